"""Keras 3 models in: real Keras 3 models rebuilt as real tf_keras models, outputs equal within 1e-5.

`import keras` is Keras 3 even after `import edgeq` (TF_USE_LEGACY_KERAS only redirects `tf.keras`), so
both frameworks run side by side in this process; nothing is mocked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import keras  # Keras 3
import numpy as np
import pytest
import tf_keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from edgeq import models
from edgeq.errors import DataError, EdgeqError, ModelError, PipelineError
from edgeq.keras3 import ACTIVATIONS, CONVERTERS, is_keras3, load_model, to_tf_keras

K = keras.layers
ATOL = 1e-5
MAX_DIFF: dict[str, float] = {}  # case -> max |Keras 3 - tf_keras| seen, printed by the last test


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _randomize_bn(model) -> None:
    """Non-trivial gamma, beta and moving statistics in every BatchNormalization (Keras 3 or tf_keras)."""
    rng = _rng(1)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            n = layer.get_weights()[0].shape
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.uniform(-0.5, 0.5, n),
                    rng.uniform(-0.5, 0.5, n),
                    rng.uniform(0.5, 2.0, n),
                ]
            )


def _assert_same(k3_model, case: str, *, seed: int = 0) -> tf_keras.Model:
    """Rebuild k3_model; same layer names, classes, weights and (random-input) outputs within ATOL."""
    tk = to_tf_keras(k3_model)
    assert isinstance(tk, tf_keras.Model) and not is_keras3(tk)
    assert [lyr.name for lyr in tk.layers if type(lyr).__name__ != "InputLayer"] == [
        lyr.name for lyr in k3_model.layers if type(lyr).__name__ != "InputLayer"
    ]
    for a, b in zip(k3_model.layers, tk.layers[-len(k3_model.layers) :], strict=True):
        assert type(a).__name__ == type(b).__name__ and a.trainable == b.trainable
    inputs = [
        _rng(seed + i).uniform(-1, 1, (4, *t.shape[1:])).astype("float32")
        for i, t in enumerate(k3_model.inputs)
    ]
    feed = inputs if len(inputs) > 1 else inputs[0]
    want = k3_model(feed, training=False)
    got = tk(feed, training=False)
    want, got = (want, got) if isinstance(want, list | tuple) else ([want], [got])
    diff = max(float(np.max(np.abs(np.asarray(w) - g.numpy()))) for w, g in zip(want, got, strict=True))
    MAX_DIFF[case] = diff
    assert diff <= ATOL, f"{case}: max abs diff {diff}"
    return tk


def _single(layer_fn: Callable[[], object], shape: tuple[int, ...]) -> Callable[[], object]:
    return lambda: keras.Sequential([keras.Input(shape), layer_fn()])


def _merge(cls) -> Callable[[], object]:
    def build():
        i = keras.Input((4,))
        a, b = K.Dense(4, name="a")(i), K.Dense(4, name="b")(i)
        return keras.Model(i, cls(name="merge")([a, b]))

    return build


def _bn():
    m = keras.Sequential([keras.Input((3, 3, 4)), K.BatchNormalization(epsilon=1e-2)])
    _randomize_bn(m)
    return m


def _normalization():
    layer = K.Normalization(axis=-1)
    layer.adapt(_rng(2).normal([3.0, -1.0, 0.5], [2.0, 0.5, 4.0], (200, 3)).astype("float32"))
    return keras.Sequential([keras.Input((2, 2, 3)), layer])


# One Keras 3 model per supported layer kind (InputLayer is in every one of them).
LAYER_CASES: dict[str, Callable[[], object]] = {
    "InputLayer": lambda: keras.Sequential([keras.Input((3,), name="only_input"), K.Dense(2)]),
    "Conv1D": _single(
        lambda: K.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="relu", kernel_regularizer="l2"),
        (10, 3),
    ),
    "Conv2D": _single(
        lambda: K.Conv2D(
            4,
            3,
            strides=2,
            padding="same",
            activation="tanh",
            kernel_initializer="he_normal",
            kernel_regularizer=keras.regularizers.L1L2(1e-3, 1e-2),
            kernel_constraint=keras.constraints.MaxNorm(2.0),
        ),
        (6, 6, 2),
    ),
    "DepthwiseConv2D": _single(lambda: K.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (5, 5, 3)),
    "SeparableConv2D": _single(lambda: K.SeparableConv2D(5, 3, depth_multiplier=2), (6, 6, 3)),
    "Dense": _single(
        lambda: K.Dense(
            5, activation="gelu", bias_initializer=keras.initializers.Constant(0.3), trainable=False
        ),
        (7,),
    ),
    "BatchNormalization": _bn,
    "MaxPooling1D": _single(lambda: K.MaxPooling1D(2), (9, 2)),
    "MaxPooling2D": _single(lambda: K.MaxPooling2D(3, strides=1, padding="same"), (5, 5, 2)),
    "AveragePooling1D": _single(lambda: K.AveragePooling1D(3, strides=2, padding="same"), (9, 2)),
    "AveragePooling2D": _single(lambda: K.AveragePooling2D(2, padding="same"), (5, 5, 2)),
    "GlobalAveragePooling1D": _single(lambda: K.GlobalAveragePooling1D(), (6, 3)),
    "GlobalAveragePooling2D": _single(lambda: K.GlobalAveragePooling2D(keepdims=True), (4, 4, 3)),
    "GlobalMaxPooling1D": _single(lambda: K.GlobalMaxPooling1D(), (6, 3)),
    "GlobalMaxPooling2D": _single(lambda: K.GlobalMaxPooling2D(), (4, 4, 3)),
    "Flatten": _single(lambda: K.Flatten(), (3, 2, 2)),
    "Reshape": _single(lambda: K.Reshape((-1, 2)), (3, 4)),
    "Activation": _single(lambda: K.Activation("silu"), (6,)),
    "ReLU": _single(lambda: K.ReLU(max_value=0.6, negative_slope=0.1, threshold=0.2), (8,)),
    "LeakyReLU": _single(lambda: K.LeakyReLU(negative_slope=0.2), (8,)),
    "Softmax": _single(lambda: K.Softmax(axis=1), (3, 4)),
    "Dropout": _single(lambda: K.Dropout(0.5), (8,)),
    "Add": _merge(K.Add),
    "Subtract": _merge(K.Subtract),
    "Multiply": _merge(K.Multiply),
    "Concatenate": _merge(K.Concatenate),
    "ZeroPadding2D": _single(lambda: K.ZeroPadding2D(((1, 2), (0, 1))), (3, 3, 2)),
    "Rescaling": _single(lambda: K.Rescaling(1 / 255.0, offset=-0.5), (4, 4, 1)),
    "Normalization": _normalization,
}


def test_keras_is_keras3_next_to_tf_keras():
    import tensorflow as tf

    assert keras.__version__.split(".")[0] == "3" and tf_keras.__version__.startswith("2.")
    assert tf.keras.Model is tf_keras.Model  # TF_USE_LEGACY_KERAS redirects tf.keras only


def test_every_converter_has_a_case():
    assert set(LAYER_CASES) == set(CONVERTERS)


@pytest.mark.parametrize("kind", sorted(LAYER_CASES))
def test_layer_kind_rebuilds_with_equal_outputs(kind):
    model = LAYER_CASES[kind]()
    tk = _assert_same(model, kind)
    assert any(type(lyr).__name__ == kind for lyr in tk.layers) or kind == "InputLayer"


def test_layer_details_survive():
    """The Keras 3 options that differ in name or form reach tf_keras with their meaning."""
    tk = to_tf_keras(LAYER_CASES["LeakyReLU"]())
    assert tk.layers[-1].get_config()["alpha"] == pytest.approx(0.2)
    conv = to_tf_keras(LAYER_CASES["Conv2D"]()).layers[-1]
    assert conv.kernel_regularizer.get_config() == pytest.approx({"l1": 1e-3, "l2": 1e-2})
    assert conv.kernel_constraint.get_config()["max_value"] == 2.0
    assert type(conv.kernel_initializer).__name__ == "HeNormal"
    assert to_tf_keras(LAYER_CASES["Dense"]()).layers[-1].trainable is False
    assert to_tf_keras(LAYER_CASES["InputLayer"]()).inputs[0].name.startswith("only_input")
    norm = to_tf_keras(_normalization()).layers[-1]
    np.testing.assert_allclose(np.ravel(norm.mean), [3.0, -1.0, 0.5], atol=0.5)


def test_activations_compute_the_same():
    """Every activation name edgeq passes through means the same function in both frameworks."""
    i = keras.Input((64,))
    outs = [K.Activation(name, name=f"act_{name}")(i) for name in sorted(ACTIVATIONS)]
    model = keras.Model(i, outs)
    tk = _assert_same(model, "activations")
    x = np.linspace(-6, 6, 64, dtype="float32")[None]
    for w, g in zip(model(x), tk(x), strict=True):
        np.testing.assert_allclose(np.asarray(w), g.numpy(), atol=ATOL)


def test_sequential_chain():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            K.Conv2D(4, 3, activation="relu"),
            K.BatchNormalization(),
            K.MaxPooling2D(),
            K.Flatten(),
            K.Dropout(0.1),
            K.Dense(6, activation="relu"),
            K.Dense(3),
            K.Softmax(),
        ],
        name="chain",
    )
    _randomize_bn(model)
    tk = _assert_same(model, "sequential")
    assert isinstance(tk, tf_keras.Sequential) and tk.name == "chain"


def test_sequential_built_without_input():
    model = keras.Sequential([K.Dense(4, activation="relu"), K.Dense(2)])
    model.build((None, 5))
    assert isinstance(_assert_same(model, "sequential_build"), tf_keras.Sequential)
    unbuilt = keras.Sequential([K.Dense(4)], name="unbuilt")
    with pytest.raises(ModelError, match="unbuilt Keras 3 Sequential"):
        to_tf_keras(unbuilt)


def test_functional_residual_branch():
    i = keras.Input((6, 6, 4), name="image")
    y = K.Conv2D(4, 3, padding="same", name="a_conv")(i)
    y = K.BatchNormalization(name="a_bn")(y)
    y = K.ReLU(name="a_relu")(y)
    y = K.Conv2D(4, 3, padding="same", name="b_conv")(y)
    x = K.Add(name="add")([i, y])
    x = K.ReLU(name="out_relu")(x)
    x = K.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(i, K.Dense(3, name="logits")(x), name="residual")
    _randomize_bn(model)
    tk = _assert_same(model, "residual")
    assert [n.name for n in tk.get_layer("add")._inbound_nodes[0].inbound_layers] == ["image", "b_conv"]


def test_shared_layer_used_twice_out_of_config_order():
    # The shared layer's second call consumes a layer that comes after it in the config's layer list.
    i = keras.Input((5,), name="x")
    shared = K.Dense(5, activation="tanh", name="shared")
    a = shared(i)
    b = K.Dense(5, name="middle")(a)
    c = shared(b)
    model = keras.Model(i, K.Concatenate(name="cat")([a, c]), name="shared_twice")
    cfg = model.get_config()
    assert [entry["name"] for entry in cfg["layers"]].index("shared") < [
        entry["name"] for entry in cfg["layers"]
    ].index("middle")
    tk = _assert_same(model, "shared_layer")
    assert len(tk.get_layer("shared")._inbound_nodes) == 2
    assert len(tk.get_layer("shared").weights) == 2  # one set of weights, two calls


def test_two_inputs_concatenate_two_outputs():
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    joined = K.Concatenate(name="cat")([K.Dense(4, name="da")(a), b])
    gate = K.Multiply(name="gate")([K.Dense(7, name="g")(joined), joined])
    model = keras.Model([a, b], [K.Dense(2, name="o1")(gate), K.Dense(1, name="o2")(joined)])
    tk = _assert_same(model, "two_in_two_out")
    assert [t.name.split(":")[0] for t in tk.inputs] == ["a", "b"] and len(tk.outputs) == 2


def test_training_flag_follows_the_model_call_as_in_keras3():
    """Keras 3 lets model(x, training=True) override a recorded training=False; so must the rebuild."""
    i = keras.Input((1000,))
    model = keras.Model(i, K.Dropout(0.5, name="drop")(K.Dense(1000, name="d")(i), training=False))
    tk = _assert_same(model, "dropout_training_kwarg")
    x = np.ones((1, 1000), "float32")
    assert np.mean(np.asarray(model(x, training=True)) == 0) > 0.3  # Keras 3 drops despite the flag
    assert np.mean(tk(x, training=True).numpy() == 0) > 0.3
    np.testing.assert_allclose(tk(x, training=False).numpy(), np.asarray(model(x, training=False)), atol=ATOL)
    # And the recorded kwargs (mask=None on BatchNormalization) do not reach tf_keras's nodes.
    bn = keras.Model(i, K.BatchNormalization(name="bn")(K.Dense(4, name="d2")(i)))
    assert bn.get_config()["layers"][-1]["inbound_nodes"][0]["kwargs"] == {"mask": None}
    assert to_tf_keras(bn).get_layer("bn")._inbound_nodes[0].call_kwargs == {}


# --- files -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k3_functional():
    i = keras.Input((6,), name="feat")
    h = K.Dense(8, activation="relu", name="h")(i)
    h = K.BatchNormalization(name="bn")(h)
    model = keras.Model(i, K.Dense(3, name="out")(K.Add(name="skip")([h, K.Dense(8, name="p")(i)])))
    _randomize_bn(model)
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_file_loads_as_tf_keras(tmp_path, k3_functional, suffix):
    path = tmp_path / f"model{suffix}"
    k3_functional.save(path)
    x = _rng(3).normal(size=(5, 6)).astype("float32")
    for loaded in (load_model(path), to_tf_keras(path), to_tf_keras(str(path))):
        assert isinstance(loaded, tf_keras.Model)
        np.testing.assert_allclose(loaded(x).numpy(), np.asarray(k3_functional(x)), atol=ATOL)


def test_tf_keras_cannot_read_a_keras3_file(tmp_path, k3_functional):
    """Why edgeq rebuilds: tf_keras's own loader rejects what Keras 3 saves."""
    k3_functional.save(tmp_path / "m.keras")
    with pytest.raises((TypeError, ValueError)):
        tf_keras.models.load_model(tmp_path / "m.keras", compile=False)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_tf_keras_file_loads_with_tf_keras(tmp_path, suffix):
    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2, name="d")], name="tfk")
    model.save(tmp_path / f"m{suffix}")
    loaded = load_model(tmp_path / f"m{suffix}")
    assert isinstance(loaded, tf_keras.Model) and loaded.name == "tfk"
    np.testing.assert_allclose(loaded.get_weights()[0], model.get_weights()[0])


