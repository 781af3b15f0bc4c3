"""Bring your own model: a pipeline from a saved Keras model and an .npz of data, no pipeline script.

`edgeq run --model m.keras --data d.npz` runs the PipelineSpec that pipeline_from_files returns. The
.npz holds x_train, y_train, x_test, y_test and optionally x_val, y_val, with x exactly as the model
takes it (no scaling). Everything is checked before any training, each problem on one line.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.data import Splits
from edgeq.errors import DataError, PipelineError
from edgeq.keras3 import load_model
from edgeq.pipeline import PipelineSpec

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_val", "y_val")
TASKS = ("classification", "regression")
VAL_FRACTION = 0.1  # of the training set, when the .npz has no x_val/y_val


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of an .npz, or a one-line DataError naming what is wrong."""
    need = "it needs x_train, y_train, x_test, y_test (and optionally x_val, y_val)"
    if not path.is_file():
        raise DataError(
            f"data file {path} does not exist; pass an .npz with x_train, y_train, x_test, y_test"
        )
    # np.load falls back to .npy or pickle for anything that is not a zip; say what it is instead.
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz archive; save the splits with numpy.savez(path, ...): {need}")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            missing = [
                k for k in (*REQUIRED, *OPTIONAL) if k not in names and (k in REQUIRED or _has_pair(k, names))
            ]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)}; {need}")
            return {k: f[k] for k in (*REQUIRED, *OPTIONAL) if k in names}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        text = " ".join(str(e).split())
        raise DataError(f"cannot read {path} as .npz ({text}); {need}, as plain numeric arrays") from e


def _has_pair(key: str, names: set[str]) -> bool:
    """For an optional array: whether its partner (x_val for y_val and back) is there, so it is needed."""
    return ("y_val" if key == "x_val" else "x_val") in names


def _check_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Numeric, non-empty, finite arrays whose x and y agree in length and x in example shape."""
    from edgeq.validate import check_array

    for key, a in arrays.items():
        check_array(key, a, str(path))
    for split in ("train", "val", "test"):
        if f"x_{split}" in arrays and len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(
                f"{path}: x_{split} has {len(arrays[f'x_{split}'])} examples but y_{split} has "
                f"{len(arrays[f'y_{split}'])}; they must pair up one to one"
            )
        if f"x_{split}" in arrays and arrays[f"x_{split}"].shape[1:] != arrays["x_train"].shape[1:]:
            raise DataError(
                f"{path}: x_{split} has examples of shape {arrays[f'x_{split}'].shape[1:]} but x_train "
                f"{arrays['x_train'].shape[1:]}; every split must have the same example shape"
            )
    if "x_val" not in arrays and len(arrays["x_train"]) < 2:
        raise DataError(
            f"{path}: x_train has {len(arrays['x_train'])} example, too few to carve a validation split "
            f"from; add examples or x_val, y_val"
        )


def _model_io(model: Any, model_path: Path) -> tuple[tuple, int]:
    """(input shape of one example, output width) of a one-input, one-output model."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise PipelineError(
            f"{model_path} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; edgeq runs "
            f"models with one input and one output"
        )
    return tuple(model.inputs[0].shape[1:]), int(model.outputs[0].shape[-1] or 1)


def _check_input_shape(shape: tuple, x: np.ndarray, model_path: Path) -> None:
    got = x.shape[1:]
    if len(shape) != len(got) or any(s is not None and s != g for s, g in zip(shape, got, strict=False)):
        shown = tuple("None" if s is None else s for s in shape)
        raise PipelineError(
            f"the model {model_path.name} takes inputs of shape {shown} but x_train has examples of "
            f"shape {got}; reshape the data or the model's Input so they match"
        )


def _labels(y: np.ndarray) -> np.ndarray:
    """Class labels from integer (n,) / (n, 1) arrays or one-hot rows."""
    if y.ndim == 2 and y.shape[1] > 1:
        return y.argmax(1).astype("int64")
    return y.reshape(len(y)).astype("int64")


def _is_one_hot(y: np.ndarray, width: int) -> bool:
    return (
        y.ndim == 2
        and y.shape[1] == width > 1
        and bool(np.all((y == 0) | (y == 1)))
        and bool(np.all(y.sum(1) == 1))
    )


def detect_task(y_train: np.ndarray, output_width: int) -> str:
    """classification for integer or one-hot labels and a model of more than one output, else regression."""
    if output_width > 1 and (y_train.dtype.kind in "biu" or _is_one_hot(y_train, output_width)):
        return "classification"
    return "regression"


