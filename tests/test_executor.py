"""Screening through the executor table: Ray tasks on a real local Ray screen like the local process pool,
a whole search picks the same model either way, and a missing Ray or a silent address is one line up front."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path

import pytest

from deploy.app import RunOptions, train_pipeline
from deploy.search import distinct_jobs, sweep
from deploy.search.executors import (
    RAY_INSTALL,
    ExecutorError,
    LocalExecutor,
    RayExecutor,
    RayMissingError,
    RayUnreachableError,
    check_executor,
    make_executor,
)
from deploy.search.screen import screen
from edgeq.errors import EdgeqError
from edgeq.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (2.5, 4.0, 6.0)
SCORE_TOL = 0.02  # as tests/test_sweep.py: one TF thread per worker may flip a sample or two
NO_RAY = "Ray is not installed (pip install 'edgeq[ray]', or '.[dev]', which includes it)"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason=NO_RAY)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    spec = load_pipeline(ROOT / "pipelines" / "digits.py").with_epochs(2)
    return spec, train_pipeline(spec, RunOptions(out=tmp_path_factory.mktemp("train")))


@pytest.fixture(scope="module")
def local_ray():
    """A real Ray on this machine with 2 CPUs (so 2 tasks at a time), shut down after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@needs_ray
def test_ray_tasks_screen_like_the_local_pool(setup, local_ray, tmp_path):
    spec, trained = setup
    opts = RunOptions(out=tmp_path)
    jobs = distinct_jobs(trained, spec, opts, ("qiu",), TARGETS)
    assert len(jobs) == 3  # more tasks than Ray's 2 CPUs: one waits for a free worker
    local = screen(jobs, trained, spec, opts, executor=LocalExecutor(2))
    seen: list[tuple[int, int]] = []
    ray_rows = screen(
        jobs, trained, spec, opts, executor=RayExecutor(), on_result=lambda d, n: seen.append((d, n))
    )
    assert seen == [(i, len(jobs)) for i in range(1, len(jobs) + 1)]  # one call per result, as they came
    assert [(r.method, r.target) for r in ray_rows] == [(r.method, r.target) for r in local] == jobs
    for lo, ry in zip(local, ray_rows, strict=True):
        assert (ry.bits, ry.storage, ry.mean_bits) == (lo.bits, lo.storage, lo.mean_bits)
        assert (ry.flash_bytes, ry.arena_bytes) == (lo.flash_bytes, lo.arena_bytes)
        assert abs(ry.score - lo.score) <= SCORE_TOL, (lo, ry)


def _chosen(setup, out: Path, **kw) -> tuple:
    import tf_keras as keras

    spec, trained = setup
    # The finalists' QAT runs in this process: the same seed for both searches, so only the screening
    # (the executor) can differ between them.
    keras.utils.set_random_seed(0)
    rep = sweep(spec, RunOptions(out=out), targets=(3.0, 4.0, 6.0), methods=("qiu",), trained=trained, **kw)
    row = next(r for r in rep.to_json()["search"]["rows"] if r["chosen"])
    dep = rep.to_json()["models"]["deployed"]
    assert dep["flash_bytes"] == row["flash_bytes"] == (out / "model.tflite").stat().st_size
    return row["method"], row["target"], row["bits"], row["flash_bytes"]


@needs_ray
def test_a_search_on_ray_picks_the_same_model(setup, local_ray, tmp_path):
    assert _chosen(setup, tmp_path / "ray", executor="ray") == _chosen(setup, tmp_path / "local")


def test_ray_missing_is_one_line_that_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what Python sees when Ray is not installed
    with pytest.raises(RayMissingError) as e:
        check_executor("ray")
    assert isinstance(e.value, EdgeqError) and RAY_INSTALL in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RayMissingError):
        make_executor("ray", workers=2)


@needs_ray
def test_a_ray_address_that_does_not_answer_times_out_and_names_it():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    with pytest.raises(RayUnreachableError, match=f"the Ray cluster at '{address}'") as e:
        check_executor("ray", address, timeout_s=4)
    assert time.monotonic() - t0 < 15  # bounded by the timeout (plus the child's start)
    assert isinstance(e.value, EdgeqError) and "\n" not in str(e.value)


def test_unknown_executors_and_stray_addresses():
    with pytest.raises(ExecutorError, match="unknown executor 'dask'; use one of local, ray"):
        check_executor("dask")
    with pytest.raises(ExecutorError, match="--ray-address 'auto' needs --executor ray"):
        check_executor("local", "auto")
    assert make_executor("local", workers=3) == LocalExecutor(3)
