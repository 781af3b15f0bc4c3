"""Data checks that run before any training: every problem with the splits named on one line.

`check_splits` looks at the arrays alone (dtypes, shapes, lengths, finite values, labels) and, once the
model is built, at how they meet it (input shape, number of outputs). Training on data that fails any of
these would either crash minutes later inside Keras or TFLM, or silently learn nonsense (NaN losses,
fractional labels floored to integers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeq.errors import DataError

SPLITS = ("train", "val", "test")


def check_array(key: str, a: object, where: str = "") -> np.ndarray:
    """One array: numeric, at least 1-D, non-empty and finite; returns it as an ndarray."""
    at = f"{where}: " if where else ""
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except (TypeError, ValueError) as e:
            raise DataError(f"{at}{key} is not an array ({type(a).__name__}); give numpy arrays") from e
    if a.dtype.kind not in "biuf":
        raise DataError(f"{at}{key} holds {a.dtype} values; every array must be numeric (int or float)")
    if a.ndim == 0:
        raise DataError(f"{at}{key} is a single value; it must be an array with one row per example")
    if len(a) == 0:
        raise DataError(f"{at}{key} is empty; every split (train, val, test) needs at least one example")
    if a.dtype.kind == "f":
        # In blocks of rows: a whole CIFAR training set at once would need a 150 MB mask.
        step = max(1, (1 << 22) // max(1, a[0].size))
        bad = sum(int(np.count_nonzero(~np.isfinite(a[i : i + step]))) for i in range(0, len(a), step))
        if bad:
            raise DataError(f"{at}{key} has {bad} non-finite values (NaN or inf); clean or drop those rows")
    return a


def check_labels(key: str, y: np.ndarray, num_classes: int | None = None, where: str = "") -> None:
    """Class labels: one integer per example, from 0, below num_classes when it is known."""
    at = f"{where}: " if where else ""
    if y.ndim > 1 and y.shape[1:] != (1,):
        raise DataError(
            f"{at}{key} has shape {y.shape}; classification labels are one integer class per example, "
            f"shape (n,) or (n, 1)"
        )
    if y.dtype.kind == "f" and np.any(y != np.round(y)):
        raise DataError(f"{at}{key} holds fractional values; classification labels are integers 0, 1, ...")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DataError(f"{at}{key} has the negative label {lo}; class labels run from 0")
    if num_classes is not None and hi >= num_classes:
        raise DataError(
            f"{at}{key} has the label {hi} but the model has {num_classes} outputs (labels 0.."
            f"{num_classes - 1}); relabel the data or give the model one output per class"
        )


def _shape_text(shape: Sequence[int | None]) -> str:
    return str(tuple(shape))


def check_splits(
    splits: object,
    model_input_shape: Sequence[int | None] | None = None,
    num_outputs: int | None = None,
    task: str | None = None,
    where: str = "",
) -> None:
    """Raise DataError on the first problem: dtypes, emptiness, NaN/inf, x/y lengths, example shapes, labels.

    splits is an edgeq.data.Splits (anything with x_train ... y_test and task). With model_input_shape
    (one example, None for any size) and num_outputs the data must also fit the built model; without them
    only the arrays are checked, which is what can be done before the model exists.
    """
    task = task or getattr(splits, "task", "classification")
    at = f"{where}: " if where else ""
    if task not in ("classification", "regression"):
        raise DataError(f"{at}task {task!r} is neither classification nor regression")
    arrays = {}
    for split in SPLITS:
        for part in ("x", "y"):
            key = f"{part}_{split}"
            arrays[key] = check_array(key, getattr(splits, key, None), where)
    example = arrays["x_train"].shape[1:]
    if not example:
        raise DataError(
            f"{at}x_train has shape {arrays['x_train'].shape}: one number per example; a model input needs "
            f"at least one axis per example, e.g. reshape to (n, 1)"
        )
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(
                f"{at}x_{split} has {len(x)} examples but y_{split} has {len(y)}; "
                f"they must pair up one to one"
            )
        if x.shape[1:] != example:
            raise DataError(
                f"{at}x_{split} has examples of shape {_shape_text(x.shape[1:])} but x_train "
                f"{_shape_text(example)}; every split must have the same example shape"
            )
    if model_input_shape is not None:
        shape = tuple(model_input_shape)
        same_rank = len(shape) == len(example)
        fits = same_rank and all(s is None or s == e for s, e in zip(shape, example, strict=False))
        if not fits:
            raise DataError(
                f"{at}the model takes inputs of shape {_shape_text(shape)} but the examples have shape "
                f"{_shape_text(example)}; reshape the data or the model's Input so they match"
            )
    if task == "classification":
        if num_outputs is not None and num_outputs < 2:
            raise DataError(
                f"{at}classification needs one model output per class, but the model has {num_outputs}; "
                f"give the model an output per class (or make the task regression)"
            )
        for split in SPLITS:
            check_labels(f"y_{split}", arrays[f"y_{split}"], num_outputs, where)
        return
    for split in SPLITS:
        y = arrays[f"y_{split}"]
        per_example = int(np.prod(y.shape[1:], dtype=int))
        if num_outputs is not None and per_example != num_outputs:
            raise DataError(
                f"{at}y_{split} has {per_example} target(s) per example but the model has {num_outputs} "
                f"output(s); regression needs one target per output"
            )