def test_tf_keras_model_passes_through():
    model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])
    assert to_tf_keras(model) is model
    assert not is_keras3(model) and not is_keras3("model.keras")
    assert is_keras3(keras.Sequential([keras.Input((2,)), K.Dense(1)]))


# --- errors ------------------------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and isinstance(excinfo.value, EdgeqError)
    return text


def test_unsupported_layer_names_layer_class_and_fix():
    i = keras.Input((4,))
    model = keras.Model(i, K.Lambda(lambda t: t * 2, name="lambda_1")(K.Dense(4)(i)))
    with pytest.raises(ModelError) as e:
        to_tf_keras(model)
    assert _one_line(e) == (
        "layer 'lambda_1' is a Keras 3 Lambda, which edgeq cannot rebuild as tf_keras; replace it with a "
        "built-in layer or build the model with tf_keras"
    )
    seq = keras.Sequential([keras.Input((3, 2)), K.LSTM(2, name="lstm")])
    with pytest.raises(ModelError, match="layer 'lstm' is a Keras 3 LSTM"):
        to_tf_keras(seq)


def test_custom_layer_subclassed_model_ops_nested_model_and_activation():
    class MyDense(K.Dense):
        pass

    i = keras.Input((4,))
    with pytest.raises(ModelError, match=r"layer 'mine' is a custom Keras 3 layer \(MyDense\)") as e:
        to_tf_keras(keras.Model(i, MyDense(2, name="mine")(i)))
    _one_line(e)

    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.d = K.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(ModelError, match=r"model 'net' is a subclassed Keras 3 model \(Net\)") as e:
        to_tf_keras(net)
    _one_line(e)

    d = K.Dense(4, name="d")(i)
    with pytest.raises(ModelError, match=r"operation 'add(_\d+)?' is a Keras 3 op .*keras.layers.Add") as e:
        to_tf_keras(keras.Model(i, d + i))
    _one_line(e)

    inner = keras.Sequential([keras.Input((4,)), K.Dense(2)], name="inner")
    with pytest.raises(ModelError, match="layer 'inner' is a nested Keras 3 model") as e:
        to_tf_keras(keras.Model(i, inner(i)))
    _one_line(e)

    with pytest.raises(ModelError, match="'hard_sigmoid', which tf_keras lacks or computes differently") as e:
        to_tf_keras(keras.Sequential([keras.Input((2,)), K.Dense(2, activation="hard_sigmoid", name="hs")]))
    _one_line(e)

    with pytest.raises(ModelError, match="expected a Keras model") as e:
        to_tf_keras(42)
    _one_line(e)


