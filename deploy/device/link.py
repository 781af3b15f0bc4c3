"""A serial link to a board speaking the edgeq protocol: timeouts, retries, resync and reset detection."""

from __future__ import annotations

import time
from dataclasses import dataclass

from deploy.device.protocol import (
    TRANSPORT_ERRORS,
    CorruptFrame,
    DeviceErrorReply,
    DeviceInfo,
    FrameDecoder,
    FrameType,
    Result,
    hello_frame,
    infer_frame,
)
from edgeq.errors import EdgeqError

# A half frame that stalls this long was most likely a false start in noise (frames go out in one write).
IDLE_ABANDON_S = 0.1


class LinkError(EdgeqError):
    """The device could not be reached or kept sending frames that failed their checks."""


class DeviceTimeout(LinkError):
    """The device did not answer within the timeout, after every retry."""


class DeviceError(EdgeqError):
    """The device answered with an ERROR frame that a retry cannot fix."""

    def __init__(self, reply: DeviceErrorReply):
        super().__init__(f"device reported error {reply.code}: {reply.text}")
        self.reply = reply


class DeviceReset(EdgeqError):
    """The device rebooted (its boot nonce changed); the request in flight was lost."""

    def __init__(self, info: DeviceInfo):
        super().__init__(f"device reset (new boot nonce 0x{info.boot_nonce:08X})")
        self.info = info


@dataclass
class LinkStats:
    """What the link had to put up with."""

    requests: int = 0
    retries: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    device_transport_errors: int = 0
    duplicates: int = 0


