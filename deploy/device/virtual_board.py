"""A virtual board on a pseudo-terminal: answers the edgeq protocol by running model.tflite in host TFLM."""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import select
import signal
import sys
import threading
import time
import tty
import zlib
from pathlib import Path

import numpy as np

from deploy.device.protocol import (
    FLAG_CYCLES_ARE_HOST_NS,
    MAGIC,
    NO_SEQ,
    DeviceErrorReply,
    DeviceInfo,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Result,
    TensorDesc,
    encode_frame,
)
from edgeq.errors import EdgeqError

FAULTS = ("silent", "bad-crc", "bad-crc-once", "garbage", "reset", "other-model")
BOOT_BANNER = b"\r\nedgeq virtual board booting...\r\n"


def _garbage(rng: random.Random) -> bytes:
    """Noise a real line shows: random bytes, a false magic with an absurd length, a lone magic byte."""
    noise = bytes(rng.choice([b for b in range(256) if b != MAGIC]) for _ in range(rng.randint(3, 12)))
    return noise + bytes([MAGIC, FrameType.RESULT, 0xFF, 0xFF]) + b"\x00\x13" + bytes([MAGIC])


class VirtualBoard:
    """A board simulated in a thread behind a pty; fault=None behaves, else one of FAULTS."""

    def __init__(
        self, build_dir: str | Path, fault: str | None = None, *, reset_after: int = 5, seed: int = 0
    ):
        if fault is not None and fault not in FAULTS:
            raise EdgeqError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
        self.build_dir = Path(build_dir)
        self.fault = fault
        self.reset_after = int(reset_after)
        self.boots = 0
        self.requests = 0
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._master = self._slave = -1
        self.port: str | None = None
        self._corrupted = 0
        self._results = 0
        self._reset_done = False

    def start(self) -> str:
        """Load the model, open the pty, start answering; return the port path (e.g. /dev/pts/5)."""
        from deploy.measure.tflm import arena_bytes, io_quant, tflm_interpreter

        path = self.build_dir / "model.tflite"
        if not path.is_file():
            raise EdgeqError(f"{path} not found; --build must name an `edgeq run` output folder")
        self.model = path.read_bytes()
        from deploy.verify import verify_tflite

        verify_tflite(self.model, str(path))  # a malformed file must not reach TFLM in this process
        self.interp = tflm_interpreter(self.model)
        qi, qo = io_quant(self.interp, "input"), io_quant(self.interp, "output")
        # Measured before the thread starts: it briefly redirects the process's stdout/stderr.
        arena = arena_bytes(self.model)
        self._in_desc = TensorDesc(qi.dtype, qi.shape, qi.scale, qi.zero_point)
        out_desc = TensorDesc(qo.dtype, qo.shape, qo.scale, qo.zero_point)
        model_len, crc = len(self.model), zlib.crc32(self.model)
        if self.fault == "other-model":
            model_len, crc = model_len + 1024, crc ^ 0x5A5A5A5A
        self.info = DeviceInfo(
            model_len=model_len,
            model_crc32=crc,
            arena_used=arena,
            clock_hz=1_000_000_000,
            boot_nonce=self._new_nonce(),
            flags=FLAG_CYCLES_ARE_HOST_NS,
            input=self._in_desc,
            output=out_desc,
            max_payload=min(0xFFFF, max(4096, 4 + self._in_desc.nbytes, 8 + out_desc.nbytes)),
        )
        self._master, self._slave = os.openpty()
        # Raw mode before any client opens it: no echo, no CR/LF translation of binary frames.
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self._thread = threading.Thread(target=self._serve, name="edgeq-virtual-board", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop answering and close the pty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def __enter__(self) -> VirtualBoard:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _new_nonce(self) -> int:
        self.boots += 1
        return (self._rng.getrandbits(32) & 0xFFFFFF00) | (self.boots & 0xFF)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._master, view)
            view = view[n:]

    def _send(self, ftype: int, payload: bytes, *, corrupt: bool = False) -> None:
        frame = bytearray(encode_frame(ftype, payload))
        if corrupt:
            frame[-1] ^= 0x5A
        if self.fault == "garbage":
            frame = bytearray(_garbage(self._rng)) + frame
        self._write(bytes(frame))

    def _serve(self) -> None:
        decoder = FrameDecoder(
            max_payload=self.info.max_payload, types=frozenset({FrameType.HELLO, FrameType.INFER})
        )
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self._master, 4096)
            except OSError:  # no client has the slave open right now
                time.sleep(0.01)
                continue
            for ev in decoder.feed(data):
                if self.fault == "silent":
                    continue
                if not isinstance(ev, Frame):
                    self._send(
                        FrameType.ERROR, DeviceErrorReply(ErrorCode.BAD_CRC, NO_SEQ, "CRC-16 mismatch").pack()
                    )
                    continue
                self.requests += 1
                if ev.type == FrameType.HELLO:
                    self._send(FrameType.INFO, self.info.pack())
                else:
                    self._infer(ev.payload)

    def _infer(self, payload: bytes) -> None:
        seq = int.from_bytes(payload[:4], "little") if len(payload) >= 4 else NO_SEQ
        data = payload[4:]
        if len(payload) < 4 or len(data) != self._in_desc.nbytes:
            reply = DeviceErrorReply(
                ErrorCode.BAD_INPUT_LENGTH, seq, f"input bytes expected: {self._in_desc.nbytes}"
            )
            self._send(FrameType.ERROR, reply.pack())
            return
        if self.fault == "reset" and not self._reset_done and self._results >= self.reset_after:
            # Reboot mid-run: the request is lost, the nonce changes, the boot banner goes out on the line.
            self._reset_done = True
            self.info = dataclasses.replace(self.info, boot_nonce=self._new_nonce())
            self._write(BOOT_BANNER)
            return
        x = np.frombuffer(data, dtype=self._in_desc.dtype).reshape(self._in_desc.shape)
        t0 = time.perf_counter_ns()
        self.interp.set_input(x, 0)
        self.interp.invoke()
        out = np.asarray(self.interp.get_output(0))
        ns = time.perf_counter_ns() - t0
        corrupt = self.fault == "bad-crc" or (self.fault == "bad-crc-once" and self._corrupted == 0)
        self._corrupted += int(corrupt)
        self._results += 1
        raw = np.ascontiguousarray(out, dtype=out.dtype.newbyteorder("<")).tobytes()
        self._send(FrameType.RESULT, Result(seq, max(1, ns), raw).pack(), corrupt=corrupt)


def main_virtual_board(argv: list[str] | None = None) -> int:
    """`edgeq virtual-board --build OUT_DIR [--fault KIND]`: serve until interrupted."""
    p = argparse.ArgumentParser(
        prog="edgeq virtual-board", description="a pseudo-terminal board that runs model.tflite in host TFLM"
    )
    p.add_argument("--build", required=True, help="output folder of `edgeq run` (holds model.tflite)")
    p.add_argument("--fault", choices=FAULTS, default=None, help="misbehave on purpose, to test device-eval")
    p.add_argument("--reset-after", type=int, default=5, help="with --fault reset: results before the reset")
    args = p.parse_args(argv)
    board = VirtualBoard(args.build, args.fault, reset_after=args.reset_after)
    try:
        port = board.start()
    except EdgeqError as e:
        print(f"edgeq: error: {e}", file=sys.stderr)
        return 2
    print(
        f"virtual board on {port} (model {board.build_dir / 'model.tflite'}; cycles are host ns"
        f"{'; fault ' + args.fault if args.fault else ''}); Ctrl-C to stop",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
    return 0
