"""What a trial will cost, from throughput measured at start-up, so the search only tries what can finish.

At the start of a search every candidate model is timed stage by stage in one forward pass of a
small batch (a training step counts as three forwards of the trainable part; each stage's fastest of three
passes, as a busy machine only ever makes a timing too slow), with the set-up of one fold's net
and the decoding of a few training images. A configuration's
cost is then folds × (epochs × (training + decision images) + scoring images) at those per-image
rates, times what its strategies add (retrieved source images ride with the target rows). The
plan drops ``frozen_stages`` choices whose cheapest configuration would take more than
``MAX_TRIAL_SHARE`` of the budget; a sampled trial whose estimate exceeds the time left before
the deadline is not started (pruned at once, its estimate recorded). The start-up timing misses
what a whole trial adds (fine-tunes took about twice their estimates on 2 CPU cores: the
backward pass against ``BACKWARD_FACTOR``, optimiser steps, the LP-FT and WiSE-FT steps), so the
first fold of each trained trial measures it: the seconds per estimated second (median over trials, within
``COST_SCALE_BOUNDS``) scale every later estimate, and a trial whose folds so far say it would
end past the deadline stops there. Every trial records ``estimated_seconds`` next to its measured
``seconds``, so the estimator's accuracy is visible in the leaderboard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..train import TrainConfig, should_cache
from ._folds import Selection
from .._recipe import FROZEN, Recipe, resolve_frozen_relative

SVD_FLOP_FACTOR = 4.0  # a thin SVD costs a few times rows^2 * cols multiply-adds
PROBE_HVPS_PER_LAMBDA = 25  # Newton-CG products per penalty of a warm-started path (measured: 120-270 for 7)
COST_SCALE_BOUNDS = (0.5, 4.0)  # how far this run's measured trials may correct the start-up estimates
# a configuration that alone would take over a quarter of the budget: the budget could not buy the
# few trials of its kind that comparing and refining it takes, and a pruned one would waste that much
MAX_TRIAL_SHARE = 0.25
FOLD_OVERHEAD_S = 0.1  # beyond the net's copy (measured): optimiser, loaders, the fold's evaluation
IMAGE_LOADER_EPOCH_S = 0.5  # starting an epoch's decoding worker process
_TIMED_BATCH = 4
TIMING_REPEATS = 3  # per-stage minimum over this many timed passes


@dataclass
class CostModel:
    """Seconds per image for each (model, cut): ``step`` one training step's share, ``prefix`` the
    frozen prefix's forward (the image path), ``eval`` an evaluation forward; ``decode`` per image."""

    step: dict[tuple[str, int], float] = field(default_factory=dict)
    prefix: dict[tuple[str, int], float] = field(default_factory=dict)
    eval: dict[tuple[str, int], float] = field(default_factory=dict)
    forward: dict[str, float] = field(default_factory=dict)  # a whole frozen forward per image (a view's pass)
    decode: float = 0.0
    num_stages: dict[str, int] = field(default_factory=dict)
    fold_sizes: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mean train / decide / score images per fold
    n_folds: int = 1
    n_images: int = 0
    fold_setup: float = FOLD_OVERHEAD_S  # seconds to set up one fold's training run (measured)
    measure_seconds: float = 0.0
    # solved probes: measured float rates of the two kernels a probe trial spends its time in
    svd_flops_per_s: float = 1e9
    bmm_flops_per_s: float = 1e9
    probe_dims: dict[str, int] = field(default_factory=dict)  # feature width of each model's pooled block / per tap
    n_classes: int = 2

    def probe_seconds(self, dim: int, views: int, n_lambdas: int = 7) -> float:
        """Estimated wall time of a solved probe trial on ``dim`` features with ``views`` rows per image:
        the reduction of its feature table (an SVD, once per layout) and the Newton-CG solves of every
        fold (``PROBE_HVPS_PER_LAMBDA`` Hessian-vector products per penalty, each two products of every
        row with every fold's head: the folds share the reduced rows)."""
        rows = max(1, self.n_images * views)
        r = min(rows, dim)
        svd = (rows * rows * dim if rows < dim else rows * dim * dim) * SVD_FLOP_FACTOR
        hvp = 4.0 * rows * (r + 1) * self.n_folds * self.n_classes
        return svd / self.svd_flops_per_s + n_lambdas * PROBE_HVPS_PER_LAMBDA * hvp / self.bmm_flops_per_s

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
        per_epoch = n_decide * self.eval.get(key, 0.0)
        if not cached:  # decoded images: the frozen prefix and the decoding per image, a loader per epoch
            step += self.prefix.get(key, 0.0) + self.decode
            per_epoch += IMAGE_LOADER_EPOCH_S
        per_epoch += rows * step
        per_fold = cfg.epochs * per_epoch + n_score * self.eval.get(key, 0.0) + self.fold_setup
        if params.get("dropout_tau") is not None:  # influence scores: about one more pass over the fold
            per_fold += (n_train + n_decide) * (step + self.eval.get(key, 0.0))
        return self.n_folds * per_fold

    def to_json(self) -> dict[str, Any]:
        def table(d):
            return {f"{label}@{cut}": round(v * 1000, 3) for (label, cut), v in sorted(d.items())}

        return {"ms_per_image": {"train_step": table(self.step), "prefix_forward": table(self.prefix),
                                 "eval_forward": table(self.eval), "decode": round(self.decode * 1000, 3)},
                "probe_gflops": {"svd": round(self.svd_flops_per_s / 1e9, 2), "bmm": round(self.bmm_flops_per_s / 1e9, 2)},
                "fold_sizes": list(self.fold_sizes), "n_folds": self.n_folds, "fold_setup_s": round(self.fold_setup, 3),
                "measure_seconds": round(self.measure_seconds, 2)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


BACKWARD_FACTOR = 3.0  # forward + backward ≈ 3 forwards (the backward pass costs about two)


@torch.no_grad()
def _stage_seconds(net, images: torch.Tensor, policy) -> tuple[list[float], float]:
    """Seconds per image of each stage, and of pooling + head, from one timed forward pass run as
    the trials run (the device policy's autocast and memory format; queued GPU work waited for)."""
    x = images
    times = []
    with policy.autocast():
        for stage in net.stages:
            policy.synchronize()
            t0 = time.perf_counter()
            x = stage(x)
            policy.synchronize()
            times.append((time.perf_counter() - t0) / len(images))
        t0 = time.perf_counter()
        net.head(net.pool(x))
        policy.synchronize()
    return times, (time.perf_counter() - t0) / len(images)


def measure_probe_rates(model: CostModel) -> None:
    """The float rates of a probe trial's two kernels on this machine, from one small timed run each
    (the faster of two: a busy machine only ever makes a timing too slow)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1024, generator=gen)
    z = torch.randn(4, 128, 128, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 128, 8, generator=gen, dtype=torch.float64)
    svd = min(_timed(lambda: torch.linalg.svd(x, full_matrices=False)) for _ in range(2))
    bmm = min(_timed(lambda: [torch.bmm(z, w) for _ in range(20)]) for _ in range(2))
    model.svd_flops_per_s = SVD_FLOP_FACTOR * 128 * 128 * 1024 / max(svd, 1e-6)
    model.bmm_flops_per_s = 20 * 2.0 * 4 * 128 * 128 * 8 / max(bmm, 1e-6)


def measure_costs(run, recipe: Recipe, base: TrainConfig, selection: Selection) -> CostModel:
    """Per-image rates of every candidate at every cut ``recipe`` can use, from one timed forward pass
    per model (stage by stage; a training step is taken as ``BACKWARD_FACTOR`` forwards of the
    trainable part), the set-up of one fold's net and the decoding of a few training images. Cheap
    (about a second a model on 2 cores) and measured under whatever else loads the machine."""
    from ..features import ImageDataset, train_transform
    from ..stages import TransferNet

    t0 = time.monotonic()
    policy = run.policy
    folds = selection.folds
    sizes = tuple(sum(len(getattr(f, part)) for f in folds) / max(1, len(folds)) for part in ("train", "decide", "score"))
    index = run.index
    model = CostModel(fold_sizes=sizes, n_folds=len(folds), n_images=len(index.train) + len(index.val))
    frozen_values = recipe.frozen_values(base.frozen_stages)
    setup_s = []
    for label, source in run.sources.items():
        n = run.extractors[label].num_stages
        model.num_stages[label] = n
        nets = []
        for _ in range(2):  # the faster of two: a timing on a busy machine is only ever too slow
            t_setup = time.perf_counter()
            nets.append(policy.module(TransferNet.from_source(source.model, len(index.classes), "all")).eval())
            setup_s.append(time.perf_counter() - t_setup)
        net = nets[0]
        del nets
        c, h, w = source.data_config["input_size"]
        batch = policy.timing_batch(_TIMED_BATCH, base.batch_size)
        _stage_seconds(net, policy.format_input(torch.rand(batch, c, h, w, device=run.device)), policy)  # warm-up
        images = policy.format_input(torch.rand(batch, c, h, w, device=run.device))
        timings = [_stage_seconds(net, images, policy) for _ in range(TIMING_REPEATS)]
        stages = [min(t[0][i] for t in timings) for i in range(len(timings[0][0]))]
        head = min(t[1] for t in timings)
        model.forward[label] = sum(stages) + head
        for cut in sorted({resolve_frozen_relative(v, n) for v in frozen_values}):
            model.prefix[(label, cut)] = sum(stages[:cut]) + (head if cut >= n else 0.0)
            model.eval[(label, cut)] = sum(stages[cut:]) + head
            model.step[(label, cut)] = BACKWARD_FACTOR * model.eval[(label, cut)]
        del net
    model.fold_setup = (sorted(setup_s)[len(setup_s) // 2] if setup_s else 0.0) + FOLD_OVERHEAD_S
    first = next(iter(run.sources.values()))
    sample = list(index.train)[:4]
    if sample:
        ds = ImageDataset(sample, train_transform(first.data_config))
        # the training loader's workers decode in parallel
        model.decode = _timed(lambda: [ds[i] for i in range(len(ds))]) / len(sample) / max(1, policy.loader_workers)
    model.n_classes = len(index.classes)
    measure_probe_rates(model)
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
        if cfg.frozen_stages >= ex.num_stages and cfg.mixup_alpha <= 0:  # a solved probe, not a training loop
            best = min(best, cost.probe_seconds(ex.feature_width(None), 1))
        else:
            best = min(best, cost.trial_seconds(label, cfg, {}, ex))
    return best


def cheapest_trial_seconds(cost: CostModel, recipe: Recipe, base: TrainConfig, run) -> float:
    """The cheapest trial the (restricted) recipe allows, over its ``frozen_stages`` choices."""
    dim = recipe.dimension(FROZEN)
    values = list(dim.choices) if dim is not None and dim.kind == "categorical" else [base.frozen_stages]
    return min(cheapest_seconds(cost, recipe, base, v, run) for v in values)


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


__all__ = ["CostModel", "measure_costs", "feasible_frozen", "cheapest_seconds", "cheapest_trial_seconds", "MAX_TRIAL_SHARE",
           "COST_SCALE_BOUNDS"]
