"""What a trial will cost, from throughput measured at start-up, so the search only tries what can finish.

At the start of a search every candidate model's trainable part is timed once per cut the recipe can
use (one forward + backward pass on a small batch of activations at that cut, and the frozen
prefix's forward for the image path), and the decoding of a few training images. A configuration's
cost is then folds × (epochs × (training + decision images) + scoring images) at those per-image
rates, times what its strategies add (retrieved source images ride with the target rows). The
plan drops ``frozen_stages`` choices whose cheapest configuration would take more than
``MAX_TRIAL_SHARE`` of the budget; a sampled trial whose estimate exceeds the time left is not
started (pruned at once, its estimate recorded). Every trial records ``estimated_seconds`` next to
its measured ``seconds``, so the estimator's accuracy is visible in the leaderboard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..train import TrainConfig, should_cache
from ._folds import Selection
from ._recipe import FROZEN, Recipe, resolve_frozen_relative

MAX_TRIAL_SHARE = 0.5  # a configuration that alone would take over half the budget leaves no room to compare
FOLD_OVERHEAD_S = 0.3  # set-up of one fold's training run (net copy, optimiser, loaders)
_TIMED_BATCH = 8


@dataclass
class CostModel:
    """Seconds per image for each (model, cut): ``step`` one training step's share, ``prefix`` the
    frozen prefix's forward (the image path), ``eval`` an evaluation forward; ``decode`` per image."""

    step: dict[tuple[str, int], float] = field(default_factory=dict)
    prefix: dict[tuple[str, int], float] = field(default_factory=dict)
    eval: dict[tuple[str, int], float] = field(default_factory=dict)
    decode: float = 0.0
    num_stages: dict[str, int] = field(default_factory=dict)
    fold_sizes: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mean train / decide / score images per fold
    n_folds: int = 1
    n_images: int = 0
    measure_seconds: float = 0.0

    def trial_seconds(self, label: str, cfg: TrainConfig, params: Mapping[str, Any] | None = None,
                      extractor=None) -> float:
        """Estimated wall time of one trial (all folds) of ``cfg`` on model ``label``."""
        params = params or {}
        cut = int(cfg.frozen_stages) if not isinstance(cfg.frozen_stages, str) else self.num_stages[label]
        key = (label, cut)
        n_train, n_decide, n_score = self.fold_sizes
        rows = n_train * (1 + int(params.get("retrieval_k") or 0))  # retrieved images ride with each target row
        step = self.step.get(key, 0.0)
        cached = cfg.rand_augment <= 0 and (extractor is None or should_cache(extractor, self.n_images, cut, cfg.use_cache))
        if not cached:
            step += self.prefix.get(key, 0.0) + self.decode
        per_epoch = rows * step + n_decide * self.eval.get(key, 0.0)
        per_fold = cfg.epochs * per_epoch + n_score * self.eval.get(key, 0.0) + FOLD_OVERHEAD_S
        if params.get("dropout_tau") is not None:  # influence scores: about one more pass over the fold
            per_fold += (n_train + n_decide) * (step + self.eval.get(key, 0.0))
        return self.n_folds * per_fold

    def to_json(self) -> dict[str, Any]:
        def table(d):
            return {f"{label}@{cut}": round(v * 1000, 3) for (label, cut), v in sorted(d.items())}

        return {"ms_per_image": {"train_step": table(self.step), "prefix_forward": table(self.prefix),
                                 "eval_forward": table(self.eval), "decode": round(self.decode * 1000, 3)},
                "fold_sizes": list(self.fold_sizes), "n_folds": self.n_folds,
                "measure_seconds": round(self.measure_seconds, 2)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_costs(run, recipe: Recipe, base: TrainConfig, selection: Selection) -> CostModel:
    """Time each candidate's trainable part at every cut ``recipe`` can use (see module docstring)."""
    from ..features import ImageDataset, train_transform
    from ..stages import TransferNet

    t0 = time.monotonic()
    folds = selection.folds
    sizes = tuple(sum(len(getattr(f, part)) for f in folds) / max(1, len(folds)) for part in ("train", "decide", "score"))
    index = run.index
    model = CostModel(fold_sizes=sizes, n_folds=len(folds), n_images=len(index.train) + len(index.val))
    frozen_values = recipe.frozen_values(base.frozen_stages)
    n_classes = len(index.classes)
    device = run.device
    for label, source in run.sources.items():
        n = run.extractors[label].num_stages
        model.num_stages[label] = n
        cuts = sorted({resolve_frozen_relative(v, n) for v in frozen_values})
        c, h, w = source.data_config["input_size"]
        images = torch.rand(_TIMED_BATCH, c, h, w, device=device)
        for cut in cuts:
            net = TransferNet.from_source(source.model, n_classes, cut).to(device)
            net.eval()
            with torch.no_grad():
                net.forward_prefix(images[:2], cut)  # warm-up (allocator, kernels)
                model.prefix[(label, cut)] = _timed(lambda: net.forward_prefix(images, cut)) / _TIMED_BATCH
                acts = net.forward_prefix(images, cut)
                model.eval[(label, cut)] = _timed(lambda: net.forward_from(acts, cut)) / _TIMED_BATCH
            if cut >= n:  # a probe's step is a linear layer: the evaluation forward bounds it
                model.step[(label, cut)] = 2 * model.eval[(label, cut)]
                continue
            net.train()
            labels = torch.zeros(_TIMED_BATCH, dtype=torch.long, device=device)

            def step():
                loss = torch.nn.functional.cross_entropy(net.forward_from(acts, cut), labels)
                loss.backward()

            step()  # warm-up
            model.step[(label, cut)] = _timed(step) / _TIMED_BATCH
            del net
    first = next(iter(run.sources.values()))
    sample = list(index.train)[:4]
    if sample:
        ds = ImageDataset(sample, train_transform(first.data_config))
        model.decode = _timed(lambda: [ds[i] for i in range(len(ds))]) / len(sample)
    model.measure_seconds = time.monotonic() - t0
    return model


def cheapest_seconds(cost: CostModel, recipe: Recipe, base: TrainConfig, frozen_value: Any, run) -> float:
    """The cheapest trial with ``frozen_stages = frozen_value``: fewest epochs its recipe allows, the
    cheapest model, no strategy that adds work."""
    from ..strategy import config_from_params

    low_epochs = [int(d.low) for d in recipe.dimensions if d.target == "epochs" and d.kind == "int"
                  and d.active({FROZEN: frozen_value})]
    fixed_epochs = [int(d.value) for d in recipe.dimensions if d.target == "epochs" and d.kind == "fixed"]
    epochs = min(low_epochs or fixed_epochs or [base.epochs])
    best = float("inf")
    for label, ex in run.extractors.items():
        cfg = config_from_params({"epochs": epochs}, base)
        cfg.frozen_stages = resolve_frozen_relative(frozen_value, ex.num_stages)
        cfg.rand_augment = 0
        best = min(best, cost.trial_seconds(label, cfg, {}, ex))
    return best


def feasible_frozen(cost: CostModel, recipe: Recipe, base: TrainConfig, budget_s: float | None, run) -> tuple[list, dict]:
    """(the ``frozen_stages`` choices whose cheapest trial fits ``MAX_TRIAL_SHARE`` of the budget,
    the estimate of each choice in seconds). The cheapest choice always stays."""
    dim = recipe.dimension(FROZEN)
    if dim is None or dim.kind != "categorical":
        return [], {}
    estimates = {str(v): cheapest_seconds(cost, recipe, base, v, run) for v in dim.choices}
    if budget_s is None:
        return list(dim.choices), estimates
    keep = [v for v in dim.choices if estimates[str(v)] <= MAX_TRIAL_SHARE * budget_s]
    if not keep:
        keep = [min(dim.choices, key=lambda v: estimates[str(v)])]
    return keep, estimates


__all__ = ["CostModel", "measure_costs", "feasible_frozen", "cheapest_seconds", "MAX_TRIAL_SHARE"]
