"""BitPlan: how many bits each layer's weights get, and with which quantizer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeq.errors import PlanError


@dataclass(frozen=True)
class LayerBits:
    """One layer's allocation: bit width, quantizer, clipping range and (non-uniform) levels."""

    bits: int
    quantizer: str = "uniform"
    lo: float | None = None
    hi: float | None = None
    levels: tuple[float, ...] | None = None
    informativeness: float | None = None
    pruned_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        from edgeq.quantizers import GRIDS  # the grid table (quantizers imports this module)

        if self.quantizer not in GRIDS:
            raise PlanError(f"unknown quantizer {self.quantizer!r}; use one of {', '.join(GRIDS)}")
        if not 0 <= int(self.bits) <= 32:
            raise PlanError(f"bits {self.bits} outside 0..32")
        object.__setattr__(self, "bits", int(self.bits))
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        object.__setattr__(self, "pruned_channels", tuple(int(c) for c in self.pruned_channels))


@dataclass(frozen=True)
class BitPlan:
    """Per-layer bit widths plus the method that chose them; JSON round-trips."""

    layers: dict[str, LayerBits]
    method: str = "manual"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> dict[str, int]:
        """Layer name -> bit width."""
        return {name: lb.bits for name, lb in self.layers.items()}

    def mean_bits(self, sizes: dict[str, int]) -> float:
        """Parameter-weighted mean bit width (paper eq. 8) over the layers in the plan."""
        missing = [n for n in self.layers if n not in sizes]
        if missing:
            raise PlanError(f"no weight count for layers {missing}; pass sizes for every planned layer")
        total = sum(sizes[n] for n in self.layers)
        if total == 0:
            raise PlanError("planned layers hold no weights")
        return sum(lb.bits * sizes[n] for n, lb in self.layers.items()) / total

    @classmethod
    def from_bits(cls, bits: dict[str, int], quantizer: str = "uniform", method: str = "manual") -> BitPlan:
        """A hand-written plan: layer name -> bits, one quantizer for all."""
        if not bits:
            raise PlanError("empty plan; name at least one layer")
        return cls({n: LayerBits(int(b), quantizer) for n, b in bits.items()}, method=method)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "method": self.method,
            "meta": self.meta,
            "layers": {n: {k: v for k, v in asdict(lb).items()} for n, lb in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BitPlan:
        """Inverse of to_dict."""
        try:
            layers = {n: LayerBits(**v) for n, v in d["layers"].items()}
            return cls(layers, method=d.get("method", "manual"), meta=dict(d.get("meta", {})))
        except (KeyError, TypeError) as e:
            raise PlanError(f"not a BitPlan: {e}; write it with BitPlan.save") from e

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (temp name, then rename)."""
        from edgeq.io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        """Read a plan written by save."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from e
