"""The one house: a new allocator and a new storage join through their tables alone and run end to end;
the report renders as self-contained HTML in a real browser; a board's settings reach the firmware."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import edgeq  # noqa: F401
from deploy import storage
from deploy.app import RunOptions, run
from deploy.cli import parser
from deploy.storage.base import Storage, StorageKind
from edgeq import allocators
from edgeq.allocate import uniform_plan
from edgeq.allocators import Allocator
from edgeq.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _toy_allocate(trained, target, spec, seed):
    """Every layer at 6 bits, whatever the target: a method the table did not know."""
    plan = uniform_plan(list(trained.posteriors), 6)
    return type(plan)(plan.layers, method="toy", meta={"toy": True})


def _toy_build(converted: bytes) -> Storage:
    """The int8 storage under another name: a storage the table did not know."""
    plain = storage.STORAGES["int8"].build(converted)
    return Storage("toy8", plain.model, plain.tensors)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    spec = load_pipeline(ROOT / "pipelines" / "digits.py")
    toy = Allocator("toy", _toy_allocate, "toy: six bits everywhere", "*")
    kind = StorageKind("toy8", _toy_build, "int8 by another name", in_auto=False)
    with allocators.registered(toy), storage.registered(kind):
        run_help = " ".join(parser()._subparsers._group_actions[0].choices["run"].format_help().split())
        rep = run(spec, RunOptions(out=out, method="toy", storage="toy8", epochs=1))
    assert "toy" not in allocators.ALLOCATORS and "toy8" not in storage.STORAGES  # the tables are restored
    return out, rep, run_help


def test_a_toy_allocator_and_storage_run_end_to_end_through_the_tables(toy_run):
    out, rep, run_help = toy_run
    body = json.loads((out / "report.json").read_text())
    assert body == rep.to_json()
    assert body["plan"]["method"] == "toy" and {r["bits"] for r in body["plan"]["layers"]} == {6}
    dep = body["models"]["deployed"]
    assert dep["storage"] == "toy8" and dep["variants"] == {"toy8": (out / "model.tflite").stat().st_size}
    assert dep["bit_exact_compressed_vs_uncompressed"] and 0.5 < dep["accuracy_tflm"] <= 1.0
    # six-bit values hold at most 63 distinct integers: their entropy is below the fixed six bits
    assert 0 < dep["entropy_limit_bytes"] <= dep["packing_limit_bytes"]
    assert body["warnings"] == [] and body["plan"]["unplanned"] == []  # every weight layer is planned
    assert json.loads((out / "bitplan.json").read_text())["method"] == "toy"
    # the CLI's choices and help come from the tables
    assert "toy" in run_help and "toy8" in run_help and "six bits everywhere" in run_help


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return path


def test_report_html_renders_in_a_real_browser_with_the_models_figures(toy_run, tmp_path):
    out, rep, _ = toy_run
    page = out / "report.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    assert html.count("data:image/png;base64,") >= 2  # plots inline
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [_chromium(), *flags, "--dump-dom", f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    dep = rep.body["models"]["deployed"]
    assert f"{dep['flash_bytes']:,} B" in dom and "edgeq report: digits" in dom
    assert "Bits per layer against informativeness" in dom and "Storage per tensor" in dom
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == [], console
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_device_eval_rerenders_the_report_from_its_value(toy_run):
    from deploy import report
    from deploy.device.evaluate import SECTION, main_device_eval
    from deploy.device.virtual_board import VirtualBoard

    out, rep, _ = toy_run
    assert report.load(out).body == rep.body and report.load(out).device is None
    for _ in range(2):  # a second evaluation replaces the section, never appends another
        with VirtualBoard(out, None) as board:
            assert main_device_eval(["--port", board.port, "--build", str(out), "--limit", "20"]) == 0
    loaded = report.load(out)
    assert loaded.device["samples"] == 20 and loaded.device["bit_identical_rate"] == 1.0
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert md.count(SECTION) == 1 and md.startswith("# edgeq report: digits")
    assert "Host against device" in page and f"{loaded.device['arena']['device_bytes']:,}" in page


def test_board_clock_fpu_and_flavours_reach_the_firmware(tiny_tflite, tmp_path):
    from deploy.boards import load_board
    from deploy.export.carrays import write_c_arrays
    from deploy.firmware import render_firmware
    from deploy.measure.tflm import io_quant, tflm_interpreter

    for name, fpu, abi in (("nrf52840", "-mfpu=fpv4-sp-d16", "hard"), ("rp2040", None, "soft")):
        board = load_board(name)
        out = tmp_path / name
        out.mkdir()
        fw = render_firmware(
            tiny_tflite,
            out,
            name="tiny",
            arena_bytes=8000,
            board=board,
            input_quant=io_quant(tflm_interpreter(tiny_tflite), "input"),
            c_arrays=write_c_arrays(tiny_tflite, out, "tiny"),
        )
        cmake = (fw / "CMakeLists.txt").read_text()
        assert f"EDGEQ_CLOCK_HZ={board.clock_hz}u" in cmake
        assert f"-mfloat-abi={abi}" in cmake and (fpu is None or fpu in cmake)
        assert f"-mcpu={board.core.removesuffix('f')}" in cmake
        readme = (fw / "README.md").read_text()
        assert board.name in readme and board.flash_tool in readme
        for flavour in ("zephyr", "arduino"):
            assert (fw / flavour).is_dir() == (flavour in board.templates)
    assert "CONFIG_FPU=y" in (tmp_path / "nrf52840" / "firmware" / "zephyr" / "prj.conf").read_text()


def test_every_kind_comes_from_one_table():
    from deploy.firmware import FLAVOURS

    assert set(allocators.ALLOCATORS) == {"qiu", "qinu", "rb", "uniform", "bb", "planner"}  # planner: deploy
    assert {"int8", "int4", "lut", "prune", "huffman"} <= set(storage.STORAGES)
    assert set(FLAVOURS) == {"cmake", "zephyr", "arduino"}
    with pytest.raises(Exception, match="unknown method 'qi'; use one of qiu, qinu, rb, uniform, bb"):
        allocators.check_method("qi")
    assert np.isfinite(len(storage.choices()))


def test_layers_outside_the_plan_are_named_with_the_reason_and_divergence_warns():
    import tf_keras as keras

    from deploy.report import divergence_warnings
    from edgeq.layers import unplanned_layers

    model = keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.SeparableConv2D(4, 3, name="sep"),
            keras.layers.DepthwiseConv2D(3, name="dw"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name="fc"),
        ]
    )
    why = unplanned_layers(model, {"fc"})
    assert set(why) == {"sep", "dw"}  # BN folds into the layer before it; fc is planned
    assert "SeparableConv2D is not a layer edgeq quantizes" in why["sep"] and "8 bits" in why["sep"]
    assert "no TFP variational twin" in why["dw"]
    close = {"qat_keras": {"accuracy": 0.60}, "deployed": {"accuracy_tflm": 0.59}}
    far = {"qat_keras": {"accuracy": 0.605}, "deployed": {"accuracy_tflm": 0.144}}  # the LSTM case
    assert divergence_warnings(close) == []
    assert "46.1 points below the QAT model" in divergence_warnings(far)[0]
    assert divergence_warnings({"qat_keras": {"mae": 1.0}, "deployed": {"mae_tflm": 1.5}})
