"""`--prune-channels auto`: each layer's share of output channels removed, chosen with the byte planner
(issue 18).

At one flash budget (the unpruned model's at the target), every choice of channels gets its own bit plan
from the planner: the bytes removed channels free buy bits elsewhere. Which choice is best is measured,
not priced: removing a channel costs its weights' (mu / sigma)^2 in the twin's uncertainty, far more than
the bits it buys save (a 2-epoch digits twin at target 3: 9,446 against 2,287 for a quarter of fc1,
153,406 against 2,293 for a quarter of conv2), yet a fine-tuned smaller model loses no accuracy
(benchmarks/results/digits_targets.md). So each choice's smaller float model is fine-tuned for a few
epochs and its plan's QAT model, calibrated, scored by its validation loss (`Score`, the run's). The walk
starts at the smallest share, the same for every layer, whose plan fits (what a fixed --prune-channels
would remove; none when the unpruned model fits), then moves one layer's share a step (CHANNEL_FRACTIONS)
up or down at a time, the move that lowers that loss most, until no move lowers it. The removed weights'
uncertainty is kept beside each trial, for the record.

Every choice is planned on the twin as it is (edgeq.training.pruned_view: no new twin). The run then
fine-tunes the chosen smaller model for as long as the float stage trains and trains its twin, as a fixed
--prune-channels does (edgeq.training.shrink), and plans it within the same budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deploy.planning import Planned
from edgeq.errors import PlanError
from edgeq.posterior import LayerPosterior
from edgeq.training import Trained

CHANNEL_FRACTIONS = (0.0, 0.25, 0.5, 0.75)  # the shares of a layer's output channels the walk may remove

# (twin, flash budget) -> the planner's plan for it within the budget, in the run's settings
PlanAt = Callable[[Trained, int], Planned]
# (a pruned view, its plan) -> the validation loss of that plan on the view's fine-tuned model (lower: better)
Score = Callable[[Trained, Planned], float]


@dataclass(frozen=True)
class ChannelTrial:
    """One choice of channels the walk priced: the plan the planner found for it within the budget."""

    fractions: Mapping[str, float]  # layer -> share of its output channels removed (0: none)
    flash: int | None  # the plan's predicted flash, as the budget counts it (None: no plan fits)
    mean_bits: float | None
    val_loss: float  # the Score (inf: no plan fits)
    plan_cost: float  # the plan's uncertainty cost on the weights that stay
    removed_cost: float  # sum of (mu / sigma)^2 over the weights the channels take with them

    def to_dict(self) -> dict:
        return {
            "fractions": dict(self.fractions),
            "flash_bytes": self.flash,
            "mean_bits": self.mean_bits,
            "val_loss": self.val_loss if np.isfinite(self.val_loss) else None,
            "plan_cost": self.plan_cost if np.isfinite(self.plan_cost) else None,
            "removed_cost": self.removed_cost,
        }


@dataclass(frozen=True)
class ChannelChoice:
    """The walk's result: the shares chosen (layers that lose none left out), the budget, every trial."""

    fractions: Mapping[str, float]
    budget: int
    trials: tuple[ChannelTrial, ...]

    def to_dict(self) -> dict:
        return {
            "fractions": dict(self.fractions),
            "flash_budget": self.budget,
            "steps": list(CHANNEL_FRACTIONS),
            "trials": [t.to_dict() for t in self.trials],
        }


def information(posteriors: Sequence[LayerPosterior]) -> float:
    """sum of (mu / sigma)^2 over every weight: what setting them all to 0 would cost."""
    return float(sum(np.sum(np.square(p.mu / p.sigma)) for p in posteriors))


def choose_channels(
    trained: Trained,
    free: Sequence[str],
    budget: int,
    plan_at: PlanAt,
    score: Score,
    on_trial: Callable[[ChannelTrial], None] | None = None,
) -> ChannelChoice:
    """The shares of `free` layers' channels (each one of CHANNEL_FRACTIONS) whose plan within `budget` has
    the least validation loss (see the module doc); every choice tried, in order, in .trials."""
    from edgeq.training import pruned_view

    whole = information(trained.posteriors)

    def trial(fractions: Mapping[str, float]) -> ChannelTrial:
        view = pruned_view(trained, {n: f for n, f in fractions.items() if f})  # {}: an unpruned copy
        removed = whole - information(view.posteriors)
        try:
            planned = plan_at(view, budget)
        except PlanError:
            t = ChannelTrial(dict(fractions), None, None, np.inf, np.inf, removed)
        else:
            info = planned.plan.meta["planner"]
            flash = planned.prediction.flash + int(planned.plan.meta.get("decode_code_bytes", 0))
            loss = float(score(view, planned))
            bits, cost = float(info["mean_bits"]), float(info["cost"])
            t = ChannelTrial(dict(fractions), flash, bits, loss, cost, removed)
        trials.append(t)
        if on_trial:
            on_trial(t)
        return t

    trials: list[ChannelTrial] = []
    # the start: the smallest share, the same for every layer, whose plan fits (a fixed --prune-channels)
    for f in CHANNEL_FRACTIONS:
        best = trial({n: f for n in free})
        if best.flash is not None:
            break
    else:
        return ChannelChoice({}, budget, tuple(trials))
    seen = {tuple(sorted(t.fractions.items())) for t in trials}
    while True:  # then one layer's share a step up or down at a time, while the loss falls
        moves = []
        for n, f in best.fractions.items():
            i = CHANNEL_FRACTIONS.index(f)
            for k in (i + 1, i - 1):
                if not 0 <= k < len(CHANNEL_FRACTIONS):
                    continue
                move = {**best.fractions, n: CHANNEL_FRACTIONS[k]}
                if (key := tuple(sorted(move.items()))) not in seen:
                    seen.add(key)
                    moves.append(move)
        step = min((trial(m) for m in moves), key=lambda t: t.val_loss, default=None)
        if step is None or not step.val_loss < best.val_loss:
            break
        best = step
    chosen = {n: f for n, f in best.fractions.items() if f}
    return ChannelChoice(chosen, budget, tuple(trials))
