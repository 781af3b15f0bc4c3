"""Bayesian Bits (van Baalen et al. 2020): learned mixed precision and channel pruning as a baseline.

Design (where the paper leaves a choice, what edgeq does):

- Implementation: BB layers are subclasses of tf_keras Conv2D / Dense (``BBConv2D``, ``BBDense``)
  that fake-quantize their own kernel in ``call``; ``to_bayesian_bits`` swaps them in with
  ``clone_model``. Subclasses (not a TF-MOT Quantizer) because the gates need per-layer trainable
  variables, an ``add_loss`` regulariser and the ``training`` flag, and a plain ``model.fit`` then
  trains weights, ranges and gates together. Only exact Conv2D (groups=1) and Dense layers are
  wrapped; DepthwiseConv2D and the rest stay float.
- Grid: symmetric, signed, range [-beta, beta] with beta learnable (init max|w| per tensor).
  s_2 = 2 beta / (2^2 - 1), s_b = s_{b/2} / (2^{b/2} + 1), so s_b = 2 beta / (2^b - 1) for every b.
  The input is clipped to [-beta, beta]; x_2 = s_2 clip(round(x / s_2), -1, 1) and each residual
  index is clipped to +-2^{b/2-1}, so x_b = s_b k with |k| <= 2^{b-1} - 1 (2^b - 1 levels, the
  "narrow range" of TFLite int8). The clips only bite at x = +-beta, where round(1.5) would leave
  the range. Rounding is straight-through: d x_q / d x = 1 inside the range (all gates on), 0
  outside; beta gets LSQ-style gradients through the scales and the clip.
- Gates: hard-concrete (gamma=-0.1, zeta=1.1, beta_t=2/3). One z_2 per output channel (0 bits =
  channel pruned), one z_4, z_8, z_16, z_32 per tensor. Training samples them; at inference
  (training False/None) a gate is 1 exactly when q(z != 0) > 0.5, the same rule
  ``bayesian_bits_plan`` uses, so the evaluated BB model is the plan's model.
- log alpha is stored as ``log_alpha / gate_lr_mult`` and multiplied back in ``call``: with Adam
  this gives the gates gate_lr_mult (default 100) times the weights' learning rate, so a few
  epochs of fine-tuning move them (the paper trains for far longer; at 10x, 8 digits epochs left
  every gate above 0.5). Init ``init_log_alpha`` = 6 (q(z != 0) ~ 0.9995, P(z = 1) ~ 0.99) keeps
  the float model's accuracy at the start.
- Regulariser: lam * E_q[BOPs] / BOPs_32, with the autoregressive prior: gate z_b is charged only
  through prod_{b' <= b} q(z_b' != 0), times the BOPs of the bits it adds (2 for z_2, b/2 for
  z_b, b >= 4; per channel MACs x activation bits). Dividing by the BOPs of all wrapped layers at
  32-bit weights puts the term in [0, lam], on the scale of the per-example data loss (the
  paper's KL / N); lam trades accuracy for BOPs.
- Activations are not quantized in the BB model: ``activation_bits`` only weights the BOP cost
  (it cancels in the ratio when every layer has the same width) and is recorded in the plan for
  the exporter, which fake-quantizes activations to 8 bits in QAT.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.bops import bops, layer_macs
from edgeq.errors import EdgeqError
from edgeq.plan import BitPlan, LayerBits

BITS = (2, 4, 8, 16, 32)
HIGH_BITS = BITS[1:]
GAMMA, ZETA, BETA_T = -0.1, 1.1, 2.0 / 3.0
THRESHOLD = 0.5


class BayesianBitsError(EdgeqError):
    """A Bayesian Bits request that cannot be carried out (bad lambda, nothing to wrap)."""


def bb_scales(beta) -> dict[int, tf.Tensor]:
    """Bit width -> grid step, by the doubling recursion s_b = s_{b/2} / (2^{b/2} + 1)."""
    scales = {2: 2.0 * beta / (2**2 - 1)}
    for b in HIGH_BITS:
        scales[b] = scales[b // 2] / (2 ** (b // 2) + 1)
    return scales


def round_ste(t: tf.Tensor) -> tf.Tensor:
    """round(t) forward, identity backward."""
    return t + tf.stop_gradient(tf.round(t) - t)


def bb_decompose(x: tf.Tensor, beta) -> tuple[tf.Tensor, dict[int, tf.Tensor]]:
    """(x_2, {b: eps_b}) with x_b = x_{b/2} + eps_b; x_32 is the 32-bit-grid value of clip(x)."""
    # dtype_hint: a Python float must not pass through float32 before it meets a float64 x.
    beta = tf.cast(tf.convert_to_tensor(beta, dtype_hint=x.dtype), x.dtype)
    s = bb_scales(beta)
    xc = tf.clip_by_value(x, -beta, beta)
    x_prev = s[2] * tf.clip_by_value(round_ste(xc / s[2]), -1.0, 1.0)
    x2, eps = x_prev, {}
    for b in HIGH_BITS:
        k_max = float(2 ** (b // 2 - 1))
        eps[b] = s[b] * tf.clip_by_value(round_ste((xc - x_prev) / s[b]), -k_max, k_max)
        x_prev = x_prev + eps[b]
    return x2, eps


def bb_quantize(x: tf.Tensor, beta, gates: dict[int, tf.Tensor]) -> tf.Tensor:
    """x_q = z_2 (x_2 + z_4 (eps_4 + z_8 (eps_8 + z_16 (eps_16 + z_32 eps_32)))); gates broadcast on x."""
    x2, eps = bb_decompose(x, beta)
    inner = tf.zeros_like(x)
    for b in reversed(HIGH_BITS):
        inner = tf.cast(gates[b], x.dtype) * (eps[b] + inner)
    return tf.cast(gates[2], x.dtype) * (x2 + inner)


def prob_nonzero(log_alpha) -> tf.Tensor:
    """q(z != 0) of a hard-concrete gate: sigmoid(log_alpha - beta_t log(-gamma / zeta))."""
    return tf.sigmoid(log_alpha - BETA_T * math.log(-GAMMA / ZETA))


def hard_concrete(log_alpha, u) -> tf.Tensor:
    """A hard-concrete sample from uniform noise u in (0, 1) (stretched, clipped binary concrete)."""
    s = tf.sigmoid((tf.math.log(u) - tf.math.log(1.0 - u) + log_alpha) / BETA_T)
    return tf.clip_by_value(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def sample_gate(log_alpha: tf.Tensor) -> tf.Tensor:
    """One hard-concrete draw per entry of log_alpha."""
    eps = 1e-6  # keep log u and log(1 - u) finite
    u = tf.random.uniform(tf.shape(log_alpha), eps, 1.0 - eps, dtype=log_alpha.dtype)
    return hard_concrete(log_alpha, u)


def deterministic_gate(log_alpha: tf.Tensor) -> tf.Tensor:
    """The inference gate: 1 where q(z != 0) > 0.5, else 0."""
    return tf.cast(prob_nonzero(log_alpha) > THRESHOLD, log_alpha.dtype)


def expected_bits_cost(q2: tf.Tensor, q_high: tf.Tensor) -> tf.Tensor:
    """Sum over channels of expected weight bits under the autoregressive prior (q_high: z_4..z_32)."""
    added = tf.constant([b - b // 2 for b in HIGH_BITS], q_high.dtype)
    per_kept_channel = 2.0 + tf.reduce_sum(tf.math.cumprod(q_high) * added)
    return tf.reduce_sum(q2) * per_kept_channel


class _BBKernelMixin:
    """Learnable range, hard-concrete gates and the BOP regulariser for a layer's kernel.

    Listed before the Keras layer class, so its __init__/build/get_config wrap the layer's own.
    """

    def __init__(self, *args, lam=0.0, bop_weight=0.0, init_log_alpha=6.0, gate_lr_mult=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._bb_init(lam, bop_weight, init_log_alpha, gate_lr_mult)

    def build(self, input_shape):
        super().build(input_shape)
        self._bb_build()

    def get_config(self):
        return {**super().get_config(), **self._bb_config()}

    def _bb_init(self, lam: float, bop_weight: float, init_log_alpha: float, gate_lr_mult: float) -> None:
        self.lam = float(lam)
        # bop_weight = MACs x activation bits / (output channels x BOPs of all BB layers at 32 bits)
        self.bop_weight = float(bop_weight)
        self.init_log_alpha = float(init_log_alpha)
        self.gate_lr_mult = float(gate_lr_mult)

    def _bb_build(self) -> None:
        channels = int(self.kernel.shape[-1])
        m = self.gate_lr_mult
        self.bb_beta = self.add_weight("bb_beta", (), initializer="ones")
        self.bb_log_alpha_2 = self.add_weight(
            "bb_log_alpha_2", (channels,), initializer=keras.initializers.Constant(self.init_log_alpha / m)
        )
        self.bb_log_alpha_high = self.add_weight(
            "bb_log_alpha_high",
            (len(HIGH_BITS),),
            initializer=keras.initializers.Constant(self.init_log_alpha / m),
        )

    def gate_log_alpha(self) -> dict[int, np.ndarray]:
        """Bit width -> log alpha (per channel for 2, a scalar for 4..32)."""
        la2 = self.bb_log_alpha_2.numpy() * self.gate_lr_mult
        hi = self.bb_log_alpha_high.numpy() * self.gate_lr_mult
        return {2: la2, **{b: hi[i] for i, b in enumerate(HIGH_BITS)}}

    def set_gate_log_alpha(self, bits: int, value) -> None:
        """Overwrite log alpha of one gate (bits=2: per channel, broadcast; else the tensor gate)."""
        m = self.gate_lr_mult
        if bits == 2:
            self.bb_log_alpha_2.assign(
                np.broadcast_to(np.asarray(value, "float32") / m, self.bb_log_alpha_2.shape)
            )
        elif bits in HIGH_BITS:
            self.bb_log_alpha_high[HIGH_BITS.index(bits)].assign(float(value) / m)
        else:
            raise BayesianBitsError(f"no gate for {bits} bits; gates are {BITS}")

    def gate_probs(self) -> dict[int, np.ndarray]:
        """Bit width -> q(z != 0) (per channel for 2)."""
        return {b: prob_nonzero(np.asarray(la, "float32")).numpy() for b, la in self.gate_log_alpha().items()}

    def quantized_kernel(self, training) -> tf.Tensor:
        """The kernel through the gated decomposition; also records the regulariser."""
        la2 = self.bb_log_alpha_2 * self.gate_lr_mult
        la_hi = self.bb_log_alpha_high * self.gate_lr_mult
        cost = expected_bits_cost(prob_nonzero(la2), prob_nonzero(la_hi))
        self.add_loss(self.lam * self.bop_weight * cost)

        def gates(fn):
            hi = fn(la_hi)
            return {2: fn(la2), **{b: hi[i] for i, b in enumerate(HIGH_BITS)}}

        if isinstance(training, bool) or training is None:
            z = gates(sample_gate if training else deterministic_gate)
        else:
            z = tf.cond(
                tf.cast(training, tf.bool),
                lambda: gates(sample_gate),
                lambda: gates(deterministic_gate),
            )
        # |beta| keeps the range positive however the optimizer moves it.
        return bb_quantize(self.kernel, tf.abs(self.bb_beta) + 1e-8, z)

    def _bb_config(self) -> dict:
        return {
            "lam": self.lam,
            "bop_weight": self.bop_weight,
            "init_log_alpha": self.init_log_alpha,
            "gate_lr_mult": self.gate_lr_mult,
        }


@keras.utils.register_keras_serializable("edgeq")
class BBConv2D(_BBKernelMixin, keras.layers.Conv2D):
    """Conv2D whose kernel goes through Bayesian Bits gates (z_2 per output filter)."""

    def call(self, inputs, training=None):
        outputs = self.convolution_op(inputs, self.quantized_kernel(training))
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, self.bias, data_format=self._tf_data_format)
        return self.activation(outputs) if self.activation is not None else outputs


@keras.utils.register_keras_serializable("edgeq")
class BBDense(_BBKernelMixin, keras.layers.Dense):
    """Dense whose kernel goes through Bayesian Bits gates (z_2 per output unit)."""

    def call(self, inputs, training=None):
        kernel = self.quantized_kernel(training)
        if inputs.shape.rank == 2:
            outputs = tf.matmul(inputs, kernel)
        else:
            outputs = tf.tensordot(inputs, kernel, [[inputs.shape.rank - 1], [0]])
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, self.bias)
        return self.activation(outputs) if self.activation is not None else outputs


BB_LAYERS = (BBConv2D, BBDense)


def custom_objects() -> dict[str, type]:
    """Names to pass to keras.models.load_model for a saved BB model."""
    return {c.__name__: c for c in BB_LAYERS}


def _wrappable(layer: keras.layers.Layer) -> bool:
    """Exact Conv2D (ungrouped) or Dense: the layers whose call BBConv2D / BBDense reproduce."""
    if type(layer) is keras.layers.Conv2D:
        return layer.groups == 1
    return type(layer) is keras.layers.Dense


def to_bayesian_bits(
    model: keras.Model,
    *,
    lam: float = 0.1,
    activation_bits: int = 8,
    init_log_alpha: float = 6.0,
    gate_lr_mult: float = 100.0,
) -> keras.Model:
    """A copy of model with every Conv2D/Dense kernel behind Bayesian Bits gates and the BOP regulariser."""
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise BayesianBitsError(f"lam must be a finite number >= 0, got {lam!r}; larger lam means fewer BOPs")
    if not 1 <= int(activation_bits) <= 32:
        raise BayesianBitsError(f"activation_bits {activation_bits} outside 1..32")
    if gate_lr_mult <= 0:
        raise BayesianBitsError(f"gate_lr_mult must be > 0, got {gate_lr_mult}")
    targets = [lyr for lyr in model.layers if _wrappable(lyr)]
    if not targets:
        kinds = sorted({type(lyr).__name__ for lyr in model.layers})
        raise BayesianBitsError(
            f"model {model.name!r} has no Conv2D or Dense layer to quantize (layers: {kinds}); "
            "Bayesian Bits wraps Conv2D (groups=1) and Dense kernels"
        )
    macs = layer_macs(model)
    total_32 = sum(macs[lyr.name] * activation_bits * 32 for lyr in targets)

    def clone(layer):
        cfg = layer.get_config()
        if not _wrappable(layer):
            return layer.__class__.from_config(cfg)
        cls = BBConv2D if isinstance(layer, keras.layers.Conv2D) else BBDense
        channels = int(layer.kernel.shape[-1])
        weight = macs[layer.name] * activation_bits / (channels * total_32)
        return cls.from_config(
            {
                **cfg,
                "lam": lam,
                "bop_weight": weight,
                "init_log_alpha": init_log_alpha,
                "gate_lr_mult": gate_lr_mult,
            }
        )

    try:
        bb = keras.models.clone_model(model, clone_function=clone)
    except ValueError as e:
        raise BayesianBitsError(
            f"cannot clone {model.name!r} ({e}); use a Sequential or functional model"
        ) from e
    for layer in model.layers:
        new = bb.get_layer(layer.name)
        if isinstance(new, BB_LAYERS):
            new.kernel.assign(layer.kernel)
            if layer.use_bias:
                new.bias.assign(layer.bias)
            # The range starts at the kernel's extreme, so no weight is clipped at the start.
            new.bb_beta.assign(max(float(np.max(np.abs(layer.kernel.numpy()))), 1e-8))
        else:
            new.set_weights(layer.get_weights())
    bb._edgeq_bb = {"lam": float(lam), "activation_bits": int(activation_bits)}
    return bb


def _bb_layers(bb_model: keras.Model) -> list:
    layers = [lyr for lyr in bb_model.layers if isinstance(lyr, BB_LAYERS)]
    if not layers:
        raise BayesianBitsError(
            f"model {bb_model.name!r} has no Bayesian Bits layers; build it with to_bayesian_bits"
        )
    return layers


def _channels(layer: _BBKernelMixin) -> int:
    return int(layer.kernel.shape[-1])


def layer_bits(layer: _BBKernelMixin) -> LayerBits:
    """One BB layer's plan entry: bits = highest contiguous active gate, pruned channels, range."""
    q = layer.gate_probs()
    pruned = tuple(int(c) for c in np.flatnonzero(q[2] <= THRESHOLD))
    bits = 0
    if len(pruned) < q[2].size:
        bits = 2
        for b in HIGH_BITS:
            if q[b] <= THRESHOLD:
                break
            bits = b
    beta = abs(float(layer.bb_beta.numpy()))
    return LayerBits(bits, "uniform", lo=-beta, hi=beta, pruned_channels=pruned)


