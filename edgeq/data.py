"""Data splits for the pipelines: scikit-learn's bundled digits offline, MNIST/CIFAR-10 from keras or .npz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import DataError


@dataclass(frozen=True)
class Splits:
    """Train/validation/test arrays; x is float32 exactly as the Keras model takes it."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str = "classification"  # or "regression"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes (1 output for regression)."""
        if self.task == "regression":
            return 1
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def head(self, n_train: int, n_test: int) -> Splits:
        """A smaller copy for smoke runs: the first n_train training and n_test val/test examples."""
        return Splits(
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_val[:n_test],
            self.y_val[:n_test],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.task,
        )


def split_train_val_test(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    val: float = 0.15,
    test: float = 0.15,
    task: str = "classification",
) -> Splits:
    """A fixed, seeded (stratified for classification) train/val/test split of one array pair."""
    from sklearn.model_selection import train_test_split

    strat = y if task == "classification" else None
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test, random_state=seed, stratify=strat)
    strat = y_rest if task == "classification" else None
    x_tr, x_val, y_tr, y_val = train_test_split(
        x_rest, y_rest, test_size=val / (1 - test), random_state=seed, stratify=strat
    )
    return Splits(x_tr, y_tr, x_val, y_val, x_test, y_test, task)


def load_digits(seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], shape (8, 8, 1)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    return split_train_val_test(x, d.target.astype("int64"), seed=seed)


def load_diabetes(seed: int = 0) -> Splits:
    """scikit-learn's bundled diabetes regression data, standardised features and target."""
    from sklearn.datasets import load_diabetes as sk_diabetes

    d = sk_diabetes()
    x = ((d.data - d.data.mean(0)) / d.data.std(0)).astype("float32")
    y = ((d.target - d.target.mean()) / d.target.std()).astype("float32")
    return split_train_val_test(x, y, seed=seed, task="regression")


def _image_arrays(x_train, y_train, x_test, y_test, *, seed: int, val_fraction: float) -> Splits:
    """keras-layout uint8 images -> float32 in [0, 1] with a channel axis, val carved from train."""

    def prep(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype="float32") / 255.0
        return x[..., None] if x.ndim == 3 else x

    x_train, x_test = prep(x_train), prep(x_test)
    y_train, y_test = (
        np.asarray(y_train).reshape(-1).astype("int64"),
        np.asarray(y_test).reshape(-1).astype("int64"),
    )
    order = np.random.default_rng(seed).permutation(len(x_train))
    n_val = int(len(x_train) * val_fraction)
    val, tr = order[:n_val], order[n_val:]
    return Splits(x_train[tr], y_train[tr], x_train[val], y_train[val], x_test, y_test)


KERAS_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: str | Path, required: tuple[str, ...] = KERAS_ARRAYS) -> dict[str, np.ndarray]:
    """The required arrays of a local .npz, each checked; a DataError on one line for anything else.

    np.load raises many types (BadZipFile, EOFError, ValueError for pickles, OSError), and falls back to
    .npy or pickle for a file that is not a zip; all of them mean "not the .npz edgeq needs".
    """
    import zipfile

    from edgeq.validate import check_array

    path = Path(path)
    need = f"it needs {', '.join(required)} as plain numeric arrays (numpy.savez)"
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass an .npz with {', '.join(required)}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz archive (not a zip file); {need}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in required if k not in f.files]
            if missing:
                many = "s" if len(missing) > 1 else ""
                raise DataError(f"{path} lacks array{many} {', '.join(missing)}; {need}")
            arrays = {k: f[k] for k in required}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        text = " ".join(str(e).split())
        raise DataError(f"cannot read {path} as .npz ({text}); {need}") from e
    for key, a in arrays.items():
        check_array(key, a, str(path))
    return arrays


def load_npz(path: str | Path, *, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """A local .npz in the keras layout (x_train, y_train, x_test, y_test)."""
    from edgeq.validate import check_labels

    arrays = read_npz(path)
    # The labels are cast to int64 below; a NaN or 0.5 must be named before the cast hides it.
    for key in ("y_train", "y_test"):
        check_labels(key, arrays[key], where=str(path))
    return _image_arrays(**arrays, seed=seed, val_fraction=val_fraction)


def load_keras_dataset(name: str, *, seed: int = 0, data: str | Path | None = None) -> Splits:
    """MNIST or CIFAR-10: from a local .npz when given, else keras.datasets (needs internet once)."""
    if data is not None:
        return load_npz(data, seed=seed)
    import tf_keras as keras

    loaders = {"mnist": keras.datasets.mnist, "cifar10": keras.datasets.cifar10}
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}; use one of {sorted(loaders)}")
    try:
        (x_train, y_train), (x_test, y_test) = loaders[name].load_data()
    except Exception as e:  # noqa: BLE001  (download errors come in many types)
        raise DataError(f"could not download {name} ({e}); pass --data PATH.npz with a local copy") from e
    return _image_arrays(x_train, y_train, x_test, y_test, seed=seed, val_fraction=0.1)
