"""Weight storages: one module per kind (int8, int4, lut, ...), one table, one way to choose.

Like tflite_micro's compression package (a {type: plugin} table, one small module per method): adding a
storage is one module with a `KIND` and one entry in STORAGES. Every variant is checked bit for bit in
TFLM against the converted model before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deploy.flatbuffer import compact
from deploy.measure.tflm import arena_bytes, run_tflm
from deploy.storage import huffman, int4, int8, lut, prune
from deploy.storage.base import Storage, StorageError, StorageKind
from edgeq.registry import registered as table_entry

STORAGES: dict[str, StorageKind] = {
    k.name: k for k in (int8.KIND, int4.KIND, lut.KIND, lut.MIXED_KIND, prune.KIND, huffman.KIND)
}
AUTO = "auto"

__all__ = [
    "AUTO",
    "STORAGES",
    "Storage",
    "StorageError",
    "StorageKind",
    "choices",
    "choose",
    "kinds_for",
    "registered",
]


def choices() -> tuple[str, ...]:
    """What --storage accepts: every kind in the table a user may name, and auto (the per-layer kinds
    are the planner's to choose: auto builds them for a plan that names its layers' storage)."""
    return (*(k for k, kind in STORAGES.items() if not kind.planned), AUTO)


def registered(kind: StorageKind):
    """Add a storage kind to the table for the duration of a block (plugins, tests)."""
    return table_entry(STORAGES, kind.name, kind, StorageError, taken=(AUTO,))


def check_storage(name: str) -> str:
    """The name, or a StorageError listing the table."""
    if name in STORAGES and STORAGES[name].planned:
        raise StorageError(
            f"storage {name!r} is per layer: the planner chooses it under --storage auto (the default); "
            f"use one of {', '.join(choices())}"
        )
    if name not in choices():
        raise StorageError(f"unknown storage {name!r}; use one of {', '.join(choices())}")
    return name


def verify_same_outputs(reference_raw: np.ndarray, candidate: bytes, x: np.ndarray, what: str) -> None:
    """Raise unless candidate's TFLM outputs equal the reference outputs bit for bit on every row of x."""
    got = run_tflm(candidate, x)
    if not np.array_equal(reference_raw, got):
        bad = int(np.sum(np.any(reference_raw != got, axis=1)))
        raise StorageError(
            f"{what}: TFLM outputs differ from the uncompressed model on {bad}/{len(x)} samples; "
            "refusing to write it (use --storage int4 or int8)"
        )


def kinds_for(storage: str, sparse: bool = False, planned: bool = False) -> list[StorageKind]:
    """The storage kinds a --storage value builds: the one named, or every kind in auto (with the kinds
    that pay on zeros when the weights were pruned: sparse; the per-layer ones when a plan names its
    layers' storage: planned)."""
    if storage in STORAGES and STORAGES[storage].planned and planned:
        return [STORAGES[storage]]
    if check_storage(storage) == AUTO:
        return [
            k
            for k in STORAGES.values()
            if (k.in_auto or (sparse and k.sparse)) and (planned or not k.planned)
        ]
    return [STORAGES[storage]]


def choose(
    converted: bytes,
    storage: str,
    verify_x: np.ndarray,
    reference: bytes | None = None,
    arena_limit: int | None = None,
    *,
    sliced: bytes | None = None,
    kernels: str = "reference",
    code_of: Callable[[bytes], int] | None = None,
    sparse: bool = False,
    lut_ops: tuple[int, ...] = (),
) -> tuple[Storage, tuple[Storage, ...]]:
    """Build the storage variants asked for, verify each against reference (default: converted).

    A kind that buffers its weights under `kernels` is built from `sliced` (when given), the others from
    `converted`. The least flash wins, counting code_of(model) (the decoders' code) when given; with
    arena_limit, the least among the variants whose TFLM arena fits it (or the smallest arena when none
    does), since DECODE buffers cost RAM. lut_ops: the operators (of the model a planned kind is built
    from) that a planner plan stores as LUT; auto then tries the per-layer kinds too.
    """
    kinds = kinds_for(storage, sparse, planned=bool(lut_ops))  # an unknown storage: refused before work
    reference_raw = run_tflm(converted if reference is None else reference, verify_x)
    variants = []
    for kind in kinds:
        source = sliced if sliced is not None and kind.slices(kernels) else converted
        built = kind.build(source, lut_ops) if kind.planned else kind.build(source)
        v = Storage(built.kind, compact(built.model), built.tensors)
        verify_same_outputs(reference_raw, v.model, verify_x, f"{v.kind} model")
        variants.append(v)
    ranked = variants
    if arena_limit is not None and len(variants) > 1:
        arenas = {id(v): arena_bytes(v.model) for v in variants}
        ranked = [v for v in variants if arenas[id(v)] <= arena_limit]
        if not ranked:
            return min(variants, key=lambda v: arenas[id(v)]), tuple(variants)
    cost = (lambda s: len(s.model) + code_of(s.model)) if code_of is not None else (lambda s: len(s.model))
    return min(ranked, key=cost), tuple(variants)
