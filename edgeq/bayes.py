"""Bayesian twins: TFP variational layers whose kernel means start at the float model's weights."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.errors import ModelError
from edgeq.keras3 import to_tf_keras
from edgeq.posterior import LayerPosterior

tfd = tfp.distributions
METHODS = ("flipout", "reparameterization")
_VARIATIONAL = {
    "flipout": {
        keras.layers.Dense: tfp.layers.DenseFlipout,
        keras.layers.Conv2D: tfp.layers.Convolution2DFlipout,
    },
    "reparameterization": {
        keras.layers.Dense: tfp.layers.DenseReparameterization,
        keras.layers.Conv2D: tfp.layers.Convolution2DReparameterization,
    },
}
_CONV_KEYS = ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate")
# TFP builds its posteriors as tf.Modules named after the layer, and tf.Module takes only names like
# this; Keras also takes "1conv" or "conv-1", whose twins get another name (see twin_names).
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _inv_softplus(x: float) -> float:
    return float(np.log(np.expm1(x)))


def _variational_layer(
    layer,
    method: str,
    num_examples: int,
    prior_sigma: float | None,
    init_sigma: float,
    kl_weight: tf.Variable,
    name: str,
):
    """The TFP twin of one Dense/Conv2D layer, kernel mean = the layer's weights, named name."""
    cls = _VARIATIONAL[method][type(layer)]
    kernel, *rest = layer.get_weights()
    bias = rest[0] if rest else None
    posterior_fn = tfp.layers.util.default_mean_field_normal_fn(
        loc_initializer=tf.constant_initializer(kernel),
        untransformed_scale_initializer=tf.constant_initializer(_inv_softplus(init_sigma)),
    )
    if prior_sigma is None:
        prior_fn = tfp.layers.default_multivariate_normal_fn
    else:

        def prior_fn(dtype, shape, name, trainable, add_variable_fn):
            del name, trainable, add_variable_fn
            dist = tfd.Normal(loc=tf.zeros(shape, dtype), scale=tf.cast(prior_sigma, dtype))
            return tfd.Independent(dist, reinterpreted_batch_ndims=len(shape))

    cfg = layer.get_config()
    kwargs = {k: cfg[k] for k in _CONV_KEYS if k in cfg} if "filters" in cfg else {"units": cfg["units"]}
    # KL / N: the ELBO per example, so the data term and the KL term are on the same scale.
    scale = 1.0 / float(num_examples)
    return cls(
        **kwargs,
        activation=cfg["activation"],
        name=name,
        kernel_posterior_fn=posterior_fn,
        kernel_prior_fn=prior_fn,
        kernel_divergence_fn=lambda q, p, _: tfd.kl_divergence(q, p) * (scale * kl_weight),
        bias_posterior_fn=tfp.layers.util.default_mean_field_normal_fn(
            is_singular=True,
            loc_initializer=tf.constant_initializer(bias if bias is not None else 0.0),
        ),
        bias_divergence_fn=None,
    )


def is_variational(layer) -> bool:
    """True for TFP variational layers (they carry a kernel posterior)."""
    return hasattr(layer, "kernel_posterior")


def twin_names(model: keras.Model, method: str = "flipout") -> dict[str, str]:
    """Float layer name -> its TFP twin's name, for the layers whose own name tf.Module refuses."""
    taken = {lyr.name for lyr in model.layers}
    names = {}
    for lyr in model.layers:
        if type(lyr) in _VARIATIONAL[method] and not _MODULE_NAME.match(lyr.name):
            base = "edgeq_" + re.sub(r"[^A-Za-z0-9_]", "_", lyr.name)
            name, i = base, 1
            while name in taken:
                name, i = f"{base}_{i}", i + 1
            taken.add(name)
            names[lyr.name] = name
    return names


def to_bayesian(
    model: keras.Model,
    *,
    num_examples: int,
    method: str = "flipout",
    prior_sigma: float | None = None,
    init_sigma: float = 1e-3,
) -> keras.Model:
    """Bayesian twin of model: Dense/Conv2D become TFP variational layers, other layers keep weights."""
    model = to_tf_keras(model)  # a Keras 3 model is rebuilt as tf_keras, which TFP needs
    if method not in METHODS:
        raise ModelError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if num_examples < 1:
        raise ModelError("num_examples must be the size of the training set (>= 1)")
    if not any(type(lyr) in _VARIATIONAL[method] for lyr in model.layers):
        raise ModelError(f"model {model.name!r} has no Dense or Conv2D layer to make Bayesian")

    # One weight for every layer's KL term, so a callback can anneal it (edgeq.callbacks.KLWeight).
    kl_weight = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="kl_weight")
    renamed = twin_names(model, method)

    def clone(layer):
        if type(layer) in _VARIATIONAL[method]:
            name = renamed.get(layer.name, layer.name)
            return _variational_layer(layer, method, num_examples, prior_sigma, init_sigma, kl_weight, name)
        return layer.__class__.from_config(layer.get_config())

    bnn = keras.models.clone_model(model, clone_function=clone)
    bnn.edgeq_kl_weight = kl_weight
    # Posteriors, plans and reports name the float model's layers; this maps the renamed twins back.
    bnn.edgeq_float_names = tuple((twin, float_name) for float_name, twin in renamed.items())
    for layer in bnn.layers:
        if not is_variational(layer) and layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return bnn


