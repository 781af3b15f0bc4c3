"""Pruning: TF-MOT magnitude pruning, informativeness-guided masks, and structured channel pruning."""

from __future__ import annotations

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
    posteriors: list[LayerPosterior], fraction: float, *, skip: tuple[str, ...] = ()
) -> ChannelPlan:
    """Keep the (1 - fraction) most informative output channels (last kernel axis) of each layer."""
    _check_sparsity(fraction)
    keep = {}
    for p in posteriors:
        if p.name in skip:
            continue
        info = (np.abs(p.mu) / p.sigma).reshape(-1, p.mu.shape[-1]).mean(0)
        keep[p.name] = np.sort(np.argsort(-info)[: kept_count(info.size, fraction)])
    return ChannelPlan(keep, {p.name: int(p.mu.shape[-1]) for p in posteriors if p.name in keep})


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


def _inbound(layer) -> list:
    """The layers feeding `layer`'s first call in a functional model."""
    nodes = getattr(layer, "_inbound_nodes", [])
    inbound = nodes[0].inbound_layers if nodes else []
    return inbound if isinstance(inbound, list) else [inbound]


def _kernel_layer_behind(layer) -> str | None:
    """The Conv2D/Dense at or behind `layer` (first inputs, through pass-through layers)."""
    while layer is not None:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            return layer.name
        layer = next(iter(_inbound(layer)), None)  # an Input layer has none: the walk ends
    return None


def check_channel_prunable(model: keras.Model) -> None:
    """Refuse, naming the layer and why, a model whose channels prune_channels cannot remove."""
    if not isinstance(model, keras.Sequential):
        for lyr in model.layers:
            if isinstance(lyr, _MERGES):
                feeders = [n for n in map(_kernel_layer_behind, _inbound(lyr)) if n]
                tied = " and ".join(repr(n) for n in feeders) or "its inputs"
                raise PruningError(
                    f"layer {tied} cannot lose channels: {type(lyr).__name__} layer {lyr.name!r} ties their "
                    "channels together (a residual or merge); structured pruning rebuilds Sequential models "
                    "only; use --prune for weight sparsity"
                )
        raise PruningError(
            f"model {model.name!r} is not Sequential: structured pruning rebuilds Sequential models only; "
            "use --prune for weight sparsity"
        )
    kernels = kernel_layers(model)
    if len(kernels) < 2:
        raise PruningError(
            f"model {model.name!r} has one weight layer: its channels are the outputs; nothing to prune"
        )
    for lyr in model.layers:
        kinds = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.Flatten, *_PASS_THROUGH)
        if not isinstance(lyr, kinds) and lyr.get_weights():
            raise PruningError(
                f"structured pruning cannot pass through layer {lyr.name!r} ({type(lyr).__name__}); "
                "use --prune for weight sparsity"
            )


def trial_prune(model: keras.Model, fraction: float) -> keras.Model:
    """The model's pruned form at `fraction` with the channel counts channel_plan will keep (the first
    ones here): built before training, so a model whose smaller form cannot be rebuilt is refused early."""
    _check_sparsity(fraction)
    layers = kernel_layers(model)
    shape = {lyr.name: int(lyr.get_weights()[0].shape[-1]) for lyr in layers[:-1]}  # the last: the outputs
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


def prune_channels(model: keras.Model, plan: ChannelPlan) -> keras.Model:
    """A smaller Sequential model without the dropped output channels (and the inputs that fed on them)."""
    check_channel_prunable(model)
    last = kernel_layers(model)[-1].name
    if last in plan.keep:
        raise PruningError(f"layer {last!r} is the output layer; its channels are the model's outputs")
    layers, weights = [keras.layers.Input(model.input_shape[1:])], []
    prev_keep: np.ndarray | None = None  # kept channels of the tensor flowing in
    flat_channels: int | None = None
    prev: tuple[str, int] | None = None  # the last weight layer: name, output channels
    between: list[str] = []  # the layers since it
    for lyr in model.layers:
        cfg, w = lyr.get_config(), lyr.get_weights()
        if isinstance(lyr, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel, bias = w[0], (w[1] if len(w) > 1 else None)
            if prev_keep is not None:
                reads = flat_channels if flat_channels is not None else int(kernel.shape[-2])
                if reads != prev[1]:  # a Reshape, Permute, ... moved the channels: rows can't be matched
                    raise PruningError(
                        f"layer {prev[0]!r} cannot lose channels: the layers between it and {lyr.name!r} "
                        f"({', '.join(repr(n) for n in between)}) change the channel layout ({prev[1]} "
                        f"channels out, {reads} read); use --prune for weight sparsity"
                    )
                if isinstance(lyr, keras.layers.Dense) and flat_channels is not None:
                    rows = np.arange(kernel.shape[0]).reshape(-1, flat_channels)[:, prev_keep].ravel()
                    kernel = kernel[rows]
                else:
                    kernel = np.take(kernel, prev_keep, axis=-2)
            keep = plan.keep.get(lyr.name)
            if keep is not None:
                kernel = kernel[..., keep]
                bias = bias[keep] if bias is not None else None
                cfg["filters" if "filters" in cfg else "units"] = int(keep.size)
            prev_keep, flat_channels = keep, None
            prev, between = (lyr.name, int(w[0].shape[-1])), []
            weights.append([kernel] + ([bias] if bias is not None else []))
        elif isinstance(lyr, keras.layers.Flatten):
            flat_channels = int(lyr.input_shape[-1])
            weights.append([])
        elif isinstance(lyr, keras.layers.BatchNormalization) and prev_keep is not None:
            weights.append([v[prev_keep] for v in w])
        else:  # pass-through or weightless: check_channel_prunable refused anything else
            weights.append(w)
        if not isinstance(lyr, (keras.layers.Conv2D, keras.layers.Dense)):
            between.append(lyr.name)
        layers.append(lyr.__class__.from_config(cfg))
    small = keras.Sequential(layers, name=f"{model.name}_pruned")
    for lyr, w in zip(small.layers, weights, strict=True):
        if w:
            lyr.set_weights(w)
    return small
