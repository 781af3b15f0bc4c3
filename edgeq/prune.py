"""Pruning: TF-MOT magnitude pruning, informativeness-guided masks, and structured channel pruning."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.errors import EdgeqError, ModelError
from edgeq.keras3 import to_tf_keras
from edgeq.posterior import LayerPosterior

POLICIES = ("magnitude", "informativeness")
sparsity_api = tfmot.sparsity.keras


class PruningError(EdgeqError):
    """A pruning request that cannot be carried out."""


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise PruningError(f"sparsity {sparsity} is outside [0, 1); pass the fraction of weights to remove")


def kernel_layers(model: keras.Model) -> list:
    return [lyr for lyr in model.layers if isinstance(lyr, (keras.layers.Conv2D, keras.layers.Dense))]


def informativeness_masks(posteriors: list[LayerPosterior], sparsity: float) -> dict[str, np.ndarray]:
    """Per layer, a 0/1 mask that removes the `sparsity` fraction of weights with the lowest |mu|/sigma."""
    _check_sparsity(sparsity)
    masks = {}
    for p in posteriors:
        info = np.abs(p.mu) / p.sigma
        k = int(np.floor(sparsity * info.size))
        mask = np.ones(info.size, dtype=np.float32)
        if k:
            mask[np.argpartition(info.ravel(), k - 1)[:k]] = 0.0
        masks[p.name] = mask.reshape(info.shape)
    return masks


class KeepMasks(keras.callbacks.Callback):
    """Re-applies fixed weight masks after every batch, so pruned weights stay zero (QAT included)."""

    def __init__(self, masks: dict[str, np.ndarray]):
        super().__init__()
        self.masks = masks
        self._vars: list = []

    def on_train_begin(self, logs=None):
        self._vars = []
        for name, mask in self.masks.items():
            var = _find_kernel(self.model, name, mask.shape)
            self._vars.append((var, mask.reshape(var.shape)))
        self._apply()

    def on_train_batch_end(self, batch, logs=None):
        self._apply()

    def _apply(self) -> None:
        for var, mask in self._vars:
            var.assign(var * mask)


def _find_kernel(model: keras.Model, name: str, shape) -> object:
    """The kernel variable of layer `name`, also inside TF-MOT quantize/prune wrappers.

    Matched by size, not shape: quantize_model turns a Dense kernel (n, m) into a 1x1 conv's (1, 1, n, m).
    """
    for var in model.weights:
        parts = var.name.split("/")
        if (
            any(p == name or p.endswith(f"_{name}") for p in parts[:-1])
            and "kernel" in parts[-1]
            and int(np.prod(var.shape)) == int(np.prod(shape))
        ):
            return var
    raise ModelError(f"no kernel of shape {tuple(shape)} for layer {name!r} in model {model.name!r}")


def apply_masks(model: keras.Model, masks: dict[str, np.ndarray]) -> keras.Model:
    """Zero the masked weights in place (one shot) and return the model."""
    for name, mask in masks.items():
        var = _find_kernel(model, name, mask.shape)
        var.assign(var * mask.reshape(var.shape))
    return model


def prune_model(
    model: keras.Model,
    *,
    sparsity: float,
    schedule=None,
    policy: str = "magnitude",
    posteriors: list[LayerPosterior] | None = None,
):
    """Prune to `sparsity`: TF-MOT prune_low_magnitude, or masks of the least informative weights.

    magnitude: returns TF-MOT's wrapped model; fit it with `tfmot.sparsity.keras.UpdatePruningStep()`
    and call `strip(model)` after. informativeness: returns (model with masks applied, KeepMasks callback)
    to pass to fit so the pruned weights stay zero.
    """
    model = to_tf_keras(model)  # a Keras 3 model is rebuilt as tf_keras, which TF-MOT needs
    _check_sparsity(sparsity)
    if policy not in POLICIES:
        raise PruningError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
    if policy == "magnitude":
        schedule = schedule or sparsity_api.ConstantSparsity(sparsity, begin_step=0, frequency=1)
        return sparsity_api.prune_low_magnitude(model, pruning_schedule=schedule)
    if not posteriors:
        raise PruningError("policy 'informativeness' needs posteriors=edgeq.bayes.posteriors(bnn)")
    out = keras.models.clone_model(model)
    out.set_weights(model.get_weights())
    masks = informativeness_masks(posteriors, sparsity)
    return apply_masks(out, masks), KeepMasks(masks)


def strip(model: keras.Model) -> keras.Model:
    """A plain Keras model without TF-MOT pruning wrappers, ready for conversion."""
    return sparsity_api.strip_pruning(model)


def sparsity_of(model: keras.Model, names: list[str] | None = None) -> float:
    """Fraction of exactly-zero kernel weights over the named (default: all) Conv2D/Dense layers."""
    layers = [lyr for lyr in kernel_layers(model) if names is None or lyr.name in names]
    zeros = sum(int(np.sum(lyr.get_weights()[0] == 0)) for lyr in layers)
    total = sum(lyr.get_weights()[0].size for lyr in layers)
    return zeros / max(total, 1)


@dataclass(frozen=True)
class ChannelPlan:
    """Which output channels each layer keeps after structured pruning, of how many it had."""

    keep: dict[str, np.ndarray]
    channels: dict[str, int] = field(default_factory=dict)  # output channels before pruning

    def kept(self) -> dict[str, tuple[int, int]]:
        """Per pruned layer: (channels kept, channels it had)."""
        return {n: (int(k.size), self.channels.get(n, int(k.size))) for n, k in self.keep.items()}


def channel_totals(kept: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(channels removed, channels there were) over ChannelPlan.kept()'s layers."""
    return sum(of - k for k, of in kept.values()), sum(of for _, of in kept.values())


