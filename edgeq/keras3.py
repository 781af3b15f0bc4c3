"""Keras 3 models in: rebuild a Keras 3 model (or a file it saved) as the tf_keras model TF-MOT and TFP need.

`import keras` stays Keras 3 after `import edgeq`: TF_USE_LEGACY_KERAS=1 only redirects `tf.keras` to
tf_keras, so both live in one process. tf_keras cannot read what Keras 3 saves (its InputLayer rejects
`batch_shape`, and Keras 3 dtype policies, node layout and weight file differ), so a Keras 3 model is
rebuilt layer by layer from its config, each config translated to tf_keras's keys, and its weights copied.
"""

from __future__ import annotations

import inspect
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.errors import ModelError

_FIX = "replace it with a built-in layer or build the model with tf_keras"
# Keras 3 activations that tf_keras computes identically under the same name (checked value by value in
# tests/test_keras3.py). hard_sigmoid is missing on purpose: Keras 3 computes relu6(x + 3) / 6, tf_keras
# clip(0.2 x + 0.5, 0, 1), so the same name would silently change the model.
ACTIVATIONS = frozenset(
    {
        "elu",
        "exponential",
        "gelu",
        "leaky_relu",
        "linear",
        "log_softmax",
        "mish",
        "relu",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "softmax",
        "softplus",
        "softsign",
        "swish",
        "tanh",
    }
)
# Base tf_keras Layer keywords that no __init__ signature names (tf_keras validates them in Layer).
_LAYER_KWARGS = frozenset({"name", "trainable", "dtype", "dynamic", "input_shape", "batch_input_shape"})
_SERIALIZED = {
    "initializer": tf_keras.initializers,
    "regularizer": tf_keras.regularizers,
    "constraint": tf_keras.constraints,
}

Weights = list[tuple[str, np.ndarray]]  # (variable name, value) in the layer's weight order
Converter = Callable[[dict[str, Any], Any], tuple[dict[str, Any], Weights]]


def _keras3():
    """The Keras 3 package, or None where `keras` is not Keras 3."""
    try:
        import keras
    except ImportError:
        return None
    major = str(getattr(keras, "__version__", "0")).split(".")[0]
    return keras if major.isdigit() and int(major) >= 3 else None


def is_keras3(model: Any) -> bool:
    """True for a Keras 3 model object (not tf_keras)."""
    # No Keras 3 object can exist before its package is imported; don't pay for importing it.
    if "keras" not in sys.modules:
        return False
    k3 = _keras3()
    return k3 is not None and isinstance(model, k3.Model)


def _one_line(e: BaseException) -> str:
    """An exception's text on one line (Keras messages span many), cut to a readable length."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _accepted(cls: type) -> set[str]:
    """Keyword names cls's constructor takes, through its tf_keras base classes."""
    names = set(_LAYER_KWARGS)
    for base in cls.__mro__:
        if base.__module__.startswith("tf_keras") and "__init__" in vars(base):
            params = inspect.signature(base.__init__).parameters.values()
            names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self"}


def _drop_unknown(cfg: dict[str, Any], cls: type, what: str) -> dict[str, Any]:
    """cfg without the keys cls does not take; an unknown key may only hold an off value (None, False)."""
    ok = _accepted(cls)
    out = {}
    for key, value in cfg.items():
        if key in ok:
            out[key] = value
        elif value is not None and value is not False:
            raise ModelError(
                f"{what} sets the Keras 3 option {key}={value!r}, which tf_keras's {cls.__name__} lacks; "
                f"remove that option or build the model with tf_keras"
            )
    return out


