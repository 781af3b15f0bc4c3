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
