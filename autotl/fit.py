"""``autotl.fit``: data → source model(s) → training strategy → evaluation → verified ONNX."""

from __future__ import annotations

import datetime as _dt
import errno
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import _console
from ._io import atomic_write_json
from ._version import __version__
from .data import DatasetIndex, scan_dataset
from .errors import AutotlError
from .features import FeatureExtractor, ImageDataset, eval_transform
from .strategy import StrategyContext, apply_strategies
from .models import DEFAULT_MODEL, ModelSpec, SourceModel, create_source_model, set_torch_threads
from .train import TrainConfig, TrainResult, classification_metrics, confusion_matrix, pick_device, predict_logits

PARITY_IMAGES = 64


def default_cache_dir() -> Path:
    env = os.environ.get("AUTOTL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autotl" / "features"


@dataclass
class FitResult:
    """What ``autotl fit`` prints and ``autotl.fit`` returns."""

    run_dir: Path
    model_path: Path
    card_path: Path
    classes: list[str]
    source_model: str
    weights_origin: str
    strategy: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    parity: dict[str, Any]
    data: dict[str, Any]
    seconds: float
    search: dict[str, Any] | None = None
    scoring: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("run_dir", "model_path", "card_path"):
            d[k] = str(d[k])
        return d


def _load_sources(models: Sequence[str | ModelSpec]) -> list[SourceModel]:
    if not models:
        models = [DEFAULT_MODEL]
    return [create_source_model(m) for m in models]


def _run_dir(data_dir: Path, out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{data_dir.resolve().name}-{stamp}"


def evaluate(result: TrainResult, extractor: FeatureExtractor, samples, classes: list[str]) -> dict[str, Any]:
    """Metrics of a trained net on a list of samples (through the activation cache)."""
    if not samples:
        return {}
    acts = extractor.extract(samples, [result.net.frozen], description="eval features")
    logits = predict_logits(result.net, acts)
    m = classification_metrics(logits, acts.labels, len(classes))
    m["n"] = len(samples)
    m["confusion"] = confusion_matrix(logits, acts.labels, len(classes))
    return m


def export_and_verify(net: torch.nn.Module, source: SourceModel, run_dir: Path, val_samples) -> dict[str, Any]:
    """Write ``model.onnx`` and check it against PyTorch on up to 64 validation images."""
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


def fit(
    data_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    models: Sequence[str | ModelSpec] = (),
    frozen_stages: int | str = "all",
    epochs: int = 15,
    lr: float = 3e-3,
    batch_size: int = 64,
    objective: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | None = "auto",
    cache_dir: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    strategy: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    trials: int | None = None,
    time_budget: str | float | None = None,
    recipe: str | os.PathLike | None = None,
    resume: bool = False,
    storage: str | None = None,
    study: str | None = None,
    refit_on_val: bool = False,
    top_k: int | None = None,
) -> FitResult:
    """Fine-tune a pretrained model on a class-per-folder image set and export a verified ONNX model.

    Mirrors ``autotl fit``; returns the object the CLI prints. ``strategy`` holds fixed values of
    strategy parameters (e.g. ``{"dropout_tau": 3.0}``), ``options`` run-wide strategy options
    (e.g. ``{"source_pool": "pool/"}``).

    Without ``trials``, ``recipe`` and ``resume`` this trains the one strategy given by the
    arguments (a linear probe by default). With any of them it *searches* the strategy space of
    the recipe (``default`` unless named; see ``autotl.search``): ``trials`` trials in total (the
    recipe's count when not given) or until ``time_budget`` ("90s", "20m", "1h") is spent, the
    study in ``RUN_DIR/study.db`` (or ``storage``, any Optuna URL; study name ``study``), then
    refits the best strategy on train (train+val with ``refit_on_val``). ``resume`` continues an
    interrupted study in the same run folder; ``top_k`` limits the candidate models (in the
    order given). Ctrl-C raises ``autotl.search.SearchInterrupted`` (a KeyboardInterrupt).
    """
    start = time.monotonic()
    set_torch_threads()
    data_dir = Path(data_dir)
    index = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed)
    _console.log(index.summary_table())
    run_dir = _run_dir(data_dir, out)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)

    cfg = config or TrainConfig(frozen_stages=frozen_stages, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    cfg.objective = objective or (config.objective if config is not None else None) or pick_objective(index)
    sources = _load_sources(models)
    # Stage 1: rank the candidates (one feature pass each, on train only; the cache shares it with training).
    scoring = _score_sources(index, sources, run_dir, dev, cache_dir, cfg)
    ranked = [row.source for row in scoring.top_k(len(sources))]
    if trials is not None or recipe is not None or resume:
        from .search import search_fit

        reason = "" if objective or config is not None else (
            " (train classes imbalanced: largest/smallest > 1.5)" if cfg.objective == "macro_f1" else " (train classes balanced)")
        result = search_fit(index, run_dir, [str(s.spec) for s in ranked], cfg, start=start, device=dev,
                            cache_dir=cache_dir, trials=trials, time_budget=time_budget, recipe=recipe, resume=resume,
                            storage=storage, study_name=study, refit_on_val=refit_on_val, top_k=top_k,
                            fixed=dict(strategy or {}), options=options, seed=seed, objective_reason=reason)
        result.scoring = scoring.to_json()
        atomic_write_json(run_dir / "result.json", result.to_json())
        return result
    source = ranked[0]
    _console.log(f"source model [bold]{source.label}[/] — weights: {source.weights_origin}; device: {dev}")
    extractor = scoring.row(source.label).extractor
    ctx = StrategyContext(index, source, extractor, run_dir, cfg, list(index.train), options=dict(options or {}), final=True)
    apply_strategies(ctx, dict(strategy or {}))
    result = ctx.train_fn(source, ctx.train_samples, index.val, len(index.classes), ctx.config, extractor=extractor, device=dev)
    return finish(index, source, result, extractor, run_dir, start, scoring=scoring.to_json(),
                  strategy_extra={"strategies": ctx.notes, **(strategy or {})})


def _score_sources(index: DatasetIndex, sources: list[SourceModel], run_dir: Path, dev, cache_dir, cfg: TrainConfig):
    """DATL weights + transferability scores of every candidate, saved in the run dir, ranked."""
    from .score import score_models

    extractors = {s.label: FeatureExtractor(s, device=dev, cache_dir=cache_dir or default_cache_dir()) for s in sources}
    cuts = [cfg.frozen_stages] if isinstance(cfg.frozen_stages, int) else []
    report = score_models(index, sources, run_dir=run_dir, extractors=extractors, cuts=cuts)
    if len(sources) > 1:
        _console.log(report.table())
    for line in report.looks_like_lines():
        _console.log(line, markup=False)
    return report


def pick_objective(index: DatasetIndex) -> str:
    """Accuracy unless the training classes are imbalanced (largest/smallest > 1.5): macro-F1."""
    counts = [c["train"] for c in index.counts().values()]
    return "macro_f1" if counts and max(counts) > 1.5 * max(1, min(counts)) else "accuracy"


def finish(index: DatasetIndex, source: SourceModel, result: TrainResult, extractor: FeatureExtractor, run_dir: Path,
           start: float, *, search: dict | None = None, scoring: dict | None = None, strategy_extra: dict | None = None,
           decided_by: dict | None = None) -> FitResult:
    """Evaluate, export, verify and describe a trained model (shared by plain fit and the search)."""
    from .card import ModelCard

    classes = index.classes
    metrics = {"val": evaluate(result, extractor, index.val, classes)}
    if index.test:
        metrics["test"] = evaluate(result, extractor, index.test, classes)
    parity = export_and_verify(result.net, source, run_dir, index.val)
    strategy = {**result.config.to_dict(), "frozen_stages": result.net.frozen, "num_stages": result.net.num_stages,
                "stage_names": result.net.stage_names, "best_epoch": result.best_epoch, "cached_prefix": result.cached,
                "n_train": result.n_train, **(strategy_extra or {})}
    decided = decided_by or {
        "training": "train split",
        "early_stopping_and_model_selection": "val split",
        "test": "reported only, never used for a decision" if index.test else "no test split given",
    }
    for name, note in ((strategy_extra or {}).get("strategies") or {}).items():
        if isinstance(note, dict) and note.get("decided_by"):
            decided[f"strategy_{name}"] = note["decided_by"]
    card = ModelCard(
        classes=classes,
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in source.data_config.items()},
        source_model={"name": source.label, "weights_origin": source.weights_origin},
        frozen_stages=result.net.frozen,
        metrics={k: {kk: vv for kk, vv in v.items() if kk != "confusion"} for k, v in metrics.items()},
        strategy=strategy,
        data={**{k: v for k, v in index.to_json().items() if k != "skipped"}, "n_skipped": len(index.skipped)},
        parity=parity,
        extra={"decided_by": decided, **({"search": search} if search else {})},
    )
    card_path = run_dir / "model.json"
    card.save(card_path)
    atomic_write_json(run_dir / "config.json", {"autotl_version": __version__, "data_dir": str(index.root),
                                                 "source_model": str(source.spec), "train_config": result.config.to_dict()})
    atomic_write_json(run_dir / "history.json", [asdict(h) for h in result.history])
    atomic_write_json(run_dir / "data.json", index.to_json())
    res = FitResult(
        run_dir=run_dir, model_path=run_dir / "model.onnx", card_path=card_path, classes=classes,
        source_model=source.label, weights_origin=source.weights_origin, strategy=strategy, metrics=metrics,
        parity=parity, data=index.to_json(), seconds=time.monotonic() - start, search=search, scoring=scoring,
    )
    atomic_write_json(run_dir / "result.json", res.to_json())
    from .report import try_write_report

    try_write_report(run_dir)
    val = metrics["val"]
    _console.log(f"[bold green]done[/] in {res.seconds:.0f}s — val accuracy {val['accuracy']:.4f}, macro-F1 {val['macro_f1']:.4f}"
                 + (f"; test accuracy {metrics['test']['accuracy']:.4f}" if "test" in metrics else "")
                 + f"; ONNX parity max|Δ| {parity.get('max_abs_diff', float('nan')):.2e} → {res.model_path}")
    return res
