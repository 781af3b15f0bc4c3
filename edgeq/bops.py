"""Bit operations (BOPs): multiply-accumulates per example times weight bits times activation bits."""

from __future__ import annotations

import numpy as np
import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.errors import ModelError, PlanError

DEFAULT_BITS = 8


def _spatial_and_channels(shape: tuple, channels_first: bool) -> tuple[int, int]:
    """(product of the spatial dims, channels) of a batched NHWC or NCHW shape."""
    dims = [int(d) for d in shape[1:]]
    if channels_first:
        return int(np.prod(dims[1:])), dims[0]
    return int(np.prod(dims[:-1])), dims[-1]


def _single_shape(layer: keras.layers.Layer, attr: str) -> tuple:
    """The layer's one input or output shape; a layer called more than once has no single count."""
    try:
        shape = getattr(layer, attr)
    except AttributeError as e:
        raise ModelError(
            f"layer {layer.name!r} has no single {attr} ({e}); build the model on an Input "
            "and call each layer once"
        ) from e
    if isinstance(shape, list):
        raise ModelError(f"layer {layer.name!r} has several {attr}s; layer_macs counts single-use layers")
    if any(d is None for d in shape[1:]):
        raise ModelError(
            f"layer {layer.name!r} has unknown dims in {attr} {shape}; give the Input a full shape"
        )
    return tuple(shape)


def _macs(layer: keras.layers.Layer) -> int | None:
    """MACs of one example through layer, or None when it holds no kernel we count."""
    L = keras.layers
    if isinstance(layer, L.DepthwiseConv2D):
        # Each output channel sees kh*kw inputs of its own input channel.
        cf = layer.data_format == "channels_first"
        hw, c_out = _spatial_and_channels(_single_shape(layer, "output_shape"), cf)
        kh, kw = layer.kernel_size
        return hw * c_out * kh * kw
    if isinstance(layer, L.Conv2DTranspose):
        # Every input position scatters a kh*kw*C_out patch, so count from the input side.
        cf = layer.data_format == "channels_first"
        hw, c_in = _spatial_and_channels(_single_shape(layer, "input_shape"), cf)
        kh, kw = layer.kernel_size
        return hw * c_in * kh * kw * layer.filters // layer.groups
    if isinstance(layer, L.Conv2D):
        cf = layer.data_format == "channels_first"
        hw, c_out = _spatial_and_channels(_single_shape(layer, "output_shape"), cf)
        kh, kw, c_in_per_group = (int(d) for d in layer.kernel.shape[:3])
        return hw * c_out * kh * kw * c_in_per_group
    if isinstance(layer, L.Dense):
        out = _single_shape(layer, "output_shape")
        # Dense on a rank > 2 input applies the kernel at every leading position.
        positions = int(np.prod([int(d) for d in out[1:-1]])) if len(out) > 2 else 1
        return positions * int(np.prod(layer.kernel.shape))
    return None


def layer_macs(model: keras.Model) -> dict[str, int]:
    """Layer name -> multiply-accumulates for one example, for every Conv2D, DepthwiseConv2D and Dense."""
    if not model.built:
        raise ModelError(f"model {model.name!r} is not built; build it on an Input before counting MACs")
    macs = {}
    for layer in model.layers:
        m = _macs(layer)
        if m is not None:
            macs[layer.name] = int(m)
    return macs


def _bits_for(value: int | dict[str, int], name: str, what: str) -> int:
    """One layer's bit width from an int or a name -> bits dict (missing names at 8)."""
    b = value.get(name, DEFAULT_BITS) if isinstance(value, dict) else value
    if not 0 <= int(b) <= 32:
        raise PlanError(f"{what} bits {b} for layer {name!r} outside 0..32")
    return int(b)


def bops(model: keras.Model, bits: dict[str, int], activation_bits: int | dict[str, int] = 8) -> int:
    """Sum over counted layers of MACs x weight bits x activation bits; unnamed layers at 8 bits."""
    macs = layer_macs(model)
    for where, d in (("bits", bits), ("activation_bits", activation_bits)):
        unknown = sorted(set(d) - set(macs)) if isinstance(d, dict) else []
        if unknown:
            raise PlanError(
                f"{where} names {unknown}, which are not counted layers of {model.name!r}: {sorted(macs)}"
            )
    return sum(
        m * _bits_for(bits, n, "weight") * _bits_for(activation_bits, n, "activation")
        for n, m in macs.items()
    )