def test_unsupported_layer_in_a_saved_file(tmp_path):
    i = keras.Input((4,))
    keras.Model(i, K.Lambda(lambda t: t + 1, name="lam")(i)).save(tmp_path / "lam.keras")
    # Caught from the file's config, before Keras 3's safe_mode refuses the Lambda with its own story.
    with pytest.raises(ModelError, match="layer 'lam' is a Keras 3 Lambda") as e:
        load_model(tmp_path / "lam.keras")
    _one_line(e)


def test_files_that_are_not_models(tmp_path):
    (tmp_path / "notes.keras").write_text("not a model")
    np.savez(tmp_path / "data.npz", x=np.zeros(3))
    (tmp_path / "fake.h5").write_bytes(b"\x00" * 64)
    keras.Sequential([keras.Input((2,)), K.Dense(1)]).save_weights(tmp_path / "w.weights.h5")
    cases = {
        tmp_path / "missing.keras": "does not exist",
        tmp_path / "notes.keras": "is not a Keras model file",
        tmp_path / "data.npz": "is not a Keras model file",
        tmp_path / "fake.h5": "is not a Keras model file",
        tmp_path / "w.weights.h5": "holds weights only",
        tmp_path: "is not a Keras model file",
    }
    for path, message in cases.items():
        with pytest.raises(ModelError, match=message) as e:
            load_model(path)
        assert str(path) in _one_line(e)