class DeviceLink:
    """Request/response over pyserial: HELLO -> INFO, INFER -> RESULT; retries on timeouts, bad CRCs."""

    def __init__(self, port: str, baud: int = 115200, *, timeout: float = 2.0, retries: int = 3):
        self.port, self.baud, self.timeout, self.retries = port, baud, float(timeout), int(retries)
        self.decoder = FrameDecoder()
        self.stats = LinkStats()
        self.info: DeviceInfo | None = None
        self._ser = None

    def open(self) -> DeviceLink:
        """Open the serial port (LinkError with the port name when it cannot be opened)."""
        import serial

        try:
            self._ser = serial.Serial(
                self.port, self.baud, timeout=0.02, write_timeout=max(self.timeout, 1.0)
            )
        except (serial.SerialException, OSError, ValueError) as e:
            raise LinkError(f"cannot open serial port {self.port}: {e}") from e
        self._ser.reset_input_buffer()
        return self

    def close(self) -> None:
        """Close the port."""
        if self._ser is not None:
            self._ser.close()
            self._ser = None

    def __enter__(self) -> DeviceLink:
        return self.open() if self._ser is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def garbage_bytes(self) -> int:
        """Bytes skipped while resynchronising."""
        return self.decoder.garbage_bytes

    def _write(self, data: bytes) -> None:
        import serial

        try:
            self._ser.write(data)
            self._ser.flush()
        except (serial.SerialException, OSError) as e:
            raise LinkError(f"writing to {self.port} failed: {e}") from e

    def _events(self, deadline: float):
        """Decoded events until the deadline; stops yielding (returns) when it passes."""
        import serial

        last_byte = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            try:
                data = self._ser.read(max(1, self._ser.in_waiting))
            except (serial.SerialException, OSError) as e:
                raise LinkError(f"reading from {self.port} failed: {e}") from e
            if data:
                last_byte = time.monotonic()
                yield from self.decoder.feed(data)
            elif self.decoder.pending and time.monotonic() - last_byte > IDLE_ABANDON_S:
                last_byte = time.monotonic()
                yield from self.decoder.abandon()

    def _fail(self, failures: int, what: str, why: str) -> int:
        failures += 1
        if failures > self.retries:
            raise LinkError(
                f"{what}: {failures} failed attempts in a row ({why}); check the baud rate and wiring"
            )
        self.stats.retries += 1
        return failures

    def _set_info(self, info: DeviceInfo) -> None:
        self.info = info
        # A false magic byte in noise must not swallow frames: no real frame is longer than this.
        self.decoder.max_payload = max(DeviceInfo.SIZE, 8 + info.output.nbytes, 512)

    def hello(self) -> DeviceInfo:
        """HELLO -> INFO, retried; DeviceTimeout when the device never answers."""
        failures, why = 0, "no answer"
        while True:
            info = self._hello_once(self.timeout)
            if isinstance(info, DeviceInfo):
                self._set_info(info)
                return info
            why = info
            if why == "no answer":
                self.stats.timeouts += 1
            failures += 1
            if failures > self.retries:
                if why == "no answer":
                    raise DeviceTimeout(
                        f"no answer from the device on {self.port} to HELLO after {failures} tries of "
                        f"{self.timeout:g} s; is the edgeq firmware running at {self.baud} baud on this port?"
                    )
                raise LinkError(
                    f"HELLO on {self.port}: {failures} failed attempts in a row ({why}); "
                    "check the baud rate and wiring"
                )
            self.stats.retries += 1

    def _hello_once(self, timeout: float) -> DeviceInfo | str:
        self.stats.requests += 1
        self._write(hello_frame())
        for ev in self._events(time.monotonic() + timeout):
            if isinstance(ev, CorruptFrame):
                self.stats.crc_errors += 1
                if ev.type == FrameType.INFO:
                    return f"INFO with bad CRC: {ev.reason}"
                continue
            if ev.type == FrameType.INFO:
                try:
                    return DeviceInfo.unpack(ev.payload)
                except ValueError as e:
                    return f"malformed INFO: {e}"
            if ev.type == FrameType.ERROR:
                reply = DeviceErrorReply.unpack(ev.payload)
                if reply.code in TRANSPORT_ERRORS:
                    self.stats.device_transport_errors += 1
                    return f"device saw a damaged HELLO: {reply.text}"
                raise DeviceError(reply)
            # Stale RESULTs from before a retry: ignore.
            self.stats.duplicates += 1
        return "no answer"

    def infer(self, seq: int, data: bytes) -> Result:
        """INFER(seq, data) -> RESULT with that seq; DeviceReset when the device rebooted meanwhile."""
        if self.info is None:
            raise LinkError("infer before hello: the device's INFO is needed first")
        nonce = self.info.boot_nonce
        frame = infer_frame(seq, data)
        failures = 0
        while True:
            self.stats.requests += 1
            self._write(frame)
            outcome = self._await_result(seq, nonce)
            if isinstance(outcome, Result):
                return outcome
            if outcome == "timeout":
                self.stats.timeouts += 1
                # Silence may mean the board rebooted and lost the request: ask it who it is now.
                info = self._hello_once(min(self.timeout, 1.0))
                if isinstance(info, DeviceInfo) and info.boot_nonce != nonce:
                    self._set_info(info)
                    raise DeviceReset(info)
                failures = self._fail(failures, f"INFER seq {seq} on {self.port}", "timeouts")
                continue
            failures = self._fail(failures, f"INFER seq {seq} on {self.port}", outcome)

    def _await_result(self, seq: int, nonce: int) -> Result | str:
        for ev in self._events(time.monotonic() + self.timeout):
            if isinstance(ev, CorruptFrame):
                self.stats.crc_errors += 1
                return f"frame with bad CRC: {ev.reason}"
            if ev.type == FrameType.RESULT:
                try:
                    res = Result.unpack(ev.payload)
                except ValueError as e:
                    return f"malformed RESULT: {e}"
                if res.seq == seq:
                    return res
                self.stats.duplicates += 1  # an answer to an earlier attempt or sample: already counted
            elif ev.type == FrameType.ERROR:
                reply = DeviceErrorReply.unpack(ev.payload)
                if reply.code in TRANSPORT_ERRORS:
                    self.stats.device_transport_errors += 1
                    return f"device saw a damaged request: {reply.text}"
                raise DeviceError(reply)
            elif ev.type == FrameType.INFO:
                info = DeviceInfo.unpack(ev.payload)
                if info.boot_nonce != nonce:  # a board that announces itself after booting
                    self._set_info(info)
                    raise DeviceReset(info)
        return "timeout"
