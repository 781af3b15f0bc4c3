"""Training stages on plain values: the float model, its Bayesian twin, and QAT fine-tuning.

Each function takes the pipeline's spec, the data and a seed, reports what it starts through an
optional `on_stage(name, text)` callback, and returns plain values; none knows about files or flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from edgeq.data import Splits
from edgeq.errors import ModelError
from edgeq.pipeline import PipelineSpec
from edgeq.posterior import LayerPosterior

OnStage = Callable[[str, str], None]


def _silent(name: str, text: str) -> None:
    pass


def loss_and_metrics(task: str, from_logits: bool = True):
    """The Keras loss and metrics of a task (on logits for classification, unless the model says not)."""
    import tf_keras as keras

    if task == "regression":
        return keras.losses.MeanSquaredError(), ["mae"]
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits), ["accuracy"]


@dataclass(frozen=True)
class Trained:
    """What training hands on: the data, the float model, its Bayesian twin and the twin's posteriors."""

    splits: Splits
    float_model: object
    bnn: object | None  # None in a screening worker, which needs only det and the posteriors
    det: object  # M_det: the float architecture carrying the posterior means
    posteriors: tuple[LayerPosterior, ...]
    sizes: Mapping[str, int]  # weights per quantizable layer
    # structured pruning (shrink): per pruned layer, (output channels kept, channels it had)
    channels: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    unpruned_sizes: Mapping[str, int] = field(default_factory=dict)  # weights per layer before it

    @property
    def deterministic_layers(self) -> list[str]:
        """Quantizable layers the twin has no posterior for (TFP has no variational DepthwiseConv2D)."""
        return sorted(set(self.sizes) - {p.name for p in self.posteriors})


def build_float(spec: PipelineSpec, splits: Splits, seed: int):
    """The pipeline's model, built and compiled but not trained (seeded, deterministic ops)."""
    import tensorflow as tf
    import tf_keras as keras

    from edgeq.layers import check_model, weight_layers
    from edgeq.pipeline import call_user

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = call_user(spec, "build_model", spec.build_model, splits.input_shape, splits.num_classes)
    model = check_model(model, splits.input_shape)  # what the twin and QAT would refuse, refused now
    if not weight_layers(model):
        raise ModelError(
            f"model {model.name!r} has no layer edgeq can quantize (Conv2D, DepthwiseConv2D, Dense)"
        )
    compile_float(model, spec, splits)
    return model


def compile_float(model, spec: PipelineSpec, splits: Splits) -> None:
    """Compile for the float stage: Adam at spec.lr, decayed over spec.epochs when spec.lr_schedule says."""
    import tf_keras as keras

    loss, metrics = loss_and_metrics(splits.task, spec.from_logits)
    lr = spec.lr
    if spec.lr_schedule == "cosine" and spec.epochs > 0:
        steps = spec.epochs * math.ceil(len(splits.x_train) / spec.batch_size)
        lr = keras.optimizers.schedules.CosineDecay(spec.lr, steps)
    model.compile(keras.optimizers.Adam(lr), loss, metrics)


def train_float(spec: PipelineSpec, splits: Splits, seed: int, model=None):
    """The pipeline's model (or `model`, from build_float, so checks can run between) trained."""
    model = model if model is not None else build_float(spec, splits, seed)
    if spec.pretrained:  # a model that comes trained is only evaluated
        return model
    if spec.augment is None:
        train = {"x": splits.x_train, "y": splits.y_train, "batch_size": spec.batch_size}
    else:
        train = {"x": _augmented(spec, splits, seed)}
    model.fit(**train, epochs=spec.epochs, validation_data=(splits.x_val, splits.y_val), verbose=0)
    return model


def _augmented(spec: PipelineSpec, splits: Splits, seed: int):
    """The training split as tf.data batches, reshuffled each epoch, spec.augment applied to each batch."""
    import tensorflow as tf

    from edgeq.pipeline import call_user

    def augment(x, y):
        return call_user(spec, "augment", spec.augment, x), y

    ds = tf.data.Dataset.from_tensor_slices((splits.x_train, splits.y_train))
    ds = ds.shuffle(len(splits.x_train), seed=seed, reshuffle_each_iteration=True).batch(spec.batch_size)
    return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def train(
    spec: PipelineSpec,
    splits: Splits,
    seed: int,
    on_stage: OnStage = _silent,
    strategy=None,
    *,
    model=None,
) -> Trained:
    """The float model and its Bayesian twin (TFP Flipout layers, kernel means from the float weights).

    With a tf.distribute `strategy` (edgeq.distribute.strategy_for), the twin is built and trained in its
    scope: spec.batch_size is then the global batch, split across the replicas. The float model is
    trained by each worker alone, seeded, so every worker starts the twin from the same weights.
    `model` is the float model from build_float when the caller checked the data against it first.
    """
    from edgeq import bayes
    from edgeq.layers import weight_layers

    on_stage("float", "training the float Keras model")
    float_model = train_float(spec, splits, seed, model)
    sizes = weight_layers(float_model)
    on_stage("bayes", "training the Bayesian twin (TFP Flipout)")
    bnn = bayes.train_bayesian(
        lambda: bayes.to_bayesian(float_model, num_examples=len(splits.x_train), init_sigma=spec.init_sigma),
        splits.x_train,
        splits.y_train,
        loss=loss_and_metrics(splits.task, spec.from_logits)[0],
        epochs=spec.bnn_epochs,
        batch_size=spec.batch_size,
        lr=spec.bnn_lr,
        # KL / N stays per example: N is the whole training set, which every worker holds, and
        # Keras divides the KL (a model loss) by the replicas before their gradients are summed.
        strategy=strategy,
    )
    posts = tuple(p for p in bayes.posteriors(bnn) if p.name in sizes)
    return Trained(splits, float_model, bnn, bayes.to_deterministic(bnn, float_model), posts, sizes)


