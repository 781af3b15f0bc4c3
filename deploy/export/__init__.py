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
from deploy.storage import AUTO, Storage, choose

__all__ = ["ExportError", "ExportOptions", "Exported", "convert", "convert_float", "export"]


@dataclass(frozen=True)
class ExportOptions:
    """How to store the weights: the storage kind, the decode budget per slice, the RAM storage may use."""

    storage: str = AUTO
    decode_budget: int | None = 16 * 1024  # bytes of decompressed weights per slice; None: no slicing
    arena_limit: int | None = None  # --storage auto weighs flash against this arena


@dataclass(frozen=True)
class Exported:
    """The converted model and the deployed one, with every storage variant that was built."""

    uncompressed: bytes  # the converter's output: LiteRT runs it, the deployed model is held to it
    deployed: Storage
    variants: tuple[Storage, ...]
    sliced: SliceResult | None


def export(qat, x_calibrate: np.ndarray, x_verify: np.ndarray, options: ExportOptions) -> Exported:
    """Convert, slice under the decode budget, build and verify the storages, keep the best."""
    uncompressed = convert(qat, x_calibrate)
    sliced = slice_weights(uncompressed, options.decode_budget) if options.decode_budget else None
    deployed, variants = choose(
        sliced.model if sliced else uncompressed,
        options.storage,
        x_verify,
        reference=uncompressed,
        arena_limit=options.arena_limit,
    )
    return Exported(uncompressed, deployed, variants, sliced)
