"""PipelineSpec: what one pipeline script declares (model builder, data, training budget, targets)."""

from __future__ import annotations

import importlib.util
import inspect
import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeq.data import Splits
from edgeq.errors import EdgeqError, PipelineError

# Frames in these folders are edgeq's or a library's; the first frame outside them is the user's code.
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve())
    for p in {
        *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")),
        Path(__file__).parents[1] / "edgeq",
        Path(__file__).parents[1] / "deploy",
    }
)


LR_SCHEDULES = ("constant", "cosine")  # PipelineSpec.lr_schedule


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
    method: str | None = None  # None: the run's default (deploy.app.DEFAULT_METHOD, the byte planner)
    pin: dict[str, int] = field(default_factory=dict)
    pretrained: bool = False  # the model comes trained: the float stage only evaluates it
    from_logits: bool = True  # the model outputs logits (False: it ends in softmax/sigmoid)
    source: tuple[str, str] | None = None  # (model file, its sha256) when the model came from a file
    accepts_data: bool = True  # False: load_data has its own data and ignores --data, which is refused
    # the share of each hidden layer's output channels removed after the twin, by default (--prune-channels
    # overrides; edgeq.training.shrink): for a model wider than its task needs, e.g. the digits CNN
    prune_channels: float = 0.0
    # float training only: a batch of training images -> the same batch randomly changed (e.g. a
    # keras.Sequential of RandomFlip and RandomTranslation), mapped over the batches by tf.data
    augment: Callable[[Any], Any] | None = None
    lr_schedule: str = "constant"  # the float stage's learning rate: "constant" or "cosine" (decays to 0)

    def with_epochs(self, n: int) -> PipelineSpec:
        """The same pipeline with every training stage capped at n epochs (smoke runs, tests)."""
        return replace(
            self,
            epochs=min(self.epochs, n),
            bnn_epochs=min(self.bnn_epochs, n),
            qat_epochs=min(self.qat_epochs, n),
        )


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _user_frame(e: BaseException, path: Path | None = None) -> traceback.FrameSummary | None:
    """The innermost traceback frame in path (or, without one, outside edgeq and the libraries)."""
    frames = traceback.extract_tb(e.__traceback__)
    if path is not None:
        target = str(path.resolve())
        mine = [f for f in frames if f.filename and str(Path(f.filename).resolve()) == target]
    else:
        mine = [
            f
            for f in frames
            if f.filename
            and not f.filename.startswith("<")
            and not str(Path(f.filename).resolve()).startswith(_LIBRARY_DIRS)
        ]
    return mine[-1] if mine else None


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
    except EdgeqError:
        raise  # already one line that says what to do
    except Exception as e:  # noqa: BLE001  (the user's own code: any exception is theirs to fix)
        frame = _user_frame(e, path)
        where = f" at line {frame.lineno}" if frame else ""
        raise PipelineError(
            f"{path} raised {type(e).__name__}{where} while being imported: {_one_line(e)}"
        ) from e
    pipeline = getattr(module, "PIPELINE", None)
    if not isinstance(pipeline, PipelineSpec):
        raise PipelineError(
            f"{path} defines no pipeline; it must set PIPELINE = edgeq.pipeline.PipelineSpec(...)"
        )
    return pipeline


def call_user(spec: PipelineSpec, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) for a pipeline's own function; an exception raised in the user's file is
    named (PipelineError: what, file and line), one raised only inside edgeq or a library is not."""
    try:
        return fn(*args, **kwargs)
    except EdgeqError:
        raise
    except Exception as e:  # noqa: BLE001  (sorted below: the user's code, or a bug to report)
        frame = _user_frame(e)
        if frame is None:
            raise
        raise PipelineError(
            f"pipeline {spec.name!r}: {what} raised {type(e).__name__} at {frame.filename}:{frame.lineno}: "
            f"{_one_line(e)}"
        ) from e


def load_splits(spec: PipelineSpec, seed: int, data: str | Path | None) -> Splits:
    """The pipeline's data: load_data called with the arguments it takes (seed, data), as Splits."""
    try:
        params = inspect.signature(spec.load_data).parameters
    except (TypeError, ValueError):  # a builtin or C callable: pass both, as documented
        params = {}
    varkw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if not params or varkw or "seed" in params:
        kwargs["seed"] = seed
    if not params or varkw or "data" in params:
        kwargs["data"] = data
    elif data is not None:
        raise PipelineError(
            f"pipeline {spec.name!r}: load_data takes no data argument, so --data {data} would be ignored; "
            f"drop --data, or give load_data a data parameter"
        )
    splits = call_user(spec, "load_data", spec.load_data, **kwargs)
    if not isinstance(splits, Splits):
        raise PipelineError(
            f"pipeline {spec.name!r}: load_data returned {type(splits).__name__}, not edgeq.data.Splits"
        )
    return splits


def check_spec(spec: PipelineSpec, data: str | Path | None) -> None:
    """What can be checked of a pipeline before any work: its name, and --data against accepts_data."""
    if not isinstance(spec.name, str) or not spec.name.strip():
        raise PipelineError(
            f"the pipeline's name is {spec.name!r}; PipelineSpec(name=...) must be a non-empty text"
        )
    if spec.augment is not None and not callable(spec.augment):
        raise PipelineError(
            f"pipeline {spec.name!r}: augment is a {type(spec.augment).__name__}, not a function of a batch "
            "of images; pass e.g. keras.Sequential([keras.layers.RandomFlip('horizontal')]) or None"
        )
    if spec.lr_schedule not in LR_SCHEDULES:
        raise PipelineError(
            f"pipeline {spec.name!r}: lr_schedule {spec.lr_schedule!r} is not one of "
            f"{', '.join(LR_SCHEDULES)}; use 'constant' (the default) or 'cosine'"
        )
    if data is not None and not spec.accepts_data:
        raise PipelineError(
            f"pipeline {spec.name!r} loads its own data and ignores --data; drop --data, or bring the data "
            f"with your model: edgeq run --model MODEL.keras --data {data}"
        )