def shrink(
    spec: PipelineSpec,
    trained: Trained,
    fraction: float | Mapping[str, float],
    seed: int,
    on_stage: OnStage = _silent,
    strategy=None,
    *,
    epochs: int | None = None,
) -> Trained:
    """Structured pruning: each hidden weight layer loses the `fraction` (a mapping: each named layer its
    own) of its output channels with the lowest mean informativeness (|mu|/sigma over the channel's
    weights), its consumers the inputs that fed on them; layers whose channels a residual add ties keep
    them all. The smaller float model is fine-tuned from the kept weights (`epochs`, default spec.epochs,
    as the float stage trains: its augmentation and learning-rate schedule) and gets its own twin."""
    import tf_keras as keras

    from edgeq.prune import channel_plan, channel_ties, channel_totals, free_layers, prune_channels

    ties = channel_ties(trained.float_model)
    free = free_layers(trained.float_model, ties)
    tied = set(ties) & set(trained.sizes)
    plan = channel_plan(
        list(trained.posteriors), fraction, skip=tuple(n for n in trained.sizes if n not in free)
    )
    small = prune_channels(trained.float_model, plan)
    tuned = spec if epochs is None else replace(spec, epochs=int(epochs))
    compile_float(small, tuned, trained.splits)
    # seeded here, so the fine-tuning's shuffles and dropout do not hang on how many ops the rebuild made
    keras.utils.set_random_seed(seed)
    kept = plan.kept()
    removed, total = channel_totals(kept)
    on_stage(
        "channels",
        f"removed {removed} of {total} channels ({trained.float_model.count_params():,} -> "
        f"{small.count_params():,} parameters; kept whole: {len(tied)} layers a merge or the output ties); "
        f"fine-tuning the smaller model for {tuned.epochs} epochs and training its twin",
    )
    smaller = train(tuned, trained.splits, seed, _silent, strategy, model=small)
    return replace(smaller, channels=kept, unpruned_sizes=dict(trained.sizes))


def pruned_view(trained: Trained, fractions: Mapping[str, float]) -> Trained:
    """The twin as if each named layer had lost that fraction of its channels, without any training: the
    float and det models and the posteriors cut as shrink would cut them. What the planner prices a choice
    of channels on (deploy.channels) before the one it keeps is fine-tuned for real."""
    from edgeq.layers import weight_layers
    from edgeq.prune import channel_plan, prune_channels, prune_posteriors

    plan = channel_plan(list(trained.posteriors), fractions)
    small = prune_channels(trained.float_model, plan)
    sizes = weight_layers(small)
    return replace(
        trained,
        float_model=small,
        bnn=None,
        det=prune_channels(trained.det, plan),
        posteriors=prune_posteriors(trained.float_model, list(trained.posteriors), plan),
        sizes=sizes,
        channels=plan.kept(),
        unpruned_sizes=dict(trained.sizes),
    )


def fine_tune(qat, splits: Splits, spec: PipelineSpec, epochs: int, callbacks: Sequence = ()) -> None:
    """TF-MOT QAT for `epochs`; with 0 epochs, one pass at learning rate 0 only calibrates the ranges.

    The quantizers' ranges (activations' moving averages, kernels' last values) are set in training
    mode, so even a model that is not fine-tuned needs one pass before conversion. callbacks: Keras
    callbacks for the fit (edgeq.prune.KeepMasks keeps pruned weights at zero).
    """
    import tf_keras as keras

    from edgeq.optimize import bake_levels

    loss, metrics = loss_and_metrics(splits.task, spec.from_logits)
    optimizer = keras.optimizers.Adam(spec.qat_lr) if epochs > 0 else keras.optimizers.SGD(0.0)
    qat.compile(optimizer, loss, metrics)
    qat.fit(
        splits.x_train,
        splits.y_train,
        epochs=max(epochs, 1),
        batch_size=spec.batch_size,
        verbose=0,
        callbacks=list(callbacks),
    )
    bake_levels(qat)