def kl_weight(bnn: keras.Model) -> tf.Variable:
    """The variable that scales every KL term of a twin built by to_bayesian (1.0 = the plain ELBO)."""
    var = getattr(bnn, "edgeq_kl_weight", None)
    if var is None:
        raise ModelError(f"model {bnn.name!r} was not built by edgeq.bayes.to_bayesian; it has no KL weight")
    return var


def variational_layers(bnn: keras.Model) -> list:
    """The model's variational layers, in order; raises if there are none."""
    layers = [lyr for lyr in bnn.layers if is_variational(lyr)]
    if not layers:
        raise ModelError(
            f"model {bnn.name!r} has no variational layers; build it with edgeq.bayes.to_bayesian"
        )
    return layers


def float_name(bnn: keras.Model, layer_name: str) -> str:
    """The float model's name of a twin's layer (the same unless to_bayesian had to rename it)."""
    return dict(getattr(bnn, "edgeq_float_names", ())).get(layer_name, layer_name)


def twin_layer(bnn: keras.Model, name: str):
    """The twin's layer for the float model's layer `name`."""
    renamed = {f: t for t, f in getattr(bnn, "edgeq_float_names", ())}
    return bnn.get_layer(renamed.get(name, name))


def posteriors(bnn: keras.Model) -> list[LayerPosterior]:
    """Per-layer kernel posteriors N(mu, sigma), named as the float model's layers."""
    out = []
    for layer in variational_layers(bnn):
        q = layer.kernel_posterior
        out.append(LayerPosterior(float_name(bnn, layer.name), q.mean().numpy(), q.stddev().numpy()))
    return out


def to_deterministic(bnn: keras.Model, float_model: keras.Model) -> keras.Model:
    """M_det: a copy of float_model carrying the BNN's posterior means (and its other weights)."""
    float_model = to_tf_keras(float_model)  # the Keras 3 model that to_bayesian was given
    det = keras.models.clone_model(float_model)
    for layer in det.layers:
        if not layer.weights:
            continue
        src = twin_layer(bnn, layer.name)
        if is_variational(src):
            weights = [src.kernel_posterior.mean().numpy()]
            if src.bias_posterior is not None:
                weights.append(src.bias_posterior.mean().numpy())
            layer.set_weights(weights)
        else:
            layer.set_weights(src.get_weights())
    return det


@dataclass(frozen=True)
class PredictiveQuality:
    """Monte Carlo predictive quality of a Bayesian model."""

    accuracy: float
    ece: float
    samples: int


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by bin size."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    counts = np.bincount(idx, minlength=bins)
    acc = np.bincount(idx, weights=correct, minlength=bins)
    cnf = np.bincount(idx, weights=conf, minlength=bins)
    nz = counts > 0
    return float(np.sum(np.abs(acc[nz] - cnf[nz])) / len(y))


def mc_evaluate(bnn: keras.Model, x: np.ndarray, y: np.ndarray, *, samples: int = 20) -> PredictiveQuality:
    """Predictive accuracy and ECE from `samples` stochastic forward passes (softmax averaged)."""
    probs = np.zeros((len(x), 0))
    for _ in range(samples):
        p = tf.nn.softmax(bnn(x, training=False)).numpy()
        probs = p if probs.shape[1] == 0 else probs + p
    probs /= samples
    return PredictiveQuality(
        float(np.mean(probs.argmax(1) == y)), expected_calibration_error(probs, y), samples
    )


def compile_bnn(bnn: keras.Model, loss, *, lr: float = 1e-3, metrics=("accuracy",)) -> keras.Model:
    """Compile for ELBO training: the data loss plus the layers' KL terms (already divided by N)."""
    bnn.compile(keras.optimizers.Adam(lr), loss=loss, metrics=list(metrics))
    return bnn


def train_bayesian(
    model_fn: Callable[[], keras.Model],
    x: np.ndarray,
    y: np.ndarray,
    *,
    loss,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    strategy: tf.distribute.Strategy | None = None,
    validation_data=None,
    callbacks=(),
    verbose: int = 0,
) -> keras.Model:
    """Build (model_fn returns the twin) and fit under a tf.distribute strategy when given."""
    scope = strategy.scope() if strategy is not None else _NullScope()
    with scope:
        bnn = compile_bnn(model_fn(), loss, lr=lr)
    bnn.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=validation_data,
        callbacks=list(callbacks),
        verbose=verbose,
    )
    return bnn


class _NullScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
