"""The flash the firmware's code takes beside the model: TFLM's runtime and each operator's kernel.

``code_size.json`` beside this file holds, per TFLM kernel set (reference, cmsis-nn), what
benchmarks/code_size.py measured on the linked Cortex-M4F firmware (QEMU mps2-an386): ``runtime``, the
firmware with an empty op resolver less the model array, and per operator what registering it alone adds.
Helpers that several operators pull in (kernel_util, the quantization helpers, libgcc's double arithmetic)
are linked once, so the table also splits each operator into its own bytes and the pieces it shares
(read from the linker maps): a firmware's flash is about ``firmware_code(kernels, ops).total`` + the model's
bytes (within 0.3% of the linked ELF for the digits models and for all 32 measured operators at once,
benchmarks/results/code_size.md; summing each operator's bytes alone overshoots by 13-17%). Operators go
by the names ``deploy.flatbuffer.describe(model).ops`` gives them: builtins as ``CONV_2D``, the DECODE
custom op as ``TFLM_DECODE`` (its entry holds every decoder, LUT, PRUNE and HUFFMAN, since the kernel links
them all whatever the model uses).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import EdgeqError

DATA = Path(__file__).resolve().with_name("code_size.json")
DECODE_OP = "TFLM_DECODE"  # deploy.flatbuffer.DECODE_OP, spelled out: this module loads without tflite_micro


class CodeSizeError(EdgeqError):
    """No measured code sizes for the kernel set asked for, or a code-size table that cannot be read."""


@dataclass(frozen=True)
class CodeSize:
    """The code one firmware links for its operators: bytes of TFLM's runtime, of each operator, and of the
    helpers two or more of them share (counted once, in shared, not in any operator's bytes).

    per_op: each operator's own code plus the helpers no other of these operators uses (alone, an operator
    comes out at about its measured bytes: a builtin one a little over, the resolver's code being fitted on
    firmware of several operators). unknown: operators the table has no figure for; each is charged as the
    kernel set's largest measured operator (an estimate, which the report should say).
    """

    kernels: str
    runtime: int
    per_op: tuple[tuple[str, int], ...]  # (operator, bytes) in the order asked, each once
    unknown: tuple[str, ...] = ()
    shared: int = 0

    @property
    def ops_bytes(self) -> int:
        """Bytes of the operators' kernels (and decoders) together."""
        return sum(n for _, n in self.per_op)

    @property
    def total(self) -> int:
        """Runtime + operators + their shared helpers: the firmware's flash less the model."""
        return self.runtime + self.ops_bytes + self.shared

    @property
    def estimated(self) -> bool:
        """True when some operator's figure is a stand-in (see unknown)."""
        return bool(self.unknown)


@functools.cache
def _table(path: Path = DATA) -> dict:
    """The measured table, read once per process and checked for the shape firmware_code relies on."""
    try:
        data = json.loads(path.read_text())
        kernels = data["kernels"]
        for k, entry in kernels.items():
            _check_entry(k, entry)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CodeSizeError(
            f"cannot read the code-size table {path}: {e}; write it again with "
            "`python benchmarks/code_size.py`"
        ) from e
    return data


def _check_entry(kernels: str, entry: dict) -> None:
    runtime, ops, own = entry["runtime"], entry["ops"], entry["own"]
    if not (isinstance(runtime, int) and runtime > 0 and ops):
        raise ValueError(f"kernels {kernels}: runtime {runtime!r}, {len(ops)} operators")
    if not all(isinstance(n, int) and n >= 0 for n in ops.values()):
        raise ValueError(f"kernels {kernels}: an operator's bytes are not a count")
    if set(own) != set(ops) or not all(isinstance(n, int) for n in own.values()):
        raise ValueError(f"kernels {kernels}: own does not match ops")
    for piece in entry["shared"]:
        if not (set(piece["ops"]) <= set(ops) and isinstance(piece["bytes"], int) and piece["bytes"] > 0):
            raise ValueError(f"kernels {kernels}: shared piece {piece!r}")


def _entry(kernels: str) -> dict:
    table = _table()["kernels"]
    if kernels not in table:
        raise CodeSizeError(
            f"no measured code sizes for kernels {kernels!r}; measured: {', '.join(table)} "
            "(deploy/firmware/code_size.json, from benchmarks/code_size.py)"
        )
    return table[kernels]


def kernel_sets() -> tuple[str, ...]:
    """The kernel sets the table has figures for."""
    return tuple(_table()["kernels"])


def provenance() -> dict:
    """Where the figures come from: TFLM commit, toolchain, flags, date, edgeq commit, command."""
    return dict(_table()["provenance"])


def op_bytes(kernels: str) -> dict[str, int]:
    """Every measured operator's bytes for kernels (a copy)."""
    return dict(_entry(kernels)["ops"])


def firmware_code(kernels: str, ops: Iterable[str]) -> CodeSize:
    """The code a firmware of these operators links with kernels: the runtime plus each distinct operator.

    An operator the table lacks is charged as the largest measured one and listed in ``unknown``.
    CodeSizeError when kernels has no figures.
    """
    return code_from_entry(kernels, _entry(kernels), ops)


def code_from_entry(kernels: str, entry: dict, ops: Iterable[str]) -> CodeSize:
    """firmware_code on one kernel set's table entry (benchmarks/code_size.py checks its own with it)."""
    measured: dict[str, int] = entry["ops"]
    largest = max(measured.values())
    wanted = [ops] if isinstance(ops, str) else list(ops)  # one name is one operator, not its letters
    names = list(dict.fromkeys(wanted))  # the resolver registers each operator once
    known = {op for op in names if op in measured}
    own = {op: int(entry["own"][op]) for op in known}
    shared = 0
    for piece in entry["shared"]:
        users = known.intersection(piece["ops"])
        if len(users) == 1:  # only this operator of the firmware uses it: part of its bytes here
            own[users.pop()] += piece["bytes"]
        elif users:
            shared += piece["bytes"]
    per_op = tuple((op, own[op] if op in known else largest) for op in names)
    unknown = tuple(op for op in names if op not in known)
    return CodeSize(kernels, int(entry["runtime"]), per_op, unknown, shared)


def model_code(model: bytes, kernels: str) -> CodeSize:
    """firmware_code for the operators a .tflite holds (deploy.flatbuffer.operators)."""
    from deploy.flatbuffer import operators  # tflite_micro's schema: only when a model is read

    return firmware_code(kernels, operators(model))


def decode_code_bytes(kernels: str, ops: Iterable[str] = ()) -> int:
    """What DECODE (with all its decoders) adds to a firmware of ops for kernels: what storing tensors as
    LUT (or PRUNE, HUFFMAN) costs in code. Without ops, its bytes alone (an upper bound: with other
    operators it shares a few helpers)."""
    base = [op for op in ([ops] if isinstance(ops, str) else ops) if op != DECODE_OP]
    return firmware_code(kernels, [*base, DECODE_OP]).total - firmware_code(kernels, base).total


__all__ = [
    "DECODE_OP",
    "CodeSize",
    "CodeSizeError",
    "code_from_entry",
    "decode_code_bytes",
    "firmware_code",
    "kernel_sets",
    "model_code",
    "op_bytes",
    "provenance",
]
