"""TF-MOT applies the plan: mixed-precision quantization-aware training, per layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.errors import ModelError, PlanError
from edgeq.keras3 import to_tf_keras
from edgeq.layers import QUANTIZABLE, custom_layers, weight_layers  # noqa: F401  (part of this module's API)
from edgeq.plan import BitPlan
from edgeq.posterior import LayerPosterior
from edgeq.quantize_config import BitsQuantizeConfig, custom_objects
from edgeq.threads import per_core

qk = tfmot.quantization.keras
QAT_BITS = range(2, 9)


def check_plan(model: keras.Model, plan: BitPlan) -> None:
    """Raise unless every planned layer exists, is quantizable and has QAT-able bits."""
    names = {lyr.name: lyr for lyr in model.layers}
    supported = ", ".join(sorted(c.__name__ for c in QUANTIZABLE))
    for name, lb in plan.layers.items():
        if name not in names:
            raise PlanError(
                f"plan names layer {name!r} that model {model.name!r} lacks; layers: {sorted(names)}"
            )
        if type(names[name]) not in QUANTIZABLE:
            raise ModelError(
                f"layer {name!r} is a {type(names[name]).__name__}, which edgeq cannot quantize; "
                f"supported: {supported}"
            )
        if lb.bits not in QAT_BITS:
            raise PlanError(f"layer {name!r} has {lb.bits} bits; quantization-aware training takes 2..8 bits")


def project_weights(model: keras.Model, plan: BitPlan) -> keras.Model:
    """A copy of model whose planned kernels are replaced by their plan quantizer's output."""
    from edgeq.quantizers import quantize as quantize_array

    check_plan(model, plan)
    out = keras.models.clone_model(model)
    out.set_weights(model.get_weights())
    for name, lb in plan.layers.items():
        layer = out.get_layer(name)
        kernel, *rest = layer.get_weights()
        layer.set_weights([quantize_array(kernel, lb).astype(kernel.dtype), *rest])
    return out


def _bn_pairs(model: keras.Model, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, str]:
    """BatchNormalization name -> the Conv2D/Dense it folds into (linear, sole consumer, not in skip)."""
    pairs: dict[str, str] = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        src = layer._inbound_nodes[0].inbound_layers
        if (
            isinstance(src, (keras.layers.Conv2D, keras.layers.Dense))
            and not isinstance(src, keras.layers.DepthwiseConv2D)
            and src.name not in skip
            and len(src._outbound_nodes) == 1
            and src.get_config().get("activation") in ("linear", None)
        ):
            pairs[layer.name] = src.name
    return pairs


def fold_batchnorm(model: keras.Model, skip: set[str] | frozenset[str] = frozenset()) -> keras.Model:
    """A copy with every BatchNormalization folded into the Conv2D/Dense before it (BN becomes Identity).

    TF-MOT folds BN only for layers carrying its own default config; with edgeq's per-layer configs the
    converter would keep BN as MUL/ADD after each conv. Folding in Keras first (frozen BN statistics,
    w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta) gives plain
    convolutions whose folded weights are what QAT then quantizes. Layers in `skip` keep their BN.
    """
    pairs = _bn_pairs(model, skip)
    if not pairs:
        return model
    folded_into = {conv: bn for bn, conv in pairs.items()}

    def clone(layer):
        if layer.name in pairs:
            return keras.layers.Identity(name=layer.name)
        cfg = layer.get_config()
        if layer.name in folded_into:
            cfg["use_bias"] = True
        return layer.__class__.from_config(cfg)

    out = keras.models.clone_model(model, clone_function=clone)
    for layer in out.layers:
        src = model.get_layer(layer.name)
        if layer.name in pairs or not src.weights:
            continue
        weights = src.get_weights()
        if layer.name in folded_into:
            bn = model.get_layer(folded_into[layer.name])
            gamma, beta, mean, var = bn.get_weights()
            scale = gamma / np.sqrt(var + bn.epsilon)
            bias = weights[1] if len(weights) > 1 else np.zeros_like(mean)
            weights = [weights[0] * scale, (bias - mean) * scale + beta]
        layer.set_weights(weights)
    return out


