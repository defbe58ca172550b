"""``autotl.fit``: data → ranked source models → searched (or given) strategy → refit → verified ONNX.

Read top-down in :func:`fit`; each step is one call into one module, all sharing one :class:`Run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _console
from ._io import atomic_write_json
from ._version import __version__
from .card import CARD_NAME, ModelCard, datl_prior, file_sha256
from .data import DatasetIndex
from .errors import AutotlError
from .evaluation import evaluate, evaluate_ensemble
from .fitted import fitted_from_training
from .features import ImageDataset, eval_transform
from .models import SourceModel
from .options import FitOptions, keyword_signature
from .run import FinalModel, Run, claim_run_folder, default_cache_dir, default_run_dir
from .strategy import StrategyContext, apply_strategies, train_strategy
from .train import TrainConfig

__all__ = ["fit", "FitResult", "auto_time_budget", "pick_objective", "default_cache_dir"]

# an exporter fault shows on every input, and the eager reference is the slow half of the check: a
# searched model (several backbones, flip views) takes about 0.2 s an image in eager PyTorch on 2 cores
PARITY_IMAGES = 16


@dataclass
class FitResult:
    """What ``autotl fit`` prints and ``autotl.fit`` returns."""

    run_dir: Path
    model_path: Path
    card_path: Path
    classes: list[str]
    source_model: str
    weights_origin: str
    training: dict[str, Any]  # what was trained: TrainConfig, stages, strategy notes (the card's "training")
    metrics: dict[str, dict[str, Any]]
    parity: dict[str, Any]
    data: dict[str, Any]
    seconds: float
    search: dict[str, Any] | None = None
    scoring: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None  # accuracy on new images, 95 % interval, how (autotl.estimate)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the run (Run.phases)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("run_dir", "model_path", "card_path"):
            d[k] = str(d[k])
        return d


def fit(data_dir: str | os.PathLike, out: str | os.PathLike | None = None, **options: Any) -> FitResult:
    """Fit a classifier on an image set and export a verified ONNX model (``autotl fit``).

    ``options``: the fields of :class:`autotl.options.FitOptions` (``autotl fit``'s flags, with ``_`` for
    ``-``), each with its default and its check written there; all are checked before any work starts.

    ``data_dir`` is a folder (one sub-folder per class, or train/ val/ [test/]) or a label file
    (``.csv``/``.tsv`` of image paths and labels, optionally a split column; ``path_column`` /
    ``label_column`` name its columns when the header does not: see ``autotl.data.scan_dataset``).

    By default this *searches* how to transfer: every candidate source model (``models``; when none
    is named, what ``zoo`` selects: ``auto`` = the packaged ones plus the hub zoo's models for the
    device whose weights are cached or downloadable, see ``autotl.zoo``) is ranked (DATL + LogME),
    an Optuna study over the recipe's space (``default``
    unless ``recipe`` names another) runs for ``time_budget`` ("90s", "20m"; automatic from the data
    size when neither it nor ``trials`` is given), each trial scored by cross-validation on images
    that decided nothing about it (``autotl.search._folds``), the winner chosen by the one-standard-
    error rule and refitted on all labelled images. ``search=False`` trains the one strategy the
    arguments describe (a linear probe by default), early-stopped on val. ``fixed_params`` fixes search
    parameters (e.g. ``{"dropout_tau": 3.0}``), ``options`` sets run-wide ones (e.g.
    ``{"source_pool": "pool/"}``: the search then also varies retrieval K; pool images that are copies of
    data images are left out, see :func:`source_pool_overlap`; every strategy's options:
    ``autotl.options.STRATEGY_OPTIONS``). ``resume`` continues an interrupted
    study in the same run folder; ``overwrite`` replaces a finished run there (which is otherwise
    refused); the earlier run is put back if this one fails (``autotl.run.claim_run_folder``), and a
    second fit on the same folder is refused while this one runs. ``ensemble``: after the search, greedy ensemble selection over the trials'
    out-of-fold predictions may publish several refitted trials as one averaged graph (only when it
    is better out of fold than the selected trial). ``quantize="int8"`` also writes ``model.int8.onnx``
    when it keeps the fp32 model's accuracy within 0.5 points on images the model did not train on
    (``autotl.quantize``: val after ``--no-search``, else test, else augmented views).
    ``duplicates`` (warn, drop, error): what the scan does with byte-identical
    images across splits (see ``autotl.data.scan_dataset``). Ctrl-C raises ``autotl.search.SearchInterrupted``.
    """
    opts = FitOptions(**options)
    opts.check(data_dir, out)  # every option checked before any work starts (autotl/options.py)
    out = Path(out) if out is not None else default_run_dir(data_dir)
    keep_on: tuple[type[BaseException], ...] = ()
    if opts.searching:
        from .search import SearchInterrupted

        keep_on = (SearchInterrupted,)  # an interrupted search stays, to be resumed
    # the folder is this process's until the run is published; any failure puts the earlier run back
    with claim_run_folder(out, data_dir, resume=opts.resume, overwrite=opts.overwrite, search=opts.searching,
                          storage=opts.storage, keep_on=keep_on):
        run = Run.open(data_dir, out, models=opts.models, val_fraction=opts.val_fraction, seed=opts.seed,
                       device=opts.device, cache_dir=opts.cache_dir, resume=opts.resume, overwrite=opts.overwrite,
                       duplicates=opts.duplicates, claimed=True, zoo=opts.zoo, path_column=opts.path_column,
                       label_column=opts.label_column)
        base = _base_config(run.index, opts)
        pool = source_pool_overlap(run, opts.options)
        if opts.searching:
            from .search import load_recipe, search_cuts, with_pool_dimension

            recipe = load_recipe(opts.recipe)
            if (opts.options or {}).get("source_pool"):
                recipe = with_pool_dimension(recipe)
            cuts = search_cuts(run, recipe, base)
        else:
            cuts = [base.frozen_stages] if isinstance(base.frozen_stages, int) else []
        with run.phase("scoring"):
            scoring = score_candidates(run, base, cuts=cuts)  # the one frozen pass per model over the training images
        if opts.searching:
            from .search import search as search_strategies

            final = search_strategies(run, base, opts.search_options(
                recipe=recipe, time_budget=_search_budget(run, opts), fixed_params=dict(opts.fixed_params or {}),
                objective_reason=_objective_reason(base, opts)))
        else:
            with run.phase("training"):
                final = train_given_strategy(run, base, dict(opts.fixed_params or {}), dict(opts.options or {}))
        if pool is not None:
            final.notes["source_pool"] = pool
        return publish(run, final, scoring=scoring.to_json(), quantize=opts.quantize)


fit.__signature__ = keyword_signature(FitOptions, fit)  # what help(autotl.fit) and the CLI's help show


# ----------------------------------------------------------------------------------------- steps
def _search_budget(run: Run, opts: FitOptions) -> float | str | None:
    """``--time-budget``, else (without ``--trials``) the automatic budget for this data and device."""
    if opts.time_budget is not None or opts.trials is not None:
        return opts.time_budget
    budget = auto_time_budget(run.index, run.device)  # (a resumed search gets the automatic budget again)
    _console.log(f"search time budget [bold]{budget:.0f}s[/] (automatic for {_n_labelled(run.index)} labelled "
                 f"images on {run.device.type}; --time-budget to change, --no-search for one plain fit)")
    return budget


def source_pool_overlap(run: Run, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``--source-pool`` checked against the data by content before any training: the pool's
    byte-identical copies of data images (train, val or test) are left out of every trial and the
    final fit (``autotl.retrieval.pool.without_data_copies``); the card lists them."""
    root = (options or {}).get("source_pool")
    if not root:
        return None
    from .retrieval.strategy import data_free_pool

    pool, copies = data_free_pool(root, run.index, run.cache_dir / "retrieval" if run.cache_dir else None, run.memory)
    if copies:
        _console.log(_console.clean_text(
            f"source pool: {len(copies)} of its images are copies of images of the data set (same bytes); they are "
            f"left out of the pool (e.g. {copies[0]['pool']} = {copies[0]['data']})"), markup=False)
    return {"root": str(pool.root), "n_images": len(pool), "data_copies_excluded": len(copies), "compared_by": "sha256",
            "data_copies": copies[:20]}


