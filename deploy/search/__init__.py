"""Budget-driven search: train once, sweep bit targets and methods, keep the best model that fits.

Allocation is cheap once the Bayesian twin is trained, so every distinct plan is calibrated (no
fine-tuning), exported and measured in TFLM (deploy.search.screen, in worker processes); only the
finalists get QAT. Candidates are keyed by their plan, so a plan two targets share is screened once.
"""

from __future__ import annotations

import dataclasses

from deploy.app import (
    PRUNE_AUTO,
    Candidate,
    RunOptions,
    StageClock,
    allocate_for,
    channels_of,
    deploy,
    make_candidate,
    plan_key,
    prepare,
    settle_target,
    train_pipeline,
)
from deploy.measure import measure_tflm
from deploy.measure.tflm import kernel_set_arena
from deploy.report import Report, SearchRow, SearchSummary
from deploy.search.executors import Executor
from deploy.target import Target
from edgeq.allocators import check_method
from edgeq.errors import EdgeqError, PlanError
from edgeq.pipeline import PipelineSpec
from edgeq.scoring import headline, keras_score
from edgeq.training import Trained

DEFAULT_TARGETS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
FINALISTS = 2
DEFAULT_FLOOR = 2.0  # accuracy points below float a search may hand over without being told otherwise
SCREEN_SAMPLES = 2000  # candidates are screened on this many test samples, finalists on the whole split


class BudgetError(EdgeqError):
    """No candidate fits the budget."""


def row_of(cand: Candidate, trained: Trained, target: Target, samples: int | None = None) -> SearchRow:
    """One candidate measured in TFLM on the first `samples` test images (all when None)."""
    s = trained.splits
    model = cand.exported.deployed.model
    m = measure_tflm(model, s.x_test[:samples], s.y_test[:samples], s.task)
    code = target.code(model).total if target.board is not None else 0  # a board's flash holds the kernels
    arena = kernel_set_arena(model, target.kernels, m.arena_bytes)
    return SearchRow(
        cand.method,
        cand.target_bits,
        round(cand.plan.mean_bits(trained.sizes), 4),
        cand.plan.bits,
        cand.exported.deployed.kind,
        m.flash_bytes,
        arena,
        round(headline(m.scores), 4),
        target.fits(m.flash_bytes, arena, code),
        cand.qat_epochs,
        len(s.x_test[:samples]),
    )


def pick(rows: list[SearchRow], max_drop: float | None, float_score: float) -> SearchRow | None:
    """The most accurate fitting row, or with max_drop the smallest fitting row within max_drop points."""
    fitting = [r for r in rows if r.fits]
    if max_drop is None:
        return max(fitting, key=lambda r: (r.score, -r.flash_bytes), default=None)
    near = [r for r in fitting if (float_score - r.score) * 100 <= max_drop]
    return min(near, key=lambda r: (r.flash_bytes, -r.score), default=None)


def distinct_jobs(
    trained: Trained, spec: PipelineSpec, opts: RunOptions, methods, targets
) -> list[tuple[str, float]]:
    """(method, target) pairs whose plans differ: the first target of each distinct plan.

    The planner is screened where the search needs it: at the targets whose flash budgets sit just under
    the search's (deploy.planning.targets_for_budget), or at `targets` when there is no flash budget.
    """
    jobs: dict[tuple, tuple[str, float]] = {}
    for method in methods:
        near = planner_targets(trained, spec, opts) if method == "planner" else []
        for t in near or targets:
            try:
                plan = allocate_for(method, trained, t, spec, opts)
            except PlanError:  # the planner has no plan within the RAM budget at t: other targets may
                if method != "planner":
                    raise
                continue
            jobs.setdefault(plan_key(method, plan), (method, t))
    return list(jobs.values())


def planner_targets(trained: Trained, spec: PipelineSpec, opts: RunOptions) -> list[float]:
    """The planner's targets near the search's model flash budget (the board's less the runtime's and the
    operators' code); with only an arena budget, near the smallest flash within it; none without either."""
    from deploy.firmware.code_size import decode_code_bytes, firmware_code
    from deploy.planning import reference_shapes, targets_for_budget, targets_for_ram

    t = opts.target
    decode = decode_code_bytes(t.kernels) if t.counts_code else 0
    kw = {"decode_budget": t.decode_budget, "keep_dense": opts.keep_dense, "decode_code": decode}
    kw["kernels"] = t.kernels
    if t.model_flash is None:
        return targets_for_ram(trained, spec, t.model_ram, **kw) if t.model_ram is not None else []
    budget = t.model_flash
    if t.board is not None:  # the board's flash also holds the runtime and every operator's kernel
        shapes = reference_shapes(trained, t.decode_budget, opts.keep_dense)
        code = firmware_code(t.kernels, sorted({op.kind for op in shapes.ops})).total
        budget = min(budget, t.board.firmware_flash_budget - code)
    return targets_for_budget(trained, spec, budget, **kw)


def _nothing_fits(rows: list[SearchRow], target: Target) -> BudgetError:
    return BudgetError(
        f"nothing fits {target.describe()}: the smallest flash reached was "
        f"{min(r.flash_bytes for r in rows):,} B and the smallest arena "
        f"{min(r.arena_bytes for r in rows):,} B; "
        "raise the budget or lower --target-bits"
    )


def _finalists(rows, trained, spec, opts, max_drop) -> list[tuple[SearchRow, Candidate]]:
    """The best screened rows, fine-tuned with QAT and measured on the whole test split."""
    fitting = [r for r in rows if r.fits]
    key = (lambda r: -r.score) if max_drop is None else (lambda r: r.flash_bytes)
    finals = []
    for r in sorted(fitting, key=key)[:FINALISTS]:
        cand = make_candidate(trained, spec, opts, r.method, r.target, spec.qat_epochs)
        finals.append((row_of(cand, trained, opts.target), cand))
    return finals


