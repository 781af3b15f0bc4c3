"""The edgeq serial protocol: CRC, framing, resync, and the C++ firmware side over a real pty."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import tty
import zlib
from pathlib import Path

import numpy as np
import pytest

from deploy.device.link import DeviceError, DeviceLink
from deploy.device.protocol import (
    FLAG_CYCLES_ARE_HOST_NS,
    MAGIC,
    CorruptFrame,
    DeviceErrorReply,
    DeviceInfo,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Result,
    TensorDesc,
    crc16_ccitt,
    encode_frame,
    hello_frame,
    infer_frame,
)

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "firmware_templates" / "common"


def test_crc16_ccitt_false_known_vector():
    assert crc16_ccitt(b"123456789") == 0x29B1
    assert crc16_ccitt(b"") == 0xFFFF


def test_frame_layout_is_little_endian_with_crc_over_type_length_payload():
    f = encode_frame(FrameType.INFER, b"\x01\x02\x03")
    assert f[0] == MAGIC and f[1] == FrameType.INFER and f[2:4] == b"\x03\x00" and f[4:7] == b"\x01\x02\x03"
    assert struct.unpack("<H", f[7:])[0] == crc16_ccitt(f[1:7])


def test_decoder_byte_by_byte_and_in_one_chunk():
    frames = [
        encode_frame(FrameType.HELLO),
        infer_frame(7, bytes(range(64))),
        encode_frame(FrameType.ERROR, b"x"),
    ]
    stream = b"".join(frames)
    d = FrameDecoder()
    one = [ev for b in stream for ev in d.feed(bytes([b]))]
    assert one == FrameDecoder().feed(stream)
    assert [e.type for e in one] == [FrameType.HELLO, FrameType.INFER, FrameType.ERROR]
    assert one[1].payload == struct.pack("<I", 7) + bytes(range(64))


def test_decoder_resyncs_on_garbage_and_reports_bad_crc():
    good = encode_frame(FrameType.RESULT, Result(3, 99, b"\x05" * 10).pack())
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    # Noise with false magic bytes: an absurd length, an unknown type, a magic right before a real frame.
    garbage = (
        b"boot\r\n" + bytes([MAGIC, FrameType.RESULT, 0xFF, 0xFF]) + bytes([MAGIC, 0x33]) + bytes([MAGIC])
    )
    d = FrameDecoder(max_payload=256)
    events = d.feed(garbage + good + bytes(bad) + b"\x00\x11" + good)
    assert [type(e) for e in events] == [Frame, CorruptFrame, Frame]
    assert Result.unpack(events[0].payload) == Result(3, 99, b"\x05" * 10)
    assert d.garbage_bytes >= len(garbage) and d.pending == 0


def test_decoder_false_start_that_swallows_a_frame_is_recovered_by_abandon():
    good = encode_frame(FrameType.INFO, b"\x01" * 20)
    d = FrameDecoder(max_payload=256)
    # A false magic with a plausible length (200) eats the real frame while waiting for more bytes.
    assert d.feed(bytes([MAGIC, FrameType.RESULT, 200, 0]) + good) == []
    events = d.abandon()
    assert events == [Frame(FrameType.INFO, b"\x01" * 20)]


def test_payload_records_round_trip():
    t_in = TensorDesc(np.dtype("int8"), (1, 8, 8, 1), 0.00390625, -128)
    t_out = TensorDesc(np.dtype("int8"), (1, 10), 0.125, 3)
    info = DeviceInfo(1234, 0xDEADBEEF, 5000, 64_000_000, 0x01020304, FLAG_CYCLES_ARE_HOST_NS, t_in, t_out)
    assert len(info.pack()) == DeviceInfo.SIZE == 100
    assert DeviceInfo.unpack(info.pack()) == info
    assert DeviceErrorReply.unpack(DeviceErrorReply(2, 9, "too long").pack()) == DeviceErrorReply(
        2, 9, "too long"
    )
    assert t_in.nbytes == 64


# ---- the C++ firmware side, through the host harness over a pseudo-terminal ----


def _mirror(x: np.ndarray, n_out: int = 10) -> np.ndarray:
    """What tests/device_host_harness.cc's infer computes: int8 wrap of per-(i mod n_out) sums."""
    flat = x.reshape(-1).astype(np.int64)
    sums = np.array([flat[j::n_out].sum() for j in range(n_out)])
    return ((sums + 128) % 256 - 128).astype(np.int8)


