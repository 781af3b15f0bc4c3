"""`edgeq flash`: flash a built firmware with the board profile's tool (or print the exact command)."""

from __future__ import annotations

import argparse
import glob
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import EdgeqError

# The flashing tools a board profile may name: the image files each takes, best first.
FLASH_TOOLS = {
    "pyocd": (".hex", ".elf", ".bin"),
    "esptool": (".bin",),
    "picotool": (".uf2", ".elf"),
    "arduino-cli": (".hex", ".bin", ".uf2", ".elf"),
    "edgeq": (".elf",),  # a virtual board: `edgeq virtual-board --qemu` boots the ELF under QEMU
}
# Where an RP2040 in BOOTSEL mode shows up as a USB drive (UF2 copy needs no picotool).
UF2_VOLUMES = ("/media/*/RPI-RP2", "/run/media/*/RPI-RP2", "/media/RPI-RP2", "/Volumes/RPI-RP2")


class FlashError(EdgeqError):
    """No image to flash, a missing port, or a flashing tool that failed."""


@dataclass(frozen=True)
class FlashPlan:
    """The command that flashes the board, and whether it can run as is."""

    board: str
    tool: str
    argv: list[str]
    image: Path | None
    tool_path: str | None
    missing: list[str]

    @property
    def command(self) -> str:
        """The command line, quoted for a POSIX shell."""
        return shlex.join(self.argv)


def find_image(build: Path, tool: str) -> Path | None:
    """The newest firmware image under build/firmware of a kind the tool takes (None when there is none)."""
    exts = FLASH_TOOLS.get(tool, (".hex", ".elf", ".bin", ".uf2"))
    root = build / "firmware"
    found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts] if root.is_dir() else []
    # Prefer the tool's favourite format, then the newest build.
    found.sort(key=lambda p: (exts.index(p.suffix.lower()), -p.stat().st_mtime))
    return found[0] if found else None


def plan_flash(
    board_name: str, build: str | Path, *, port: str | None = None, image: str | Path | None = None
):
    """Resolve the board's tool and arguments into a FlashPlan (placeholders where something is missing)."""
    from deploy.artifacts import check_folder
    from deploy.boards import load_board

    board = load_board(board_name)
    build = Path(build)
    check_folder(build)  # a killed run's half-moved folder may pair one run's firmware with another's model
    img = Path(image) if image else find_image(build, board.flash_tool)
    missing = []
    if img is None and any("{image}" in a for a in board.flash_args):
        missing.append(
            f"a firmware image ({', '.join(FLASH_TOOLS.get(board.flash_tool, ()))}) "
            f"under {build / 'firmware'}"
        )
    values = {
        "image": str(img) if img else f"{build / 'firmware'}/<built image>",
        "port": port or "PORT",
        "fqbn": board.arduino_fqbn or "FQBN",
        "build": str(build),
        "firmware": str(build / "firmware"),
    }
    if port is None and any("{port}" in a for a in board.flash_args):
        missing.append("--port")
    try:
        args = [a.format(**values) for a in board.flash_args]
    except (KeyError, IndexError) as e:
        raise FlashError(f"board profile {board.name}: flash_args use an unknown placeholder {e}") from e
    return FlashPlan(
        board.name, board.flash_tool, [board.flash_tool, *args], img, shutil.which(board.flash_tool), missing
    )


def _uf2_volume() -> Path | None:
    for pattern in UF2_VOLUMES:
        for hit in glob.glob(pattern):
            return Path(hit)
    return None


def flash(plan: FlashPlan) -> int:
    """Run the plan; FlashError with the exact command when the tool is absent or something is missing."""
    if plan.missing:
        raise FlashError(
            f"cannot flash {plan.board}: need {' and '.join(plan.missing)}; then run: {plan.command}"
        )
    if plan.tool_path is None:
        if (
            plan.tool == "picotool"
            and plan.image
            and plan.image.suffix.lower() == ".uf2"
            and (vol := _uf2_volume())
        ):
            shutil.copyfile(plan.image, vol / plan.image.name)  # the bootloader flashes and reboots
            return 0
        raise FlashError(f"{plan.tool} is not installed; install it and run: {plan.command}")
    done = subprocess.run(plan.argv, check=False)
    if done.returncode != 0:
        raise FlashError(f"{plan.tool} failed with exit status {done.returncode}: {plan.command}")
    return 0


def main_flash(argv: list[str] | None = None) -> int:
    """`edgeq flash --board NAME --build OUT_DIR [--port P] [--image F] [--dry-run]`: 0, or 2 and one line."""
    p = argparse.ArgumentParser(
        prog="edgeq flash", description="flash a built firmware with the board's tool"
    )
    p.add_argument("--board", required=True, help="board profile name (deploy/boards/*.yaml)")
    p.add_argument(
        "--build", required=True, help="output folder of `edgeq run` (firmware built under firmware/)"
    )
    p.add_argument("--port", default=None, help="serial port, for tools that need one (esptool)")
    p.add_argument(
        "--image", default=None, help="firmware image to flash (default: newest under BUILD/firmware)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args = p.parse_args(argv)
    try:
        plan = plan_flash(args.board, args.build, port=args.port, image=args.image)
        if args.dry_run:
            print(plan.command)
            return 0
        flash(plan)
    except EdgeqError as e:
        print(f"edgeq: error: {e}", file=sys.stderr)
        return 2
    print(f"flashed {plan.board} with {plan.image}")
    return 0
