"""Board profiles (flash/RAM budgets, clock, flashing tool) as YAML data, and the fit check against them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgeq.errors import EdgeqError

BOARDS_DIR = Path(__file__).resolve().parent
KERNEL_SETS = ("reference", "cmsis-nn")
FLOAT_ABIS = ("hard", "softfp", "soft")
SIMULATORS = (None, "qemu")  # boards edgeq can run itself: the firmware under qemu-system-arm

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


class BoardError(EdgeqError):
    """An unknown board or a board profile that does not make sense."""


@dataclass(frozen=True)
class Board:
    """One board's budgets and how to flash it."""

    name: str
    core: str
    clock_hz: int
    flash_bytes: int
    ram_bytes: int
    app_allowance_bytes: int  # flash for the board's own code: bootloader, HAL, the user's application
    stack_allowance_bytes: int
    templates: tuple[str, ...]
    flash_tool: str
    flash_args: tuple[str, ...]
    zephyr_board: str | None = None
    arduino_fqbn: str | None = None
    fpu: str = "none"  # -mfpu for the firmware build; "none": no FPU
    float_abi: str = "soft"  # -mfloat-abi
    kernels: str = "reference"  # the TFLM kernel set the firmware links (reference or cmsis-nn)
    simulator: str | None = None  # "qemu": a virtual board; the run measures its firmware on it

    @property
    def has_fpu(self) -> bool:
        """True when the firmware may use hardware floating point."""
        return self.fpu != "none" and self.float_abi != "soft"

    @property
    def cpu_flags(self) -> tuple[str, ...]:
        """GCC target flags from the profile: -mcpu, -mthumb, -mfpu and -mfloat-abi for Arm cores."""
        if not self.core.startswith("cortex-m"):
            return ()
        cpu = self.core.removesuffix("f")  # "cortex-m4f" is GCC's cortex-m4 with an FPU
        fpu = (f"-mfpu={self.fpu}",) if self.fpu != "none" else ()
        return (f"-mcpu={cpu}", "-mthumb", *fpu, f"-mfloat-abi={self.float_abi}")

    @property
    def firmware_flash_budget(self) -> int:
        """Flash for edgeq's firmware (TFLM runtime, the model's kernels and decoders, the model)."""
        return self.flash_bytes - self.app_allowance_bytes

    @property
    def arena_budget(self) -> int:
        """RAM bytes left for the tensor arena after stack, heap and the rest."""
        return self.ram_bytes - self.stack_allowance_bytes


@dataclass(frozen=True)
class FitResult:
    """Whether a model fits a board, and by how much (negative margin = bytes short)."""

    fits: bool
    flash_margin: int
    ram_margin: int
    message: str


def parse_size(text: str | int) -> int:
    """Bytes in "256KB", "1MiB", "90000B" or "90000"; KB and KiB both mean 1024 (as MCU vendors use them)."""
    if isinstance(text, bool):
        raise BoardError(f"size {text!r} is not a byte count; write e.g. 256KiB, 1MiB or 90000")
    if isinstance(text, int):
        if text < 0:
            raise BoardError(f"size {text} is negative; sizes are byte counts >= 0")
        return text
    if not isinstance(text, str):
        raise BoardError(f"size {text!r} is not a byte count; write e.g. 256KiB, 1MiB or 90000")
    m = _SIZE_RE.match(text.replace("_", "").lower())
    if not m or m.group(2) not in _UNITS:
        raise BoardError(f"cannot read size {text!r}; write a whole number with B, KB/KiB, MB/MiB or GB/GiB")
    value = (
        float(m.group(1)) * _UNITS[m.group(2)] if "." in m.group(1) else int(m.group(1)) * _UNITS[m.group(2)]
    )
    if value != int(value):
        raise BoardError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def known_boards() -> list[str]:
    """Names of the board profiles shipped in deploy/boards."""
    return sorted(p.stem for p in BOARDS_DIR.glob("*.yaml"))


