"""PipelineSpec: what one pipeline script declares (model builder, data, training budget, targets)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeq.data import Splits
from edgeq.errors import PipelineError


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a pipeline needs; the flow in deploy.flow runs it stage by stage."""

    name: str
    build_model: Callable[[tuple[int, ...], int], Any]  # (input_shape, outputs) -> tf_keras model
    load_data: Callable[..., Splits]  # (seed=..., data=path or None) -> Splits
    epochs: int = 20
    bnn_epochs: int = 20
    qat_epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    bnn_lr: float = 5e-3
    qat_lr: float = 1e-4
    init_sigma: float = 0.01
    target_bits: float = 4.0
    min_bits: int = 2
    max_bits: int = 8
    method: str = "qiu"
    pin: dict[str, int] = field(default_factory=dict)
    pretrained: bool = False  # the model comes trained: the float stage only evaluates it

    def with_epochs(self, n: int) -> PipelineSpec:
        """The same pipeline with every training stage capped at n epochs (smoke runs, tests)."""
        return replace(
            self,
            epochs=min(self.epochs, n),
            bnn_epochs=min(self.bnn_epochs, n),
            qat_epochs=min(self.qat_epochs, n),
        )


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Import a pipeline script and return its module-level PIPELINE."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline {path} does not exist; try pipelines/digits.py")
    spec = importlib.util.spec_from_file_location(f"edgeq_pipeline_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PipelineError(f"{path} is not a Python file; a pipeline is a .py defining PIPELINE")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise PipelineError(f"{path} has a syntax error at line {e.lineno}: {e.msg}") from e
    pipeline = getattr(module, "PIPELINE", None)
    if not isinstance(pipeline, PipelineSpec):
        raise PipelineError(
            f"{path} defines no pipeline; it must set PIPELINE = edgeq.pipeline.PipelineSpec(...)"
        )
    return pipeline