def bayesian_bits_plan(bb_model: keras.Model) -> BitPlan:
    """The learned BitPlan (method "bb"): gates on where q(z != 0) > 0.5, bits in {0, 2, 4, 8, 16, 32}."""
    layers = {lyr.name: layer_bits(lyr) for lyr in _bb_layers(bb_model)}
    info = getattr(bb_model, "_edgeq_bb", {})
    abits = int(info.get("activation_bits", 8))
    macs = layer_macs(bb_model)
    plan_bops = bops(bb_model, {n: lb.bits for n, lb in layers.items()}, abits)
    # Output channels pruned inside a layer cut its own MACs (not yet the next layer's inputs);
    # every counted layer's MACs are a whole multiple of its output channels.
    pruned_bops = sum(
        macs[n] // _channels(bb_model.get_layer(n)) * len(lb.pruned_channels) * lb.bits * abits
        for n, lb in layers.items()
    )
    meta = {
        "lam": info.get("lam"),
        "activation_bits": abits,
        "threshold": THRESHOLD,
        "bops": plan_bops,
        "bops_kept": plan_bops - pruned_bops,
        "bops_32": bops(bb_model, {n: 32 for n in layers}, abits),
        "expected_bops": expected_bops(bb_model),
    }
    return BitPlan(layers, method="bb", meta=meta)


