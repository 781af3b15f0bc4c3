"""Shared fixtures: a tiny real Keras model on scikit-learn's digits and its real int8 TFLite export."""

from __future__ import annotations

import os

import numpy as np
import pytest

import edgeq  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


@pytest.fixture(scope="session")
def digits():
    """(x, y): the 1,797 bundled 8x8 digits, x float32 in [0, 1] with a channel axis."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype("float32")[..., None], d.target.astype("int64")


@pytest.fixture(autouse=True)
def _tiny_keras_unchanged(request):
    """After every test that used tiny_keras, its trained weights are put back: a test that changes them
    (masks, QAT that trains its kernels in place) cannot change what the next test gets."""
    if "tiny_keras" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("tiny_keras")
    weights = [w.copy() for w in model.get_weights()]
    yield
    model.set_weights(weights)


@pytest.fixture(scope="session")
def tiny_keras(digits):
    """A small conv net trained for a few epochs on 1,400 digits (a real, accurate model)."""
    import tensorflow as tf
    import tf_keras as keras

    tf.keras.utils.set_random_seed(0)
    x, y = digits
    model = keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="fc2"),
        ],
        name="tiny_digits",
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    model.fit(x[:1400], y[:1400], epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def tiny_tflite(tiny_keras, digits) -> bytes:
    """The tiny model as a full-integer (int8 in/out) TFLite flatbuffer from the real converter."""
    import tensorflow as tf

    x, _ = digits
    conv = tf.lite.TFLiteConverter.from_keras_model(tiny_keras)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[i : i + 1]] for i in range(100))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return bytes(conv.convert())


@pytest.fixture(scope="session")
def tiny_lut_tflite(tiny_tflite) -> bytes:
    """The tiny model with its first Dense kernel coarsened to 8 values, LUT-compressed by TFLM (DECODE)."""
    import numpy as np
    from tflite_micro.tensorflow.lite.micro.compression import model_editor as me
    from tflite_micro.tensorflow.lite.micro.compression import spec, spec_builder
    from tflite_micro.tensorflow.lite.micro.compression.compress import compress

    bits = 3
    model = me.read(tiny_tflite)
    w = next(op for op in model.subgraphs[0].operators if op.opcode_name == "FULLY_CONNECTED").inputs[1]
    step = 256 // 2**bits
    w.array = (w.array.astype(np.int16) // step * step).astype(np.int8)
    sb = spec_builder.SpecBuilder()
    sb.add_tensor(0, w.index).with_lut(bits, spec.PerChannel(0))
    return bytes(compress(bytes(model.build()), sb.build()))


@pytest.fixture
def tiny_build(tmp_path, tiny_tflite, digits):
    """A build folder as `edgeq run` leaves it, reduced to model.tflite and test_data.npz (100 digits)."""
    x, y = digits
    (tmp_path / "model.tflite").write_bytes(tiny_tflite)
    np.savez(tmp_path / "test_data.npz", x=x[-100:], y=y[-100:])
    return tmp_path


@pytest.fixture
def umask() -> int:
    """The process umask: files edgeq writes should have 0o666 & ~umask, folders 0o777 & ~umask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
