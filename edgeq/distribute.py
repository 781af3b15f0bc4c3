"""Training the Bayesian twin on several workers: TF_CONFIG checked, MultiWorkerMirroredStrategy built.

Every worker runs the same program on the same data; TF_CONFIG names the cluster and this worker's
place in it. The float model is trained on each worker alone (seeded, so identically); only the twin
is trained under the strategy, with the global batch split across the workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from edgeq.errors import EdgeqError

DISTRIBUTES = ("multi-worker",)  # the values of `edgeq run --distribute`
JOBS = ("chief", "worker")  # the task types MultiWorkerMirroredStrategy trains on


class DistributeError(EdgeqError):
    """A --distribute value or a TF_CONFIG that multi-worker training cannot use."""


def _address_ok(addr: object) -> bool:
    if not isinstance(addr, str) or ":" not in addr:
        return False
    host, _, port = addr.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def check_tf_config(environ: Mapping[str, str] | None = None) -> dict:
    """The parsed TF_CONFIG; DistributeError (one line) when it is absent or cannot describe a worker."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    hint = (
        'set TF_CONFIG=\'{"cluster": {"worker": ["host1:port", ...]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    if not raw:
        raise DistributeError(f"--distribute multi-worker needs TF_CONFIG; {hint}")
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DistributeError(f"TF_CONFIG is not JSON ({e.msg} at character {e.pos}); {hint}") from None
    if not isinstance(cfg, dict):
        raise DistributeError(f"TF_CONFIG must be a JSON object, not {type(cfg).__name__}; {hint}")
    cluster, task = cfg.get("cluster"), cfg.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise DistributeError(f"TF_CONFIG has no 'cluster' (a job name -> list of host:port); {hint}")
    for job, addrs in cluster.items():
        if job not in JOBS:
            raise DistributeError(
                f"TF_CONFIG cluster job {job!r} is not one multi-worker training uses ({', '.join(JOBS)})"
            )
        if not isinstance(addrs, list) or not addrs or not all(_address_ok(a) for a in addrs):
            raise DistributeError(
                f"TF_CONFIG cluster {job!r} must be a non-empty list of 'host:port', not {addrs!r}"
            )
        if len(set(addrs)) != len(addrs):
            raise DistributeError(f"TF_CONFIG cluster {job!r} lists an address twice: {addrs!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise DistributeError(f"TF_CONFIG has no 'task' with a 'type' and an 'index'; {hint}")
    kind, index = task["type"], task["index"]
    if kind not in cluster:
        raise DistributeError(
            f"TF_CONFIG task type {kind!r} is not a job of the cluster ({', '.join(cluster)})"
        )
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise DistributeError(
            f"TF_CONFIG task index {index!r} is out of range: cluster {kind!r} has {len(cluster[kind])} "
            f"address(es), so the index is 0 to {len(cluster[kind]) - 1}"
        )
    return cfg


def check_distribute(distribute: str | None) -> None:
    """Raise DistributeError unless distribute is None or a known value whose environment is usable."""
    if distribute is None:
        return
    if distribute not in DISTRIBUTES:
        raise DistributeError(f"unknown --distribute {distribute!r}; use one of {', '.join(DISTRIBUTES)}")
    check_tf_config()


def is_chief(environ: Mapping[str, str] | None = None) -> bool:
    """True for the worker that should write the run's artifacts (the chief, else worker 0, else alone)."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not raw:
        return True
    cfg = check_tf_config(environ)
    task = cfg["task"]
    return task["type"] == "chief" or ("chief" not in cfg["cluster"] and task["index"] == 0)


_STRATEGIES: dict[str, object] = {}  # one per process: collective ops can be configured only once


def strategy_for(distribute: str | None):
    """The tf.distribute strategy for a --distribute value (None: train in this process alone).

    The first call builds it, and must come before TensorFlow runs any op (collective ops are
    configured at program startup); later calls return the same strategy.
    """
    check_distribute(distribute)
    if distribute is None:
        return None
    if distribute not in _STRATEGIES:
        import tensorflow as tf

        try:
            _STRATEGIES[distribute] = tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as e:
            raise DistributeError(
                f"MultiWorkerMirroredStrategy could not start ({str(e).splitlines()[0]}); "
                "build it (edgeq.distribute.strategy_for) before TensorFlow runs anything else"
            ) from None
    return _STRATEGIES[distribute]
