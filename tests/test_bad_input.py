"""`edgeq run` on bad input: one line, exit 2, before any training; the output folder's manifest and kills.

Every case runs the real CLI (deploy.cli.main) on a tiny pipeline written into tmp_path, whose model builder
imports tf_keras only when called, so a case refused on its data alone needs no TensorFlow. The refusals run
one after another in one subprocess (tests/cli_batch.py), the other tests each in their own. "Before
training" is read from the progress lines: no case may print the float stage's line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "import sys; from deploy.cli import main; sys.exit(main())"
TRAINING = "training the float"

PIPELINE = """
import numpy as np
from edgeq.data import Splits, load_npz
from edgeq.pipeline import PipelineSpec

NAME, LAYER, INPUT, OUTPUTS, KERAS_LAYOUT = {name!r}, {layer!r}, {input!r}, {outputs!r}, {keras_layout!r}


def build(shape, n):
    import tf_keras as keras

    return keras.Sequential([
        keras.layers.Input(INPUT or shape),
        keras.layers.Conv2D(4, 3, name=LAYER),
        keras.layers.Flatten(),
        keras.layers.Dense(OUTPUTS or n, name="head"),
    ])


def load(seed=0, data=None):
    if KERAS_LAYOUT:
        return load_npz(data, seed=seed)
    with np.load(data) as f:
        return Splits(*(f[k] for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")))


PIPELINE = PipelineSpec(name=NAME, build_model=build, load_data=load, epochs=1, bnn_epochs=1, qat_epochs=1)
"""


def edgeq(*args: str, cwd: Path | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, progress on (it is how "before training" is told)."""
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
        preexec_fn=preexec_fn,
    )


def refused(r: subprocess.CompletedProcess, needle: str) -> str:
    """Exit 2, exactly one `edgeq: error:` line containing needle, no traceback, nothing trained."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("edgeq:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("edgeq: error:"), r.stderr[-3000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr and TRAINING not in r.stderr, r.stderr[-3000:]
    return lines[0]


def pipeline(
    folder: Path,
    tag: str,
    *,
    name="tiny",
    layer="conv",
    input=None,
    outputs=None,
    keras_layout=False,
    extra="",
) -> str:
    path = folder / f"{tag}.py"
    text = PIPELINE.format(name=name, layer=layer, input=input, outputs=outputs, keras_layout=keras_layout)
    path.write_text(text + textwrap.dedent(extra))
    return str(path)


def base_arrays() -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    x = r.random((120, 8, 8, 1), dtype=np.float32)
    y = (x.mean((1, 2, 3)) > 0.5).astype("int64")
    return dict(
        x_train=x[:80], y_train=y[:80], x_val=x[80:100], y_val=y[80:100], x_test=x[100:], y_test=y[100:]
    )


def splits_npz(folder: Path, tag: str, **changes) -> str:
    arrays = {**base_arrays(), **changes}
    path = folder / f"{tag}.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad")


def _nan(a: np.ndarray, where=(0,)) -> np.ndarray:
    a = a.astype("float32")
    a[where] = np.nan
    return a


def _cases(w: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (argv after `run`, a word of the expected message); every one refused before training."""
    a = base_arrays()
    good = splits_npz(w, "good")
    raw, keras = pipeline(w, "raw"), pipeline(w, "keras", keras_layout=True)
    junk = w / "junk.npz"
    junk.write_bytes(np.random.default_rng(1).bytes(300))
    cut = w / "cut.npz"
    cut.write_bytes(Path(good).read_bytes()[:400])
    neg = a["y_train"].copy()
    neg[5] = -1
    return {
        "corrupt npz": ([keras, "--data", str(junk)], "not an .npz archive"),
        "truncated npz": ([keras, "--data", str(cut)], "not an .npz archive"),
        "epochs 0": ([raw, "--data", good, "--epochs", "0"], "--epochs 0"),
        "epochs negative": ([raw, "--data", good, "--epochs", "-2"], "--epochs -2"),
        "x/y lengths differ": ([raw, "--data", splits_npz(w, "len", y_train=a["y_train"][:70])], "pair up"),
        "1-D x": ([raw, "--data", splits_npz(w, "oned", x_train=np.arange(80.0))], "one number per example"),
        "empty test split": (
            [raw, "--data", splits_npz(w, "empty", x_test=a["x_test"][:0], y_test=a["y_test"][:0])],
            "x_test is empty",
        ),
        "test images of another size": (
            [raw, "--data", splits_npz(w, "size", x_test=np.zeros((20, 10, 10, 1), "float32"))],
            "same example shape",
        ),
        "NaN labels": ([raw, "--data", splits_npz(w, "ynan", y_train=_nan(a["y_train"]))], "non-finite"),
        "NaN labels, keras layout": (
            [keras, "--data", splits_npz(w, "kynan", y_train=_nan(a["y_train"]))],
            "non-finite",
        ),
        "negative labels": ([raw, "--data", splits_npz(w, "yneg", y_train=neg)], "negative label -1"),
        "fractional labels": (
            [raw, "--data", splits_npz(w, "yfrac", y_train=a["y_train"] + 0.5)],
            "fractional",
        ),
        "NaN inputs": ([raw, "--data", splits_npz(w, "xnan", x_train=_nan(a["x_train"]))], "non-finite"),
        "text inputs": ([raw, "--data", splits_npz(w, "xstr", x_train=np.array(["a"] * 80))], "numeric"),
        "pipeline raises at import": (
            [pipeline(w, "boom", extra="\n1 / 0\n"), "--data", good],
            "raised ZeroDivisionError at line",
        ),
        "load_data raises": (
            [
                pipeline(
                    w,
                    "ldboom",
                    extra="""
                    def _broken(seed=0, data=None):
                        raise RuntimeError("no data today")
                    PIPELINE = PIPELINE.__class__(**{**PIPELINE.__dict__, "load_data": _broken})
                    """,
                ),
                "--data",
                good,
            ],
            "load_data raised RuntimeError at",
        ),
        "load_data takes no data": (
            [
                pipeline(
                    w,
                    "nodata",
                    extra="""
                    PIPELINE = PIPELINE.__class__(**{**PIPELINE.__dict__, "load_data": lambda seed=0: None})
                    """,
                ),
                "--data",
                good,
            ],
            "takes no data argument",
        ),
        "name not text": ([pipeline(w, "nonstr", name=7), "--data", good], "name is 7"),
        "out empty": ([raw, "--data", good, "--out", ""], "--out needs a folder name"),
        "sweep-methods foo": (
            [raw, "--data", good, "--max-accuracy-drop", "1", "--sweep-methods", "foo"],
            "foo",
        ),
        "max-accuracy-drop nan": ([raw, "--data", good, "--max-accuracy-drop", "nan"], "finite"),
        # These need the model built (TensorFlow loaded) to be seen, still before any fit.
        "labels beyond the model's outputs": (
            [pipeline(w, "narrow", outputs=2), "--data", splits_npz(w, "y9", y_train=np.arange(80) % 9)],
            "the model has 2 outputs",
        ),
        "model input of another shape": (
            [pipeline(w, "wide", input=(10, 10, 1)), "--data", good],
            "the model takes inputs of shape (10, 10, 1)",
        ),
        "digits ignores --data": ([str(ROOT / "pipelines" / "digits.py"), "--data", good], "ignores --data"),
    }


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return list(_cases(Path(d)))


def _out(work: Path, case: str) -> Path:
    return work / f"out-{re.sub(r'[^a-z0-9]+', '-', case)}"


@pytest.fixture(scope="module")
def cases(work) -> dict[str, tuple[list[str], str]]:
    return _cases(work)


@pytest.fixture(scope="module")
def refusals(work, cases) -> dict[str, subprocess.CompletedProcess]:
    """Every case's `edgeq run`, all in one subprocess (tests/cli_batch.py: TensorFlow loads once)."""
    from cli_batch import run_batch

    batch = []
    for case, (argv, _) in cases.items():
        out = ["--out", str(_out(work, case))] if "--out" not in argv else []
        batch.append((case, work, ["run", *argv, *out]))
    return run_batch(batch, work)


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_one_line_before_training(work, cases, refusals, case):
    refused(refusals[case], cases[case][1])
    out = _out(work, case)
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
    assert not any(p.name.startswith("model") for p in work.iterdir())  # --out "" wrote nothing in cwd


def test_foreign_files_are_kept_unless_force(work):
    raw, good = pipeline(work, "raw"), splits_npz(work, "good")
    out = work / "foreign"
    (out / "firmware").mkdir(parents=True)
    mine = out / "firmware" / "mine.c"
    mine.write_text("int mine;\n")
    line = refused(edgeq("run", raw, "--data", good, "--out", str(out)), "did not write")
    assert "firmware/" in line and "--force" in line and mine.read_text() == "int mine;\n"
    (out / "report.md").write_text("my notes\n")
    assert "report.md" in refused(edgeq("run", raw, "--data", good, "--out", str(out)), "did not write")
    # --force passes the folder check; the run then stops at its bad data, before writing anything.
    nan = splits_npz(work, "ynan2", y_train=_nan(base_arrays()["y_train"]))
    refused(edgeq("run", raw, "--data", nan, "--out", str(out), "--force"), "non-finite")
    assert mine.read_text() == "int mine;\n" and (out / "report.md").read_text() == "my notes\n"


def test_names_become_bounded_identifiers_and_one_line_text():
    from deploy.export.carrays import MAX_IDENT, c_identifier, safe_text

    long_a, long_b = "a" * 300 + "1", "a" * 300 + "2"
    a, b = c_identifier(long_a), c_identifier(long_b)
    assert len(a) <= MAX_IDENT and len(b) <= MAX_IDENT and a != b and re.fullmatch(r"[a-z_][a-z0-9_]*", a)
    text = safe_text('x"\n#include <y>\r\u2028*/\\??/' + "z" * 200)
    assert text.isprintable() and len(text) <= 80 and not set('"\\') & set(text) and "*/" not in text
    assert "??" not in text and safe_text("\n\t") == "model"


# --- the manifest, in process (no TensorFlow) -------------------------------------------------------


def _stage(out: Path, files: dict[str, str], **kw) -> None:
    from deploy.artifacts import staging

    with staging(out, **kw) as stage:
        for rel, text in files.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)


