"""The README's two Python examples, run as written (epochs cut), with a tf_keras and a Keras 3 model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _examples() -> dict[str, str]:
    """The python blocks under '## Python API' and '## Inside your own `model.fit`'."""
    text = (ROOT / "README.md").read_text()
    out = {}
    for title in ("## Python API", "## Inside your own `model.fit`"):
        section = text[text.index(title) :]
        out[title] = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return out


def _model(kind: str):
    if kind == "keras3":
        import keras as k
    else:
        import tf_keras as k
    m = k.Sequential(
        [
            k.Input((8, 8, 1)),
            k.layers.Conv2D(8, 3, activation="relu", name="conv1"),
            k.layers.Flatten(),
            k.layers.Dense(32, activation="relu", name="fc1"),
            k.layers.Dense(10, name="fc2"),
        ]
    )
    m.compile("adam", k.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


@pytest.mark.parametrize("kind", ["tf_keras", "keras3"])
@pytest.mark.parametrize("title", ["## Python API", "## Inside your own `model.fit`"])
def test_readme_example_runs_as_written(title, kind, digits, tmp_path, monkeypatch):
    import tf_keras

    x, y = digits
    model = _model(kind)
    model.fit(x[:600], y[:600], epochs=2, verbose=0)
    code = re.sub(r"epochs=\d+", "epochs=1", _examples()[title])  # the README's budgets, cut for a test
    monkeypatch.chdir(tmp_path)  # bitplan.json and tb/ land here
    scope = {
        "model": model,
        "float_model": model,
        "x_train": x[:600],
        "y_train": y[:600],
        "loss": tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    }
    exec(compile(code, f"README {title}", "exec"), scope)  # noqa: S102  (the README's own code)
    qat, plan = scope["qat"], scope.get("plan") or scope["alloc"].plan
    assert isinstance(qat, tf_keras.Model) and set(plan.bits) == {"conv1", "fc1", "fc2"}
    assert np.isfinite(qat.predict(x[:16], verbose=0)).all()