def _n_labelled(index: DatasetIndex) -> int:
    return len(index.train) + len(index.val)


def auto_time_budget(index: DatasetIndex, device: torch.device) -> float:
    """Seconds of search for this data: a minute plus 0.18 s per labelled image (≈ 2 min for a few
    hundred images and 10 min for 3,000 on 2 CPU cores), at most 30 min; a GPU does more in the same time."""
    return float(min(1800.0, 60.0 + 0.18 * _n_labelled(index)))


def pick_objective(index: DatasetIndex) -> str:
    """Accuracy unless the training classes are imbalanced (largest/smallest > 1.5): macro-F1."""
    counts = [c["train"] for c in index.counts().values()]
    return "macro_f1" if counts and max(counts) > 1.5 * max(1, min(counts)) else "accuracy"


def _base_config(index: DatasetIndex, opts: FitOptions) -> TrainConfig:
    config = opts.config
    cfg = dataclasses.replace(config) if config is not None else TrainConfig(
        frozen_stages=opts.frozen_stages, epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed)
    cfg.objective = opts.objective or (config.objective if config is not None else None) or pick_objective(index)
    return cfg


def _objective_reason(cfg: TrainConfig, opts: FitOptions) -> str:
    if opts.objective or opts.config is not None:
        return ""
    return " (train classes imbalanced: largest/smallest > 1.5)" if cfg.objective == "macro_f1" else " (train classes balanced)"