# Dense config keys that mean the same on a Conv2D.
_DENSE_TO_CONV_KEYS = (
    "activation",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
    "trainable",
    "dtype",
)


class _DenseAsConv:
    """Reshape to 1x1xN, a 1x1 Conv2D carrying the Dense's name, reshape back: the Dense, as a conv."""

    def __init__(self, dense: keras.layers.Dense):
        cfg = dense.get_config()
        conv_cfg = {k: cfg[k] for k in _DENSE_TO_CONV_KEYS if k in cfg}
        conv_cfg.update(filters=dense.units, kernel_size=1, name=dense.name)
        self.to_4d = keras.layers.Reshape((1, 1, int(dense.input_shape[-1])), name=f"{dense.name}_to_4d")
        self.conv = keras.layers.Conv2D.from_config(conv_cfg)
        self.to_2d = keras.layers.Reshape((dense.units,), name=f"{dense.name}_to_2d")

    def __call__(self, x):
        return self.to_2d(self.conv(self.to_4d(x)))

    def set_weights(self, weights: list[np.ndarray]) -> None:
        kernel, *rest = weights
        self.conv.set_weights([kernel.reshape(1, 1, *kernel.shape), *rest])


def _is_vector_dense(layer) -> bool:
    return type(layer) is keras.layers.Dense and len(layer.input_shape) == 2


def dense_as_conv(model: keras.Model) -> keras.Model:
    """A copy in which every Dense on a vector is a 1x1 Conv2D between two Reshapes (same name, weights).

    Why: TFLM's and LiteRT's reference FULLY_CONNECTED kernels round the output rescale differently
    (1 LSB apart on 35-62% of rows of our QAT digits CNN); their CONV_2D kernels agree bit for bit.
    Converted at batch 1 (deploy.export.convert) the reshapes fold into their neighbours, so the
    flatbuffer gains no operator. Models without such a Dense come back unchanged.
    """
    if not any(_is_vector_dense(layer) for layer in model.layers):
        return model
    if not getattr(model, "_is_graph_network", False):
        raise ModelError(
            f"model {model.name!r} is subclassed or unbuilt; build it from keras.Input (Sequential or "
            "functional) so edgeq can rewrite its Dense layers"
        )
    import tensorflow as tf

    rebuilt: dict[str, object] = {}  # old layer name -> its copy (shared layers stay shared)

    def copy_of(layer):
        if layer.name not in rebuilt:
            if _is_vector_dense(layer):
                rebuilt[layer.name] = _DenseAsConv(layer)
            else:
                rebuilt[layer.name] = layer.__class__.from_config(layer.get_config())
        return rebuilt[layer.name]

    # Replay the graph on new inputs, as Functional._run_internal_graph does, with each layer's copy.
    tensors: dict[str, list] = {}
    usage = model._tensor_usage_count
    inputs = []
    for t in model.inputs:
        layer = t._keras_history.layer
        new = keras.Input(shape=t.shape[1:], dtype=t.dtype, name=layer.name)
        inputs.append(new)
        tensors[str(id(t))] = [new] * usage[str(id(t))]
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            args, kwargs = node.map_arguments(tensors)
            outputs = copy_of(node.layer)(*args, **kwargs)
            for t_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs), strict=True):
                tensors[t_id] = [y] * usage[t_id]
    outputs = [tensors[str(id(t))].pop() for t in model.outputs]
    out = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
    for name, copy in rebuilt.items():
        copy.set_weights(model.get_layer(name).get_weights())
    return out


QAT_STARTS = ("float", "twin")


def _non_uniform(plan: BitPlan) -> set[str]:
    """Planned layers with their own levels (their BN stays unfolded: the levels fit unfolded weights)."""
    return {n for n, lb in plan.layers.items() if lb.quantizer != "uniform" and lb.levels}