def _check_labels(arrays: dict[str, np.ndarray], task: str, width: int, path: Path) -> None:
    ys = {k: a for k, a in arrays.items() if k.startswith("y_")}
    if task == "classification":
        if width < 2:
            raise PipelineError(
                "classification needs one model output per class, but the model has 1 output; "
                "use --task regression or give the model an output per class"
            )
        for key, y in ys.items():
            if _is_one_hot(y, width):
                continue
            if y.ndim > 1 and y.shape[1:] != (1,):
                raise DataError(
                    f"{path}: {key} has shape {y.shape}; classification labels are (n,) integers or (n, "
                    f"{width}) one-hot rows"
                )
            if np.any(y != np.round(y)):
                raise DataError(f"{path}: {key} holds fractional values; classification labels are integers")
            lo, hi = int(y.min()), int(y.max())
            if lo < 0:
                raise DataError(f"{path}: {key} has the negative label {lo}; class labels run from 0")
            if hi >= width:
                raise DataError(
                    f"{path}: {key} has the label {hi} but the model has {width} outputs (labels 0.."
                    f"{width - 1}); relabel the data or widen the model's last layer"
                )
        return
    for key, y in ys.items():
        per_example = int(np.prod(y.shape[1:], dtype=int))
        if per_example != width:
            raise DataError(
                f"{path}: {key} has {per_example} target(s) per example but the model has {width} "
                f"output(s); regression needs one target per output"
            )


def emits_probabilities(model: Any) -> bool:
    """True when the model's last layer is a softmax/sigmoid, so a loss must not take its output as logits."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    return type(last).__name__ == "Softmax" or name in ("softmax", "sigmoid")


def _splits(arrays: dict[str, np.ndarray], task: str, seed: int) -> Splits:
    x = {k: v.astype("float32") for k, v in arrays.items() if k.startswith("x_")}
    if task == "classification":
        y = {k: _labels(v) for k, v in arrays.items() if k.startswith("y_")}
    else:
        y = {k: v.astype("float32") for k, v in arrays.items() if k.startswith("y_")}
    if "x_val" not in x:
        order = np.random.default_rng(seed).permutation(len(x["x_train"]))
        n_val = max(1, int(len(order) * VAL_FRACTION))
        val, tr = order[:n_val], order[n_val:]
        x["x_val"], y["y_val"] = x["x_train"][val], y["y_train"][val]
        x["x_train"], y["y_train"] = x["x_train"][tr], y["y_train"][tr]
    return Splits(x["x_train"], y["y_train"], x["x_val"], y["y_val"], x["x_test"], y["y_test"], task)


def pipeline_from_files(
    model_path: str | Path,
    data_path: str | Path,
    *,
    task: str | None = None,
    name: str | None = None,
    epochs: int = 20,
    bnn_epochs: int = 20,
    qat_epochs: int = 3,
    train: bool = True,
) -> PipelineSpec:
    """A PipelineSpec for a saved model (Keras 3 or tf_keras) and an .npz of splits, checked up front.

    train=False marks the model as already trained (PipelineSpec.pretrained): the float stage only
    evaluates it.
    """
    import tf_keras

    model_path, data_path = Path(model_path), Path(data_path)
    if task is not None and task not in TASKS:
        raise PipelineError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    model = load_model(model_path)
    shape, width = _model_io(model, model_path)

    def checked(path: Path) -> tuple[dict[str, np.ndarray], str]:
        arrays = _read_npz(path)
        _check_arrays(arrays, path)
        _check_input_shape(shape, arrays["x_train"], model_path)
        kind = task or detect_task(arrays["y_train"], width)
        _check_labels(arrays, kind, width, path)
        return arrays, kind

    arrays, kind = checked(data_path)

    def load_data(seed: int = 0, data: str | Path | None = None) -> Splits:
        # `--data` on the command line is normally this same file; another one is checked the same way.
        got, got_kind = (arrays, kind) if data is None or Path(data) == data_path else checked(Path(data))
        return _splits(got, got_kind, seed)

    def build_model(input_shape: tuple[int, ...], outputs: int) -> Any:
        # A fresh copy per call: the flow trains what it is given, and the loaded weights must survive.
        del input_shape, outputs  # the model is what the file holds
        copy = tf_keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        return copy

    return PipelineSpec(
        name=name or model_path.stem,
        build_model=build_model,
        load_data=load_data,
        epochs=epochs,
        bnn_epochs=bnn_epochs,
        qat_epochs=qat_epochs,
        pretrained=not train,
        from_logits=not emits_probabilities(model),
        source=(str(model_path), hashlib.sha256(model_path.read_bytes()).hexdigest()),
    )
