"""`edgeq inspect` on real flatbuffers: operators, tensors, arena, flash, peak-memory operator, bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deploy.inspect import inspect_model, peak_memory_op

ROOT = Path(__file__).resolve().parents[1]


def test_inspect_reports_what_tflm_measures(tiny_build):
    from deploy.measure.tflm import arena_bytes

    path = tiny_build / "model.tflite"
    d = inspect_model(path)
    assert d["flash_bytes"] == path.stat().st_size
    assert d["arena_bytes"] == arena_bytes(path.read_bytes())
    assert d["operators"][0] == "CONV_2D" and "FULLY_CONNECTED" in d["operators"]
    weights = [t for t in d["tensors"] if t["type"] == "INT8" and len(t["shape"]) == 2 and t["bytes_stored"]]
    assert {tuple(t["shape"]) for t in weights} == {(32, 288), (10, 32)}


def test_peak_memory_operator_counts_live_activations(tiny_tflite):
    peak = peak_memory_op(tiny_tflite)
    # conv1: 64 B in + 288 B out; reshape: 288 B in + 288 B out is the largest live set;
    # fc1: 288 + 32; fc2: 32 + 10
    assert peak["op"] == "RESHAPE" and peak["index"] == 1 and peak["live_bytes"] == 288 + 288


def test_cli_json_and_bad_files(tiny_build, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "deploy.cli", "inspect", *args], capture_output=True, text=True, cwd=ROOT
        )

    r = run(str(tiny_build / "model.tflite"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["flash_bytes"] > 0
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model at all")
    for bad, needle in ((junk, "not a TFLite flatbuffer"), (tmp_path / "missing.tflite", "does not exist")):
        r = run(str(bad))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes((tiny_build / "model.tflite").read_bytes()[:100])
    r = run(str(truncated))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