def _stratified_sample(samples, n: int, seed: int) -> list:
    """At most ``n`` samples, every class in proportion (at least one each where it has two)."""
    from .search._folds import stratified_split

    samples = list(samples)
    if len(samples) <= n:
        return samples
    return stratified_split(samples, n / len(samples), np.random.default_rng([seed, 0x5C0]))[1]


def score_candidates(run: Run, base: TrainConfig, *, cuts=()):
    """DATL weights + transferability scores of every candidate (saved in the run folder); the run's
    candidates are then kept in ranked order. ``cuts`` (a list, or one per candidate label): prefix
    activations the later steps read, computed in the same pass over the training images."""
    from .score import score_models

    report = score_models(run.index, list(run.sources.values()), run_dir=run.run_dir, extractors=run.extractors, cuts=cuts)
    if len(run.sources) > 1:
        _console.log(report.table())
    for line in report.looks_like_lines():
        _console.log(line, markup=False)
    run.keep([row.source.label for row in report.top_k(len(run.sources))])
    return report


def train_given_strategy(run: Run, base: TrainConfig, params: dict[str, Any], options: dict[str, Any]) -> FinalModel:
    """``--no-search``: the one strategy the flags describe, on train, early-stopped on val."""
    label = run.labels[0]
    source, extractor = run.sources[label], run.extractors[label]
    _console.log(f"source model [bold]{source.label}[/] — weights: {source.weights_origin}; device: {run.device}")
    index = run.index
    ctx = StrategyContext(index, source, extractor, run.run_dir, base, list(index.train), options=options, final=True,
                          memory=run.memory)
    apply_strategies(ctx, params)
    result = train_strategy(ctx, index.val, device=run.device)
    decided = {
        "training": "train split",
        "early_stopping_and_model_selection": "val split",
        "test": "reported only, never used for a decision" if index.test else "no test split given",
    }
    return FinalModel(fitted_from_training(result, source, extractor, len(index.classes)), decided,
                      {"strategies": ctx.notes, **params})


ROLES = {
    "test": "held out: the test/ split decided nothing",
    "val_searched": "trained on: the refit after the search trained on val (not an estimate of new images)",
    "val_plain": "held out from training, but it chose the early-stopping epoch",
}


def _label_roles(metrics: dict[str, dict], *, searched: bool) -> None:
    """Name every figure for what it is (held out, or trained on) on the card and in the report."""
    if metrics.get("val"):
        metrics["val"]["role"] = ROLES["val_searched" if searched else "val_plain"]
    if metrics.get("test"):
        metrics["test"]["role"] = ROLES["test"]


def headline_estimate(metrics: dict[str, dict], search: dict | None):
    """The one figure a user should believe (``autotl.estimate``): the test split when given, else the
    search's corrected cross-validated estimate, else the val accuracy of a plain fit."""
    from .estimate import Estimate, held_out

    test, val = metrics.get("test") or {}, metrics.get("val") or {}
    if test.get("n"):
        return held_out(test["accuracy"], int(test["n"]), method="accuracy on the test/ split, which decided nothing")
    if search and search.get("estimate"):
        return Estimate(**search["estimate"])
    return held_out(val.get("accuracy", 0.0), int(val.get("n") or 0), kind="validation",
                    method="accuracy on the val split, which also chose the early-stopping epoch")


def export_and_verify(net: torch.nn.Module, source: SourceModel, run_dir: Path, val_samples) -> dict[str, Any]:
    """Write ``model.onnx`` and check it against PyTorch on up to ``PARITY_IMAGES`` validation images."""
    from .export import export_onnx, verify_onnx

    onnx_path = run_dir / "model.onnx"
    net = net.cpu().eval()
    try:
        export_onnx(net, onnx_path, input_size=tuple(source.data_config["input_size"]))
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and getattr(cause, "errno", None) != errno.ENOSPC:
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise AutotlError(f"no space left on the device writing {onnx_path} (the previous model there, if any, is "
                          "intact); free some space and run the same command again (with --resume for a search)") from exc
    picked = list(val_samples)[:PARITY_IMAGES]
    ds = ImageDataset(picked, eval_transform(source.data_config))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    report = verify_onnx(net, onnx_path, images)
    if not report.passed:
        bad = run_dir / "model.failed-parity.onnx"
        os.replace(onnx_path, bad)
        raise RuntimeError(f"ONNX parity check failed: {report.to_json()}; the model was moved to {bad}")
    return report.to_json()