# --- entry points take Keras 3 models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def k3_digits(digits):
    """A Keras 3 twin of edgeq.models.digits_cnn, trained briefly on 600 digits."""
    keras.utils.set_random_seed(0)
    model = k3_digits_cnn()
    x, y = digits
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:600], y[:600], epochs=2, batch_size=64, verbose=0)
    return model


def test_to_bayesian_quantize_and_prune_take_keras3(k3_digits, digits):
    from edgeq import allocate, bayes
    from edgeq.optimize import quantize_model
    from edgeq.plan import BitPlan
    from edgeq.prune import prune_model

    x, y = digits
    bnn = bayes.to_bayesian(k3_digits, num_examples=600)
    for post in bayes.posteriors(bnn):
        np.testing.assert_allclose(post.mu, k3_digits.get_layer(post.name).get_weights()[0], rtol=1e-6)
    det = bayes.to_deterministic(bnn, k3_digits)  # the README passes the same (Keras 3) float model
    np.testing.assert_allclose(det(x[:32]).numpy(), np.asarray(k3_digits(x[:32])), atol=ATOL)
    plan = allocate.quantile_inform(bayes.posteriors(bnn), target_bits=4)
    for qat in (
        quantize_model(det, plan),
        quantize_model(k3_digits, BitPlan.from_bits({"conv1": 4, "fc1": 3})),
    ):
        assert isinstance(qat, tf_keras.Model) and np.isfinite(qat.predict(x[:8], verbose=0)).all()
    pruned = prune_model(k3_digits, sparsity=0.5)
    assert isinstance(pruned, tf_keras.Model) and pruned.predict(x[:4], verbose=0).shape == (4, 10)


