"""Export: a QAT model in, the deployable flatbuffer out (converted, sliced, stored, verified bit for bit).

`export(qat, x_calibrate, x_verify, options)` is the one entry point; the stages it runs live beside it:
convert.py (the TFLite converter), slicing.py (output-channel slices under the decode budget), the
storage table in deploy.storage, and carrays.py (the C arrays the firmware embeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deploy.export.convert import ExportError, convert, convert_float
from deploy.export.slicing import SliceResult, slice_weights
from deploy.storage import AUTO, STORAGES, Storage, choose, kinds_for

__all__ = ["ExportError", "ExportOptions", "Exported", "convert", "convert_float", "export"]


@dataclass(frozen=True)
class ExportOptions:
    """How to store the weights: the storage kind, the decode budget per slice, the RAM storage may use."""

    storage: str = AUTO
    decode_budget: int | None = 16 * 1024  # bytes of decompressed weights per slice; None: no slicing
    arena_limit: int | None = None  # --storage auto weighs flash against this arena
    kernels: str = "reference"  # the kernel set the firmware links: what it buffers, what code it costs
    count_code: bool = True  # --storage auto counts the decoders' code (deploy/firmware/code_size.json)
    sparse: bool = False  # the weights were pruned: --storage auto also tries the kinds that pay on zeros
    # the operators (of the sliced model) a planner plan stores as LUT, the others INT4/INT8 (int4+lut)
    lut_ops: tuple[int, ...] = ()


@dataclass(frozen=True)
class Exported:
    """The converted model and the deployed one, with every storage variant that was built."""

    uncompressed: bytes  # the converter's output: LiteRT runs it, the deployed model is held to it
    deployed: Storage
    variants: tuple[Storage, ...]
    sliced: SliceResult | None


def export(qat, x_calibrate: np.ndarray, x_verify: np.ndarray, options: ExportOptions) -> Exported:
    """Convert; slice under the decode budget where the kernels buffer weights, store, keep the best."""
    uncompressed = convert(qat, x_calibrate, via_saved_model=False)
    kinds = kinds_for(options.storage, options.sparse, planned=bool(options.lut_ops))
    buffered = any(k.slices(options.kernels) for k in kinds)
    budget = options.decode_budget if buffered else None
    sliced = slice_weights(uncompressed, budget) if budget else None
    deployed, variants = choose(
        uncompressed,
        options.storage,
        x_verify,
        arena_limit=options.arena_limit,
        sliced=sliced.model if sliced else None,
        kernels=options.kernels,
        code_of=_code_of(options.kernels) if options.count_code else None,
        sparse=options.sparse,
        lut_ops=options.lut_ops,
    )
    used_slices = sliced is not None and STORAGES[deployed.kind].slices(options.kernels)
    return Exported(uncompressed, deployed, variants, sliced if used_slices else None)


def _code_of(kernels: str):
    """The flash a stored model's operators and decoders take in the firmware, for kernels."""
    from deploy.firmware.code_size import model_code

    return lambda model: model_code(model, kernels).total