def test_manifest_lists_what_a_run_wrote_and_refuses_foreign_files(tmp_path):
    from deploy.artifacts import MANIFEST, OutputError, check_folder, read_manifest, sha256_file

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _stage(out, {"model.tflite": "a", "pareto.json": "old search", "firmware/main.cc": "x"})
    m = read_manifest(out)
    assert m.state == "complete" and set(m.files) == {"model.tflite", "pareto.json", "firmware/main.cc"}
    assert m.files["model.tflite"] == sha256_file(out / "model.tflite")
    assert check_folder(out) == m
    # A later run replaces its own files, drops the earlier run's stale ones, keeps the user's.
    _stage(out, {"model.tflite": "b", "firmware/main.cc": "y"})
    assert not (out / "pareto.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "model.tflite").read_text() == "b" and check_folder(out).run_id != m.run_id
    # A build folder the user made inside firmware/ is not edgeq's: refused, left alone; --force replaces it.
    (out / "firmware" / "build").mkdir()
    (out / "firmware" / "build" / "app.elf").write_text("elf")
    with pytest.raises(OutputError, match=r"firmware/build/.*--force"):
        _stage(out, {"firmware/main.cc": "z"})
    assert (out / "firmware" / "main.cc").read_text() == "y" and (
        out / "firmware" / "build" / "app.elf"
    ).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".edgeq-")]
    _stage(out, {"firmware/main.cc": "z"}, force=True)
    assert not (out / "firmware" / "build").exists() and (out / "notes.txt").read_text() == "mine"
    # A file changed behind the manifest's back is seen.
    (out / "firmware" / "main.cc").write_text("edited")
    with pytest.raises(OutputError, match="does not match its edgeq-manifest.json: firmware/main.cc"):
        check_folder(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(OutputError, match="not a readable edgeq manifest"):
        check_folder(out)


def test_a_live_staging_folder_is_not_removed(tmp_path):
    from deploy.artifacts import new_stage, remove_leftovers

    live, lock = new_stage(tmp_path)
    dead = tmp_path / ".edgeq-staging-dead"
    dead.mkdir()
    (dead / "junk").write_bytes(b"x" * 1000)
    try:
        assert remove_leftovers(tmp_path) == [dead.name] and live.is_dir()
    finally:
        os.close(lock)
    assert remove_leftovers(tmp_path) == [live.name]


# --- a kill between the renames, then device-eval, flash and the next runs ------------------------------

KILL = """
import os, signal, sys
from pathlib import Path
from deploy.artifacts import commit, new_stage

out, stop = Path(sys.argv[1]), int(sys.argv[2])
stage, _lock = new_stage(out)
for name in ("bitplan.json", "model.tflite", "report.json"):
    (stage / name).write_text("new " + name)
for done, _ in enumerate(commit(stage, out, run_id="killed"), 1):
    if done == stop:
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def killed(work) -> Path:
    """A folder whose second run was SIGKILLed after its first rename: a new bitplan.json, old others."""
    out = work / "killed"
    out.mkdir()
    _stage(out, {n: f"old {n}" for n in ("bitplan.json", "model.tflite", "report.json", "pareto.json")})
    r = subprocess.run(
        [sys.executable, "-c", KILL, str(out), "1"], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120
    )
    assert r.returncode == -signal.SIGKILL
    assert (out / "bitplan.json").read_text() == "new bitplan.json"
    assert (out / "model.tflite").read_text() == "old model.tflite"
    assert [p.name for p in out.iterdir() if p.name.startswith(".edgeq-staging-")]
    return out


def test_device_eval_and_flash_see_a_half_moved_folder(killed):
    r = edgeq("device-eval", "--port", str(killed / "no-such-port"), "--build", str(killed))
    assert "half-written" in refused(r, "killed")
    r = edgeq("flash", "--board", "nrf52840", "--build", str(killed), "--dry-run")
    assert "two runs" in refused(r, "killed")


def test_next_run_removes_leftovers_and_replaces_the_killed_runs_files(work, killed):
    # A run refused on its data has still cleared the killed run's staging folder.
    bad = splits_npz(work, "ynan3", y_train=_nan(base_arrays()["y_train"]))
    refused(edgeq("run", pipeline(work, "raw"), "--data", bad, "--out", str(killed)), "non-finite")
    assert not [p for p in killed.iterdir() if p.name.startswith(".edgeq-")]
    # A whole run: a layer TFP would refuse (1conv), a name that tries to inject a line, and too long for a
    # file name. The killed run's files are edgeq's (its manifest lists them): replaced without --force.
    name = 'evil"\n#include "/etc/passwd"\r\\' + "x" * 250
    r = edgeq(
        "run",
        pipeline(work, "names", name=name, layer="1conv"),
        "--data",
        splits_npz(work, "good"),
        "--out",
        str(killed),
        "--epochs",
        "1",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert TRAINING in r.stderr and "Traceback" not in r.stderr

    from deploy.artifacts import check_folder

    m = check_folder(killed)
    assert m.state == "complete" and "model.tflite" in m.files and not (killed / "pareto.json").exists()
    assert not [p for p in killed.iterdir() if p.name.startswith(".edgeq-")]
    plan = json.loads((killed / "bitplan.json").read_text())
    assert "1conv" in plan["layers"]
    assert "1conv" in {r["name"] for r in json.loads((killed / "report.json").read_text())["plan"]["layers"]}
    firmware = killed / "firmware"
    sketch = next((firmware / "arduino").iterdir())
    assert len(sketch.name) <= 48 and (sketch / f"{sketch.name}.ino").is_file()
    for path in firmware.rglob("*"):
        if path.is_file() and path.suffix in (".cc", ".cpp", ".h", ".ino", ".txt", ".conf", ".md"):
            text = path.read_text()
            assert "\r" not in text and not re.search(r"^\s*#include \"/etc/passwd", text, re.M), path
    assert (killed / "report.md").read_text().splitlines()[0].startswith("# edgeq report: evil")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx:  # the model's C array, with the name in its comments, still compiles
        subprocess.run([cxx, "-std=c++17", "-fsyntax-only", str(firmware / "model_data.cc")], check=True)
    # A file of another run copied in is seen too.
    (killed / "model.tflite").write_bytes(b"another model")
    r = edgeq("device-eval", "--port", str(killed / "no-such-port"), "--build", str(killed))
    assert "model.tflite" in refused(r, "does not match its edgeq-manifest.json")


def test_full_disk_is_one_line(work):
    """The writes fail (a per-file size limit stands in for a full disk): one line, the folder untouched."""

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = work / "full"
    r = edgeq(
        "run",
        pipeline(work, "raw"),
        "--data",
        splits_npz(work, "good"),
        "--out",
        str(out),
        "--epochs",
        "1",
        preexec_fn=small_files,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("edgeq:")]
    assert r.returncode == 2 and lines == [lines[0]] and "File too large" in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and list(out.iterdir()) == []
