"""The allocation methods as one table: name -> Allocator (qiu, qinu, rb, uniform, bb).

Every entry takes what training handed on (edgeq.training.Trained), the target mean bits, the
pipeline's spec (bit limits, pins, training budgets) and the seed, and returns a BitPlan. The CLI's
--method choices, report rows and plot legends come from this table; adding a method is one function
plus one entry (or `registered(...)` from a plugin or test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from edgeq.errors import PlanError
from edgeq.pipeline import PipelineSpec
from edgeq.plan import BitPlan, LayerBits
from edgeq.registry import registered as table_entry
from edgeq.training import Trained

AllocateFn = Callable[[Trained, float, PipelineSpec, int], BitPlan]


@dataclass(frozen=True)
class Allocator:
    """One allocation method: how it plans, and how reports and plots name it."""

    name: str
    allocate: AllocateFn
    label: str  # report and legend text
    marker: str = "o"  # matplotlib marker in the search's Pareto plot


def _qi(quantizer: str) -> AllocateFn:
    def allocate(trained: Trained, target: float, spec: PipelineSpec, seed: int) -> BitPlan:
        from edgeq.allocate import quantile_inform

        pin = dict(spec.pin) or None
        return quantile_inform(
            list(trained.posteriors),
            target,
            min_bits=spec.min_bits,
            max_bits=spec.max_bits,
            pin=pin,
            quantizer=quantizer,
        )

    return allocate


def _random_bits(trained: Trained, target: float, spec: PipelineSpec, seed: int) -> BitPlan:
    from edgeq.allocate import random_bits

    return random_bits(
        list(trained.posteriors), target, min_bits=spec.min_bits, max_bits=spec.max_bits, seed=seed
    )


def _uniform(trained: Trained, target: float, spec: PipelineSpec, seed: int) -> BitPlan:
    from edgeq.allocate import uniform_plan

    return uniform_plan(list(trained.posteriors), int(round(target)))


BB_LAMBDA = 0.1


def _bayesian_bits(trained: Trained, target: float, spec: PipelineSpec, seed: int) -> BitPlan:
    """Bayesian Bits gates learned on the float model; bits clipped into the QAT range [min_bits, max_bits].

    BB ignores the target (its lambda sets the trade-off) and its pruned channels stay in the model here:
    the run quantizes at BB's bit widths only (benchmarks/paper_tables.py also removes the channels).
    """
    import tf_keras as keras

    from edgeq.bayesian_bits import bayesian_bits_plan, to_bayesian_bits
    from edgeq.training import loss_and_metrics

    keras.utils.set_random_seed(seed)
    s = trained.splits
    bb = to_bayesian_bits(trained.float_model, lam=BB_LAMBDA)
    bb.compile(keras.optimizers.Adam(spec.qat_lr * 10), *loss_and_metrics(s.task, spec.from_logits))
    bb.fit(s.x_train, s.y_train, epochs=spec.bnn_epochs, batch_size=spec.batch_size, verbose=0)
    raw = bayesian_bits_plan(bb)
    clip = {n: min(max(lb.bits, spec.min_bits), spec.max_bits) for n, lb in raw.layers.items()}
    layers = {n: LayerBits(b, lo=raw.layers[n].lo, hi=raw.layers[n].hi) for n, b in clip.items()}
    meta = {
        "lam": BB_LAMBDA,
        "bb_bits": raw.bits,
        "pruned_channels_kept": {
            n: len(lb.pruned_channels) for n, lb in raw.layers.items() if lb.pruned_channels
        },
    }
    return BitPlan(layers, method="bb", meta=meta)


ALLOCATORS: dict[str, Allocator] = {
    a.name: a
    for a in (
        Allocator("qiu", _qi("uniform"), "Quantile Inform, uniform grid (QIU)", "o"),
        Allocator("qinu", _qi("quantile"), "Quantile Inform, quantile grid (QINU)", "s"),
        Allocator("rb", _random_bits, "Random Bits (RB)", "^"),
        Allocator("uniform", _uniform, "uniform bits", "x"),
        Allocator("bb", _bayesian_bits, "Bayesian Bits (BB, baseline)", "D"),
    )
}


def check_method(name: str) -> Allocator:
    """The table's entry for name, or a PlanError listing the table."""
    if name not in ALLOCATORS:
        raise PlanError(f"unknown method {name!r}; use one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]


def allocate(method: str, trained: Trained, target: float, spec: PipelineSpec, seed: int) -> BitPlan:
    """The BitPlan of one method at one target; layers the twin cannot plan are named in its meta."""
    plan = check_method(method).allocate(trained, target, spec, seed)
    if trained.deterministic_layers:  # TFP has no variational DepthwiseConv2D: those stay 8-bit
        plan = dataclasses.replace(
            plan, meta={**plan.meta, "deterministic_layers_at_8_bits": trained.deterministic_layers}
        )
    return plan


def registered(allocator: Allocator):
    """Add an allocation method to the table for the duration of a block (plugins, tests)."""
    return table_entry(ALLOCATORS, allocator.name, allocator, PlanError)