def _int8(run_dir: Path, preprocessing: dict, index: DatasetIndex, quantize: str | None, seed: int, *,
          trained_on_val: bool) -> dict[str, Any]:
    """The card's ``int8`` entry: calibrated on train, gated on images the model did not train on
    (``autotl.quantize.choose_gate``: val, else test, else augmented views); without ``quantize`` an
    int8 file of an earlier model in the folder is removed."""
    from .quantize import INT8_NAME, choose_gate, write_int8

    if quantize is None:
        (run_dir / INT8_NAME).unlink(missing_ok=True)
        return {}
    gate = choose_gate(index.val, index.test, list(index.train) + list(index.val), trained_on_val=trained_on_val)
    return {"int8": write_int8(run_dir, preprocessing, index.train, gate, seed=seed).to_json()}


PREVIOUS_CARD = "model.json.previous"


@contextlib.contextmanager
def _card_set_aside(run_dir: Path):
    """While model.onnx is being replaced, the card of the previous model is not beside it: a model
    is never next to a card that does not describe it, whenever an interrupt comes. If the export
    fails or is interrupted and the previous model is still there, its card is put back."""
    card, aside, model = run_dir / CARD_NAME, run_dir / PREVIOUS_CARD, run_dir / "model.onnx"
    if not card.exists():
        yield
        return
    before = model.stat().st_mtime_ns if model.exists() else None
    os.replace(card, aside)
    try:
        yield
    except BaseException:
        try:
            recorded = json.loads(aside.read_text(encoding="utf-8")).get("model_sha256")
            same = model.exists() and (file_sha256(model) == recorded if recorded else model.stat().st_mtime_ns == before)
        except (OSError, ValueError):
            same = False
        if same:
            os.replace(aside, card)
        raise


def _evaluate_final(final: FinalModel, index: DatasetIndex) -> tuple[dict, torch.nn.Module, dict | None]:
    """(metrics, the net to export, the card's ensemble entry or None) of the final model."""
    fitted, source, classes = final.model, final.source, index.classes
    if final.members:  # the ensemble is the model: metrics, export and parity are of its one graph
        from .ensemble import ensemble_net, latency_ms

        net = ensemble_net(final.members)
        metrics = {"val": evaluate_ensemble(final.members, index.val, len(classes))}
        if index.test:
            metrics["test"] = evaluate_ensemble(final.members, index.test, len(classes))
        ensemble_card = {
            **((final.search or {}).get("ensemble") or {}),
            "members": [{"name": m.name, "model": m.source.label, "weight": round(m.weight, 4), "description": m.description,
                         "kind": m.fitted.training.get("kind"), "frozen_stages": m.fitted.training.get("frozen_stages")}
                        for m in final.members],
            "latency_ms_batch1_pytorch_cpu": {"single": latency_ms(fitted.net, source.data_config),
                                               "ensemble": latency_ms(net, source.data_config)},
            # reported only (decides nothing): what the selected trial alone would have scored
            "single_model_metrics": {k: evaluate(fitted, split, len(classes), confusion=False)
                                     for k, split in (("val", index.val), ("test", index.test)) if split},
        }
    else:
        net, ensemble_card = fitted.net, None
        metrics = {"val": evaluate(fitted, index.val, len(classes))}
        if index.test:
            metrics["test"] = evaluate(fitted, index.test, len(classes))
    return metrics, net, ensemble_card


def _record_phases(extra: dict, run: Run) -> None:
    """The card's ``phases`` (seconds per phase, exclusive, in run order), ``wall_seconds`` (since
    ``Run.open``): what the time went to; the phases sum to at most the wall time. And the memory
    high-water mark when each phase ended, with the phase that set the peak."""
    extra["phases"] = run.phases.to_json()
    extra["phase_peak_rss_mb"] = dict(run.phases.peak_mb)
    extra["peak_rss_phase"] = run.phases.peak_phase
    extra["wall_seconds"] = round(run.seconds(), 2)


