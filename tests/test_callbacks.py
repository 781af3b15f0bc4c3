"""edgeq's Keras callbacks run inside a plain model.fit and produce what they promise."""

from __future__ import annotations

import pytest

from edgeq import bayes
from edgeq.callbacks import BitAllocation, InformativenessMonitor, KLWeight, linear_warmup
from edgeq.errors import ModelError
from edgeq.plan import BitPlan


def _loss():
    import tf_keras as keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def bnn(tiny_keras):
    twin = bayes.to_bayesian(tiny_keras, num_examples=512, init_sigma=0.01)
    twin.compile("adam", _loss(), ["accuracy"])
    return twin


def test_callbacks_inside_fit(bnn, digits, tmp_path):
    import tensorflow as tf

    x, y = digits
    monitor = InformativenessMonitor(target_bits=4, log_dir=tmp_path / "tb")
    alloc = BitAllocation(target_bits=4, method="qiu", path=tmp_path / "plan.json")
    kl = KLWeight(linear_warmup(4))
    hist = bnn.fit(x[:512], y[:512], epochs=2, batch_size=64, verbose=0, callbacks=[kl, monitor, alloc])

    # KLWeight set the shared KL weight before each epoch and logged it
    assert kl.values == [0.25, 0.5]
    assert float(bayes.kl_weight(bnn).numpy()) == 0.5
    assert hist.history["kl_weight"] == [0.25, 0.5]
    # InformativenessMonitor logged every layer's score and QI bits each epoch, into logs and TensorBoard
    assert len(monitor.history) == 2
    for name in ("conv1", "fc1", "fc2"):
        assert len(hist.history[f"info/{name}"]) == 2
        assert 2 <= hist.history[f"bits/{name}"][-1] <= 8
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert tf is not None
    # BitAllocation computed a plan at the end of training and wrote it
    assert isinstance(alloc.plan, BitPlan)
    assert BitPlan.load(tmp_path / "plan.json").bits == alloc.plan.bits
    assert alloc.plan.mean_bits({p.name: p.size for p in bayes.posteriors(bnn)}) <= 4


def test_kl_weight_scales_the_loss(bnn, digits):
    import tensorflow as tf

    x, _ = digits
    bnn(x[:2])
    full = float(tf.add_n(bnn.losses))
    bayes.kl_weight(bnn).assign(0.1)
    bnn(x[:2])
    assert float(tf.add_n(bnn.losses)) == pytest.approx(0.1 * full, rel=1e-5)


def test_bit_allocation_at_epoch_with_random_bits(bnn, digits):
    x, y = digits
    alloc = BitAllocation(target_bits=3, method="rb", at=0, epochs=50)
    bnn.fit(x[:256], y[:256], epochs=1, verbose=0, callbacks=[alloc])
    assert alloc.plan is not None and alloc.plan.method == "rb"


def test_callbacks_refuse_a_model_without_variational_layers(tiny_keras, digits):
    x, y = digits
    tiny_keras.compile("adam", _loss())
    for cb in (InformativenessMonitor(), BitAllocation(4)):
        with pytest.raises(ModelError, match="to_bayesian"):
            tiny_keras.fit(x[:32], y[:32], epochs=1, verbose=0, callbacks=[cb])
    with pytest.raises(ModelError, match="to_bayesian"):
        tiny_keras.fit(x[:32], y[:32], epochs=1, verbose=0, callbacks=[KLWeight(lambda e: 1.0)])
    with pytest.raises(ModelError, match="qi"):
        BitAllocation(4, method="hawq")