def kept_count(channels: int, fraction: float) -> int:
    """Output channels a layer keeps when `fraction` of its `channels` go (at least one)."""
    return max(1, int(round(channels * (1.0 - fraction))))


def channel_plan(
    posteriors: list[LayerPosterior], fraction: float | Mapping[str, float], *, skip: tuple[str, ...] = ()
) -> ChannelPlan:
    """Keep the (1 - fraction) most informative output channels (last kernel axis) of each layer; a
    mapping gives each layer its own fraction (a layer it does not name keeps all its channels)."""
    fractions = dict(fraction) if isinstance(fraction, Mapping) else {p.name: fraction for p in posteriors}
    for f in fractions.values():
        _check_sparsity(f)
    keep = {}
    for p in posteriors:
        if p.name in skip or p.name not in fractions:
            continue
        info = (np.abs(p.mu) / p.sigma).reshape(-1, p.mu.shape[-1]).mean(0)
        keep[p.name] = np.sort(np.argsort(-info)[: kept_count(info.size, fractions[p.name])])
    return ChannelPlan(keep, {p.name: int(p.mu.shape[-1]) for p in posteriors if p.name in keep})


# Layers that keep every channel where it is: a removed channel simply flows through them.
_PASS_THROUGH = (
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.Dropout,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.BatchNormalization,
)


_MERGES = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Concatenate,
)
OUTPUT_TIE = "it is the output layer: its channels are the model's outputs"


def _reads_channels(layer) -> bool:
    """A weight layer whose kernel has one row per input channel and one column per output channel."""
    skip = (keras.layers.DepthwiseConv2D, keras.layers.Conv2DTranspose)
    return isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and not isinstance(layer, skip)


def _inbound(layer) -> list:
    """The layers feeding `layer`'s first call in a functional model."""
    nodes = getattr(layer, "_inbound_nodes", [])
    inbound = nodes[0].inbound_layers if nodes else []
    return inbound if isinstance(inbound, list) else [inbound]


def _consumers(model: keras.Model) -> dict[str, list]:
    """Each layer's name -> the layers of model that read its output."""
    out: dict[str, list] = {}
    for lyr in model.layers:
        for src in _inbound(lyr):
            out.setdefault(src.name, []).append(lyr)
    return out