def publish(run: Run, final: FinalModel, *, scoring: dict | None = None, quantize: str | None = None) -> FitResult:
    """Evaluate, export, verify and describe the final model (and its int8 twin with ``quantize="int8"``);
    write the card, ``result.json`` and the report."""

    index, fitted, run_dir = run.index, final.model, run.run_dir
    source = final.source  # the graph's input: its preprocessing is the card's
    classes = index.classes
    with run.phase("evaluation"):
        metrics, net, ensemble_card = _evaluate_final(final, index)
        run.release_caches()
    _label_roles(metrics, searched=final.search is not None)
    estimate = headline_estimate(metrics, final.search)
    with run.phase("export+parity"), _card_set_aside(run_dir):
        parity = export_and_verify(net, source, run_dir, index.val)
    model_sha256 = file_sha256(run_dir / "model.onnx")
    preprocessing = {k: list(v) if isinstance(v, tuple) else v for k, v in source.data_config.items()}
    with run.phase("int8") if quantize else contextlib.nullcontext():
        int8 = _int8(run_dir, preprocessing, index, quantize, run.seed, trained_on_val=final.search is not None)
    training = {**fitted.training, **final.notes}
    decided = dict(final.decided_by)
    for name, note in (final.notes.get("strategies") or {}).items():
        if isinstance(note, dict) and note.get("decided_by"):
            decided[f"strategy_{name}"] = note["decided_by"]
    card = ModelCard(
        classes=classes,
        preprocessing=preprocessing,
        source_model={"name": source.label, "weights_origin": source.weights_origin,
                      **({"datl_p_s": p_s} if (p_s := datl_prior(scoring, source.label, final.notes.get("strategies"))) else {}),
                      # every candidate that was scored, with where its weights came from
                      "candidates": [{"name": row["model"], "weights_origin": row["weights_origin"]}
                                     for row in (scoring or {}).get("models") or []]},
        frozen_stages=fitted.training.get("frozen_stages"),
        metrics={k: {kk: vv for kk, vv in v.items() if kk != "confusion"} for k, v in metrics.items()},
        estimate=estimate.to_json(),
        training=training,
        # the lists of skipped files and duplicates live in data.json; the card keeps their counts
        data={**{k: v for k, v in index.to_json().items() if k not in ("skipped", "duplicates")},
              "n_skipped": len(index.skipped)},
        parity=parity,
        extra={"decided_by": decided, **({"search": final.search} if final.search else {}),
               **({"ensemble": ensemble_card} if ensemble_card else {}), **int8},
        model_sha256=model_sha256,
    )
    card_path = run_dir / CARD_NAME
    _record_phases(card.extra, run)
    card.save(card_path)
    (run_dir / PREVIOUS_CARD).unlink(missing_ok=True)
    atomic_write_json(run_dir / "config.json", {"autotl_version": __version__, "data_dir": str(index.source),
                                                 "source_model": str(source.spec), "train_config": fitted.training})
    atomic_write_json(run_dir / "history.json", [asdict(h) for h in fitted.history])
    atomic_write_json(run_dir / "data.json", index.to_json())
    res = FitResult(
        run_dir=run_dir, model_path=run_dir / "model.onnx", card_path=card_path, classes=classes,
        source_model=source.label, weights_origin=source.weights_origin, training=training, metrics=metrics,
        parity=parity, data=index.to_json(), seconds=run.seconds(), search=final.search, scoring=scoring,
        estimate=estimate.to_json(), phases=run.phases.to_json(),
    )
    atomic_write_json(run_dir / "result.json", res.to_json())
    from .report import try_write_report

    with run.phase("report"):
        try_write_report(run_dir)
    # the report's own time is known only now: card and result.json get the complete phases
    _record_phases(card.extra, run)
    card.save(card_path)
    res.seconds, res.phases = card.extra["wall_seconds"], card.extra["phases"]
    atomic_write_json(run_dir / "result.json", res.to_json())
    val = metrics["val"]
    held = " (val trained on: not held out)" if final.search else ""
    _console.log(f"[bold]estimate for new images: {estimate.line()}[/]")
    _console.log(f"[bold green]done[/] in {res.seconds:.0f}s ({run.phases.line()}) — val accuracy {val['accuracy']:.4f}{held}, macro-F1 {val['macro_f1']:.4f}"
                 + (f"; cross-validated {final.search['objective']} {final.search['best']['value']:.4f}" if final.search else "")
                 + (f"; test accuracy {metrics['test']['accuracy']:.4f}" if "test" in metrics else "")
                 + f"; ONNX parity max|Δ| {parity.get('max_abs_diff', float('nan')):.2e} → {res.model_path}")
    return res