def _why(best: SearchRow, n_fitting: int, target: Target, max_drop: float | None) -> str:
    reason = (
        f"the most accurate of {n_fitting} candidates that fit {target.describe()}"
        if max_drop is None
        else f"the smallest fitting candidate within {max_drop} points of the float model"
    )
    return (
        f"{best.method} at target {best.target:g} ({best.mean_bits:.2f} mean bits, {best.storage}): "
        f"{reason}; "
        f"TFLM score {best.score:.4f}, flash {best.flash_bytes:,} B, arena {best.arena_bytes:,} B."
    )


def check_floor(
    best: SearchRow, rows: list[SearchRow], base: float, floor: float | None, target: Target
) -> None:
    """BudgetError when the most accurate fitting model is more than `floor` points below the float model.

    The message names that model and the smallest model (fitting or not) within the floor, so the user
    sees both ends of the trade. Regression scores (-MAE) have no points: no floor applies.
    """
    drop = (base - best.score) * 100
    if floor is None or base < 0 or drop <= floor:
        return
    within = [r for r in rows if (base - r.score) * 100 <= floor]
    small = min(within, key=lambda r: r.flash_bytes, default=None)
    smallest = (
        f"the smallest within the floor is {small.method} at target {small.target:g}: "
        f"{small.flash_bytes:,} B flash, {small.arena_bytes:,} B arena, score {small.score:.4f}"
        if small
        else "no candidate is within the floor"
    )
    raise BudgetError(
        f"the most accurate model that fits {target.describe()} ({best.method} at target {best.target:g}, "
        f"{best.flash_bytes:,} B) scores {best.score:.4f}, {drop:.2f} points below the float model "
        f"({base:.4f}), more than the {floor:g}-point floor; {smallest}; raise the budget, or pass "
        "--max-accuracy-drop none to accept the drop"
    )


def float_score(trained: Trained) -> float:
    """The float model's headline score on the test split."""
    s = trained.splits
    return headline(keras_score(trained.float_model, s.x_test, s.y_test, s.task))


def _choose(rows, finals, trained, spec, opts, max_drop, base: float) -> tuple[SearchRow, Candidate]:
    """The winning row (marked chosen) and its candidate; BudgetError when none is within max_drop of base."""
    best = pick([f for f, _ in finals], max_drop, base) or pick(rows, max_drop, base)
    if best is None:
        raise BudgetError(
            f"no candidate that fits {opts.target.describe()} is within {max_drop} points "
            f"of the float model ({100 * base:.2f}%); allow a larger drop or a larger budget"
        )
    cand = next((c for f, c in finals if f is best), None)
    cand = cand or make_candidate(trained, spec, opts, best.method, best.target, qat_epochs=0)
    return dataclasses.replace(best, chosen=True), cand


def sweep(
    spec: PipelineSpec,
    opts: RunOptions,
    *,
    targets=DEFAULT_TARGETS,
    methods=("planner", "qiu", "rb"),
    max_accuracy_drop: float | None = None,
    trained: Trained | None = None,
    workers: int = 2,
    executor: str | Executor = "local",
    on_stage=None,
    floor: float | None = DEFAULT_FLOOR,
) -> Report:
    """Train once (or reuse `trained`), screen each distinct plan, QAT the finalists, deploy the best.

    With a budget and no max_accuracy_drop the most accurate fitting model wins, but never one more than
    `floor` points below float (None: any); with max_accuracy_drop, the smallest fitting one within it.
    """
    from deploy.search.executors import make_executor
    from deploy.search.screen import screen

    for m in methods:
        check_method(m)
    if channels_of(spec, opts) == PRUNE_AUTO:
        raise PlanError(
            "--prune-channels auto chooses the channels for one target, a search screens many: pass a "
            "fraction such as --prune-channels 0.5, or run without the search"
        )
    # A named executor is built (Ray checked and reached) before any training.
    executor = make_executor(executor, workers=workers) if isinstance(executor, str) else executor
    spec, _, _ = prepare(spec, opts)
    clock = StageClock(on_stage) if on_stage else StageClock()
    trained = trained or train_pipeline(spec, opts, clock)
    opts = settle_target(trained, opts, clock)
    clock("allocate", f"sweeping {len(targets)} targets x {len(methods)} methods (calibrated, no QAT)")
    jobs = distinct_jobs(trained, spec, opts, methods, targets)
    rows = screen(jobs, trained, spec, opts, workers, executor)
    if not any(r.fits for r in rows):
        raise _nothing_fits(rows, opts.target)
    clock("qat", f"QAT fine-tuning of up to {FINALISTS} finalists ({spec.qat_epochs} epochs)")
    finals = _finalists(rows, trained, spec, opts, max_accuracy_drop)
    base = float_score(trained)
    best, cand = _choose(rows, finals, trained, spec, opts, max_accuracy_drop, base)
    if max_accuracy_drop is None:  # the most accurate fitting model must still be within the floor
        check_floor(best, rows + [f for f, _ in finals], base, floor, opts.target)
    all_rows = _mark_chosen(rows + [f for f, _ in finals], best)
    why = _why(best, sum(r.fits for r in rows), opts.target, max_accuracy_drop)
    summary = SearchSummary(opts.target.describe(), why, tuple(all_rows))
    return deploy(trained, cand, spec, opts, clock, search=summary)


def _mark_chosen(rows: list[SearchRow], best: SearchRow) -> list[SearchRow]:
    """The rows with the (first) one the winner was picked from replaced by the winner."""
    i = next(i for i, r in enumerate(rows) if dataclasses.replace(r, chosen=True) == best)
    return [*rows[:i], best, *rows[i + 1 :]]