# --- the model zoo, built in Keras 3 ----------------------------------------------------------------


def k3_digits_cnn(input_shape=(8, 8, 1), num_classes: int = 10):
    return keras.Sequential(
        [
            keras.Input(input_shape),
            K.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            K.Conv2D(32, 3, activation="relu", name="conv2"),
            K.MaxPooling2D(2, name="pool"),
            K.Flatten(name="flatten"),
            K.Dense(64, activation="relu", name="fc1"),
            K.Dense(num_classes, name="fc2"),
        ],
        name="digits_cnn",
    )


def k3_lenet5(input_shape=(28, 28, 1), num_classes: int = 10):
    return keras.Sequential(
        [
            keras.Input(input_shape),
            K.Conv2D(32, 5, activation="relu", name="conv1"),
            K.MaxPooling2D(2, name="pool1"),
            K.Conv2D(64, 5, activation="relu", name="conv2"),
            K.MaxPooling2D(2, name="pool2"),
            K.Flatten(name="flatten"),
            K.Dense(512, activation="relu", name="fc1"),
            K.Dense(num_classes, name="fc2"),
        ],
        name="lenet5",
    )


def k3_mlp(input_shape=(10,), num_outputs: int = 1, hidden=(512, 256, 64)):
    layers = [keras.Input(input_shape)]
    layers += [K.Dense(h, activation="relu", name=f"fc{i + 1}") for i, h in enumerate(hidden)]
    layers.append(K.Dense(num_outputs, name="out"))
    return keras.Sequential(layers, name="mlp")


def _k3_conv_bn(x, filters, kernel, name, *, strides=1, relu=True):
    x = K.Conv2D(filters, kernel, strides=strides, padding="same", name=f"{name}_conv")(x)
    x = K.BatchNormalization(name=f"{name}_bn")(x)
    return K.ReLU(name=f"{name}_relu")(x) if relu else x