def interval_ranges(
    model: keras.Model, plan: BitPlan, posteriors: Sequence[LayerPosterior] = ()
) -> dict[str, np.ndarray]:
    """Each uniform planned layer's symmetric range minimising sum((Q(w) - w)**2 / sigma**2).

    The paper's interval learning on the grid the converter stores (zero point 0, 2**(b-1) - 1 levels a side).

    w is the kernel QAT will quantize: the model's, with any BatchNormalization folded in as quantize_model
    folds it (sigma scales with the kernel). One range per output channel of a Conv2D or DepthwiseConv2D,
    one for a Dense (the storage the converter gives them). A layer without a posterior gets the
    unweighted squared error. Pass the result to quantize_model(ranges=...).
    """
    check_plan(model, plan)
    uniform = {name: lb.bits for name, lb in plan.layers.items() if lb.quantizer == "uniform"}
    folded = _bn_pairs(model, skip=_non_uniform(plan))
    ranges = _ranges(model, {name: (b,) for name, b in uniform.items()}, posteriors, folded)
    return {name: r[uniform[name]] for name, r in ranges.items()}


def interval_ranges_at(
    model: keras.Model, bits: Sequence[int], posteriors: Sequence[LayerPosterior]
) -> dict[int, dict[str, np.ndarray]]:
    """interval_ranges of every posterior's layer at each bit width (uniform plans; one sort per layer)."""
    names = [p.name for p in posteriors]
    check_plan(model, BitPlan.from_bits({n: bits[0] for n in names}))
    by_layer = _ranges(model, {n: tuple(bits) for n in names}, posteriors, _bn_pairs(model))
    return {b: {n: r[b] for n, r in by_layer.items()} for b in bits}


def _ranges(
    model: keras.Model,
    bits: Mapping[str, Sequence[int]],
    posteriors: Sequence[LayerPosterior],
    folded: Mapping[str, str],
) -> dict[str, dict[int, np.ndarray]]:
    """Per named layer, its symmetric_ranges at its bit widths, BatchNorm folded per `folded` (bn: conv)."""
    from edgeq.quantizers import symmetric_ranges

    sigmas = {p.name: p.sigma for p in posteriors}
    folded_by = {conv: bn for bn, conv in folded.items()}
    work = {}
    for name, widths in bits.items():
        layer = model.get_layer(name)
        kernel = np.asarray(layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel)
        kernel = kernel.astype(np.float64)
        sigma = np.asarray(sigmas[name], dtype=np.float64).reshape(kernel.shape) if name in sigmas else None
        if name in folded_by:
            bn = model.get_layer(folded_by[name])
            gamma, _, _, var = bn.get_weights()
            scale = gamma / np.sqrt(var + bn.epsilon)  # per output channel, the last kernel axis
            kernel = kernel * scale
            sigma = None if sigma is None else sigma * np.abs(scale)
        weights = None if sigma is None else 1.0 / sigma**2
        work[name] = (kernel, widths, weights, QUANTIZABLE[type(layer)])

    def search(args: tuple) -> dict[int, np.ndarray]:
        kernel, widths, weights, per_channel = args
        return symmetric_ranges(kernel, widths, weights, per_channel=per_channel)

    # the layers are independent and numpy's sorts and searches release the GIL: threads, one per core
    # (VGG-16's 14 layers take 1.7x less time on 2 cores); Keras is read above, in this thread only
    return dict(zip(work, per_core(search, list(work.values())), strict=True))


def prepare_qat(
    twin: keras.Model,
    float_model: keras.Model,
    plan: BitPlan,
    posteriors: Sequence[LayerPosterior],
    *,
    start: str = "float",
    activation_bits: int = 8,
    keep_dense: bool = False,
) -> keras.Model:
    """The QAT model of a plan: weights from the float model or the twin's means (`start`), grids fixed.

    Uniform layers get interval_ranges (fitted to the starting weights, weighted by the twin's 1/sigma**2)
    held fixed through QAT; their kernels are not projected first (the fake quant applies the same grid,
    and snapping the latent weights onto it only costs QAT the sub-grid positions). Non-uniform layers
    are projected onto their levels as before. twin is M_det (bayes.to_deterministic).
    """
    if start not in QAT_STARTS:
        raise PlanError(f"unknown QAT start {start!r}; use one of {', '.join(QAT_STARTS)}")
    src = float_model if start == "float" else twin
    levelled = {n: plan.layers[n] for n in _non_uniform(plan)}
    if levelled:
        src = project_weights(src, BitPlan(levelled, method=plan.method))
    ranges = interval_ranges(src, plan, posteriors)
    return quantize_model(src, plan, activation_bits=activation_bits, keep_dense=keep_dense, ranges=ranges)