def _tie(kernel, consumers: dict[str, list], outputs: set[str]) -> str | None:
    """Why `kernel`'s output channels must all stay (None: they can go), following them through the
    layers that keep channels in place to the weight layers that read them. Raises PruningError where a
    layer in the way moves or mixes them in a way no rebuild can follow."""
    todo = [(kernel, False)]  # (layer, whether the channels were flattened on the way)
    while todo:
        lyr, flat = todo.pop()
        if lyr.name in outputs:
            return OUTPUT_TIE if lyr is kernel else f"they reach the model's output through {lyr.name!r}"
        for c in consumers.get(lyr.name, []):
            if isinstance(c, _MERGES):
                kind = type(c).__name__
                return f"{kind} layer {c.name!r} ties their channels together (a residual or merge)"
            if isinstance(c, keras.layers.DepthwiseConv2D):
                return f"DepthwiseConv2D layer {c.name!r} filters each channel on its own"
            if _reads_channels(c) and not (flat and isinstance(c, keras.layers.Conv2D)):
                continue
            if isinstance(c, keras.layers.Flatten) and not flat:
                todo.append((c, True))
            elif isinstance(c, _PASS_THROUGH) and not (flat and c.get_weights()):
                todo.append((c, flat))
            elif c.get_weights():
                raise PruningError(
                    f"structured pruning cannot pass through layer {c.name!r} ({type(c).__name__}); "
                    "use --prune for weight sparsity"
                )
            else:
                n = int(kernel.get_weights()[0].shape[-1])
                raise PruningError(
                    f"layer {kernel.name!r} cannot lose channels: layer {c.name!r} ({type(c).__name__}) "
                    f"changes the layout of its {n} channels before a weight layer reads them; "
                    "use --prune for weight sparsity"
                )
    return None


def channel_ties(model: keras.Model) -> dict[str, str]:
    """Each weight layer whose output channels cannot be removed -> why (a merge or a depthwise conv ties
    them, they are the outputs); DepthwiseConv2D layers themselves are never pruned and not listed."""
    kernels = kernel_layers(model)
    if len(kernels) < 2:
        raise PruningError(
            f"model {model.name!r} has one weight layer: its channels are the outputs; nothing to prune"
        )
    consumers = _consumers(model)
    outputs = {t._keras_history.layer.name for t in model.outputs}
    ties = {}
    for k in kernels:
        if _reads_channels(k) and (why := _tie(k, consumers, outputs)):
            ties[k.name] = why
    return ties


def free_layers(model: keras.Model, ties: Mapping[str, str] | None = None) -> list[str]:
    """The weight layers whose output channels structured pruning can remove, in graph order (ties: the
    model's channel_ties, where the caller has them already)."""
    ties = channel_ties(model) if ties is None else ties
    return [k.name for k in kernel_layers(model) if _reads_channels(k) and k.name not in ties]


def check_channel_prunable(model: keras.Model) -> dict[str, str]:
    """Refuse, naming the layers and why, a model whose channels prune_channels cannot remove; else its
    channel_ties."""
    ties = channel_ties(model)
    if not free_layers(model, ties):
        tied = {n: why for n, why in ties.items() if why != OUTPUT_TIE}
        names = " and ".join(repr(n) for n in tied) or "no layer"
        why = next(iter(tied.values()), "every weight layer is an output or a depthwise conv")
        raise PruningError(f"layer {names} cannot lose channels: {why}; use --prune for weight sparsity")
    return ties


def trial_prune(model: keras.Model, fraction: float) -> keras.Model:
    """The model's pruned form at `fraction` with the channel counts channel_plan will keep (the first
    ones here): built before training, so a model whose smaller form cannot be rebuilt is refused early."""
    _check_sparsity(fraction)
    # a model with no free layer gets an empty plan, which prune_channels refuses, naming the ties
    shape = {n: int(model.get_layer(n).get_weights()[0].shape[-1]) for n in free_layers(model)}
    plan = ChannelPlan({n: np.arange(kept_count(c, fraction)) for n, c in shape.items()}, shape)
    try:
        return prune_channels(model, plan)
    except PruningError:
        raise
    except Exception as e:  # noqa: BLE001  (Keras raises many types when a layer's config no longer fits)
        raise PruningError(
            f"model {model.name!r} with {fraction:g} of its channels removed cannot be rebuilt: "
            f"{str(e).splitlines()[0]}; use a smaller --prune-channels, or --prune for weight sparsity"
        ) from e