def expected_bops(bb_model: keras.Model) -> float:
    """E_q[BOPs] of the wrapped layers under the current gates (the regulariser's quantity, unscaled)."""
    info = getattr(bb_model, "_edgeq_bb", {})
    abits = int(info.get("activation_bits", 8))
    macs = layer_macs(bb_model)
    total = 0.0
    for lyr in _bb_layers(bb_model):
        q = lyr.gate_probs()
        cost = expected_bits_cost(tf.constant(q[2]), tf.constant([q[b] for b in HIGH_BITS])).numpy()
        total += macs[lyr.name] * abits * float(cost) / q[2].size
    return total


def strip_bayesian_bits(
    bb_model: keras.Model, float_model: keras.Model, *, zero_pruned: bool = True
) -> keras.Model:
    """A clone of float_model with bb_model's trained float weights (pruned channels zeroed by default)."""
    out = keras.models.clone_model(float_model)
    for layer in out.layers:
        try:
            src = bb_model.get_layer(layer.name)
        except ValueError as e:
            raise BayesianBitsError(
                f"BB model lacks layer {layer.name!r}; pass the float model it was built from"
            ) from e
        if isinstance(src, BB_LAYERS):
            kernel = src.kernel.numpy()
            if zero_pruned:
                kernel[..., list(layer_bits(src).pruned_channels)] = 0.0
            weights = [kernel, src.bias.numpy()] if src.use_bias else [kernel]
        else:
            weights = src.get_weights()
        try:
            layer.set_weights(weights)
        except ValueError as e:
            raise BayesianBitsError(f"layer {layer.name!r} does not match the BB model's: {e}") from e
    return out