def _dtype(value: Any, what: str) -> Any:
    """A Keras 3 dtype or DTypePolicy dict as tf_keras takes it (the policy's name)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
        return value["config"]["name"]
    name = value.get("class_name") if isinstance(value, dict) else type(value).__name__
    raise ModelError(
        f"{what} uses the Keras 3 dtype policy {name}, which tf_keras lacks; give edgeq the float model "
        f"(edgeq quantizes it itself)"
    )


def _serialized(value: Any, kind: str, what: str) -> Any:
    """A Keras 3 initializer/regularizer/constraint dict as tf_keras deserializes it."""
    if not isinstance(value, dict):
        return value  # None or a plain name such as "zeros"
    module = _SERIALIZED[kind]
    name = value.get("class_name", "")
    cls = getattr(module, name, None)
    if value.get("registered_name") or not isinstance(cls, type):
        raise ModelError(
            f"{what} uses the {kind} {value.get('registered_name') or name}, which tf_keras lacks; "
            f"use a built-in {kind} or build the model with tf_keras"
        )
    cfg = _drop_unknown(value.get("config", {}), cls, f"{what}'s {kind} {name}")
    return {"class_name": name, "config": cfg}


def _activation(value: Any, what: str) -> Any:
    if value is None or (isinstance(value, str) and value in ACTIVATIONS):
        return value
    shown = (
        value if isinstance(value, str) else (value.get("class_name") if isinstance(value, dict) else value)
    )
    raise ModelError(
        f"{what} uses the activation {shown!r}, which tf_keras lacks or computes differently; use one of "
        f"{', '.join(sorted(ACTIVATIONS))} or build the model with tf_keras"
    )


def _translate(cfg: dict[str, Any], cls: type, what: str) -> dict[str, Any]:
    """The keys every layer shares: dtype policy, serialized objects, activation; then cls's own keys."""
    out = dict(cfg)
    if "dtype" in out:
        out["dtype"] = _dtype(out["dtype"], what)
    for key in out:
        kind = key.rsplit("_", 1)[-1]
        if kind in _SERIALIZED or key == "activity_regularizer":
            out[key] = _serialized(out[key], "regularizer" if key == "activity_regularizer" else kind, what)
    if "activation" in out:
        out["activation"] = _activation(out["activation"], what)
    return _drop_unknown(out, cls, what)


def _weights(layer: Any) -> Weights:
    return [(v.name, np.asarray(w)) for v, w in zip(layer.weights, layer.get_weights(), strict=True)]


def _same(cfg: dict[str, Any], layer: Any) -> tuple[dict[str, Any], Weights]:
    """Config-compatible layers: the config as it is (shared keys are translated after) and the weights."""
    return cfg, _weights(layer)


def _input_layer(cfg: dict[str, Any], layer: Any) -> tuple[dict[str, Any], Weights]:
    cfg = dict(cfg)
    cfg["batch_input_shape"] = tuple(cfg.pop("batch_shape"))
    return cfg, []


def _leaky_relu(cfg: dict[str, Any], layer: Any) -> tuple[dict[str, Any], Weights]:
    cfg = dict(cfg)
    cfg["alpha"] = cfg.pop("negative_slope")
    return cfg, []


def _reshape(cfg: dict[str, Any], layer: Any) -> tuple[dict[str, Any], Weights]:
    return {**cfg, "target_shape": tuple(cfg["target_shape"])}, []


def _normalization(cfg: dict[str, Any], layer: Any) -> tuple[dict[str, Any], Weights]:
    # An adapted Keras 3 Normalization keeps mean and variance in variables; tf_keras computes its
    # broadcast mean when it builds, before weights could be set, so pass them as constants instead.
    cfg = dict(cfg)
    weights = layer.get_weights()
    if cfg.get("mean") is None and weights:
        cfg["mean"], cfg["variance"] = weights[0].tolist(), weights[1].tolist()
    cfg["axis"] = tuple(cfg["axis"]) if isinstance(cfg["axis"], list | tuple) else cfg["axis"]
    return cfg, []


# Keras 3 class name -> converter to tf_keras's class of the same name (one entry per layer kind).
CONVERTERS: dict[str, Converter] = {
    "InputLayer": _input_layer,
    "Conv1D": _same,
    "Conv2D": _same,
    "DepthwiseConv2D": _same,
    "SeparableConv2D": _same,
    "Dense": _same,
    "BatchNormalization": _same,
    "MaxPooling1D": _same,
    "MaxPooling2D": _same,
    "AveragePooling1D": _same,
    "AveragePooling2D": _same,
    "GlobalAveragePooling1D": _same,
    "GlobalAveragePooling2D": _same,
    "GlobalMaxPooling1D": _same,
    "GlobalMaxPooling2D": _same,
    "Flatten": _same,
    "Reshape": _reshape,
    "Activation": _same,
    "ReLU": _same,
    "LeakyReLU": _leaky_relu,
    "Softmax": _same,
    "Dropout": _same,
    "Add": _same,
    "Subtract": _same,
    "Multiply": _same,
    "Concatenate": _same,
    "ZeroPadding2D": _same,
    "Rescaling": _same,
    "Normalization": _normalization,
}


