"""Fine-tuning that starts from a fitted probe and ends between the start and the fine-tuned weights.

- **LP-FT** (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
  Out-of-Distribution"): a randomly initialised head sends large, arbitrary gradients into the
  pretrained layers during the first steps and distorts their features; fitting the head first as a
  linear probe on the frozen features (here: solved to its optimum, ``autotl.probe``) and fine-tuning
  from there does not. ``lp_init: true`` sets the new head to that probe before the first step.
- **WiSE-FT** (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the weights
  ``(1 - alpha) * theta_start + alpha * theta_fine-tuned`` of every trainable layer (and its
  batch-norm statistics) often beat both ends. ``wise: true`` picks alpha from ``WISE_ALPHAS`` by the
  loss on the run's validation images — in a search trial, the fold's decision part, never the images
  that score it — and the refit reuses the alpha the folds chose (``refit`` in the notes).

Both are hooks on the one training loop (``autotl.train.TrainingHooks``), added in this order so the
interpolation starts from the probe head.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import torch

from .options import FinetuneOptions
from .strategy import BaseStrategy, StrategyContext
from .train import TrainingHooks, TrainingSetup, changeable_state

WISE_ALPHAS = (0.2, 0.4, 0.6, 0.8, 1.0)
LP_L2 = FinetuneOptions.probe_l2  # the probe penalty when the run has not measured a better one


def solve_probe_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (K, d), bias (K,))`` of the L2 logistic-regression probe on raw ``features``, the
    layout of ``nn.Linear``."""
    from .probe import ReducedFeatures

    reduced = ReducedFeatures(features)
    solution = reduced.solve([range(features.shape[0])], labels.long(), num_classes, [float(l2)])
    weight, bias = reduced.head(solution.theta[0])
    return weight[0].T.contiguous(), bias[0]


class LinearProbeInit(TrainingHooks):
    """Sets the net's new head to a probe solved on the training images' frozen pooled features."""

    def __init__(self, extractor, samples: Sequence, num_classes: int, l2: float, notes: dict[str, Any]):
        self.extractor, self.samples, self.num_classes, self.l2, self.notes = extractor, list(samples), num_classes, l2, notes

    def setup(self, run: TrainingSetup) -> None:
        acts = self.extractor.extract(self.samples, description="train features")
        weight, bias = solve_probe_head(acts.pooled, acts.labels, self.num_classes, self.l2)
        head = run.net.head
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            head.bias.copy_(bias.to(head.bias))
        self.notes.update({"lp_init": True, "lp_l2": self.l2})
        return None


class WeightInterpolation(TrainingHooks):
    """WiSE-FT over the trainable part: the start is the net as training begins (after LP init)."""

    def __init__(self, alpha: float | None, notes: dict[str, Any], alphas: Sequence[float] = WISE_ALPHAS):
        self.alpha, self.alphas, self.notes = alpha, tuple(alphas), notes
        self.start: dict[str, torch.Tensor] = {}

    def setup(self, run: TrainingSetup) -> None:
        self.start = {k: v.detach().clone() for k, v in changeable_state(run.net).items()}
        return None

    def end_training(self, net, evaluate) -> None:
        end = {k: v.detach().clone() for k, v in changeable_state(net).items()}

        def load(alpha: float) -> None:
            mixed = {k: (self.start[k] + alpha * (v - self.start[k])) if v.is_floating_point() else v
                     for k, v in end.items()}
            net.load_state_dict(mixed, strict=False)

        if self.alpha is not None:
            load(float(self.alpha))
            self.notes.update({"wise_alpha": float(self.alpha), "wise_alpha_from": "the search's folds"})
            return
        losses = {}
        for alpha in self.alphas:
            load(alpha)
            losses[alpha] = evaluate(net)["loss"]
        best = min(self.alphas, key=lambda a: (losses[a], -a))  # equal losses: the fine-tuned end
        load(best)
        self.notes.update({"wise_alpha": best, "wise_alpha_from": "validation loss (the fold's decision part)",
                           "wise_losses": {str(a): round(v, 5) for a, v in losses.items()},
                           "refit": {"wise_alpha": best}})


class ProbeStartedFineTuning(BaseStrategy):
    """LP-FT and WiSE-FT for a trial that trains stages (module docstring). Parameters and options:
    ``autotl.options.FinetuneOptions`` (``lp_init``, ``wise``: interpolate, alpha chosen on the
    validation images, ``wise_alpha``: a fixed alpha, what a refit reuses; ``probe_l2``)."""

    name = "lpft"
    params = FinetuneOptions.params()

    def is_active(self, params: dict[str, Any]) -> bool:
        return bool(params.get("lp_init")) or bool(params.get("wise")) or params.get("wise_alpha") is not None

    def apply(self, ctx: StrategyContext, params: dict[str, Any]) -> None:
        from .stages import resolve_frozen

        if resolve_frozen(ctx.config.frozen_stages, ctx.extractor.num_stages) >= ctx.extractor.num_stages:
            return  # a probe: nothing to start or interpolate
        notes = ctx.notes.setdefault(self.name, {})
        opts = FinetuneOptions.of(ctx.options, params)
        if opts.lp_init:
            ctx.hooks.append(LinearProbeInit(ctx.extractor, ctx.train_samples, len(ctx.index.classes),
                                             float(opts.probe_l2 or LP_L2), notes))
        if opts.wise or opts.wise_alpha is not None:
            alpha = opts.wise_alpha
            ctx.hooks.append(WeightInterpolation(None if alpha is None else float(alpha), notes))

    def describe(self, params: dict[str, Any]) -> str:
        parts = []
        if params.get("lp_init"):
            parts.append("head started from the solved probe (LP-FT)")
        if params.get("wise_alpha") is not None:
            parts.append(f"WiSE-FT alpha={params['wise_alpha']:g}")
        elif params.get("wise"):
            parts.append("WiSE-FT alpha chosen on the decision part")
        return "; ".join(parts) or "lpft: off"


def refit_values(fold_notes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the refit reuses from a trial's folds: each strategy's ``refit`` values, numbers by their
    median over the folds."""
    merged: dict[str, list] = {}
    for notes in fold_notes:
        for note in notes.values():
            if isinstance(note, dict):
                for k, v in (note.get("refit") or {}).items():
                    merged.setdefault(k, []).append(v)
    return {k: statistics.median(v) if all(isinstance(x, (int, float)) for x in v) else v[0] for k, v in merged.items()}