def _channel_cuts(model: keras.Model, plan: ChannelPlan) -> dict[str, tuple]:
    """Per layer the plan changes: (the rows of its kernel that stay, the output channels that stay; None:
    all). A pass-through layer's rows are its per-channel weights' (BatchNormalization) channels."""
    ties = check_channel_prunable(model)
    if tied := [n for n in plan.keep if n in ties]:
        raise PruningError(f"layer {tied[0]!r} cannot lose channels: {ties[tied[0]]}")
    keep_out: dict[str, np.ndarray | None] = {}  # layer -> the channels of its output that stay (None: all)
    flat: dict[str, int | None] = {}  # layer -> channels per position, where its output is a flattened map
    cuts: dict[str, tuple] = {}
    for lyr in model.layers:
        src = next(iter(_inbound(lyr)), None)
        k_in = keep_out.get(src.name) if src is not None else None
        f_in = flat.get(src.name) if src is not None else None
        keep_out[lyr.name], flat[lyr.name] = None, None
        if _reads_channels(lyr):
            rows = k_in
            if k_in is not None and f_in is not None:  # a Dense reading a flattened map: rows by position
                n_rows = int(lyr.kernel.shape[0])
                rows = np.arange(n_rows).reshape(-1, f_in)[:, k_in].ravel()
            keep = plan.keep.get(lyr.name)
            keep_out[lyr.name] = keep
            if rows is not None or keep is not None:
                cuts[lyr.name] = (rows, keep)
        elif isinstance(lyr, keras.layers.Flatten) and k_in is not None:
            keep_out[lyr.name], flat[lyr.name] = k_in, int(lyr.input_shape[-1])
        elif isinstance(lyr, _PASS_THROUGH) and k_in is not None:
            cuts[lyr.name] = (k_in, None)
            keep_out[lyr.name], flat[lyr.name] = k_in, f_in
        # anything else reads only channels that stay: channel_ties ties its producers
    return cuts


def _cut(kernel: np.ndarray, rows: np.ndarray | None, keep: np.ndarray | None) -> np.ndarray:
    """A kernel (input channels on axis -2, output channels last) without the cut rows and channels."""
    if rows is not None:
        kernel = np.take(kernel, rows, axis=-2)
    return kernel if keep is None else kernel[..., keep]


def prune_posteriors(
    model: keras.Model, posteriors: list[LayerPosterior], plan: ChannelPlan
) -> tuple[LayerPosterior, ...]:
    """The posteriors of prune_channels(model, plan): each kernel's mu and sigma cut as its weights are."""
    cuts = _channel_cuts(model, plan)
    out = []
    for p in posteriors:
        rows, keep = cuts.get(p.name, (None, None))
        out.append(LayerPosterior(p.name, _cut(p.mu, rows, keep), _cut(p.sigma, rows, keep)))
    return tuple(out)


def prune_channels(model: keras.Model, plan: ChannelPlan) -> keras.Model:
    """A smaller copy of the model (Sequential or functional) without the dropped output channels and the
    inputs that fed on them; layers whose channels a merge ties (channel_ties) must keep them all."""
    cuts = _channel_cuts(model, plan)
    weights = {}  # layer -> its weights in the smaller model
    for lyr in model.layers:
        w = lyr.get_weights()
        rows, keep = cuts.get(lyr.name, (None, None))
        if _reads_channels(lyr):
            w = [_cut(w[0], rows, keep), *(w[1:] if keep is None else [b[keep] for b in w[1:]])]
        elif rows is not None:
            w = [v[rows] for v in w]  # BatchNormalization: one value per channel
        weights[lyr.name] = w

    def smaller(layer):
        cfg = layer.get_config()
        if layer.name in plan.keep:
            cfg["filters" if "filters" in cfg else "units"] = int(plan.keep[layer.name].size)
        return layer.__class__.from_config(cfg)

    small = keras.models.clone_model(model, clone_function=smaller)
    small._name = f"{model.name}_pruned"  # noqa: SLF001  (Keras has no public rename)
    for name, w in weights.items():
        if w:
            small.get_layer(name).set_weights(w)
    return small
