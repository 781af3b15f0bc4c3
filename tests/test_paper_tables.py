"""paper_tables.py --quick on a tiny synthetic MNIST-like .npz: every row, finite figures, paper columns."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("float", "int8", "uniform", "qiu", "qinu", "rb", "bb")
NUMBERS = (
    "mean_bits",
    "bops",
    "accuracy_keras",
    "accuracy_tflm",
    "flash_bytes",
    "packing_limit_bytes",
    "arena_bytes",
    "latency_rel_int8",
    "method_seconds",
)


def _synthetic_mnist(path: Path, n_train: int = 320, n_test: int = 120) -> None:
    """28x28 uint8 images whose class is the row of a bright bar, over noise (learnable in one epoch)."""
    rng = np.random.default_rng(0)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = (rng.random((n, 28, 28)) * 40).astype("uint8")
        for i, c in enumerate(y):
            x[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 250
        return x, y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """The --quick LeNet-5 table on synthetic data (a subprocess keeps TF state out of pytest)."""
    tmp = tmp_path_factory.mktemp("paper_tables")
    data = tmp / "mnist_like.npz"
    _synthetic_mnist(data)
    return _run(tmp / "results", "--data", str(data), "--tables", "lenet")


def _run(out: Path, *args: str) -> Path:
    """Run benchmarks/paper_tables.py --quick with args into out."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "paper_tables.py"),
            *args,
            "--quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_every_method_has_a_row_with_finite_figures(quick_run):
    res = json.loads((quick_run / "lenet5_mnist_quick.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(METHODS) <= set(rows)
    for method in METHODS:
        for key in NUMBERS:
            value = rows[method][key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (method, key, value)
        assert 0.0 <= rows[method]["accuracy_tflm"] <= 1.0
    for method in ("qiu", "qinu", "rb"):
        assert rows[method]["mean_bits"] <= 4.0 + 1e-9, rows[method]
    assert rows["int8"]["mean_bits"] == 8.0
    assert rows["int8"]["latency_rel_int8"] == 1.0
    # The packing limit is the floor for flash bytes of every quantized row.
    for method in METHODS[1:]:
        assert rows[method]["packing_limit_bytes"] <= rows[method]["flash_bytes"]
    assert {"command", "commit", "machine", "wall_seconds", "paper"} <= set(res)
    assert res["machine"]["nproc"] >= 1 and res["machine"]["cpu"]
    assert res["paper"]["qiu"] == {"accuracy": 99.05, "mean_bits": 3.17}


def test_markdown_has_the_paper_columns_and_the_plot(quick_run):
    md = (quick_run / "lenet5_mnist_quick.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    for col in (
        "mean bits",
        "BOPs",
        "Keras acc",
        "TFLM acc",
        "flash B",
        "packing limit B",
        "arena B",
        "latency / int8",
        "method s",
        "paper acc %",
        "paper mean bits",
    ):
        assert col in header
    assert "| 99.05 | 3.17 |" in md and "| 96.40 | 4.00 |" in md and "| 99.23 |" in md
    assert "TFLM interpreter" in md
    assert (quick_run / "lenet5_mnist_quick.png").stat().st_size > 1000


@pytest.mark.slow
def test_regression_table_has_mae_and_mse_at_6_and_8_bits(tmp_path):
    out = _run(tmp_path, "--tables", "regression")
    res = json.loads((out / "regression_mlp_quick.json").read_text())
    targets = {(r["method"], r["target_bits"]) for r in res["rows"]}
    for method in ("qiu", "qinu", "rb", "bb"):
        assert {(method, 6.0), (method, 8.0)} <= targets
    for r in res["rows"]:
        assert all(math.isfinite(r[k]) for k in ("mae_tflm", "mse_tflm", "mae_keras", "flash_bytes"))
    assert "TFLM MAE" in (out / "regression_mlp_quick.md").read_text()
