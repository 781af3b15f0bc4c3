"""TF-MOT QuantizeConfigs: one small object says how one layer's weights are quantized."""

from __future__ import annotations

import tensorflow_model_optimization as tfmot

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)

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


class BitsQuantizeConfig(qk.QuantizeConfig):
    """Kernel fake-quantized to `bits` (symmetric, narrow range), activation to `activation_bits`.

    Symmetric narrow range is what the TFLite int8/int4 kernels require (zero point 0), so a b-bit
    layer holds at most 2**b - 1 distinct integer values per channel after conversion.
    """

    def __init__(self, bits: int, per_axis: bool, activation_bits: int = 8, levels=None):
        self.bits = int(bits)
        self.per_axis = bool(per_axis)
        self.activation_bits = int(activation_bits)
        self.levels = None if levels is None else [float(v) for v in levels]

    def _weight_quantizer(self):
        if self.levels is not None:
            return LevelsQuantizer(self.levels, self.per_axis)
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
    return {"BitsQuantizeConfig": BitsQuantizeConfig, "LevelsQuantizer": LevelsQuantizer}