def _k3_vgg(cfg, input_shape, num_classes, fc, name):
    inputs = keras.Input(input_shape, name="input")
    x, block, i = inputs, 1, 1
    for c in cfg:
        if c == "M":
            x = K.MaxPooling2D(2, name=f"pool{block}")(x)
            block, i = block + 1, 1
        else:
            x = _k3_conv_bn(x, c, 3, f"b{block}c{i}")
            i += 1
    x = K.Flatten(name="flatten")(x)
    for j, units in enumerate(fc, start=1):
        x = K.Dense(units, activation="relu", name=f"fc{j}")(x)
    return keras.Model(inputs, K.Dense(num_classes, name="logits")(x), name=name)


def k3_vgg7(input_shape=(32, 32, 3), num_classes: int = 10):
    return _k3_vgg([128, 128, "M", 256, 256, "M", 512, 512, "M"], input_shape, num_classes, (1024,), "vgg7")


def k3_vgg16(input_shape=(32, 32, 3), num_classes: int = 10):
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    return _k3_vgg(cfg, input_shape, num_classes, (), "vgg16")


def _k3_basic_block(x, filters, strides, name):
    y = _k3_conv_bn(x, filters, 3, f"{name}_a", strides=strides)
    y = _k3_conv_bn(y, filters, 3, f"{name}_b", relu=False)
    if strides != 1 or x.shape[-1] != filters:
        x = K.Conv2D(filters, 1, strides=strides, padding="same", name=f"{name}_proj")(x)
    x = K.Add(name=f"{name}_add")([x, y])
    return K.ReLU(name=f"{name}_out")(x)


def _k3_cifar_resnet(input_shape, num_classes, blocks, name):
    inputs = keras.Input(input_shape, name="input")
    x = _k3_conv_bn(inputs, 16, 3, "stem")
    for stage, filters in enumerate((16, 32, 64), start=1):
        for b in range(1, blocks + 1):
            x = _k3_basic_block(x, filters, 2 if stage > 1 and b == 1 else 1, f"s{stage}b{b}")
    x = K.GlobalAveragePooling2D(name="avgpool")(x)
    return keras.Model(inputs, K.Dense(num_classes, name="logits")(x), name=name)


def k3_resnet20(input_shape=(32, 32, 3), num_classes: int = 10):
    return _k3_cifar_resnet(input_shape, num_classes, 3, "resnet20")


def k3_resnet8(input_shape=(32, 32, 3), num_classes: int = 10):
    return _k3_cifar_resnet(input_shape, num_classes, 1, "resnet8")