_MODELS = ("Sequential", "Functional")


def _is_keras_module(module: str | None) -> bool:
    return module is None or module == "keras" or module.startswith("keras.")


def _unsupported(name: str, class_name: str, module: str | None, registered: str | None) -> str | None:
    """The one-line reason a Keras 3 config entry cannot be rebuilt, or None when it can."""
    if class_name in _MODELS and _is_keras_module(module):
        return (
            f"layer {name!r} is a nested Keras 3 model ({class_name}), which edgeq cannot rebuild as "
            f"tf_keras; call its layers directly in one functional model or build the model with tf_keras"
        )
    if module and module.startswith("keras.src.ops"):
        return (
            f"operation {name!r} is a Keras 3 op (keras.ops {class_name}), which edgeq cannot rebuild as "
            f"tf_keras; use a layer (e.g. keras.layers.Add for x + y) or build the model with tf_keras"
        )
    # Legacy .h5 configs name no module; a custom class there fails the CONVERTERS check below.
    if registered or module not in ("keras.layers", "keras", None):
        return (
            f"layer {name!r} is a custom Keras 3 layer ({registered or class_name}), which edgeq cannot "
            f"rebuild as tf_keras; {_FIX}"
        )
    if class_name not in CONVERTERS:
        return f"layer {name!r} is a Keras 3 {class_name}, which edgeq cannot rebuild as tf_keras; {_FIX}"
    return None


def _check_config(model_cfg: dict[str, Any]) -> None:
    """Raise for the first layer of a serialized Keras 3 model that cannot be rebuilt."""
    for entry in model_cfg.get("layers", []):
        why = _unsupported(
            entry.get("name") or entry.get("config", {}).get("name", "?"),
            entry.get("class_name", "?"),
            entry.get("module"),
            entry.get("registered_name"),
        )
        if why:
            raise ModelError(why)


def _check_model_class(model: Any, k3: Any) -> None:
    if type(model) not in (k3.Sequential, k3.src.models.functional.Functional):
        raise ModelError(
            f"model {model.name!r} is a subclassed Keras 3 model ({type(model).__name__}), which edgeq "
            f"cannot rebuild as tf_keras; build it with keras.Sequential or keras.Model(inputs, outputs), "
            f"or with tf_keras"
        )


def _convert_layer(entry: dict[str, Any], layer: Any, k3: Any):
    """(tf_keras layer, weights to set once it is built) for one Keras 3 layer."""
    class_name = entry["class_name"]
    # A subclass keeps its parent's class_name only when registered; compare the classes themselves.
    if type(layer) is not getattr(k3.layers, class_name, None):
        raise ModelError(
            f"layer {layer.name!r} is a custom Keras 3 layer ({type(layer).__name__}), which edgeq cannot "
            f"rebuild as tf_keras; {_FIX}"
        )
    what = f"layer {layer.name!r} ({class_name})"
    cls = getattr(tf_keras.layers, class_name)
    cfg, weights = CONVERTERS[class_name](entry["config"], layer)
    cfg = _translate(cfg, cls, what)
    try:
        return cls.from_config(cfg), weights
    except (TypeError, ValueError) as e:
        raise ModelError(f"{what} cannot be rebuilt as tf_keras ({_one_line(e)}); {_FIX}") from e


# Keras 3 variable names that tf_keras spells differently for the same weight.
_WEIGHT_ALIASES = {"DepthwiseConv2D": {"kernel": "depthwise_kernel"}}


def _set_weights(layer: Any, weights: Weights, what: str) -> None:
    """Copy weights in order, after checking the names pair up (same shapes could hide a swap)."""
    if not weights:
        return
    aliases = _WEIGHT_ALIASES.get(type(layer).__name__, {})
    want = [aliases.get(name, name) for name, _ in weights]
    have = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
    try:
        if want != have:
            raise ValueError(f"Keras 3 has weights {want}, tf_keras {have}")
        layer.set_weights([w for _, w in weights])
    except ValueError as e:
        raise ModelError(f"{what}: its Keras 3 weights do not fit tf_keras ({_one_line(e)}); {_FIX}") from e


