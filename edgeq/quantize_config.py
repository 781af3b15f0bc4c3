"""TF-MOT QuantizeConfigs: one small object says how one layer's weights are quantized."""

from __future__ import annotations

import numpy as np
import tensorflow_model_optimization as tfmot

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.errors import PlanError

qk = tfmot.quantization.keras


class LevelsQuantizer(qk.quantizers.LastValueQuantizer):
    """Projects weights onto a fixed set of levels (straight-through), then TF-MOT's 8-bit fake quant.

    Non-uniform plans (Gaussian-quantile, Lloyd-Max) keep their levels through QAT this way; the
    converter sees an ordinary 8-bit FakeQuant, so each tensor holds at most len(levels) distinct
    int8 values and TFLM's LUT compression stores them in log2(len(levels)) bits.
    """

    def __init__(self, levels, per_axis: bool):
        super().__init__(num_bits=8, per_axis=per_axis, symmetric=True, narrow_range=True)
        self.levels = [float(v) for v in levels]

    def project(self, w):
        """The nearest level for every weight."""
        import tensorflow as tf

        levels = tf.constant(sorted(self.levels), dtype=w.dtype)
        return tf.gather(levels, tf.argmin(tf.abs(w[..., None] - levels), axis=-1))

    def __call__(self, inputs, training, weights, **kwargs):
        import tensorflow as tf

        # In training the projection is a straight-through op; at inference (and so in the converted
        # graph) it is absent: bake_levels() has written the projected values into the kernel.
        def projected():
            return inputs + tf.stop_gradient(self.project(inputs) - inputs)

        x = tf.__internal__.smart_cond.smart_cond(training, projected, lambda: inputs)
        return super().__call__(x, training, weights, **kwargs)

    def get_config(self):
        return {"levels": self.levels, "per_axis": self.per_axis}


class FixedRangeQuantizer(qk.quantizers.Quantizer):
    """Symmetric narrow-range b-bit fake quant on a fixed [-r, r] (per channel or per tensor).

    TF-MOT's LastValueQuantizer sets r = max|w| at every training step, so a clipping range chosen for
    accuracy would be overwritten by the first batch. Here r comes from the config (edgeq.quantizers.
    symmetric_range) and stays: the converter reads it from the FakeQuant op like any TF-MOT range, and
    the layer stores integers in [-n, n] with scale r / n, n = 2**(b-1) - 1 (<= 4 bits: INT4). Gradients
    are TF's fake-quant straight-through estimator: 1 inside [-r, r], 0 for a clipped weight.
    """

    def __init__(self, num_bits: int, per_axis: bool, ranges):
        self.num_bits = int(num_bits)
        self.per_axis = bool(per_axis)
        self.ranges = [float(v) for v in np.ravel(ranges)]

    def build(self, tensor_shape, name, layer):
        import tf_keras as keras

        shape = (int(tensor_shape[-1]),) if self.per_axis else ()
        r = np.asarray(self.ranges, dtype=np.float32)
        if r.size != int(np.prod(shape)):
            unit = "per channel" if shape else "per tensor"
            raise PlanError(
                f"{layer.name}: {r.size} ranges for a kernel quantized {unit} into {int(np.prod(shape))};"
                " fit them with edgeq.optimize.interval_ranges"
            )
        # An all-zero channel has r = 0; any positive range maps its zeros to zeros, and 0 would make the
        # fake quant's scale 0.
        r = np.where(r > 0, r, 1.0).reshape(shape)
        kw = {"trainable": False, "shape": shape}
        lo = layer.add_weight(name + "_min", initializer=keras.initializers.Constant(-r), **kw)
        hi = layer.add_weight(name + "_max", initializer=keras.initializers.Constant(r), **kw)
        return {"min_var": lo, "max_var": hi}

    def __call__(self, inputs, training, weights, **kwargs):
        import tensorflow as tf

        lo, hi = weights["min_var"], weights["max_var"]
        if self.per_axis:
            return tf.quantization.fake_quant_with_min_max_vars_per_channel(
                inputs, lo, hi, num_bits=self.num_bits, narrow_range=True
            )
        return tf.quantization.fake_quant_with_min_max_vars(
            inputs, lo, hi, num_bits=self.num_bits, narrow_range=True
        )

    def get_config(self):
        return {"num_bits": self.num_bits, "per_axis": self.per_axis, "ranges": self.ranges}

    def __eq__(self, other):
        return isinstance(other, FixedRangeQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


class BitsQuantizeConfig(qk.QuantizeConfig):
    """Kernel fake-quantized to `bits` (symmetric, narrow range), activation to `activation_bits`.

    Symmetric narrow range is what the TFLite int8/int4 kernels require (zero point 0), so a b-bit
    layer holds at most 2**b - 1 distinct integer values per channel after conversion. With `ranges`
    the kernel's range is fixed (FixedRangeQuantizer), else TF-MOT's LastValueQuantizer sets it to max|w|.
    """

    def __init__(self, bits: int, per_axis: bool, activation_bits: int = 8, levels=None, ranges=None):
        self.bits = int(bits)
        self.per_axis = bool(per_axis)
        self.activation_bits = int(activation_bits)
        self.levels = None if levels is None else [float(v) for v in levels]
        self.ranges = None if ranges is None else [float(v) for v in np.ravel(ranges)]

    def _weight_quantizer(self):
        if self.levels is not None:
            return LevelsQuantizer(self.levels, self.per_axis)
        if self.ranges is not None:
            return FixedRangeQuantizer(self.bits, self.per_axis, self.ranges)
        return qk.quantizers.LastValueQuantizer(
            num_bits=self.bits, per_axis=self.per_axis, symmetric=True, narrow_range=True
        )

    def get_weights_and_quantizers(self, layer):
        return [(_kernel(layer), self._weight_quantizer())]

    def get_activations_and_quantizers(self, layer):
        act = qk.quantizers.MovingAverageQuantizer(
            num_bits=self.activation_bits, per_axis=False, symmetric=False, narrow_range=False
        )
        return [(layer.activation, act)]

    def set_quantize_weights(self, layer, quantize_weights):
        _set_kernel(layer, quantize_weights[0])

    def set_quantize_activations(self, layer, quantize_activations):
        layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {
            "bits": self.bits,
            "per_axis": self.per_axis,
            "activation_bits": self.activation_bits,
            "levels": self.levels,
            "ranges": self.ranges,
        }


def _kernel(layer):
    return layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel


def _set_kernel(layer, value) -> None:
    if hasattr(layer, "depthwise_kernel"):
        layer.depthwise_kernel = value
    else:
        layer.kernel = value


def custom_objects() -> dict:
    """What quantize_scope needs to rebuild models annotated with edgeq's configs."""
    return {
        "BitsQuantizeConfig": BitsQuantizeConfig,
        "LevelsQuantizer": LevelsQuantizer,
        "FixedRangeQuantizer": FixedRangeQuantizer,
    }
