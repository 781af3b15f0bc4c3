"""The edgeq serial protocol (deploy/device/PROTOCOL.md): frames, CRC-16/CCITT-FALSE, payloads, decoder."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAGIC = 0xA5
PROTOCOL_VERSION = 1
MAX_DIMS = 6
FRAME_OVERHEAD = 6  # magic, type, u16 length, u16 CRC
DEFAULT_MAX_PAYLOAD = 4096  # EDGEQ_MAX_PAYLOAD's default in edgeq_protocol.h
NO_SEQ = 0xFFFFFFFF

FLAG_CYCLES_ARE_HOST_NS = 0x1
FLAG_NO_CYCLE_COUNTER = 0x2


class FrameType(IntEnum):
    """Frame types: host -> device below 0x80, device -> host from 0x80."""

    HELLO = 0x01
    INFER = 0x02
    INFO = 0x81
    RESULT = 0x82
    ERROR = 0xEE


class ErrorCode(IntEnum):
    """Codes of the device's ERROR frames."""

    BAD_CRC = 1
    TOO_LONG = 2
    BAD_INPUT_LENGTH = 3
    INFER_FAILED = 4


# Errors about the transport (the request never arrived whole): the host resends.
TRANSPORT_ERRORS = frozenset({ErrorCode.BAD_CRC, ErrorCode.TOO_LONG})

# TFLite TensorType numbers <-> numpy dtypes (little-endian on the wire).
_DTYPES = {0: "<f4", 1: "<f2", 2: "<i4", 3: "u1", 4: "<i8", 6: "?", 7: "<i2", 9: "i1"}
_CODES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


def dtype_from_code(code: int) -> np.dtype:
    """numpy dtype of a TFLite TensorType number."""
    if code not in _DTYPES:
        raise ValueError(f"unknown tensor dtype code {code}")
    return np.dtype(_DTYPES[code])


