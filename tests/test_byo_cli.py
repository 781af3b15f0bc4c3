"""Bring your own model: a Keras 3 model file and an .npz go straight into `edgeq run --model --data`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _keras3_model(kind: str):
    import keras  # Keras 3: TF_USE_LEGACY_KERAS redirects only tf.keras

    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, activation="relu", name="c1")(inp)
    if kind == "residual":
        r = keras.layers.Conv2D(8, 3, padding="same", name="c2")(h)
        h = keras.layers.Activation("relu")(keras.layers.Add()([h, r]))
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(10, name="fc")(h))


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """digits.npz and two Keras 3 models trained and saved with model.save (a CNN and a residual one)."""
    import keras

    x, y = digits
    d = tmp_path_factory.mktemp("byo")
    np.savez(d / "digits.npz", x_train=x[:1400], y_train=y[:1400], x_test=x[1400:], y_test=y[1400:])
    for kind in ("cnn", "residual"):
        keras.utils.set_random_seed(0)
        m = _keras3_model(kind)
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        m.fit(x[:1400], y[:1400], epochs=3, verbose=0)
        m.save(d / f"{kind}.keras")
    L = keras.layers  # a Reshape between fc1 and c1: its pruned form cannot be rebuilt
    head = [keras.Input((8, 8, 1)), L.Flatten(), L.Dense(64, name="fc1"), L.Reshape((8, 8, 1))]
    tail = [L.Conv2D(4, 3, name="c1"), L.Flatten(), L.Dense(10, name="fc")]
    keras.Sequential(head + tail).save(d / "reshaped.keras")
    return d


def _edgeq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from deploy.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize("kind", ["cnn", "residual"])
def test_a_keras3_file_runs_to_a_measured_tflm_model_and_firmware(files, kind):
    out = files / f"out_{kind}"
    r = _edgeq(
        "run",
        "--model",
        str(files / f"{kind}.keras"),
        "--data",
        str(files / "digits.npz"),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--quiet",
        cwd=files,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["pipeline"] == kind and (out / "firmware" / "main.cc").is_file()
    assert rep["source"]["sha256"] == hashlib.sha256((files / f"{kind}.keras").read_bytes()).hexdigest()
    assert rep["models"]["deployed"]["accuracy_tflm"] > 0.8
    assert rep["models"]["deployed"]["bit_exact_compressed_vs_uncompressed"]


def test_no_train_only_evaluates_the_model(files):
    import keras

    x = np.load(files / "digits.npz")
    m = keras.models.load_model(files / "cnn.keras")
    want = float(np.mean(m.predict(x["x_test"], verbose=0).argmax(1) == x["y_test"]))
    out = files / "out_pretrained"
    r = _edgeq(
        "run",
        "--model",
        str(files / "cnn.keras"),
        "--data",
        str(files / "digits.npz"),
        "--no-train",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--quiet",
        cwd=files,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["models"]["float"]["accuracy"] == round(want, 4)


BAD = [
    (["--model", "{d}/missing.keras", "--data", "{d}/digits.npz"], "missing.keras"),
    (["--model", "{d}/digits.npz", "--data", "{d}/digits.npz"], "not a Keras model"),
    (["--model", "{d}/cnn.keras"], "--model needs --data"),
    (["pipelines/digits.py", "--model", "{d}/cnn.keras", "--data", "{d}/digits.npz"], "or --model"),
    (["--model", "{d}/cnn.keras", "--data", "{d}/bad.npz"], "y_test"),
    (["--model", "{d}/residual.keras", "--data", "{d}/digits.npz", "--prune-channels", "0.5"], "Add layer"),
    (["--model", "{d}/reshaped.keras", "--data", "{d}/digits.npz", "--prune-channels", "0.5"], "fc1' cannot"),
]


@pytest.fixture(scope="module")
def refusals(files) -> dict[str, subprocess.CompletedProcess]:
    """Every BAD command line in one subprocess (tests/cli_batch.py), each into its own --out."""
    from cli_batch import run_batch

    np.savez(
        files / "bad.npz", x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(4), x_test=np.zeros((2, 8, 8, 1))
    )
    cases = [
        (needle, ROOT, ["run", *[a.format(d=files) for a in args], "--out", str(files / f"bad_out{i}")])
        for i, (args, needle) in enumerate(BAD)
    ]
    return run_batch(cases, files)


@pytest.mark.parametrize(("i", "needle"), [(i, needle) for i, (_, needle) in enumerate(BAD)])
def test_bad_input_is_one_line_and_exit_2_before_training(files, refusals, i, needle):
    r = refusals[needle]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("edgeq: error:")]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (files / f"bad_out{i}" / "model.tflite").exists()