def _board_from(data: dict, source: Path) -> Board:
    try:
        board = Board(
            name=str(data["name"]),
            core=str(data["core"]),
            clock_hz=int(data["clock_hz"]),
            flash_bytes=parse_size(data["flash"]),
            ram_bytes=parse_size(data["ram"]),
            app_allowance_bytes=parse_size(data["app_allowance"]),
            stack_allowance_bytes=parse_size(data["stack_allowance"]),
            templates=tuple(str(t) for t in data["templates"]),
            flash_tool=str(data["flash_tool"]),
            flash_args=tuple(str(a) for a in data["flash_args"]),
            zephyr_board=data.get("zephyr_board"),
            arduino_fqbn=data.get("arduino_fqbn"),
            fpu=str(data.get("fpu", "none")),
            float_abi=str(data.get("float_abi", "soft")),
            kernels=str(data.get("kernels", "reference")),
            simulator=data.get("simulator"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BoardError(
            f"board profile {source} is incomplete or malformed ({type(e).__name__}: {e})"
        ) from e
    from deploy.firmware import FLAVOURS  # the firmware flavours edgeq can render

    bad = [t for t in board.templates if t not in FLAVOURS]
    if board.simulator not in SIMULATORS:
        raise BoardError(f"board profile {source}: simulator {board.simulator!r}; use qemu or leave it out")
    if board.kernels not in KERNEL_SETS or board.float_abi not in FLOAT_ABIS:
        raise BoardError(
            f"board profile {source}: kernels {board.kernels!r} / float_abi {board.float_abi!r}; "
            f"use one of {', '.join(KERNEL_SETS)} / {', '.join(FLOAT_ABIS)}"
        )
    from deploy.device.flash import FLASH_TOOLS  # the flashing tools edgeq can drive

    budgets_ok = board.firmware_flash_budget > 0 and board.arena_budget > 0
    if bad or board.flash_tool not in FLASH_TOOLS or not budgets_ok:
        raise BoardError(
            f"board profile {source} is inconsistent (templates {list(board.templates)}, tool "
            f"{board.flash_tool}, allowances larger than flash or RAM?)"
        )
    return board


def load_board(name: str) -> Board:
    """The board profile called name (e.g. nrf52840); BoardError listing the known ones otherwise."""
    known = known_boards()
    key = str(name).strip().lower()
    if key not in known:
        raise BoardError(f"unknown board {name!r}; known boards: {', '.join(known)}")
    path = BOARDS_DIR / f"{key}.yaml"
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise BoardError(f"board profile {path} is not a YAML mapping")
    board = _board_from(data, path)
    if board.name != key:
        raise BoardError(f"board profile {path} names itself {board.name!r}; the file name must match")
    return board


def _b(n: int) -> str:
    return f"{n:,} B"


def fit_check(board: Board, flash_bytes: int, arena_bytes: int, code_bytes: int = 0) -> FitResult:
    """Does a model of flash_bytes, with code_bytes of TFLM runtime and kernels beside it and an arena of
    arena_bytes, fit the board's budgets, and by how much."""
    if min(flash_bytes, arena_bytes, code_bytes) < 0:
        raise BoardError(f"flash ({flash_bytes}), code ({code_bytes}) and arena ({arena_bytes}) must be >= 0")
    flash_need = flash_bytes + code_bytes
    flash_margin = board.firmware_flash_budget - flash_need
    ram_margin = board.arena_budget - arena_bytes
    fits = flash_margin >= 0 and ram_margin >= 0
    flash_what = f"{_b(flash_bytes)} model + {_b(code_bytes)} code = {_b(flash_need)}" if code_bytes else ""
    parts = []
    for what, need, budget, margin, total, allowance in (
        ("flash", flash_need, board.firmware_flash_budget, flash_margin, board.flash_bytes, "app"),
        ("RAM", arena_bytes, board.arena_budget, ram_margin, board.ram_bytes, "stack/heap"),
    ):
        state = f"{_b(margin)} spare" if margin >= 0 else f"{_b(-margin)} short"
        shown = flash_what if what == "flash" and flash_what else _b(need)
        parts.append(
            f"{what} {shown} of {_b(budget)} available ({_b(total)} less the {allowance} allowance): {state}"
        )
    head = f"fits {board.name}" if fits else f"does not fit {board.name}"
    return FitResult(fits, flash_margin, ram_margin, f"{head}: " + "; ".join(parts))
