"""Screening a search's candidates: calibrate, export and measure each plan, through an executor.

What every job reads is handed to the executor once as plain values (the twin's posteriors, the
mean-weight model as .keras bytes, the splits); a worker rebuilds its Trained from them once and
screens one (method, target) per job. This process keeps its own Trained and rebuilds nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from deploy.app import RunOptions, make_candidate
from deploy.report import SearchRow
from deploy.search.executors import Executor, OnResult, make_executor
from edgeq.data import Splits
from edgeq.pipeline import PipelineSpec
from edgeq.training import Trained

SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_WORKER: dict[str, tuple[Trained, PipelineSpec, RunOptions]] = {}  # token -> what that state rebuilds to


def screen_one(
    trained: Trained, spec: PipelineSpec, opts: RunOptions, method: str, target: float
) -> SearchRow:
    """One calibrated (0 QAT epochs) candidate, measured on the screening samples."""
    from deploy.search import SCREEN_SAMPLES, row_of

    cand = make_candidate(trained, spec, opts, method, target, qat_epochs=0)
    return row_of(cand, trained, opts.target, SCREEN_SAMPLES)


def screen(
    jobs,
    trained: Trained,
    spec: PipelineSpec,
    opts: RunOptions,
    workers: int = 2,
    executor: str | Executor = "local",
    on_result: OnResult | None = None,
) -> list[SearchRow]:
    """Every (method, target) job screened by the executor (a name: `workers` local processes or CPUs)."""
    jobs = list(jobs)
    ex = make_executor(executor, workers=workers) if isinstance(executor, str) else executor
    from edgeq.layers import custom_layers

    if custom_layers(trained.float_model):
        # A worker process cannot import layer classes that live in the user's pipeline script: screen
        # here, where they are defined (slower, but the same rows).
        from deploy.search.executors import LocalExecutor

        ex = LocalExecutor(workers=1)
    shared = shared_state(trained, spec, opts)
    # A job that runs in this process finds the live Trained and rebuilds nothing (workers=1).
    _WORKER.clear()
    _WORKER[shared["token"]] = (trained, spec, opts)
    try:
        with _progress(len(jobs), f"screening {len(jobs)} candidates ({ex.name})", on_result) as cb:
            return ex.map(screen_job, jobs, shared, cb)
    finally:
        _WORKER.clear()


def shared_state(trained: Trained, spec: PipelineSpec, opts: RunOptions) -> dict[str, Any]:
    """What a worker needs, as plain values: the float and mean-weight models' .keras bytes, the splits."""
    # The spec's callables (model builder, data loader, augment) live in the pipeline script, which a worker
    # cannot import by name; candidates need neither.
    light = dataclasses.replace(spec, build_model=None, load_data=None, augment=None)
    return {
        "token": uuid.uuid4().hex,  # names this state, so a long-lived worker rebuilds once per search
        "posteriors": trained.posteriors,
        "det": _keras_bytes(trained.det),
        "float": _keras_bytes(trained.float_model),  # QAT may start from the float weights
        "splits": {k: getattr(trained.splits, k) for k in SPLIT_KEYS},
        "meta": (dict(trained.sizes), trained.splits.task, light, opts),
    }


def load_state(shared: Mapping[str, Any]) -> tuple[Trained, PipelineSpec, RunOptions]:
    """The worker's Trained (no twin: screening needs only its means and posteriors), spec and options."""
    import tensorflow as tf

    # One core per worker. Setting the same value again is allowed once TensorFlow runs, so a worker
    # that serves a second search does not fail here.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    sizes, task, spec, opts = shared["meta"]
    splits = Splits(*(shared["splits"][k] for k in SPLIT_KEYS), task=task)
    det, float_model = _load_keras(shared["det"]), _load_keras(shared["float"])
    return Trained(splits, float_model, None, det, shared["posteriors"], sizes), spec, opts


def _keras_bytes(model) -> bytes:
    """A Keras model as the bytes of its .keras file."""
    with tempfile.TemporaryDirectory(prefix="edgeq-state-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        return path.read_bytes()


def _load_keras(data: bytes):
    """The model of a .keras file's bytes (uncompiled)."""
    import tf_keras as keras

    with tempfile.TemporaryDirectory(prefix="edgeq-worker-") as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(data)
        # safe_mode off: these bytes are this run's own models (a Lambda layer's code is the user's)
        return keras.models.load_model(path, compile=False, safe_mode=False)


def screen_job(shared: Mapping[str, Any], job: tuple[str, float]) -> SearchRow:
    """One job in a worker: the state rebuilt on the first job of a search, then reused."""
    token = shared["token"]
    if token not in _WORKER:
        _WORKER.clear()  # a previous search's state
        _WORKER[token] = load_state(shared)
    trained, spec, opts = _WORKER[token]
    method, target = job
    return screen_one(trained, spec, opts, method, target)


@contextlib.contextmanager
def _progress(total: int, label: str, on_result: OnResult | None) -> Iterator[OnResult]:
    """The caller's callback, else a rich bar on a terminal's stderr as results come back (else nothing)."""
    if on_result is not None:
        yield on_result
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal or total < 2:
        yield lambda done, n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done, n: bar.update(task, completed=done)
