"""Where a search's candidates are screened: a table of executors, each mapping a function over jobs.

An executor runs `fn(shared, job)` for every job and returns the results in job order. `shared` is a
mapping of the large values every job reads (the twin's posteriors, the mean-weight model's bytes, the
splits); an executor ships it to each worker once, not once per job, and calls `on_result(done, total)`
as results come back.

    local  spawned processes on this machine (concurrent.futures), `workers` of them
    ray    Ray tasks, one CPU each, on a Ray cluster (`address="auto"`) or a local Ray started for the run
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeq.errors import EdgeqError

OnResult = Callable[[int, int], None]  # (results back so far, jobs in all)
CONNECT_TIMEOUT_S = 30.0
RAY_INSTALL = "pip install 'edgeq[ray]'"


class ExecutorError(EdgeqError):
    """An executor that is unknown or cannot run here."""


class RayMissingError(ExecutorError):
    """--executor ray without Ray installed."""


class RayUnreachableError(ExecutorError):
    """A Ray address that does not answer within the connect timeout."""


class Executor(Protocol):
    """Maps fn(shared, job) over jobs, in order; shared reaches each worker once."""

    name: str

    def map(
        self,
        fn: Callable[[Mapping[str, Any], Any], Any],
        jobs: Sequence[Any],
        shared: Mapping[str, Any],
        on_result: OnResult | None = None,
    ) -> list: ...


def _silent(done: int, total: int) -> None:
    pass


# --- local: spawned processes -------------------------------------------------------------------------

_SHARED: dict[str, Any] = {}  # a local worker's shared values, loaded once by the pool's initializer


def _load_shared(path: str) -> None:
    _SHARED.clear()
    _SHARED.update(pickle.loads(Path(path).read_bytes()))


def _call_local(fn, job):
    return fn(_SHARED, job)


@dataclass(frozen=True)
class LocalExecutor:
    """`workers` spawned processes on this machine; with one worker (or one job), this process."""

    workers: int = 2
    name: str = "local"

    def map(self, fn, jobs, shared, on_result=None) -> list:
        """fn(shared, job) for each job, in `workers` spawned processes; results in job order."""
        on_result = on_result or _silent
        jobs = list(jobs)
        if self.workers <= 1 or len(jobs) < 2:
            out = []
            for job in jobs:
                out.append(fn(shared, job))
                on_result(len(out), len(jobs))
            return out
        import multiprocessing

        with tempfile.TemporaryDirectory(prefix="edgeq-executor-") as tmp:
            # A file, not the initializer's arguments: the splits can be large, and a worker reads them
            # from the page cache instead of a pipe.
            path = Path(tmp) / "shared.pkl"
            path.write_bytes(pickle.dumps(dict(shared), protocol=pickle.HIGHEST_PROTOCOL))
            ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
            with concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_load_shared, initargs=(str(path),)
            ) as pool:
                futures = {pool.submit(_call_local, fn, job): i for i, job in enumerate(jobs)}
                results: list = [None] * len(jobs)
                for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                    results[futures[fut]] = fut.result()
                    on_result(n, len(jobs))
                return results


# --- ray: tasks on a cluster ----------------------------------------------------------------------------


def _call_ray(fn, keys: tuple[str, ...], job, *values):
    # Ray resolves object references only among a task's top-level arguments, so the shared values
    # travel as *values (each put once) and the mapping is rebuilt here.
    return fn(dict(zip(keys, values, strict=True)), job)


def ray_installed() -> bool:
    """True when Ray can be imported here."""
    return importlib.util.find_spec("ray") is not None


_REACHED: set[str] = set()  # addresses this process has already seen answer


def probe_ray(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Connect to the Ray cluster at address from a child process; RayUnreachableError after timeout_s.

    A child, because ray.init on an address that does not answer can retry for minutes and cannot be
    interrupted from the thread that called it.
    """
    if address in _REACHED:
        return
    code = "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); ray.shutdown()"
    what = f"the Ray cluster at {address!r}"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, address], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise RayUnreachableError(
            f"{what} did not answer within {timeout_s:g} s; start it (ray start --head) or fix --ray-address"
        ) from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1][:200] if lines else f"exit status {proc.returncode}"
        raise RayUnreachableError(
            f"{what} does not answer ({why}); start it (ray start --head) or fix --ray-address"
        )
    _REACHED.add(address)


@dataclass(frozen=True)
class RayExecutor:
    """Ray tasks of one CPU each. address: "auto" or "host:port" joins a cluster; None starts a local
    Ray (of num_cpus CPUs, all when None) for the map and stops it after, unless Ray is already up."""

    address: str | None = None
    num_cpus: int | None = None
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    name: str = "ray"

    def map(self, fn, jobs, shared, on_result=None) -> list:
        """fn(shared, job) for each job as a Ray task; shared put once into the object store."""
        on_result = on_result or _silent
        jobs = list(jobs)
        if not jobs:
            return []
        check_executor("ray", self.address, self.connect_timeout_s)
        import ray

        started = not ray.is_initialized()
        if started:
            address = self.address or os.environ.get("RAY_ADDRESS") or None  # ray.init reads it too
            # The workers' TensorFlow and converter logs stay in Ray's log folder, not on this terminal;
            # a task's exception still comes back with its traceback.
            quiet = {"logging_level": "ERROR", "log_to_driver": False}
            if address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, **quiet)
            else:
                ray.init(address=address, **quiet)
        pending: dict = {}
        try:
            keys = tuple(shared)
            refs = [ray.put(shared[k]) for k in keys]  # once: every task reads the same objects
            task = ray.remote(num_cpus=1)(_call_ray)
            pending = {task.remote(fn, keys, job, *refs): i for i, job in enumerate(jobs)}
            results: list = [None] * len(jobs)
            done = 0
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    try:
                        results[pending.pop(ref)] = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        # An edgeq error in a task is the user's one line, not Ray's traceback around it.
                        if isinstance(e.cause, EdgeqError):
                            raise e.cause from None
                        raise
                    done += 1
                    on_result(done, len(jobs))
            return results
        finally:
            for ref in pending:  # a task failed: on a cluster, the rest would run on for nothing
                ray.cancel(ref)
            if started:
                ray.shutdown()


EXECUTORS: dict[str, str] = {
    "local": "spawned processes on this machine (--workers of them)",
    "ray": "Ray tasks, one CPU each: a cluster with --ray-address auto, else a local Ray",
}


def check_executor(name: str, address: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise before any work: an unknown name, Ray missing, or a Ray address that does not answer.

    With address None, RAY_ADDRESS (which ray.init reads too) is probed when set.
    """
    if name not in EXECUTORS:
        raise ExecutorError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")
    if name != "ray":
        if address is not None:
            raise ExecutorError(f"--ray-address {address!r} needs --executor ray")
        return
    if not ray_installed():
        raise RayMissingError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        probe_ray(address, timeout_s)


def make_executor(name: str = "local", *, workers: int = 2, address: str | None = None) -> Executor:
    """The executor a name stands for: local with `workers` processes, or Ray (workers CPUs if local)."""
    check_executor(name, address)
    if name == "local":
        return LocalExecutor(workers)
    # A local Ray gets `workers` CPUs, as the local executor gets `workers` processes; a cluster has its own.
    return RayExecutor(address, num_cpus=workers if address is None else None)
