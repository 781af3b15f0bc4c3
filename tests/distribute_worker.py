"""One worker of tests/test_distribute.py: train the digits twin (under TF_CONFIG when set), write its stats.

Usage: python tests/distribute_worker.py OUT.json EPOCHS
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from edgeq.distribute import strategy_for

ROOT = Path(__file__).resolve().parents[1]


def kl_over_n(posteriors, n: int) -> float:
    """sum KL(N(mu, sigma) || N(0, 1)) / N over the posteriors: the ELBO's KL term the twin trained with."""
    import numpy as np

    return float(
        sum(np.sum(np.log(1.0 / p.sigma) + (p.sigma**2 + p.mu**2) / 2.0 - 0.5) for p in posteriors) / n
    )


def main(out: str, epochs: int) -> None:
    t0 = time.perf_counter()
    # First, before TensorFlow runs any op: collective ops are configured at program startup.
    strategy = strategy_for("multi-worker" if os.environ.get("TF_CONFIG") else None)
    import numpy as np

    from edgeq.informativeness import layer_informativeness
    from edgeq.pipeline import load_pipeline
    from edgeq.training import train

    spec = load_pipeline(ROOT / "pipelines" / "digits.py").with_epochs(epochs)
    splits = spec.load_data(seed=0)
    trained = train(spec, splits, 0, strategy=strategy)
    posts = trained.posteriors
    hist = trained.bnn.history.history
    trained.bnn(splits.x_train[:1])  # one call outside the strategy: the layers' KL terms as trained
    model_kl = float(sum(float(v) for v in trained.bnn.losses))  # the twin's own sum of KL / N
    stats = {
        "replicas": strategy.num_replicas_in_sync if strategy is not None else 1,
        "layers": [p.name for p in posts],
        "mean_abs_mu": {p.name: float(np.mean(np.abs(p.mu))) for p in posts},
        "mean_sigma": {p.name: float(np.mean(p.sigma)) for p in posts},
        "informativeness": layer_informativeness(list(posts)),
        "kl_over_n": kl_over_n(posts, len(splits.x_train)),
        "model_kl": model_kl,
        "loss": [float(v) for v in hist["loss"]],
        "mu_sum": {p.name: float(np.sum(p.mu)) for p in posts},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(out).write_text(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