def k3_ds_cnn(input_shape=(49, 10, 1), num_classes: int = 12):
    inputs = keras.Input(input_shape, name="input")
    x = _k3_conv_bn(inputs, 64, (10, 4), "stem", strides=2)
    x = K.Dropout(0.2, name="stem_drop")(x)
    for i in range(1, 5):
        x = K.DepthwiseConv2D(3, padding="same", name=f"ds{i}_dw")(x)
        x = K.BatchNormalization(name=f"ds{i}_dw_bn")(x)
        x = K.ReLU(name=f"ds{i}_dw_relu")(x)
        x = _k3_conv_bn(x, 64, 1, f"ds{i}_pw")
    x = K.Dropout(0.4, name="drop")(x)
    x = K.AveragePooling2D((input_shape[0] // 2, input_shape[1] // 2), name="avgpool")(x)
    x = K.Flatten(name="flatten")(x)
    return keras.Model(inputs, K.Dense(num_classes, name="logits")(x), name="ds_cnn")


ZOO = [
    (k3_digits_cnn, models.digits_cnn, (8, 8, 1), 10),
    (k3_lenet5, models.lenet5, (28, 28, 1), 10),
    (k3_mlp, models.mlp, (123,), 1),
    (k3_vgg7, models.vgg7, (32, 32, 3), 10),
    (k3_vgg16, models.vgg16, (32, 32, 3), 10),
    (k3_resnet20, models.resnet20, (32, 32, 3), 10),
    (k3_resnet8, models.resnet8, (32, 32, 3), 10),
    (k3_ds_cnn, models.ds_cnn, (49, 10, 1), 12),
]


def _architecture(model) -> list[tuple]:
    """(name, class, weight shapes, inbound layer names) per layer: what makes two models the same net."""
    out = []
    for layer in model.layers:
        inbound = []
        for node in layer._inbound_nodes:
            parents = node.inbound_layers
            parents = parents if isinstance(parents, list) else [parents]
            # Unnamed Inputs get counter names (input_4 vs input_layer_45); what they feed is what counts.
            inbound.append([p.name if type(p).__name__ != "InputLayer" else "<input>" for p in parents])
        out.append((layer.name, type(layer).__name__, [tuple(w.shape) for w in layer.weights], inbound))
    return out


@pytest.mark.parametrize(("k3_build", "build", "shape", "outputs"), ZOO, ids=[z[1].__name__ for z in ZOO])
def test_zoo_model_built_in_keras3_rebuilds_as_the_zoo_model(k3_build, build, shape, outputs):
    keras.utils.set_random_seed(0)
    k3_model = k3_build(shape, outputs)
    _randomize_bn(k3_model)
    tk = _assert_same(k3_model, build.__name__)
    assert _architecture(tk) == _architecture(build(shape, outputs))
    assert tk.count_params() == k3_model.count_params()


# --- bring your own model: pipeline_from_files ------------------------------------------------------


@pytest.fixture(scope="module")
def byo_files(tmp_path_factory, k3_digits, digits):
    """A Keras 3 digits model saved as .keras and the digits splits as an .npz."""
    folder = tmp_path_factory.mktemp("byo")
    k3_digits.save(folder / "digits.keras")
    x, y = digits
    arrays = {"x_train": x[:1200], "y_train": y[:1200], "x_test": x[1500:], "y_test": y[1500:]}
    np.savez(folder / "digits.npz", **arrays)
    return folder / "digits.keras", folder / "digits.npz", arrays


def test_pipeline_from_files_runs_the_saved_model(byo_files, k3_digits, digits):
    from edgeq.byo import pipeline_from_files
    from edgeq.pipeline import PipelineSpec

    model_path, data_path, arrays = byo_files
    spec = pipeline_from_files(model_path, data_path, epochs=3, train=False)
    assert isinstance(spec, PipelineSpec) and spec.name == "digits" and spec.epochs == 3 and spec.pretrained
    s = spec.load_data(seed=0, data=str(data_path))
    assert s.task == "classification" and s.input_shape == (8, 8, 1)
    assert len(s.x_train) + len(s.x_val) == 1200 and len(s.x_val) == 120 and len(s.x_test) == 297
    np.testing.assert_array_equal(spec.load_data(seed=0).x_val, s.x_val)  # seeded split
    assert not np.array_equal(spec.load_data(seed=1).y_val, s.y_val)
    a, b = spec.build_model(s.input_shape, s.num_classes), spec.build_model(s.input_shape, s.num_classes)
    assert isinstance(a, tf_keras.Model) and a is not b
    x = digits[0][:16]
    np.testing.assert_allclose(a(x).numpy(), np.asarray(k3_digits(x)), atol=ATOL)
    assert not pipeline_from_files(model_path, data_path).pretrained


def test_pipeline_from_files_val_split_and_task(byo_files, tmp_path):
    from edgeq.byo import pipeline_from_files

    model_path, _, arrays = byo_files
    np.savez(tmp_path / "v.npz", **arrays, x_val=arrays["x_test"][:10], y_val=arrays["y_test"][:10])
    s = pipeline_from_files(model_path, tmp_path / "v.npz").load_data()
    assert len(s.x_val) == 10 and len(s.x_train) == 1200
    floats = {**arrays, "y_train": arrays["y_train"].astype("float32"), "y_test": arrays["y_test"] * 1.0}
    np.savez(tmp_path / "f.npz", **floats)
    # Float targets and a 10-wide output: regression by the rule, whose targets must match the width.
    with pytest.raises(DataError, match="1 target"):
        pipeline_from_files(model_path, tmp_path / "f.npz")
    s = pipeline_from_files(model_path, tmp_path / "f.npz", task="classification").load_data()
    assert s.task == "classification" and s.y_train.dtype == np.int64
    onehot = {**arrays, "y_train": np.eye(10)[arrays["y_train"]], "y_test": np.eye(10)[arrays["y_test"]]}
    np.savez(tmp_path / "o.npz", **onehot)
    s = pipeline_from_files(model_path, tmp_path / "o.npz").load_data()
    np.testing.assert_array_equal(s.y_test, arrays["y_test"])


def test_pipeline_from_files_regression(tmp_path):
    from edgeq.byo import detect_task, pipeline_from_files

    m = keras.Sequential([keras.Input((5,)), K.Dense(8, activation="relu"), K.Dense(1)])
    m.save(tmp_path / "reg.keras")
    rng = _rng(4)
    np.savez(
        tmp_path / "reg.npz",
        x_train=rng.normal(size=(50, 5)),
        y_train=rng.normal(size=50),
        x_test=rng.normal(size=(10, 5)),
        y_test=rng.normal(size=10),
    )
    s = pipeline_from_files(tmp_path / "reg.keras", tmp_path / "reg.npz").load_data()
    assert s.task == "regression" and s.num_classes == 1 and s.x_train.dtype == np.float32
    assert detect_task(np.arange(4), 1) == "regression" and detect_task(np.arange(4), 3) == "classification"


def test_emits_probabilities(k3_digits):
    from edgeq.byo import emits_probabilities

    assert not emits_probabilities(to_tf_keras(k3_digits))
    for last in (K.Softmax(), K.Dense(3, activation="softmax"), K.Activation("sigmoid")):
        assert emits_probabilities(to_tf_keras(keras.Sequential([keras.Input((4,)), K.Dense(3), last])))


def _bad(arrays: dict, **change) -> dict:
    out = {**arrays, **change}
    return {k: v for k, v in out.items() if v is not None}


def test_pipeline_from_files_validations(byo_files, tmp_path):
    from edgeq.byo import pipeline_from_files

    model_path, _, arrays = byo_files
    nan_x = arrays["x_train"].copy()
    nan_x[3, 0, 0, 0] = np.nan
    neg = arrays["y_train"].copy()
    neg[0] = -1
    nan_y = arrays["y_train"].astype("float32")
    nan_y[5] = np.nan
    cases = {
        "missing_keys": (_bad(arrays, x_test=None, y_test=None), DataError, "lacks x_test, y_test"),
        "half_val": (_bad(arrays, x_val=arrays["x_test"]), DataError, "lacks y_val"),
        "length": (
            _bad(arrays, y_train=arrays["y_train"][:-1]),
            DataError,
            "1200 examples but y_train has 1199",
        ),
        "empty": (
            _bad(arrays, x_test=arrays["x_test"][:0], y_test=arrays["y_test"][:0]),
            DataError,
            "x_test is empty",
        ),
        "non_finite": (_bad(arrays, x_train=nan_x), DataError, "x_train has 1 non-finite value"),
        "shape": (
            _bad(arrays, x_train=arrays["x_train"].reshape(-1, 64), x_test=arrays["x_test"].reshape(-1, 64)),
            PipelineError,
            r"takes inputs of shape \(8, 8, 1\) but x_train has examples of shape \(64,\)",
        ),
        "range": (
            _bad(arrays, y_test=arrays["y_test"] + 5),
            DataError,
            "label 14 but the model has 10 outputs",
        ),
        "negative": (_bad(arrays, y_train=neg), DataError, "negative label -1"),
        "nan_label": (_bad(arrays, y_train=nan_y), DataError, "y_train has 1 non-finite value"),
    }
    for case, (data, error, message) in cases.items():
        np.savez(tmp_path / f"{case}.npz", **data)
        with pytest.raises(error, match=message) as e:
            pipeline_from_files(
                model_path, tmp_path / f"{case}.npz", task="classification" if case == "nan_label" else None
            )
        _one_line(e)
    (tmp_path / "text.npz").write_text("x_train,y_train\n1,2\n")
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    np.save(tmp_path / "one.npy", arrays["x_train"])
    np.savez(tmp_path / "objects.npz", **_bad(arrays, y_train=np.array([{"a": 1}] * 1200, dtype=object)))
    for name, message in {
        "text.npz": "is not an .npz archive",
        "cut.npz": "is not an .npz archive",
        "one.npy": "is not an .npz archive",
        "objects.npz": "cannot read",
        "absent.npz": "does not exist",
    }.items():
        with pytest.raises(DataError, match=message) as e:
            pipeline_from_files(model_path, tmp_path / name)
        _one_line(e)
    with pytest.raises(PipelineError, match="unknown task 'segmentation'"):
        pipeline_from_files(model_path, good, task="segmentation")
    with pytest.raises(ModelError, match="does not exist"):
        pipeline_from_files(tmp_path / "absent.keras", good)
    one_out = tmp_path / "one_out.keras"
    keras.Sequential([keras.Input((8, 8, 1)), K.Flatten(), K.Dense(1)]).save(one_out)
    with pytest.raises(PipelineError, match="model has 1 output") as e:
        pipeline_from_files(one_out, good, task="classification")
    _one_line(e)


def test_report_max_diffs(capsys):
    """Print the largest Keras 3 vs tf_keras difference per case (run with -s to see it)."""
    if MAX_DIFF:
        with capsys.disabled():
            print(
                "\nmax |keras3 - tf_keras|:", json.dumps({k: f"{v:.2e}" for k, v in sorted(MAX_DIFF.items())})
            )
        assert max(MAX_DIFF.values()) <= ATOL
    assert Path(__file__).exists()
