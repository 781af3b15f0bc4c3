"""The packing limit: the fewest bytes a plan's weights can take, the floor for any flash figure."""

from __future__ import annotations

import numpy as np


def packing_limit(model, plan_bits: dict[str, int]) -> int:
    """sum_j ceil(|l_j| b_j / 8) + 4 bytes per int32 bias, over the weight layers (unplanned ones at 8 bits).

    Works on plain models and on TF-MOT QAT models, whose wrappers hold the original layer in `.layer`.
    """
    from edgeq.layers import QUANTIZABLE

    total = 0
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if type(inner) not in QUANTIZABLE:
            continue
        kernel = inner.depthwise_kernel if hasattr(inner, "depthwise_kernel") else inner.kernel
        total += int(np.ceil(int(np.prod(kernel.shape)) * plan_bits.get(inner.name, 8) / 8))
        bias = getattr(inner, "bias", None)
        total += 4 * int(bias.shape[0]) if bias is not None else 0
    return total
