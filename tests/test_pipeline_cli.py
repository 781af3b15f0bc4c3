"""`edgeq run` end to end on a tiny configuration of the offline default, and its bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def edgeq(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    r = edgeq(
        "run", "pipelines/digits.py", "--out", str(out), "--epochs", "3", "--quiet", "--target-bits", "4"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_run_writes_every_artifact(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "model_float.keras",
        "bitplan.json",
        "model_int8.tflite",
        "model_uncompressed.tflite",
        "model.tflite",
        "model_data.h",
        "model_data.cc",
        "firmware",
        "test_data.npz",
        "report.json",
        "report.md",
    } <= names
    assert not [n for n in names if n.startswith(".edgeq-")], "staging leftovers"


def test_report_shape_and_claims(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["pipeline"] == "digits" and rep["seed"] == 0 and rep["target_bits"] == 4.0
    plan, models = rep["plan"], rep["models"]
    assert plan["mean_bits"] <= 4.0
    sizes = {r["name"]: r["params"] for r in plan["layers"]}
    mean = sum(r["bits"] * r["params"] for r in plan["layers"]) / sum(sizes.values())
    assert plan["mean_bits"] == pytest.approx(mean, abs=1e-3)
    dep, int8 = models["deployed"], models["int8"]
    for key in (
        "flash_bytes",
        "packing_limit_bytes",
        "arena_bytes",
        "accuracy_tflm",
        "bit_exact_tflm_vs_litert",
        "bit_exact_compressed_vs_uncompressed",
        "latency_tflm_us",
    ):
        assert key in dep
    assert dep["bit_exact_compressed_vs_uncompressed"] is True
    # Dense stays FULLY_CONNECTED, whose rescale LiteRT's reference kernels round differently: <= 1 LSB.
    ref = dep["litert"]["BUILTIN_REF"]
    assert dep["bit_exact_tflm_vs_litert"] is ref["bit_exact_vs_tflm"] and ref["max_abs_diff"] <= 1
    assert ref["accuracy"] == pytest.approx(dep["accuracy_tflm"], abs=0.02)
    assert set(dep["litert"]) == {"BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"}
    assert all(c["latency_us"] > 0 and c["max_abs_diff"] >= 0 for c in dep["litert"].values())
    assert dep["flash_bytes"] == (run_dir / "model.tflite").stat().st_size < int8["flash_bytes"]
    assert int8["flash_bytes"] == (run_dir / "model_int8.tflite").stat().st_size
    assert int8["flash_bytes"] < models["float"]["flash_bytes"]
    for key in ("accuracy_tflm", "arena_bytes", "latency_tflm_us", "latency_litert_us"):
        assert isinstance(int8[key], float | int) and int8[key] > 0
    for k in ("float", "bnn"):
        assert 0.5 < models[k]["accuracy"] <= 1.0
    assert set(rep["artifacts"]) >= {"c_source", "c_header", "firmware", "test_data"}
    # No --decode-budget: no slice's decoded or unpacked weights need more than the int8 model's arena
    t, sliced = rep["target"], rep["slicing"]
    assert t["decode_budget_bytes"] == min(
        16 * 1024, max(1024, t["decode_budget_int8_arena_bytes"] // 1024 * 1024)
    )
    assert sliced["decode_budget_bytes"] == t["decode_budget_bytes"]
    assert max(r["largest_slice_bytes"] for r in sliced["layers"]) <= t["decode_budget_bytes"]
    assert t["decode_budget_int8_arena_bytes"] == pytest.approx(int8["arena_bytes"], rel=0.15)
    md = (run_dir / "report.md").read_text()
    assert "deployed" in md and f"{dep['flash_bytes']:,}" in md


def test_c_array_holds_exactly_the_deployed_model(run_dir):
    from deploy.export.carrays import parse_c_array

    assert parse_c_array((run_dir / "model_data.cc").read_text()) == (run_dir / "model.tflite").read_bytes()


def test_deployed_accuracy_is_measured_in_tflm(run_dir):
    from deploy.measure.tflm import run_tflm

    rep = json.loads((run_dir / "report.json").read_text())
    data = np.load(run_dir / "test_data.npz")
    raw = run_tflm((run_dir / "model.tflite").read_bytes(), data["x"])
    assert float(np.mean(raw.argmax(1) == data["y"])) == pytest.approx(
        rep["models"]["deployed"]["accuracy_tflm"], abs=1e-4
    )


def _assert_clean_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("edgeq: error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_pipeline(tmp_path):
    _assert_clean_error(edgeq("run", "pipelines/nope.py", "--out", str(tmp_path / "o")), "does not exist")
    assert not (tmp_path / "o").exists()


def test_file_without_pipeline(tmp_path):
    p = tmp_path / "empty.py"
    p.write_text("x = 1\n")
    _assert_clean_error(edgeq("run", str(p), "--out", str(tmp_path / "o")), "defines no pipeline")


@pytest.mark.parametrize("bits", ["0.5", "9"])
def test_target_bits_out_of_range(tmp_path, bits):
    _assert_clean_error(
        edgeq("run", "pipelines/digits.py", "--out", str(tmp_path / "o"), "--target-bits", bits),
        "outside [1, 8]",
    )
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _assert_clean_error(edgeq("run", "pipelines/digits.py", "--out", str(blocker / "sub")), "cannot write")


def test_model_without_quantizable_layer(tmp_path):
    p = tmp_path / "noweights.py"
    p.write_text(
        "import tf_keras as keras\n"
        "from edgeq.data import load_digits\n"
        "from edgeq.pipeline import PipelineSpec\n"
        "def build(shape, n):\n"
        "    return keras.Sequential([keras.layers.Input(shape), keras.layers.Flatten(),"
        " keras.layers.Activation('softmax')])\n"
        "PIPELINE = PipelineSpec(name='noweights', build_model=build, load_data=lambda seed=0, data=None:"
        " load_digits(seed))\n"
    )
    out = tmp_path / "o"
    _assert_clean_error(edgeq("run", str(p), "--out", str(out), "--quiet"), "no layer edgeq can quantize")
    assert list(out.iterdir()) == []
