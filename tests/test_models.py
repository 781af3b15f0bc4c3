"""The model zoo: published parameter counts, shapes, Bayesian twins and 4-bit QAT export of the ResNets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy import flatbuffer
from edgeq import models

# (builder, input shape, outputs, total parameters, trainable parameters). Published figures:
# LeNet-5 582k (the papers); VGG-16-BN 14,728,266 trainable (the usual CIFAR VGG-16 with BN);
# ResNet-20 274,442 (Keras ResNet v1 example, 0.27M in He et al.); ResNet-8 78,666 (MLPerf Tiny);
# DS-CNN small 23,756 trainable (MLPerf Tiny KWS). VGG-7 is the paper's layout with BN.
ZOO = [
    (models.lenet5, (28, 28, 1), 10, 582_026, 582_026),
    (models.vgg7, (32, 32, 3), 10, 12_983_434, 12_979_850),
    (models.vgg16, (32, 32, 3), 10, 14_736_714, 14_728_266),
    (models.resnet20, (32, 32, 3), 10, 274_442, 273_066),
    (models.resnet8, (32, 32, 3), 10, 78_666, 78_186),
    (models.ds_cnn, (49, 10, 1), 12, 24_908, 23_756),
    (models.mlp, (123,), 1, 211_329, 211_329),
]
IDS = [z[0].__name__ for z in ZOO]


def _trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.mark.parametrize(("build", "shape", "outputs", "total", "trainable"), ZOO, ids=IDS)
def test_builds_with_published_size_and_runs(build, shape, outputs, total, trainable):
    model = build(shape, outputs)
    assert (model.count_params(), _trainable(model)) == (total, trainable)
    assert model.output_shape == (None, outputs)
    y = model(np.random.default_rng(0).random((2, *shape), dtype=np.float32), training=False).numpy()
    assert y.shape == (2, outputs) and np.isfinite(y).all()


@pytest.mark.parametrize(("build", "shape", "outputs", "total", "trainable"), ZOO, ids=IDS)
def test_names_unique_and_every_weight_layer_quantizable(build, shape, outputs, total, trainable):
    import tf_keras as keras

    from edgeq.optimize import QUANTIZABLE

    model = build(shape, outputs)
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    # Rebuilding gives the same names: plans and reports refer to layers by name.
    assert names == [layer.name for layer in build(shape, outputs).layers]
    kinds = {type(lyr) for lyr in model.layers if lyr.weights}
    assert kinds <= set(QUANTIZABLE) | {keras.layers.BatchNormalization}


def test_lenet5_layers_match_the_paper():
    from edgeq.optimize import weight_layers

    sizes = weight_layers(models.lenet5())
    assert sizes == {"conv1": 5 * 5 * 32, "conv2": 5 * 5 * 32 * 64, "fc1": 1024 * 512, "fc2": 512 * 10}


@pytest.mark.parametrize(
    ("build", "shape", "outputs"),
    [(models.resnet8, (32, 32, 3), 10), (models.resnet20, (32, 32, 3), 10), (models.ds_cnn, (49, 10, 1), 12)],
    ids=["resnet8", "resnet20", "ds_cnn"],
)
def test_bayesian_twin_of_functional_models(build, shape, outputs):
    import tf_keras as keras

    from edgeq import bayes
    from edgeq.optimize import weight_layers

    keras.utils.set_random_seed(0)
    model = build(shape, outputs)
    x = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    bnn = bayes.to_bayesian(model, num_examples=100)
    assert bnn(x).shape == (4, outputs)
    assert sum(type(lyr) is keras.layers.Add for lyr in bnn.layers) == sum(
        type(lyr) is keras.layers.Add for lyr in model.layers
    )
    # TFP has no variational depthwise layer: DepthwiseConv2D stays deterministic, keeps its weights,
    # and has no posterior (the flow then leaves it out of the plan; QAT gives it TF-MOT's 8 bits).
    depthwise = {n for n in weight_layers(model) if type(model.get_layer(n)) is keras.layers.DepthwiseConv2D}
    assert [p.name for p in bayes.posteriors(bnn)] == [n for n in weight_layers(model) if n not in depthwise]
    for name in depthwise:
        assert type(bnn.get_layer(name)) is keras.layers.DepthwiseConv2D
        np.testing.assert_array_equal(
            bnn.get_layer(name).get_weights()[0], model.get_layer(name).get_weights()[0]
        )
    # M_det carries the posterior means, which start at the float weights: same function.
    det = bayes.to_deterministic(bnn, model)
    np.testing.assert_allclose(det(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-5)


def test_resnet8_uniform_4bit_qat_exports_int4():
    import tf_keras as keras

    from deploy import export
    from deploy.inspect import op_sequence
    from deploy.measure.tflm import dequantize, io_quant, run_tflm, tflm_interpreter
    from edgeq.optimize import quantize_model, weight_layers
    from edgeq.plan import BitPlan

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, 64)
    model = models.resnet8()
    plan = BitPlan.from_bits({n: 4 for n in weight_layers(model)})
    qat = quantize_model(model, plan)
    qat.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    tflite = export.convert(qat, x)

    ops = Counter(op for op, _, _ in op_sequence(tflite))
    assert ops["CONV_2D"] == 9 + 1 and "FULLY_CONNECTED" not in ops  # the classifier runs as a 1x1 conv
    tensors = flatbuffer.weight_tensors(tflite)
    assert len(tensors) == 10
    assert all(t.stored_type == "INT4" and t.distinct <= 15 for t in tensors)
    # The integer model computes what the QAT model does.
    out = dequantize(run_tflm(tflite, x[:16]), io_quant(tflm_interpreter(tflite), "output"))
    ref = qat.predict(x[:16], verbose=0)
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.9


def test_resnet8_qat_folds_batchnorm_into_its_convs():
    import tf_keras as keras

    from deploy import export
    from deploy.inspect import op_sequence
    from edgeq.optimize import quantize_model, weight_layers
    from edgeq.plan import BitPlan

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((32, 32, 32, 3), dtype=np.float32)
    model = models.resnet8()
    tflite = export.convert(quantize_model(model, BitPlan.from_bits({n: 4 for n in weight_layers(model)})), x)
    ops = Counter(op for op, _, _ in op_sequence(tflite))
    # What plain PTQ and TF-MOT's own quantize_model give: only the 3 residual ADDs, no MUL.
    assert ops["ADD"] == 3 and "MUL" not in ops