def code_from_dtype(dtype) -> int:
    """TFLite TensorType number of a numpy dtype."""
    key = np.dtype(dtype).newbyteorder("<").str if np.dtype(dtype).itemsize > 1 else np.dtype(dtype).str
    if key not in _CODES:
        raise ValueError(f"dtype {np.dtype(dtype)} has no protocol code")
    return _CODES[key]


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16_ccitt(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, xorout 0); b"123456789" -> 0x29B1."""
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    """One whole frame: magic, type, u16 length, payload, CRC-16 over type+length+payload (all LE)."""
    if len(payload) > 0xFFFF:
        raise ValueError(f"payload of {len(payload)} bytes does not fit the 16-bit length field")
    body = struct.pack("<BH", int(ftype), len(payload)) + bytes(payload)
    return bytes([MAGIC]) + body + struct.pack("<H", crc16_ccitt(body))


@dataclass(frozen=True)
class Frame:
    """A frame whose CRC checked out."""

    type: int
    payload: bytes


@dataclass(frozen=True)
class CorruptFrame:
    """A frame whose header was plausible but whose CRC did not match (or that was cut off)."""

    type: int
    length: int
    reason: str


@dataclass
class FrameDecoder:
    """Byte-stream decoder that resynchronises on garbage by rescanning for the next magic byte."""

    max_payload: int = DEFAULT_MAX_PAYLOAD
    types: frozenset[int] = frozenset(int(t) for t in FrameType)
    garbage_bytes: int = 0
    _buf: bytearray = field(default_factory=bytearray)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete candidate frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | CorruptFrame]:
        """Add received bytes; return the frames (and corrupt frames) they completed, in order."""
        events: list[Frame | CorruptFrame] = []
        for b in data:
            if not self._buf and b != MAGIC:
                self.garbage_bytes += 1
                continue
            self._buf.append(b)
            self._process(events)
        return events

    def abandon(self) -> list[Frame | CorruptFrame]:
        """Give up on a stalled candidate (a false start in noise) and rescan what it swallowed."""
        events: list[Frame | CorruptFrame] = []
        if self._buf:
            self._drop()
            self._process(events)
        return events

    def _drop(self) -> None:
        # Restart at the next magic byte after the false start: a real frame may begin inside it.
        k = 1
        while k < len(self._buf) and self._buf[k] != MAGIC:
            k += 1
        self.garbage_bytes += k
        del self._buf[:k]

    def _process(self, events: list) -> None:
        while self._buf:
            buf = self._buf
            if len(buf) < 2:
                return
            if buf[1] not in self.types:
                self._drop()
                continue
            if len(buf) < 4:
                return
            length = buf[2] | (buf[3] << 8)
            if length > self.max_payload:
                self._drop()
                continue
            if len(buf) < length + FRAME_OVERHEAD:
                return
            body = bytes(buf[1 : 4 + length])
            got = buf[4 + length] | (buf[5 + length] << 8)
            if crc16_ccitt(body) != got:
                events.append(
                    CorruptFrame(buf[1], length, f"CRC-16 0x{got:04X}, computed 0x{crc16_ccitt(body):04X}")
                )
                self._drop()
                continue
            events.append(Frame(buf[1], body[3:]))
            del buf[: length + FRAME_OVERHEAD]


@dataclass(frozen=True)
class TensorDesc:
    """Shape, dtype and per-tensor affine quantization of a model input or output, as INFO carries them."""

    dtype: np.dtype
    shape: tuple[int, ...]
    scale: float
    zero_point: int

    SIZE = 12 + 4 * MAX_DIMS

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies on the wire."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def pack(self) -> bytes:
        """The 36-byte tensor record."""
        if len(self.shape) > MAX_DIMS:
            raise ValueError(f"tensor of rank {len(self.shape)} exceeds the protocol's {MAX_DIMS} dimensions")
        dims = list(self.shape) + [0] * (MAX_DIMS - len(self.shape))
        return struct.pack(
            f"<BBH{MAX_DIMS}Ifi",
            code_from_dtype(self.dtype),
            len(self.shape),
            0,
            *dims,
            self.scale,
            self.zero_point,
        )

    @classmethod
    def unpack(cls, data: bytes) -> TensorDesc:
        """Parse a 36-byte tensor record."""
        code, ndim, _, *rest = struct.unpack(f"<BBH{MAX_DIMS}Ifi", data[: cls.SIZE])
        dims, scale, zp = rest[:MAX_DIMS], rest[MAX_DIMS], rest[MAX_DIMS + 1]
        if ndim > MAX_DIMS:
            raise ValueError(f"tensor record claims {ndim} dimensions (max {MAX_DIMS})")
        return cls(dtype_from_code(code), tuple(int(d) for d in dims[:ndim]), float(scale), int(zp))


@dataclass(frozen=True)
class DeviceInfo:
    """The INFO payload: which model the device holds, its arena, clock and boot nonce, its tensors."""

    model_len: int
    model_crc32: int
    arena_used: int
    clock_hz: int
    boot_nonce: int
    flags: int
    input: TensorDesc
    output: TensorDesc
    version: int = PROTOCOL_VERSION
    max_payload: int = DEFAULT_MAX_PAYLOAD

    HEAD = struct.Struct("<BBHIIIIII")
    SIZE = HEAD.size + 2 * TensorDesc.SIZE

    @property
    def cycles_are_host_ns(self) -> bool:
        """True for a virtual board: "cycles" are host nanoseconds, not MCU cycles."""
        return bool(self.flags & FLAG_CYCLES_ARE_HOST_NS)

    def pack(self) -> bytes:
        """The 100-byte INFO payload."""
        head = self.HEAD.pack(
            self.version,
            0,
            self.max_payload,
            self.model_len,
            self.model_crc32,
            self.arena_used,
            self.clock_hz,
            self.boot_nonce,
            self.flags,
        )
        return head + self.input.pack() + self.output.pack()

    @classmethod
    def unpack(cls, data: bytes) -> DeviceInfo:
        """Parse an INFO payload (ValueError when it is too short)."""
        if len(data) < cls.SIZE:
            raise ValueError(f"INFO payload of {len(data)} bytes, expected {cls.SIZE}")
        ver, _, maxp, mlen, mcrc, arena, clock, nonce, flags = cls.HEAD.unpack(data[: cls.HEAD.size])
        t = cls.HEAD.size
        return cls(
            model_len=mlen,
            model_crc32=mcrc,
            arena_used=arena,
            clock_hz=clock,
            boot_nonce=nonce,
            flags=flags,
            input=TensorDesc.unpack(data[t : t + TensorDesc.SIZE]),
            output=TensorDesc.unpack(data[t + TensorDesc.SIZE : t + 2 * TensorDesc.SIZE]),
            version=ver,
            max_payload=maxp,
        )


@dataclass(frozen=True)
class Result:
    """The RESULT payload: sequence number, cycles of the invoke, raw output tensor bytes."""

    seq: int
    cycles: int
    output: bytes

    def pack(self) -> bytes:
        """u32 seq, u32 cycles, output bytes."""
        return struct.pack("<II", self.seq, self.cycles & 0xFFFFFFFF) + self.output

    @classmethod
    def unpack(cls, data: bytes) -> Result:
        """Parse a RESULT payload."""
        if len(data) < 8:
            raise ValueError(f"RESULT payload of {len(data)} bytes, expected at least 8")
        seq, cycles = struct.unpack("<II", data[:8])
        return cls(seq, cycles, bytes(data[8:]))


@dataclass(frozen=True)
class DeviceErrorReply:
    """The ERROR payload: u16 code, u32 seq (0xFFFFFFFF when none), ASCII text."""

    code: int
    seq: int
    text: str

    def pack(self) -> bytes:
        """u16 code, u32 seq, text."""
        return struct.pack("<HI", self.code, self.seq) + self.text.encode("ascii", "replace")

    @classmethod
    def unpack(cls, data: bytes) -> DeviceErrorReply:
        """Parse an ERROR payload."""
        if len(data) < 6:
            raise ValueError(f"ERROR payload of {len(data)} bytes, expected at least 6")
        code, seq = struct.unpack("<HI", data[:6])
        return cls(code, seq, bytes(data[6:]).decode("ascii", "replace"))


def hello_frame() -> bytes:
    """HELLO (empty payload)."""
    return encode_frame(FrameType.HELLO)


def infer_frame(seq: int, data: bytes) -> bytes:
    """INFER: u32 seq, then the input tensor's bytes."""
    return encode_frame(FrameType.INFER, struct.pack("<I", seq & 0xFFFFFFFF) + bytes(data))