def _input(cfg: dict[str, Any], what: str) -> Any:
    """The tf_keras InputLayer for a Keras 3 InputLayer config."""
    cfg, _ = CONVERTERS["InputLayer"](cfg, None)
    return tf_keras.layers.InputLayer(**_translate(cfg, tf_keras.layers.InputLayer, what))


def _sequential(model: Any, k3: Any) -> tf_keras.Model:
    cfg = model.get_config()
    entries = cfg["layers"]
    head = entries[0] if entries and entries[0]["class_name"] == "InputLayer" else None
    if head is not None:
        inp = _input(head["config"], f"input {head['config'].get('name')!r}")
        entries = entries[1:]
    elif cfg.get("build_input_shape") is not None:
        inp = tf_keras.layers.InputLayer(batch_input_shape=tuple(cfg["build_input_shape"]))
    else:
        raise ModelError(
            f"model {model.name!r} is an unbuilt Keras 3 Sequential; start it with keras.Input(shape) "
            f"or call model.build(input_shape) first"
        )
    _check_config({"layers": entries})
    built = [_convert_layer(e, layer, k3) for e, layer in zip(entries, model.layers, strict=True)]
    out = tf_keras.Sequential([inp, *(layer for layer, _ in built)], name=model.name)
    for layer, weights in built:
        _set_weights(layer, weights, f"layer {layer.name!r}")
    return out


