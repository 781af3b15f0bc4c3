"""device-eval end to end against the VirtualBoard over a real pty and pyserial, including every fault."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deploy.device.evaluate import main_device_eval
from deploy.device.virtual_board import VirtualBoard

N = 30


def _host_accuracy(build, n=N) -> float:
    from deploy.measure.tflm import run_tflm

    d = np.load(build / "test_data.npz")
    out = run_tflm((build / "model.tflite").read_bytes(), d["x"][:n])
    return round(float(np.mean(np.argmax(out, axis=1) == d["y"][:n])), 6)


def _eval(build, fault=None, *extra: str, **board_kw) -> tuple[int, dict | None]:
    with VirtualBoard(build, fault, **board_kw) as board:
        rc = main_device_eval(["--port", board.port, "--build", str(build), "--limit", str(N), *extra])
    path = build / "device_report.json"
    return rc, (json.loads(path.read_text()) if path.exists() else None)


def test_device_eval_reproduces_host_tflm_exactly(tiny_build, capsys):
    (tiny_build / "report.md").write_text("# tiny\n\n## Sizes\n\nflash 1 B\n")
    rc, rep = _eval(tiny_build)
    assert rc == 0, capsys.readouterr().err
    assert rep["samples"] == rep["samples_counted"] == N
    assert rep["device"]["accuracy"] == rep["host_tflm"]["accuracy"] == _host_accuracy(tiny_build)
    assert rep["device"]["accuracy"] > 0.5
    assert rep["bit_identical_rate"] == 1.0 and rep["max_abs_diff"] == 0
    assert rep["virtual_board"] and "host nanoseconds" in rep["cycles"]["unit"]
    assert rep["cycles"]["median"] > 0 and rep["cycles"]["ms_median"] == pytest.approx(
        rep["cycles"]["median"] / 1e6, abs=1e-6
    )
    assert rep["arena"]["device_bytes"] == rep["arena"]["host_tflm_bytes"] > 0
    assert rep["link"]["retries"] == 0 and rep["resets"] == []
    assert "bit-identical" in capsys.readouterr().out
    # Without the run's report.json there is no Report to re-render: a foreign report.md is left as it is
    # (test_house runs device-eval on a real run's folder and checks the re-rendered report).
    rc, _ = _eval(tiny_build)
    assert rc == 0 and (tiny_build / "report.md").read_text() == "# tiny\n\n## Sizes\n\nflash 1 B\n"


def test_silent_board_times_out_with_a_clear_message(tiny_build, capsys):
    rc, rep = _eval(tiny_build, "silent", "--timeout", "0.2", "--retries", "1")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and rep is None
    assert len(err.splitlines()) == 1 and "no answer from the device" in err


def test_bad_crc_every_time_gives_up_after_retries(tiny_build, capsys):
    rc, rep = _eval(tiny_build, "bad-crc", "--timeout", "0.5", "--retries", "2")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and rep is None
    assert "3 failed attempts in a row" in err and "bad CRC" in err


def test_bad_crc_once_is_retried_and_the_run_succeeds(tiny_build):
    rc, rep = _eval(tiny_build, "bad-crc-once", "--timeout", "0.5")
    assert rc == 0
    assert rep["link"]["crc_errors"] == 1 and rep["link"]["retries"] >= 1
    assert rep["samples_counted"] == N and rep["bit_identical_rate"] == 1.0


def test_garbage_before_frames_is_skipped(tiny_build):
    rc, rep = _eval(tiny_build, "garbage", "--timeout", "0.5")
    assert rc == 0
    assert rep["link"]["garbage_bytes"] > N * 3 and rep["link"]["crc_errors"] == 0
    assert rep["bit_identical_rate"] == 1.0 and rep["device"]["accuracy"] == _host_accuracy(tiny_build)


def test_reset_mid_run_resumes_without_counting_twice(tiny_build):
    rc, rep = _eval(tiny_build, "reset", "--timeout", "0.5", reset_after=12)
    assert rc == 0
    assert [r["resumed_at_sample"] for r in rep["resets"]] == [12]
    assert rep["info"]["boot_nonce_first"] != rep["info"]["boot_nonce_last"]
    assert rep["samples"] == rep["samples_counted"] == N
    assert rep["device"]["accuracy"] == rep["host_tflm"]["accuracy"] == _host_accuracy(tiny_build)
    assert rep["bit_identical_rate"] == 1.0


def test_other_model_is_refused_with_both_checksums(tiny_build, capsys):
    import zlib

    rc, rep = _eval(tiny_build, "other-model")
    err = capsys.readouterr().err
    model = (tiny_build / "model.tflite").read_bytes()
    assert rc == 2 and rep is None
    assert "different model" in err and f"{len(model):,} B" in err and f"{len(model) + 1024:,} B" in err
    assert f"0x{zlib.crc32(model):08X}" in err


def test_virtual_board_command_prints_its_port(tiny_build):
    """`edgeq virtual-board` as a process: the printed pty answers device-eval."""
    code = (
        "import sys; from deploy.device.virtual_board import main_virtual_board as m; "
        "sys.exit(m(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--build", str(tiny_build)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("virtual board on /dev/"), line
        port = line.split()[3]
        assert main_device_eval(["--port", port, "--build", str(tiny_build), "--limit", "5"]) == 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_flash_prints_the_exact_command_when_the_tool_is_missing(tiny_build, capsys):
    boards = pytest.importorskip("deploy.boards", reason="board profiles (deploy.boards) are not there yet")
    from deploy.device.flash import main_flash

    board = boards.load_board("generic-cortex-m4")
    if shutil.which(board.flash_tool):
        pytest.skip(f"{board.flash_tool} is installed; this test needs it absent")
    image = tiny_build / "firmware" / "cmake" / "build" / "edgeq_app.hex"
    image.parent.mkdir(parents=True)
    image.write_bytes(b":00000001FF\n")
    assert main_flash(["--board", "generic-cortex-m4", "--build", str(tiny_build)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{board.flash_tool} flash {image}" in err
    assert main_flash(["--board", "generic-cortex-m4", "--build", str(tiny_build), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == f"{board.flash_tool} flash {image}"
    # esptool needs a port: without --port the message says so and still shows the command.
    assert main_flash(["--board", "esp32s3", "--build", str(tiny_build)]) == 2
    assert "--port" in capsys.readouterr().err