def quantize_model(
    model: keras.Model,
    plan: BitPlan,
    *,
    activation_bits: int = 8,
    keep_dense: bool = False,
    ranges: Mapping[str, np.ndarray | float] | None = None,
) -> keras.Model:
    """QAT model: planned layers get their plan's bits, other supported layers TF-MOT's default 8 bits.

    BatchNormalization after a planned conv/dense is folded into it first (see fold_batchnorm); every
    Dense on a vector then becomes a 1x1 Conv2D of the same name (see dense_as_conv) unless keep_dense:
    FULLY_CONNECTED saves TFLM 8 B of arena per output unit and ~30 B of flash per operator, but TFLM
    and LiteRT then differ by up to 1 LSB. `ranges` (layer -> symmetric range per output channel of a
    conv, one for a dense; see interval_ranges) fixes those uniform layers' grids through QAT; the other
    uniform layers get TF-MOT's LastValueQuantizer, whose range is max|w| at every step.
    """
    model = to_tf_keras(model)  # a Keras 3 model is rebuilt as tf_keras, which TF-MOT needs
    check_plan(model, plan)
    ranges = dict(ranges or {})
    unknown = sorted(set(ranges) - {n for n, lb in plan.layers.items() if lb.quantizer == "uniform"})
    if unknown:
        raise PlanError(f"ranges given for {unknown}, which are not uniform layers of the plan")
    non_uniform = _non_uniform(plan)
    was_dense = {layer.name for layer in model.layers if type(layer) is keras.layers.Dense}
    model = fold_batchnorm(model, skip=non_uniform)  # levels were fitted to the unfolded weights
    if not keep_dense:
        model = dense_as_conv(model)
    registry = qk.default_8bit.Default8BitQuantizeRegistry()

    def annotate(layer):
        if layer.name in plan.layers:
            lb = plan.layers[layer.name]
            # Non-uniform plans keep their own levels through QAT; uniform ones use TF-MOT's b-bit grid.
            levels = lb.levels if lb.quantizer != "uniform" and lb.levels else None
            # A former Dense stays per-tensor: per-channel scales and zero points for its weights and
            # bias cost ~24 B per output unit of flash (digits: +1.9 KB on 17.6 KB).
            per_axis = QUANTIZABLE[type(layer)] and layer.name not in was_dense
            cfg = BitsQuantizeConfig(
                lb.bits, per_axis, activation_bits, levels=levels, ranges=ranges.get(layer.name)
            )
            return qk.quantize_annotate_layer(layer, cfg)
        if registry.supports(layer):
            return qk.quantize_annotate_layer(layer)
        return layer

    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    # quantize_apply rebuilds the model from its config: the user's own layer classes must be known by name.
    with qk.quantize_scope({**custom_layers(model), **custom_objects()}):
        return qk.quantize_apply(annotated)


def bake_levels(qat: keras.Model) -> keras.Model:
    """Write each non-uniform layer's projected kernel into the kernel itself; call before conversion."""
    from edgeq.quantize_config import LevelsQuantizer

    for layer in qat.layers:
        cfg = getattr(layer, "quantize_config", None)
        if isinstance(cfg, BitsQuantizeConfig) and cfg.levels is not None:
            # After quantize_apply, .kernel is the fake-quantized tensor; the variable is among the weights.
            kernel = next(
                w for w in layer.weights if w.name.split("/")[-1].startswith(("kernel", "depthwise"))
            )
            kernel.assign(LevelsQuantizer(cfg.levels, cfg.per_axis).project(kernel))
    return qat


def quantize_scope():
    """Context in which edgeq's QAT models can be saved, loaded or cloned."""
    return qk.quantize_scope(custom_objects())
