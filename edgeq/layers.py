"""The Keras layers edgeq quantizes, their weight counts, and the model checks made before any training
(tf_keras only: no TF-MOT, no TFP)."""

from __future__ import annotations

import numpy as np
import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.errors import ModelError

# Layers whose kernel a BitsQuantizeConfig can fake-quantize, and whether it is per output channel.
# Dense stays per-tensor: per-axis Dense does not convert in TF 2.21 ("mismatched quantized axes").
QUANTIZABLE = {keras.layers.Conv2D: True, keras.layers.DepthwiseConv2D: True, keras.layers.Dense: False}


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # tf_keras wraps what the class raised after a dump of the whole config: keep what it raised.
    text = text.rpartition("Exception encountered: ")[2]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_keras(cls: type) -> bool:
    return cls.__module__.startswith(("tf_keras.", "keras.", "tensorflow"))


def weight_layers(model: keras.Model) -> dict[str, int]:
    """Layer name -> kernel weight count, for every layer edgeq can quantize."""
    sizes = {}
    for layer in model.layers:
        if type(layer) in QUANTIZABLE:
            kernel = layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel
            sizes[layer.name] = int(np.prod(kernel.shape))
    return sizes


def unplanned_layers(model: keras.Model, planned: set[str] | frozenset[str]) -> dict[str, str]:
    """Layer name -> why its weights are not in the plan, for every layer with weights outside `planned`.

    They still reach the device, at the converter's int8 (or float where it has no int8 kernel).
    """
    out = {}
    for layer in model.layers:
        if not layer.weights or layer.name in planned:
            continue
        kind = type(layer).__name__
        base = next((b.__name__ for b in type(layer).__mro__ if b in QUANTIZABLE), None)
        if type(layer) in QUANTIZABLE:
            why = f"{kind} has no TFP variational twin here, so no informativeness: kept at 8 bits"
        elif base is not None and not _is_keras(type(layer)):
            why = (
                f"{kind} subclasses {base} but overrides more than __init__ and get_config, so it may "
                "compute something else: left to the converter, kept at 8 bits"
            )
        elif kind in ("BatchNormalization", "LayerNormalization", "Normalization", "Rescaling"):
            continue  # folded into the layer before it, or no weights that QAT quantizes
        else:
            why = f"{kind} is not a layer edgeq quantizes (Conv2D, DepthwiseConv2D, Dense): kept at 8 bits"
        out[layer.name] = why
    return out


# What a user subclass may define and still compute exactly what its Keras base computes: new defaults
# in __init__, and the config that goes with them (plus what Python puts in every class body).
_PLAIN_ATTRS = frozenset(
    "__init__ get_config from_config __module__ __qualname__ __doc__ __dict__ __weakref__ __annotations__ "
    "__firstlineno__ __static_attributes__ __orig_bases__ __parameters__".split()
)


def plain_base(layer) -> type | None:
    """The QUANTIZABLE class that `layer`'s own class only re-parametrises, else None.

    A subclass that overrides nothing but __init__ (new defaults) and get_config, and whose config
    rebuilds the base class unchanged, computes what the base computes: edgeq quantizes it as one.
    """
    cls = type(layer)
    base = next((b for b in cls.__mro__ if b in QUANTIZABLE), None)
    if base is None or base is cls:
        return None
    if any(set(vars(k)) - _PLAIN_ATTRS for k in cls.__mro__[: cls.__mro__.index(base)]):
        return None  # call, build, a property...: it may compute something else
    try:
        cfg = layer.get_config()
        return base if base.from_config(cfg).get_config() == cfg else None
    except (TypeError, ValueError, NotImplementedError):  # extra arguments: not the base's config
        return None


def check_model(model: keras.Model, input_shape: tuple[int, ...] | None = None) -> keras.Model:
    """The model as edgeq can transform it, or a ModelError before any training.

    The twin, BatchNormalization folding and TF-MOT's quantize_apply all rebuild the model layer by layer
    from its graph and each layer's get_config(): a subclassed Model (layers wired in call()) has no
    graph, and a layer whose config does not rebuild it would fail only after float training. A
    Sequential without keras.Input is built on `input_shape`; plain subclasses of Conv2D,
    DepthwiseConv2D and Dense (see plain_base) become their base class, weights kept. A Keras 3 model
    is rebuilt as tf_keras first (edgeq.keras3).
    """
    from edgeq.keras3 import to_tf_keras

    model = to_tf_keras(model)  # anything but a Keras model is refused here, by name
    if isinstance(model, keras.Sequential) and not model.built and input_shape is not None:
        try:
            model.build((None, *input_shape))
        except (TypeError, ValueError) as e:
            raise ModelError(
                f"model {model.name!r} cannot be built on inputs of shape {tuple(input_shape)} "
                f"({_one_line(e)}); start it with keras.Input(shape) so its input shape is known"
            ) from e
    if not getattr(model, "_is_graph_network", False):
        kind = type(model).__name__
        raise ModelError(
            f"model {model.name!r} is a subclassed Keras model ({kind}, its layers wired in call()); "
            "TF-MOT's quantize_apply and edgeq's Bayesian twin need a graph of layers: build it as "
            "keras.Sequential([keras.Input(shape), ...]) or functionally, keras.Model(inputs, outputs)"
        )
    for layer in model.layers:
        try:
            layer.__class__.from_config(layer.get_config())
        except Exception as e:  # noqa: BLE001  (the user's layer class: whatever it raises is theirs)
            kind = type(layer).__name__
            raise ModelError(
                f"layer {layer.name!r} ({kind}) cannot be rebuilt from its get_config() "
                f"({type(e).__name__}: {_one_line(e)}); edgeq copies the model for the Bayesian twin and "
                f"QAT: give {kind} a get_config() that returns every argument its __init__ takes"
            ) from e
    swaps = {layer.name: base for layer in model.layers if (base := plain_base(layer)) is not None}
    if not swaps:
        return model

    def clone(layer):
        cls = swaps.get(layer.name, layer.__class__)
        return cls.from_config(layer.get_config())

    out = keras.models.clone_model(model, clone_function=clone)
    out.set_weights(model.get_weights())  # a pretrained model keeps its weights
    return out


def custom_layers(model: keras.Model) -> dict[str, type]:
    """Class name -> class of the model's layers that are not Keras's own (what deserialising needs)."""
    return {type(layer).__name__: type(layer) for layer in model.layers if not _is_keras(type(layer))}
