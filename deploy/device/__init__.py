"""On-device evaluation: the edgeq serial protocol, a serial link, device-eval, a virtual board, flashing."""

from __future__ import annotations

from deploy.device.protocol import (
    CorruptFrame,
    DeviceInfo,
    Frame,
    FrameDecoder,
    FrameType,
    Result,
    TensorDesc,
    crc16_ccitt,
    encode_frame,
)

__all__ = [
    "CorruptFrame",
    "DeviceInfo",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Result",
    "TensorDesc",
    "crc16_ccitt",
    "encode_frame",
]