@pytest.fixture(scope="module")
def harness_bin(tmp_path_factory) -> Path:
    """tests/device_host_harness.cc + edgeq_protocol.cc compiled with g++ -std=c++11 (warnings are errors)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    out = tmp_path_factory.mktemp("harness") / "device_host_harness"
    cmd = [gxx, "-std=c++11", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{COMMON}"]
    cmd += [str(ROOT / "tests" / "device_host_harness.cc"), str(COMMON / "edgeq_protocol.cc"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture
def harness(harness_bin, tmp_path):
    """The harness running on a pty's master side; yields (slave path, model bytes, nonce)."""
    model = np.random.default_rng(1).integers(0, 256, 3001, dtype=np.uint8).tobytes()
    (tmp_path / "m.bin").write_bytes(model)
    master, slave = os.openpty()
    tty.setraw(slave)
    nonce = 0x1234ABCD
    proc = subprocess.Popen(
        [str(harness_bin), str(tmp_path / "m.bin"), hex(nonce)], stdin=master, stdout=master
    )
    try:
        yield os.ttyname(slave), model, nonce
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)


def test_cpp_device_info_and_results_round_trip(harness):
    port, model, nonce = harness
    with DeviceLink(port, timeout=2.0) as link:
        info = link.hello()
        assert (info.model_len, info.model_crc32, info.boot_nonce) == (len(model), zlib.crc32(model), nonce)
        assert info.arena_used == 12345 and info.clock_hz == 1_000_000_000 and info.cycles_are_host_ns
        assert info.input == TensorDesc(np.dtype("int8"), (1, 8, 8, 1), 0.00390625, -128)
        assert info.output == TensorDesc(np.dtype("int8"), (1, 10), 0.125, 3)
        assert info.max_payload == 4096 and info.version == 1
        rng = np.random.default_rng(0)
        for seq in (0, 1, 2, 0xFFFFFFFE, 41):
            x = rng.integers(-128, 128, 64, dtype=np.int8)
            res = link.infer(seq, x.tobytes())
            assert res.seq == seq
            assert np.array_equal(np.frombuffer(res.output, np.int8), _mirror(x))
            assert 0 < res.cycles < 1_000_000_000  # measured by the protocol around the callback
        assert link.stats.retries == 0 and link.stats.crc_errors == 0


def _read_frames(fd: int, want: int, timeout: float = 2.0) -> list:
    d, events, deadline = FrameDecoder(), [], time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        try:
            events += d.feed(os.read(fd, 4096))
        except BlockingIOError:
            time.sleep(0.005)
    return events


def test_cpp_device_rejects_bad_crc_and_oversize_and_resyncs(harness):
    port, model, _ = harness
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        bad = bytearray(hello_frame())
        bad[-1] ^= 0x01
        os.write(fd, bytes(bad))
        (ev,) = _read_frames(fd, 1)
        assert ev.type == FrameType.ERROR and DeviceErrorReply.unpack(ev.payload).code == ErrorCode.BAD_CRC

        os.write(fd, bytes([MAGIC, FrameType.INFER, 0xFF, 0xFF]))  # longer than EDGEQ_MAX_PAYLOAD
        (ev,) = _read_frames(fd, 1)
        assert DeviceErrorReply.unpack(ev.payload).code == ErrorCode.TOO_LONG

        # Garbage with false starts, then a real HELLO: the device resynchronises and answers INFO.
        os.write(fd, b"\x00noise" + bytes([MAGIC, 0x42, MAGIC]) + hello_frame())
        events = _read_frames(fd, 1)
        assert events and events[-1].type == FrameType.INFO
        assert DeviceInfo.unpack(events[-1].payload).model_len == len(model)
    finally:
        os.close(fd)


def test_cpp_device_reports_wrong_input_length(harness):
    port, _, _ = harness
    with DeviceLink(port, timeout=2.0) as link:
        link.hello()
        with pytest.raises(DeviceError, match="input bytes expected: 64") as e:
            link.infer(5, b"\x01" * 63)
        assert e.value.reply.code == ErrorCode.BAD_INPUT_LENGTH and e.value.reply.seq == 5


def test_protocol_compiles_for_cortex_m4():
    armgxx = shutil.which("arm-none-eabi-g++")
    if armgxx is None:
        pytest.skip("arm-none-eabi-g++ is not installed")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgeq_protocol_m4_{os.getpid()}.o"
    cmd = [armgxx, "-std=c++11", "-mcpu=cortex-m4", "-mthumb", "-Os", "-Wall", "-Wextra", "-Werror"]
    cmd += ["-fno-exceptions", "-fno-rtti", "-c", str(COMMON / "edgeq_protocol.cc"), "-o", str(out)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        assert out.stat().st_size > 0
    finally:
        out.unlink(missing_ok=True)