def _is_history(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 3 and isinstance(value[0], str)


def _map_structure(value: Any, fn: Callable[[Any], Any]) -> Any:
    """fn over the [layer, node, tensor] triples of a Keras 3 input_layers/output_layers structure."""
    if _is_history(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_structure(v, fn) for k, v in value.items()}
    return [_map_structure(v, fn) for v in value]


class _NotReady(Exception):
    """A node's input tensor is not built yet; try the node again later."""


def _functional(model: Any, k3: Any) -> tf_keras.Model:
    cfg = model.get_config()
    _check_config(cfg)
    live = {layer.name: layer for layer in model.layers}
    tensors: dict[tuple[str, int], list] = {}  # (layer name, node index) -> output tensors
    layers: dict[str, tuple[Any, list[np.ndarray]]] = {}
    pending: list[tuple[dict[str, Any], int, dict[str, Any]]] = []
    for entry in cfg["layers"]:
        name = entry["name"]
        if entry["class_name"] == "InputLayer":
            tensors[(name, 0)] = [_input(entry["config"], f"input {name!r}").output]
            continue
        layers[name] = _convert_layer(entry, live[name], k3)
        pending += [(entry, i, node) for i, node in enumerate(entry["inbound_nodes"])]

    def resolve(value: Any) -> Any:
        if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
            layer, node, index = value["config"]["keras_history"]
            if (layer, node) not in tensors:
                raise _NotReady
            return tensors[(layer, node)][index]
        if isinstance(value, list | tuple):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    # Shared layers make the config's layer order non-topological (a layer's second call may consume a
    # later layer's output), so call each node once all its inputs exist, as Keras 3's own loader does.
    while pending:
        waiting = []
        for entry, i, node in pending:
            try:
                args = resolve(node["args"])
                kwargs = resolve(node.get("kwargs", {}))
                # Keras 3 records the training flag it resolved at build time (Dropout: False) but lets
                # the model's own training argument override it; in tf_keras a recorded flag wins and
                # would freeze the layer during fit. So drop it, and the None defaults (mask=None).
                kwargs = {k: v for k, v in kwargs.items() if k != "training" and v is not None}
            except _NotReady:
                waiting.append((entry, i, node))
                continue
            layer = layers[entry["name"]][0]
            try:
                out = layer(*args, **kwargs)
            except (TypeError, ValueError) as e:
                raise ModelError(
                    f"layer {entry['name']!r} ({entry['class_name']}) cannot be called as tf_keras "
                    f"({_one_line(e)}); {_FIX}"
                ) from e
            tensors[(entry["name"], i)] = list(out) if isinstance(out, list | tuple) else [out]
        if len(waiting) == len(pending):
            raise ModelError(
                f"model {model.name!r}: the Keras 3 graph cannot be rebuilt (layer {waiting[0][0]['name']!r} "
                f"waits on a tensor no layer makes); build the model with tf_keras"
            )
        pending = waiting

    def tensor(history: list) -> Any:
        return tensors[(history[0], history[1])][history[2]]

    inputs = _map_structure(cfg["input_layers"], tensor)
    outputs = _map_structure(cfg["output_layers"], tensor)
    out = tf_keras.Model(inputs, outputs, name=model.name)
    for name, (layer, weights) in layers.items():
        _set_weights(layer, weights, f"layer {name!r}")
    return out


def _from_keras3(model: Any) -> tf_keras.Model:
    """A Keras 3 Sequential or functional model rebuilt as tf_keras, weights copied."""
    k3 = _keras3()
    _check_model_class(model, k3)
    if isinstance(model, k3.Sequential):
        return _sequential(model, k3)
    return _functional(model, k3)


def to_tf_keras(model_or_path: Any) -> tf_keras.Model:
    """The tf_keras model for a Keras 3 or tf_keras model, or for a .keras/.h5 file of either."""
    if isinstance(model_or_path, str | Path):
        return load_model(model_or_path)
    if isinstance(model_or_path, tf_keras.Model):
        return model_or_path
    if is_keras3(model_or_path):
        return _from_keras3(model_or_path)
    raise ModelError(
        f"expected a Keras model or the path of a .keras/.h5 file, got {type(model_or_path).__name__}; "
        f"pass a keras.Model, a tf_keras.Model or a file saved with model.save"
    )


def _saved_config(path: Path) -> tuple[str, dict[str, Any]]:
    """(Keras version that saved it, model config) of a .keras zip or a full-model .h5 file."""
    hint = "save the model with model.save('model.keras')"
    if path.suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise ModelError(f"{path} is not a Keras model file (a .keras file is a zip archive); {hint}")
        try:
            with zipfile.ZipFile(path) as z:
                meta = json.loads(z.read("metadata.json"))
                config = json.loads(z.read("config.json"))
        except (KeyError, ValueError, zipfile.BadZipFile) as e:
            raise ModelError(f"{path} is not a Keras model file ({_one_line(e)}); {hint}") from e
        return str(meta.get("keras_version", "")), config
    import h5py

    if not h5py.is_hdf5(path):
        raise ModelError(f"{path} is not a Keras model file (an .h5 file is HDF5); {hint}")
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    if "model_config" not in attrs:
        raise ModelError(
            f"{path} holds weights only, not a model; save the whole model with model.save('model.keras')"
        )

    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return text(attrs.get("keras_version", "")), json.loads(text(attrs["model_config"]))


def load_model(path: str | Path) -> tf_keras.Model:
    """A tf_keras model from a .keras (Keras 3 or tf_keras) or .h5 file, without its optimizer state."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; pass a .keras or .h5 file saved by model.save")
    if path.is_dir() or path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelError(
            f"{path} is not a Keras model file; edgeq loads .keras (Keras 3 or tf_keras) and .h5 files "
            f"saved by model.save"
        )
    version, config = _saved_config(path)
    keras3 = version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 3
    try:
        if not keras3:
            return tf_keras.models.load_model(path, compile=False)
        # Check the layers before Keras 3 loads them: its own errors (safe_mode for a Lambda, an
        # unregistered custom class) say nothing of what edgeq can rebuild.
        if config.get("class_name") not in _MODELS or not _is_keras_module(config.get("module")):
            raise ModelError(
                f"{path} holds a subclassed Keras 3 model ({config.get('class_name')}), which edgeq cannot "
                f"rebuild as tf_keras; build it with keras.Sequential or keras.Model(inputs, outputs)"
            )
        _check_config(config.get("config", {}))
        k3 = _keras3()
        if k3 is None:
            raise ModelError(f"{path} was saved by Keras {version}; install keras>=3 to load it")
        return _from_keras3(k3.saving.load_model(path, compile=False))
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001  (Keras raises many types for an unreadable model)
        raise ModelError(f"cannot load {path} as a Keras model ({_one_line(e)}); {_hint_for(path)}") from e


def _hint_for(path: Path) -> str:
    return f"check that {path.name} was saved by model.save with built-in layers only"
