"""The Keras layers edgeq quantizes, and their weight counts (tf_keras only: no TF-MOT, no TFP)."""

from __future__ import annotations

import numpy as np
import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)

# Layers whose kernel a BitsQuantizeConfig can fake-quantize, and whether it is per output channel.
# Dense stays per-tensor: per-axis Dense does not convert in TF 2.21 ("mismatched quantized axes").
QUANTIZABLE = {keras.layers.Conv2D: True, keras.layers.DepthwiseConv2D: True, keras.layers.Dense: False}


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
        if type(layer) in QUANTIZABLE:
            why = f"{kind} has no TFP variational twin here, so no informativeness: kept at 8 bits"
        elif kind in ("BatchNormalization", "LayerNormalization", "Normalization", "Rescaling"):
            continue  # folded into the layer before it, or no weights that QAT quantizes
        else:
            why = f"{kind} is not a layer edgeq quantizes (Conv2D, DepthwiseConv2D, Dense): kept at 8 bits"
        out[layer.name] = why
    return out
