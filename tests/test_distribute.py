"""The Bayesian twin under MultiWorkerMirroredStrategy: two real worker processes on localhost train it
like one process does; a malformed TF_CONFIG is one line before any training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeq.distribute import DistributeError, check_distribute, check_tf_config, is_chief
from edgeq.errors import EdgeqError

HERE = Path(__file__).resolve().parent
EPOCHS = 2
TIMEOUT_S = 240  # a hard limit for every process of the test; alone they take about 25 s and 60 s
# Two workers see the same global batches as one process (each takes half of every batch), so only the
# Flipout noise and the order of float sums differ. Measured on digits at 2 epochs: mean |mu| and
# informativeness within 2.5 %, mean sigma within 0.5 %, the loss and KL / N within 0.03 %.
TOL_MU = 0.10  # relative, per layer: mean |mu| and mean |mu| / sigma
TOL_SIGMA = 0.05  # relative, per layer: mean sigma
TOL_LOSS = 0.01  # relative: final training loss and KL / N (a KL weighted by 2 or 1/2 is 40-100 % off)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start(out: Path, tf_config: dict | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(
        [sys.executable, str(HERE / "distribute_worker.py"), str(out), str(EPOCHS)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process stats, [worker 0 stats, worker 1 stats]), all three processes run at once."""
    tmp = tmp_path_factory.mktemp("distribute")
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    outs = [tmp / "single.json", tmp / "worker0.json", tmp / "worker1.json"]
    configs = [None] + [{"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(2)]
    procs = [_start(o, c) for o, c in zip(outs, configs, strict=True)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p, o in zip(procs, outs, strict=True):
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert rc == 0, o.with_suffix(".log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    single, *workers = (json.loads(o.read_text()) for o in outs)
    return single, workers


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_two_workers_train_one_twin(runs):
    _, (w0, w1) = runs
    assert w0["replicas"] == w1["replicas"] == 2
    # the variables are mirrored: both workers end with the same posteriors, bit for bit
    assert w0["mu_sum"] == w1["mu_sum"] and w0["mean_sigma"] == w1["mean_sigma"]


def test_two_workers_posteriors_match_one_process(runs):
    single, (w0, _) = runs
    assert w0["layers"] == single["layers"]
    for name in single["layers"]:
        assert _close(w0["mean_abs_mu"][name], single["mean_abs_mu"][name], TOL_MU), name
        assert _close(w0["mean_sigma"][name], single["mean_sigma"][name], TOL_SIGMA), name
        assert _close(w0["informativeness"][name], single["informativeness"][name], TOL_MU), name


def test_kl_over_n_keeps_its_weight_with_the_global_batch(runs):
    single, (w0, _) = runs
    for stats in (single, w0):
        # the twin's own KL terms are the analytic KL / N of its posteriors: weight 1, N the whole set
        assert _close(stats["model_kl"], stats["kl_over_n"], 1e-5)
    # the loss Keras reports (data + KL / N, the KL divided by the replicas before the sum) agrees
    assert _close(w0["loss"][-1], single["loss"][-1], TOL_LOSS)
    assert _close(w0["kl_over_n"], single["kl_over_n"], TOL_LOSS)


def _cfg(**kw) -> dict[str, str]:
    base = {
        "cluster": {"worker": ["localhost:12345", "localhost:12346"]},
        "task": {"type": "worker", "index": 1},
    }
    base.update(kw)
    return {"TF_CONFIG": json.dumps(base)}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "needs TF_CONFIG"),
        ({"TF_CONFIG": "{cluster: 1"}, "TF_CONFIG is not JSON"),
        ({"TF_CONFIG": "[1, 2]"}, "must be a JSON object"),
        (_cfg(cluster=None), "has no 'cluster'"),
        (_cfg(task=None), "has no 'task'"),
        (_cfg(task={"type": "worker"}), "has no 'task'"),
        (_cfg(task={"type": "worker", "index": 2}), "task index 2 is out of range"),
        (_cfg(task={"type": "worker", "index": -1}), "task index -1 is out of range"),
        (_cfg(task={"type": "chief", "index": 0}), "task type 'chief' is not a job of the cluster"),
        (_cfg(cluster={"worker": ["localhost"]}), "must be a non-empty list of 'host:port'"),
        (_cfg(cluster={"ps": ["localhost:1"], "worker": ["localhost:2"]}), "job 'ps' is not one"),
    ],
)
def test_a_malformed_tf_config_is_one_line(environ, message):
    with pytest.raises(DistributeError, match=message) as e:
        check_tf_config(environ)
    assert isinstance(e.value, EdgeqError) and "\n" not in str(e.value)


def test_a_good_tf_config_and_the_chief():
    cfg = check_tf_config(_cfg())
    assert cfg["task"]["index"] == 1
    assert not is_chief(_cfg()) and is_chief(_cfg(task={"type": "worker", "index": 0})) and is_chief({})
    with pytest.raises(DistributeError, match="unknown --distribute 'ring'"):
        check_distribute("ring")
    check_distribute(None)


def test_the_strategy_must_come_before_any_tensorflow_op(tmp_path):
    code = (
        "import edgeq, tensorflow as tf\n"
        "tf.constant(1.0) + 1.0\n"
        "from edgeq.distribute import DistributeError, strategy_for\n"
        "try:\n"
        "    strategy_for('multi-worker')\n"
        "except DistributeError as e:\n"
        "    print('ERROR', e)\n"
    )
    port = _free_ports(1)[0]
    tf_config = {"cluster": {"worker": [f"localhost:{port}"]}, "task": {"type": "worker", "index": 0}}
    env = dict(os.environ, TF_CONFIG=json.dumps(tf_config))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    ).stdout
    assert "ERROR MultiWorkerMirroredStrategy could not start (Collective ops must be configured" in out
