"""The rendered generic CMake firmware, built against a real TFLM tree (TFLM_ROOT) and run as a board.

Needs a TensorFlow Lite Micro source tree laid out like create_tflm_tree.py's output; CI has none, so the
build test is skipped unless TFLM_ROOT names one. Building TFLM takes about a minute on two cores:

    TFLM_ROOT=/path/to/tflm-tree python -m pytest -m slow tests/test_firmware_build.py
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from deploy.export.carrays import write_c_arrays
from deploy.firmware import render_firmware
from deploy.measure.tflm import arena_bytes, io_quant, tflm_interpreter

ROOT = Path(__file__).resolve().parents[1]
TFLM_ROOT = os.environ.get("TFLM_ROOT", "")
HAVE_TREE = bool(TFLM_ROOT) and (Path(TFLM_ROOT) / "tensorflow/lite/micro/micro_interpreter.h").is_file()

needs_tree = pytest.mark.skipif(
    not HAVE_TREE,
    reason="TFLM_ROOT is not set to a TFLM tree (tensorflow/lite/micro/micro_interpreter.h); CI has none",
)
needs_cmake = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("c++") is None, reason="no cmake / c++"
)


def _benchmark():
    """benchmarks/firmware_build.py as a module (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / "firmware_build.py"
    spec = importlib.util.spec_from_file_location("firmware_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@needs_tree
@needs_cmake
def test_rendered_project_builds_and_answers_device_eval_bit_for_bit(tiny_build, tiny_tflite, tmp_path):
    fb = _benchmark()
    arena = arena_bytes(tiny_tflite)
    carr = write_c_arrays(tiny_tflite, tiny_build, "tiny")
    fw = render_firmware(
        tiny_tflite,
        tiny_build,
        name="tiny",
        arena_bytes=arena,
        input_quant=io_quant(tflm_interpreter(tiny_tflite), "input"),
        c_arrays=carr,
    )
    built = fb.cmake_build(fw, fb.check_tflm_root(TFLM_ROOT), tmp_path / "cmake-build")
    assert built["warnings_edgeq"] == 0, built["warnings_edgeq_list"]
    assert built["build_type"] == "MinSizeRel"  # the template's default when none is given

    rep, stderr = fb.device_eval(built["exe"], tiny_build)
    boot = fb.BOOT_LINE.search(stderr)
    assert boot, stderr
    assert rep["samples"] == 100 and rep["samples_counted"] == 100
    assert rep["bit_identical_rows"] == 100, rep
    assert rep["device"] == rep["host_tflm"]
    assert rep["link"]["retries"] == 0 and rep["link"]["crc_errors"] == 0
    # The firmware's own arena figure fits the array edgeq sized from its measurement plus margin.
    used, size = int(boot.group(1)), int(boot.group(2))
    assert used == rep["arena"]["device_bytes"] > 0
    assert used <= size


def test_a_missing_or_wrong_tflm_root_is_a_one_line_error_and_exit_2(tmp_path):
    fb = _benchmark()
    with pytest.raises(fb.TflmRootError, match="lacks tensorflow/lite/micro/micro_interpreter.h"):
        fb.check_tflm_root(str(tmp_path))
    with pytest.raises(fb.TflmRootError, match="TFLM_ROOT is not set"):
        fb.check_tflm_root("")
    assert fb.main(["--tflm-root", str(tmp_path)]) == 2
