"""Screening a search's candidates: calibrate, export and measure each plan, in worker processes.

A spawned worker rebuilds what it needs from a state folder once (the twin's mean-weight model, the
posteriors, the splits), then screens one (method, target) per task.
"""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
from pathlib import Path

import numpy as np

from deploy.app import RunOptions, make_candidate
from deploy.report import SearchRow
from edgeq.data import Splits
from edgeq.pipeline import PipelineSpec
from edgeq.training import Trained

SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_WORKER: dict = {}


def screen_one(
    trained: Trained, spec: PipelineSpec, opts: RunOptions, method: str, target: float
) -> SearchRow:
    """One calibrated (0 QAT epochs) candidate, measured on the screening samples."""
    from deploy.search import SCREEN_SAMPLES, row_of

    cand = make_candidate(trained, spec, opts, method, target, qat_epochs=0)
    return row_of(cand, trained, opts.target, SCREEN_SAMPLES)


def screen(jobs, trained: Trained, spec: PipelineSpec, opts: RunOptions, workers: int) -> list[SearchRow]:
    """Every job screened; in `workers` spawned processes when workers > 1."""
    if workers <= 1 or len(jobs) < 2:
        return [screen_one(trained, spec, opts, m, t) for m, t in jobs]
    import concurrent.futures
    import multiprocessing

    with tempfile.TemporaryDirectory(prefix="edgeq-sweep-") as tmp:
        save_state(Path(tmp), trained, spec, opts)
        ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            return list(pool.map(_screen_in_worker, [(tmp, m, t) for m, t in jobs]))


def save_state(state: Path, trained: Trained, spec: PipelineSpec, opts: RunOptions) -> None:
    """What a worker needs, as files: the mean-weight model, the splits, and the plain values pickled."""
    trained.det.save(state / "det.keras")
    np.savez(state / "splits.npz", **{k: getattr(trained.splits, k) for k in SPLIT_KEYS})
    # The spec's callables (model builder, data loader) live in the pipeline script, which a
    # spawned process cannot import by name; candidates need neither.
    light = dataclasses.replace(spec, build_model=None, load_data=None)
    plain = (trained.posteriors, dict(trained.sizes), trained.splits.task, light, opts)
    (state / "state.pkl").write_bytes(pickle.dumps(plain))


def load_state(state: Path) -> tuple[Trained, PipelineSpec, RunOptions]:
    """The worker's Trained (no float model, no twin: screening needs neither), spec and options."""
    import tensorflow as tf
    import tf_keras as keras

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one core per worker
    posts, sizes, task, spec, opts = pickle.loads((state / "state.pkl").read_bytes())
    with np.load(state / "splits.npz") as f:
        splits = Splits(*(f[k] for k in SPLIT_KEYS), task=task)
    det = keras.models.load_model(state / "det.keras", compile=False)
    return Trained(splits, None, None, det, posts, sizes), spec, opts


def _screen_in_worker(job) -> SearchRow:
    state, method, target = job
    if _WORKER.get("dir") != state:
        _WORKER.update(dir=state, loaded=load_state(Path(state)))
    trained, spec, opts = _WORKER["loaded"]
    return screen_one(trained, spec, opts, method, target)
