"""MACs and BOPs of real tf_keras models, checked against counts worked out by hand."""

from __future__ import annotations

import pytest

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.bops import bops, layer_macs
from edgeq.errors import ModelError, PlanError


@pytest.fixture(scope="module")
def small():
    """conv (valid) -> depthwise (same) -> strided conv (same) -> pool -> flatten -> dense."""
    import tf_keras as keras

    L = keras.layers
    return keras.Sequential(
        [
            L.Input((10, 10, 3)),
            L.Conv2D(4, 3, name="c1"),  # 8x8x4
            L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw"),  # 8x8x8
            L.Conv2D(6, 3, strides=2, padding="same", name="c2"),  # 4x4x6
            L.MaxPooling2D(2, name="pool"),  # 2x2x6
            L.Flatten(name="flat"),  # 24
            L.Dense(5, name="fc"),
        ]
    )


HAND_MACS = {
    "c1": 8 * 8 * 4 * (3 * 3 * 3),  # output positions x filters x (kh kw C_in)
    "dw": 8 * 8 * 8 * (3 * 3),  # each output channel sees one input channel
    "c2": 4 * 4 * 6 * (3 * 3 * 8),
    "fc": 24 * 5,
}


def test_layer_macs_match_hand_counts(small):
    assert layer_macs(small) == HAND_MACS


def test_dense_on_sequences_counts_every_position():
    import tf_keras as keras

    model = keras.Sequential([keras.layers.Input((7, 3)), keras.layers.Dense(4, name="d")])
    assert layer_macs(model) == {"d": 7 * 3 * 4}


def test_bops_default_and_mixed_bits(small):
    total = sum(HAND_MACS.values())
    assert bops(small, {}) == total * 8 * 8
    mixed = bops(small, {"c1": 4, "fc": 0}, activation_bits={"c2": 4})
    expect = HAND_MACS["c1"] * 4 * 8 + HAND_MACS["dw"] * 8 * 8 + HAND_MACS["c2"] * 8 * 4
    assert mixed == expect
    assert (
        bops(small, {"c1": 2}, activation_bits=16)
        == (HAND_MACS["c1"] * 2 + (total - HAND_MACS["c1"]) * 8) * 16
    )


def test_bad_inputs_raise_clear_errors(small):
    import tf_keras as keras

    with pytest.raises(PlanError, match="nope"):
        bops(small, {"nope": 4})
    with pytest.raises(PlanError, match="outside 0..32"):
        bops(small, {"c1": 33})
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ModelError, match="not built"):
        layer_macs(unbuilt)
