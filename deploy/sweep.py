"""Budget-driven search: train once, sweep bit targets and methods, keep the best model that fits.

Quantile Inform and Random Bits are cheap once the Bayesian twin is trained, so every candidate is
allocated, calibrated (no fine-tuning), exported and measured in TFLM; only the finalists get QAT.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deploy import measure
from deploy.flow import (
    Candidate,
    PipelineSpec,
    RunOptions,
    Trained,
    _validate,
    allocate_plan,
    deploy_candidate,
    make_candidate,
    train,
)
from edgeq.errors import EdgeqError
from edgeq.io import atomic_write_text

DEFAULT_TARGETS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
FINALISTS = 2
SCREEN_SAMPLES = 2000  # candidates are screened on this many test samples, finalists on the whole split


class BudgetError(EdgeqError):
    """No candidate fits the budget."""


@dataclass(frozen=True)
class Budget:
    """Bytes the model may take: flash for the .tflite, RAM for the TFLM arena (None: unbounded)."""

    flash: int | None = None
    ram: int | None = None

    def fits(self, flash: int, arena: int) -> bool:
        """True when both figures are within the budget."""
        return (self.flash is None or flash <= self.flash) and (self.ram is None or arena <= self.ram)

    def describe(self) -> str:
        """'flash <= N B, RAM <= M B'."""
        parts = [
            f"flash <= {self.flash:,} B" if self.flash is not None else "",
            f"arena <= {self.ram:,} B" if self.ram is not None else "",
        ]
        return ", ".join(p for p in parts if p) or "no budget"


def budget_for(board=None, flash: int | None = None, ram: int | None = None) -> Budget:
    """The model's budget: the board's memory less its allowances, tightened by explicit budgets."""
    if board is not None:
        board_flash = board.flash_bytes - board.firmware_allowance_bytes
        board_ram = board.ram_bytes - board.stack_allowance_bytes
        flash = board_flash if flash is None else min(flash, board_flash)
        ram = board_ram if ram is None else min(ram, board_ram)
    return Budget(flash, ram)


@dataclass
class Row:
    """One measured candidate of the sweep (a point of the Pareto plot)."""

    method: str
    target: float
    mean_bits: float
    bits: dict[str, int]
    storage: str
    flash_bytes: int
    arena_bytes: int
    score: float  # TFLM accuracy, or -MAE for regression, so that higher is better
    fits: bool
    qat_epochs: int
    test_samples: int = 0  # how many test samples the score was measured on
    chosen: bool = False


def _score(cand: Candidate, trained: Trained, samples: int | None) -> tuple[float, int, int]:
    s = trained.splits
    x, y = s.x_test[:samples], s.y_test[:samples]
    m = measure.measure_tflm(cand.chosen.model, x, y, s.task)["figures"]
    score = m["accuracy_tflm"] if "accuracy_tflm" in m else -m["mae_tflm"]
    return float(score), int(m["flash_bytes"]), int(m["arena_bytes"])


def _row(
    cand: Candidate, trained: Trained, budget: Budget, qat_epochs: int, samples: int | None = None
) -> Row:
    score, flash, arena = _score(cand, trained, samples)
    n = len(trained.splits.x_test[:samples])
    return Row(
        cand.method,
        cand.target,
        round(cand.plan.mean_bits(trained.sizes), 4),
        cand.plan.bits,
        cand.chosen.kind,
        flash,
        arena,
        round(score, 4),
        budget.fits(flash, arena),
        qat_epochs,
        n,
    )


def _float_score(trained: Trained) -> float:
    s = trained.splits
    pred = trained.float_model.predict(s.x_test, verbose=0, batch_size=256)
    if s.task == "regression":
        return -float(np.mean(np.abs(pred.reshape(-1) - s.y_test.reshape(-1))))
    return float(np.mean(pred.argmax(1) == s.y_test))


def pick(rows: list[Row], max_drop: float | None, float_score: float) -> Row | None:
    """The most accurate fitting row, or with max_drop the smallest fitting row within max_drop points."""
    fitting = [r for r in rows if r.fits]
    if max_drop is None:
        return max(fitting, key=lambda r: (r.score, -r.flash_bytes), default=None)
    near = [r for r in fitting if (float_score - r.score) * 100 <= max_drop]
    return min(near, key=lambda r: (r.flash_bytes, -r.score), default=None)


def sweep(
    spec: PipelineSpec,
    opts: RunOptions,
    *,
    targets=DEFAULT_TARGETS,
    methods=("qiu", "rb"),
    budget: Budget = Budget(),
    max_accuracy_drop: float | None = None,
    trained: Trained | None = None,
    workers: int = 2,
) -> dict:
    """Train once (or reuse `trained`), measure each (method, target), QAT the finalists, deploy the best."""
    opts = dataclasses.replace(opts, arena_limit=budget.ram)
    spec, _, _, board, out, progress = _validate(spec, opts)
    trained = trained or train(spec, opts, progress)
    progress.stage(
        "allocate", f"sweeping {len(targets)} targets x {len(methods)} methods (calibrated, no QAT)"
    )
    # Allocation is cheap and decides which (method, target) pairs are distinct plans.
    jobs = {}
    for method in methods:
        for target in targets:
            plan = allocate_plan(method, trained.posteriors, target, spec, opts.seed)
            jobs.setdefault(tuple(sorted(plan.bits.items())) + (method,), (method, target))
    rows = _screen(list(jobs.values()), trained, spec, opts, budget, workers)
    fitting = [r for r in rows if r.fits]
    if not fitting:
        raise BudgetError(
            f"nothing fits {budget.describe()}: the smallest flash reached was "
            f"{min(r.flash_bytes for r in rows):,} B and the smallest arena "
            f"{min(r.arena_bytes for r in rows):,} B; "
            "raise the budget or lower --target-bits"
        )
    base = _float_score(trained)
    if max_accuracy_drop is None:
        order = sorted(fitting, key=lambda r: -r.score)
    else:
        order = sorted(fitting, key=lambda r: r.flash_bytes)
    progress.stage(
        "qat", f"QAT fine-tuning of {min(FINALISTS, len(order))} finalists ({spec.qat_epochs} epochs)"
    )
    finals: list[tuple[Row, Candidate]] = []
    for r in order[:FINALISTS]:
        cand = make_candidate(trained, spec, opts, r.method, r.target, spec.qat_epochs)
        finals.append((_row(cand, trained, budget, spec.qat_epochs), cand))
    best = pick([f for f, _ in finals], max_accuracy_drop, base) or pick(rows, max_accuracy_drop, base)
    if best is None:
        raise BudgetError(
            f"no candidate that fits {budget.describe()} is within {max_accuracy_drop} points "
            f"of the float model ({100 * base:.2f}%); allow a larger drop or a larger budget"
        )
    best.chosen = True
    chosen = next((c for f, c in finals if f is best), None) or make_candidate(
        trained, spec, opts, best.method, best.target, qat_epochs=0
    )
    all_rows = rows + [f for f, _ in finals]
    why = (
        f"{best.method} at target {best.target:g} ({best.mean_bits:.2f} mean bits, {best.storage}): "
        + (
            f"the most accurate of {len(fitting)} candidates that fit {budget.describe()}"
            if max_accuracy_drop is None
            else f"the smallest fitting candidate within {max_accuracy_drop} points of the float model"
        )
        + f"; TFLM score {best.score:.4f}, flash {best.flash_bytes:,} B, arena {best.arena_bytes:,} B."
    )
    extra = {
        "sweep": {
            "budget": asdict(budget),
            "why": why,
            "candidates": len(all_rows),
            "pareto": "pareto.json",
            "plot": "pareto.png",
        }
    }
    rep = deploy_candidate(trained, chosen, spec, opts, board, out, progress, extra=extra)
    write_pareto(Path(out), all_rows, budget, why, spec.name)
    _append_why(Path(out) / "report.md", why, all_rows)
    return rep


def _screen(jobs, trained: Trained, spec: PipelineSpec, opts: RunOptions, budget: Budget, workers: int):
    """Calibrate, export and measure every job; in `workers` spawned processes when workers > 1."""
    if workers <= 1 or len(jobs) < 2:
        return [
            _row(make_candidate(trained, spec, opts, m, t, qat_epochs=0), trained, budget, 0, SCREEN_SAMPLES)
            for m, t in jobs
        ]
    import concurrent.futures
    import multiprocessing
    import pickle
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeq-sweep-") as tmp:
        state = Path(tmp)
        trained.det.save(state / "det.keras")
        s = trained.splits
        np.savez(state / "splits.npz", **{k: getattr(s, k) for k in _SPLIT_KEYS})
        # The spec's callables (model builder, data loader) live in the pipeline script, which a
        # spawned process cannot import by name; candidates need neither.
        light_spec = dataclasses.replace(spec, build_model=None, load_data=None)
        light_opts = dataclasses.replace(opts, stderr=None)
        (state / "state.pkl").write_bytes(
            pickle.dumps((trained.posteriors, trained.sizes, s.task, light_spec, light_opts, budget))
        )
        ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            return list(pool.map(_screen_one, [(str(state), m, t) for m, t in jobs]))


_SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_WORKER_STATE: dict = {}


def _screen_one(job) -> Row:
    """Worker: rebuild Trained from the state folder once per process, then screen one candidate."""
    state, method, target = job
    if _WORKER_STATE.get("dir") != state:
        import pickle

        import tensorflow as tf
        import tf_keras as keras

        from deploy.flow import _loss_and_metrics
        from edgeq.data import Splits

        tf.config.threading.set_intra_op_parallelism_threads(1)  # one core per worker
        posts, sizes, task, spec, opts, budget = pickle.loads((Path(state) / "state.pkl").read_bytes())
        with np.load(Path(state) / "splits.npz") as f:
            splits = Splits(*(f[k] for k in _SPLIT_KEYS), task=task)
        det = keras.models.load_model(Path(state) / "det.keras", compile=False)
        loss, metrics = _loss_and_metrics(task)
        trained = Trained(splits, None, None, det, posts, sizes, loss, metrics)
        _WORKER_STATE.update(dir=state, trained=trained, spec=spec, opts=opts, budget=budget)
    w = _WORKER_STATE
    cand = make_candidate(w["trained"], w["spec"], w["opts"], method, target, qat_epochs=0)
    return _row(cand, w["trained"], w["budget"], 0, SCREEN_SAMPLES)


def _append_why(path: Path, why: str, rows: list[Row]) -> None:
    lines = [
        "",
        "## Why this model",
        "",
        why,
        "",
        "![Pareto front](pareto.png)",
        "",
        "| method | target | mean bits | QAT epochs | storage | flash B | arena B | TFLM score | fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.method} | {r.target:g} | {r.mean_bits:.2f} | {r.qat_epochs} | {r.storage} | {r.flash_bytes:,} "
        f"| {r.arena_bytes:,} | {r.score:.4f} | {'yes' if r.fits else 'no'}{' (chosen)' * r.chosen} |"
        for r in sorted(rows, key=lambda r: r.flash_bytes)
    ]
    atomic_write_text(path, path.read_text() + "\n".join(lines) + "\n")


def write_pareto(out: Path, rows: list[Row], budget: Budget, why: str, name: str) -> None:
    """pareto.json (every candidate) and pareto.png (TFLM score vs flash, budget line, chosen point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_text(
        out / "pareto.json",
        json.dumps({"budget": asdict(budget), "why": why, "candidates": [asdict(r) for r in rows]}, indent=2),
    )
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, marker in (("qiu", "o"), ("qinu", "s"), ("rb", "^"), ("uniform", "x")):
        pts = [r for r in rows if r.method == method]
        if pts:
            ax.scatter(
                [r.flash_bytes for r in pts],
                [r.score for r in pts],
                marker=marker,
                label=method,
                alpha=[1.0 if r.qat_epochs else 0.5 for r in pts],
            )
    best = next(r for r in rows if r.chosen)
    ax.scatter([best.flash_bytes], [best.score], s=200, facecolors="none", edgecolors="red", label="chosen")
    if budget.flash is not None:
        ax.axvline(budget.flash, color="red", linestyle="--", label="flash budget")
    ax.set_xlabel("flash bytes (model.tflite)")
    ax.set_ylabel("TFLM accuracy" if best.score >= 0 else "-MAE (TFLM)")
    ax.set_title(f"{name}: candidates (faded: calibrated only, solid: after QAT)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out / ".pareto.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out / "pareto.png")
