"""The float stage's augmentation and learning-rate schedule (PipelineSpec.augment, lr_schedule)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeq.data import Splits
from edgeq.errors import PipelineError
from edgeq.pipeline import PipelineSpec, check_spec


def _splits() -> Splits:
    r = np.random.default_rng(0)
    x = r.random((96, 6, 6, 1), dtype=np.float32)
    y = (x.mean((1, 2, 3)) > 0.5).astype("int64")
    return Splits(x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:])


def _model(input_shape, outputs):
    import tf_keras as keras

    return keras.Sequential(
        [
            keras.layers.Conv2D(4, 3, activation="relu", input_shape=input_shape, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(outputs, name="fc"),
        ]
    )


def _zeros(images):
    """Every training image blanked: a conv kernel then gets no gradient at all."""
    import tensorflow as tf

    return tf.zeros_like(images)


SPEC = PipelineSpec(name="tiny", build_model=_model, load_data=lambda seed=0, data=None: _splits(), epochs=3)


def _kernel_moves(spec: PipelineSpec) -> bool:
    from edgeq.training import build_float, train_float

    splits = _splits()
    model = build_float(spec, splits, seed=0)
    before = model.get_layer("conv").get_weights()[0].copy()
    train_float(spec, splits, seed=0, model=model)
    return not np.array_equal(before, model.get_layer("conv").get_weights()[0])


def test_augment_is_what_the_float_stage_trains_on():
    assert _kernel_moves(SPEC)  # on the images themselves the kernel learns
    assert not _kernel_moves(dataclasses.replace(SPEC, augment=_zeros))  # on blanked batches it cannot


def test_cosine_schedule_decays_the_float_learning_rate_to_zero():
    from edgeq.training import build_float, train_float

    splits = _splits()
    spec = dataclasses.replace(SPEC, lr_schedule="cosine")
    model = train_float(spec, splits, seed=0, model=build_float(spec, splits, seed=0))
    lr = model.optimizer.get_config()["learning_rate"]
    assert lr["class_name"] == "CosineDecay"
    assert lr["config"]["decay_steps"] == int(model.optimizer.iterations) == 3 * 2  # 3 epochs, batch 32 of 64
    assert lr["config"]["initial_learning_rate"] == SPEC.lr and lr["config"]["alpha"] == 0.0
    constant = build_float(SPEC, splits, seed=0).optimizer.get_config()["learning_rate"]
    assert constant == pytest.approx(SPEC.lr)  # the default: a plain number


@pytest.mark.parametrize(
    "change, words",
    [({"augment": 5}, "augment is a int, not a function"), ({"lr_schedule": "step"}, "lr_schedule 'step'")],
)
def test_bad_float_training_fields_are_refused(change, words):
    with pytest.raises(PipelineError, match=words):
        check_spec(dataclasses.replace(SPEC, **change), None)
