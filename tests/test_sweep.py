"""Budget search on the offline default: real fit, looser is better, impossible fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deploy.app import RunOptions, train_pipeline
from deploy.search import BudgetError, sweep
from deploy.target import Target
from edgeq.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (2.5, 4.0, 6.0)  # one sub-4-bit target is enough for the tight budget below


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    spec = load_pipeline(ROOT / "pipelines" / "digits.py").with_epochs(3)
    opts = RunOptions(out=tmp_path_factory.mktemp("train"))
    return spec, train_pipeline(spec, opts)


def _sweep(setup, out: Path, budget: Target | None = None, **kw) -> dict:
    spec, trained = setup
    opts = RunOptions(out=out, target=budget or Target())
    return sweep(spec, opts, targets=TARGETS, methods=("qiu",), trained=trained, **kw).to_json()


@pytest.fixture(scope="module")
def loose(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("loose")
    budget = Target(flash_budget=1 << 20, ram_budget=1 << 20)
    return out, _sweep(setup, out, workers=2, budget=budget)  # worker processes


def _pareto(out: Path) -> list[dict]:
    return json.loads((out / "pareto.json").read_text())["candidates"]


@pytest.fixture(scope="module")
def tight(setup, loose, tmp_path_factory):
    """A budget just below the smallest model of >= 4 mean bits: only sub-4-bit models fit."""
    rows = _pareto(loose[0])
    flash_4 = min(r["flash_bytes"] for r in rows if r["mean_bits"] >= 4.0)
    budget = Target(flash_budget=flash_4 - 1, ram_budget=64 * 1024)
    assert any(r["flash_bytes"] <= budget.model_flash for r in rows), "the sweep must reach below 4 bits"
    out = tmp_path_factory.mktemp("tight")
    return out, _sweep(setup, out, budget=budget), budget


def test_tight_budget_picks_a_sub_4_bit_model_that_really_fits(tight):
    tmp_path, rep, budget = tight
    dep = rep["models"]["deployed"]
    assert rep["plan"]["mean_bits"] < 4.0
    assert (tmp_path / "model.tflite").stat().st_size == dep["flash_bytes"] <= budget.model_flash
    assert dep["arena_bytes"] <= budget.model_ram
    assert "Why this model" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "pareto.png").stat().st_size > 0
    chosen = [r for r in _pareto(tmp_path) if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["fits"]


def test_looser_budget_picks_a_more_accurate_model(loose, tight):
    loose_out, loose_rep = loose
    rows = _pareto(loose_out)
    tight_rep = tight[1]
    assert (
        loose_rep["models"]["deployed"]["accuracy_tflm"] >= tight_rep["models"]["deployed"]["accuracy_tflm"]
    )
    assert loose_rep["models"]["deployed"]["flash_bytes"] > tight_rep["models"]["deployed"]["flash_bytes"]
    # the chosen one is the best measured (after QAT) among the finalists that fit
    finals = [r for r in rows if r["qat_epochs"] > 0 and r["fits"]]
    assert next(r for r in rows if r["chosen"])["score"] == max(r["score"] for r in finals)


def test_worker_processes_screen_like_the_main_process(loose, tight):
    parallel = {(r["method"], r["target"]): r for r in _pareto(loose[0]) if r["qat_epochs"] == 0}
    serial = {(r["method"], r["target"]): r for r in _pareto(tight[0]) if r["qat_epochs"] == 0}
    assert parallel.keys() == serial.keys()
    for key, p in parallel.items():
        s = serial[key]
        assert (p["bits"], p["storage"], p["flash_bytes"], p["arena_bytes"]) == (
            s["bits"],
            s["storage"],
            s["flash_bytes"],
            s["arena_bytes"],
        )
        # one TF thread per worker reorders float reductions in calibration: a sample or two may flip
        assert abs(p["score"] - s["score"]) <= 0.02


def test_impossible_budget_says_what_was_reached(setup, tmp_path):
    with pytest.raises(
        BudgetError, match=r"smallest flash reached was [\d,]+ B and the smallest arena [\d,]+ B"
    ):
        _sweep(setup, tmp_path, budget=Target(flash_budget=2000, ram_budget=1000))
    assert not (tmp_path / "model.tflite").exists()


def test_max_accuracy_drop_picks_the_smallest_within_the_drop(setup, loose, tmp_path):
    rep = _sweep(setup, tmp_path, max_accuracy_drop=100.0)
    rows = _pareto(tmp_path)
    assert rep["models"]["deployed"]["flash_bytes"] == min(
        r["flash_bytes"] for r in rows if r["qat_epochs"] > 0
    )
    assert np.isfinite(rep["models"]["deployed"]["accuracy_tflm"])


def test_board_allowances_shrink_the_budget():
    from deploy.boards import load_board

    board = load_board("nrf52832")
    b = Target(board=board)
    assert b.model_flash == board.flash_bytes - board.app_allowance_bytes
    assert b.model_ram == board.ram_bytes - board.stack_allowance_bytes
    assert Target(board=board, flash_budget=1000).model_flash == 1000
    # The board's flash holds the firmware: the model plus TFLM's runtime and its kernels' code.
    assert b.fits(1000, 1000) and not b.fits(1000, 1000, code=b.model_flash)


def test_a_model_below_the_accuracy_floor_is_refused_with_both_ends_named(setup, tmp_path):
    # A floor no model can meet (it asks for 50 points above the float model): the search must refuse,
    # name the most accurate fitting model and say that none is within the floor, and write nothing.
    budget = Target(flash_budget=1 << 20, ram_budget=1 << 20)
    with pytest.raises(BudgetError, match=r"points below the float model .*-50-point floor; no candidate"):
        _sweep(setup, tmp_path, budget=budget, floor=-50.0)
    assert not (tmp_path / "model.tflite").exists()
