"""A run measured on a virtual board: the firmware it rendered, cross-compiled and run under QEMU.

With `--board mps2-an386` the run does what a user would do with a real board (build the firmware, boot
it, stream the test split through it over serial with `edgeq device-eval`) before it writes its report,
so the report's arena and firmware flash are the 32-bit device's own figures, not the host's.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.device.qemu import QemuBoard, QemuBuild, build_firmware, check_qemu, check_toolchain, find_tree

DEFAULT_MAX_SECONDS = 900.0  # a hung firmware must not hang the run


@dataclass(frozen=True)
class DeviceRun:
    """The firmware's ELF and what it measured on the test split."""

    build: QemuBuild
    evaluation: Mapping[str, Any] = field(repr=False)  # device_report.json
    instructions_median: int | None  # guest instructions per inference (QEMU TCG plugin), None if absent

    @property
    def arena_bytes(self) -> int:
        """The arena the firmware's interpreter used on the device (MicroInterpreter::arena_used_bytes)."""
        return int(self.evaluation["arena"]["device_bytes"])


def check_simulator(kernels: str, tflm_root: str | Path | None = None) -> None:
    """Refuse before any training when the cross-compiler, QEMU or the kernel set's TFLM tree is missing."""
    check_toolchain()
    check_qemu()
    find_tree(kernels, tflm_root)


def run_on_qemu(
    folder: Path, kernels: str, tflm_root: str | Path | None = None, max_seconds: float = DEFAULT_MAX_SECONDS
) -> DeviceRun:
    """Build folder/firmware for mps2-an386 with kernels and run the whole test split on it under QEMU.

    The evaluation (device_report.json in folder) compares every output row with host TFLM.
    """
    from deploy.device.evaluate import evaluate_on_device

    build = build_firmware(folder, kernels, tflm_root)
    with QemuBoard(build, count_instructions=True, max_seconds=max_seconds) as board:
        evaluation = evaluate_on_device(board.port or "", folder)
        counts = board.instruction_counts()
    median = int(statistics.median(counts)) if counts else None
    return DeviceRun(build, evaluation, median)


__all__ = ["DeviceRun", "check_simulator", "run_on_qemu"]
