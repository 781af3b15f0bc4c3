"""The paper's regression MLP (512-256-64 hidden units) on tabular data.

The paper uses the Shifts weather-prediction set (123 features, temperature target), which cannot be
fetched offline; scikit-learn's bundled diabetes data (10 features, standardised target) stands in
by default. Pass the real set as a local .npz with float arrays `x_train, y_train, x_test, y_test`:
`edgeq run pipelines/regression_mlp.py --data shifts_weather.npz`. Features are standardised with the
training split's statistics, targets are kept as given, and 10% of the training rows become the
validation split. The default budget suits the stand-in (about 300 training rows, seconds per epoch);
cap it with `--epochs` for the millions of rows of the real set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.data import Splits, load_diabetes, read_npz
from edgeq.errors import DataError
from edgeq.models import mlp
from edgeq.pipeline import PipelineSpec

ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load_regression_npz(path: str | Path, *, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """A local regression .npz (float x_train, y_train, x_test, y_test) as standardised-feature Splits."""
    arrays = {k: a.astype("float32") for k, a in read_npz(path, ARRAYS).items()}
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise DataError(
            f"{path}: x_train {x_train.shape} and x_test {x_test.shape} must be 2-D with the same width"
        )
    y_train, y_test = arrays["y_train"].reshape(-1), arrays["y_test"].reshape(-1)
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise DataError(f"{path}: x and y row counts differ; one target per row is needed")
    # Training statistics only, so nothing about the test rows leaks into the inputs.
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1.0).astype("float32")
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    order = np.random.default_rng(seed).permutation(len(x_train))
    n_val = int(len(x_train) * val_fraction)
    val, tr = order[:n_val], order[n_val:]
    return Splits(x_train[tr], y_train[tr], x_train[val], y_train[val], x_test, y_test, task="regression")


def load_data(seed: int = 0, data: str | Path | None = None) -> Splits:
    """The real set from a local .npz when given, else the bundled diabetes stand-in."""
    return load_regression_npz(data, seed=seed) if data is not None else load_diabetes(seed)


PIPELINE = PipelineSpec(
    name="regression_mlp",
    build_model=mlp,
    load_data=load_data,
    epochs=60,
    bnn_epochs=60,
    qat_epochs=5,
    batch_size=32,
    target_bits=4.0,
)

if __name__ == "__main__":
    from deploy.cli import run_script

    raise SystemExit(run_script(__file__))
