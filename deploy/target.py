"""The target: board, budgets, decode budget and kernel set, loaded once and handed to every stage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from deploy.boards import KERNEL_SETS, Board, BoardError, FitResult, fit_check, load_board, parse_size

if TYPE_CHECKING:
    from deploy.firmware.code_size import CodeSize

DEFAULT_DECODE_BUDGET = 16 * 1024
DECOMPRESS_TO = ("arena", "alt")


@dataclass(frozen=True)
class Target:
    """Where the model goes: a board (or none), the budgets the search must meet, how DECODE runs."""

    board: Board | None = None
    flash_budget: int | None = None  # explicit --flash-budget, tightening the board's
    ram_budget: int | None = None  # explicit --ram-budget, tightening the board's
    decode_budget: int | None = DEFAULT_DECODE_BUDGET  # bytes of decompressed weights per slice; None: none
    # no --decode-budget, board or --flash-budget: once the model is trained, settle_decode caps the
    # budget at its int8 arena
    decode_auto: bool = False
    int8_arena: int | None = None  # the arena settle_decode was given (the int8 model's, predicted)
    decompress_to: str = "arena"  # or "alt": DECODE writes into a separate memory region
    kernels: str = "reference"  # the TFLM kernel set the firmware links

    @property
    def model_flash(self) -> int | None:
        """Flash the model file may take: --flash-budget, or the board's firmware budget (an upper bound:
        fits() also takes the runtime's and kernels' code off the board's)."""
        limits = [b for b in (self.flash_budget, self.board and self.board.firmware_flash_budget) if b]
        return min(limits) if limits else None

    @property
    def model_ram(self) -> int | None:
        """Arena the model may take: the board's RAM less its stack allowance, tightened by --ram-budget."""
        limits = [b for b in (self.ram_budget, self.board and self.board.arena_budget) if b]
        return min(limits) if limits else None

    @property
    def simulator(self) -> str | None:
        """ "qemu" when the board is a virtual one the run measures its firmware on, else None."""
        return self.board.simulator if self.board is not None else None

    @property
    def searching(self) -> bool:
        """True when a budget asks for a search rather than one plan.

        A virtual board's memory is no budget: it is there to measure the firmware on, not to size it for.
        """
        if self.flash_budget is not None or self.ram_budget is not None:
            return True
        return self.board is not None and self.simulator is None

    @property
    def counts_code(self) -> bool:
        """Whether flash here means the firmware's (model + kernels' code, as a board holds it) rather than
        the model file's: every case but a --flash-budget without a board, which budgets the model alone."""
        return self.board is not None or self.flash_budget is None

    def code(self, model: bytes) -> CodeSize:
        """The firmware code the model needs beside its bytes: TFLM's runtime and its operators' kernels
        and decoders for this kernel set, as measured on a Cortex-M4 (deploy/firmware/code_size.json)."""
        from deploy.firmware.code_size import model_code

        return model_code(model, self.kernels)

    def fits(self, flash: int, arena: int, code: int = 0) -> bool:
        """True when the model's flash (plus code, against a board) and its arena are within the budgets."""
        board_ok = self.board is None or fit_check(self.board, flash, arena, code).fits
        flash_ok = self.flash_budget is None or flash <= self.flash_budget
        return board_ok and flash_ok and (self.ram_budget is None or arena <= self.ram_budget)

    @property
    def decode_unsettled(self) -> bool:
        """True while settle_decode still has a budget to cap (it needs the int8 model's arena)."""
        return self.decode_auto and self.decode_budget is not None

    def settle_decode(self, int8_arena: int) -> Target:
        """The decode budget for a model whose int8 form needs int8_arena bytes of arena.

        Without --decode-budget, a slice's decoded (LUT) or unpacked (INT4 on the reference kernels) weights
        may take no more RAM than the int8 model's whole arena, in whole KiB (at least 1 KiB): the default
        16 KiB would let a small model's one big layer double or treble its arena (digits: 7,040 B against
        its int8 model's 3,664 B; at 3 KiB, 5,168 B for 312 B more flash). Not with a flash budget or a
        board: more slices cost flash, and digits' full net then missed --flash-budget 8000B by 2,984 B.
        """
        if not self.decode_unsettled:
            return self
        cap = max(1024, int8_arena // 1024 * 1024)
        budget = min(self.decode_budget, cap)
        return replace(self, decode_budget=budget, decode_auto=False, int8_arena=int(int8_arena))

    def describe(self) -> str:
        """'model flash <= N B, firmware flash <= F B, arena <= M B', or 'no budget'."""
        parts = [
            f"model flash <= {self.flash_budget:,} B" if self.flash_budget is not None else "",
            f"firmware flash <= {self.board.firmware_flash_budget:,} B (model + {self.kernels} kernels)"
            if self.board is not None
            else "",
            f"arena <= {self.model_ram:,} B" if self.model_ram is not None else "",
        ]
        return ", ".join(p for p in parts if p) or "no budget"

    def fit(self, flash: int, arena: int, code: int = 0) -> FitResult | None:
        """The board's fit check (margins and the message the report prints); None without a board."""
        return fit_check(self.board, flash, arena, code) if self.board is not None else None


def default_decode_budget(board: Board | None) -> int:
    """16 KiB, or with a board a quarter of its free RAM (whole KiB, at least 1 KiB, at most 16 KiB).

    That is before the model is known; once it is, Target.settle_decode caps it at the int8 model's arena.
    The arena also holds activations and TFLM's own structures: a quarter of the RAM left after the
    stack allowance goes to the one decompressed slice.
    """
    if board is None:
        return DEFAULT_DECODE_BUDGET
    return max(1024, min(DEFAULT_DECODE_BUDGET, board.arena_budget // 4 // 1024 * 1024))


def load_target(
    board: str | None = None,
    flash_budget: str | int | None = None,
    ram_budget: str | int | None = None,
    decode_budget: str | int | None = None,
    decompress_to: str = "arena",
    kernels: str | None = None,
) -> Target:
    """The Target from what a user typed; BoardError with the reason for anything that does not parse."""
    b = load_board(board) if board else None
    if decompress_to not in DECOMPRESS_TO:
        raise BoardError(f"unknown decompress-to {decompress_to!r}; use arena or alt")
    kernels = kernels or (b.kernels if b else "reference")
    if kernels not in KERNEL_SETS:
        raise BoardError(f"unknown kernel set {kernels!r}; use one of {', '.join(KERNEL_SETS)}")
    if isinstance(decode_budget, str) and decode_budget.strip().lower() == "none":
        decode = None
    elif decode_budget is None:
        decode = default_decode_budget(b)
    else:
        decode = _positive(decode_budget, "decode budget")
    return Target(
        board=b,
        flash_budget=_positive(flash_budget, "flash budget") if flash_budget is not None else None,
        ram_budget=_positive(ram_budget, "RAM budget") if ram_budget is not None else None,
        decode_budget=decode,
        # a flash budget (or a board's) is what a search must meet: the cap would spend its flash on RAM
        decode_auto=decode_budget is None and b is None and flash_budget is None,
        decompress_to=decompress_to,
        kernels=kernels,
    )


def _positive(text: str | int, what: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise BoardError(f"{what} {text!r} must be a positive number of bytes, e.g. 16KiB")
    return value
