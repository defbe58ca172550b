"""Computing the scores: one feature pass per candidate, then DATL, LogME, LEEP and H-score."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import _console
from ..errors import AutotlError
from ._report import ScoreReport
from ._row import ScoreRow
from ._rules import DEFAULT_RULE, METRICS, rank_rows, rule_metrics
from ._text import TOP_CLASSES

#: P_s of an ImageNet-1k head: the ILSVRC-2012 per-class counts are not bundled (no verified
#: public list), so the prior is uniform and every report says so.
IMAGENET_PRIOR_ORIGIN = "uniform (ImageNet-1k class counts not bundled)"


def _check_options(rule: str, top: int) -> None:
    rule_metrics(rule)
    if top < 1:
        raise AutotlError(f"--top {top}: show at least one source class (--top 1 or more)")


def _resolve_prior(source, prior_path) -> tuple[np.ndarray, str, list[str]]:
    from ..transferability import load_prior

    c = source.num_source_classes
    names = list(source.source_classes) if source.source_classes else [str(i) for i in range(c)]
    if prior_path is not None:
        return load_prior(prior_path, names), f"class counts from {prior_path}", names
    uniform = np.full(c, 1.0 / c)
    if c == 1000 and source.source_classes is not None:
        return uniform, IMAGENET_PRIOR_ORIGIN, names
    return uniform, (f"uniform (no class-count file for this {c}-class source head; "
                     f"give --prior {source.label}=counts.csv)"), names


def _resolve_extractors(sources, extractors, cache_dir, device, batch_size):
    from ..features import DecodedImages, FeatureExtractor

    if extractors is None:
        from ..run import resolve_cache_dir

        cache_dir = resolve_cache_dir(cache_dir)
        given = {"batch_size": batch_size} if batch_size else {}  # else the extractor's (``features.FROZEN_BATCH``)
        # candidates that share one preprocessing (a run's do) share one decode of each image
        same = all(s.data_config == sources[0].data_config for s in sources)
        decoded = DecodedImages(cache_dir) if same and len(sources) > 1 else None
        return [FeatureExtractor(s, device=device, cache_dir=cache_dir, decoded=decoded, **given) for s in sources]
    if isinstance(extractors, Mapping):
        missing = [s.label for s in sources if s.label not in extractors]
        if missing:
            raise ValueError(f"extractors has no entry for {missing}")
        out = [extractors[s.label] for s in sources]
    else:
        out = list(extractors)
        if len(out) != len(sources):
            raise ValueError(f"{len(out)} extractors for {len(sources)} sources")
    for s, e in zip(sources, out):
        if e.source is not s:
            raise ValueError(f"extractor for {s.label} wraps another model ({e.source.label})")
    return out


def _metric(notes: list[str], name: str, fn, *args) -> float:
    try:
        value = float(fn(*args))
    except (ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
        notes.append(f"{name} not computed: {exc}")
        return float("nan")
    if not math.isfinite(value):
        notes.append(f"{name} is not finite")
        return float("nan")
    return value


def _score_one(source, ext, train, cuts, prior_path, top) -> ScoreRow:
    """The row of one candidate: its (cached) feature pass, then every metric on those arrays."""
    from ..transferability import datl_weights, hscore, leep, logme, softmax
    from ..stages import resolve_frozen

    if isinstance(cuts, Mapping):  # per candidate: the cuts its later trials read, computed in this pass
        cuts = cuts.get(source.label, ())
    want = sorted({resolve_frozen(int(c), ext.num_stages) for c in cuts})
    before = ext.forward_batches
    t0 = time.monotonic()
    acts = ext.extract(train, want, description="scoring features")
    t_pass = time.monotonic() - t0
    t1 = time.monotonic()
    notes: list[str] = []
    feats, y = acts.pooled, acts.labels
    scores = {m: float("nan") for m in METRICS}
    scores["logme"] = _metric(notes, "LogME", logme, feats, y)
    scores["hscore"] = _metric(notes, "H-score", hscore, feats, y)
    weights, datl, names = None, None, None
    logits = acts.source_logits
    if logits is not None and logits.shape[1] > 0 and not bool(np.isfinite(logits.numpy()).all()):
        notes.append("source-head logits are not finite: DATL and LEEP not available")
    elif logits is not None and logits.shape[1] > 0:
        probs = softmax(logits)
        scores["leep"] = _metric(notes, "LEEP", leep, probs, y)
        p_s, prior_origin, names = _resolve_prior(source, prior_path)
        weights = datl_weights(probs, p_s)
        scores["datl"] = weights.score
        datl = {
            "score_name": weights.score_name,
            "score": weights.score,
            "top_mass_10": weights.top_mass(10),
            "prior": prior_origin,
            "top_classes": [{"index": i, "name": n, "w": w, "p_t": p}
                            for i, n, w, p in weights.top_classes(top, names, by="w")],
        }
    else:
        notes.append("no source classifier: DATL and LEEP not available")
    size = source.data_config["input_size"]
    return ScoreRow(
        label=source.label, spec=str(source.spec), weights_origin=source.weights_origin,
        input_size=int(size[-1]), params=source.num_params(), num_source_classes=source.num_source_classes,
        feature_dim=int(feats.shape[1]), n_images=len(train), feature_pass_s=t_pass,
        forward_batches=ext.forward_batches - before, metrics_s=time.monotonic() - t1, scores=scores,
        datl=datl, notes=notes, source=source, extractor=ext, weights=weights, class_names=names,
    )


def score_models(
    index,
    sources: Sequence[Any],
    *,
    run_dir: str | os.PathLike | None = None,
    extractors: Mapping[str, Any] | Sequence[Any] | None = None,
    prior_files: Mapping[str, str | os.PathLike] | None = None,
    rule: str = DEFAULT_RULE,
    cuts: Sequence[int] | Mapping[str, Sequence[int]] = (),
    top: int = TOP_CLASSES,
    cache_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
) -> ScoreReport:
    """Score every source model on ``index.train`` with one feature pass each; rank by ``rule``.

    ``extractors``: ``FeatureExtractor`` per source (a mapping by label, or a list aligned with
    ``sources``); by default one per source on ``cache_dir`` (default: autotl's feature cache).
    Pass the ones training will use: their memory and disk caches then serve training without a
    second pass. ``cuts``: prefix activations to compute in the same pass (negative = from the
    end, as ``frozen_stages``: ``[-1]`` for a trial that trains the last stage), the same for every
    candidate or a mapping by candidate label. ``prior_files``:
    class-count file per model label (``"*"`` = every model without its own entry).
    ``run_dir``: where to save ``scoring.json`` and ``datl/<model>.npz``.
    """
    start = time.monotonic()
    _check_options(rule, top)
    sources = list(sources)
    if not sources:
        raise AutotlError("--model: no source model to score; give at least one --model NAME")
    labels = [s.label for s in sources]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise AutotlError(f"--model {dupes[0]}: given more than once; each candidate must be distinct")
    prior_files = dict(prior_files or {})
    unknown = [k for k in prior_files if k != "*" and k not in labels]
    if unknown:
        raise AutotlError(f"--prior {unknown[0]}=...: no such candidate model; use one of {', '.join(labels)} (or a bare FILE for all)")
    train = list(index.train)
    present = sorted({s.label for s in train})
    if len(present) < 2:
        raise AutotlError(f"{index.root}: the training split has {len(train)} images in {len(present)} class(es); "
                          "scoring needs images of at least two classes")
    exts = _resolve_extractors(sources, extractors, cache_dir, device, batch_size)
    from ..options import check_frozen_stages

    for source, ext in zip(sources, exts):  # --frozen-stages against each model, before any feature pass
        for c in (cuts.get(source.label, ()) if isinstance(cuts, Mapping) else cuts):
            check_frozen_stages(int(c), ext.num_stages, source.label)
    rows = [_score_one(source, ext, train, cuts, prior_files.get(source.label, prior_files.get("*")), top)
            for source, ext in zip(sources, exts)]
    rows = rank_rows(rows, rule)
    counts: dict[str, int] = {}
    for s in train:
        counts[index.classes[s.label]] = counts.get(index.classes[s.label], 0) + 1
    data = {"root": str(index.root), "split": "train", "n_images": len(train), "n_classes": len(present),
            "classes": list(index.classes), "train_counts": counts}
    report = ScoreReport(rows=rows, rule=rule, data=data, seconds=time.monotonic() - start)
    if run_dir is not None:
        report.save(run_dir)
    return report


def default_models() -> list[str]:
    """Candidates when none are named: every model with packaged (offline) weights."""
    from ..models import DEFAULT_MODEL, list_packaged_models

    return list_packaged_models() or [DEFAULT_MODEL]


def default_score_dir(data_dir: str | os.PathLike) -> Path:
    """Where ``autotl score`` saves when no --out is given: ``runs/<data>-score-<time>``."""
    from ..run import default_run_dir

    return default_run_dir(data_dir, "score")


def parse_priors(values: Sequence[str]) -> dict[str, str]:
    """``--prior MODEL=FILE`` (one model) or ``--prior FILE`` (every model) -> {label or '*': path}."""
    from ..models import ModelSpec

    out: dict[str, str] = {}
    for v in values:
        if "=" in v and not Path(v).exists():
            model, path = v.split("=", 1)
            spec = ModelSpec.parse(model) if model else None
            key = str(ModelSpec(spec.name, None, spec.input_size, spec.reinit)) if spec else "*"
        else:
            key, path = "*", v
        if key in out:
            raise AutotlError(f"--prior {v}: a prior file for {'every model' if key == '*' else key} was already given")
        out[key] = path
    return out


def score(
    data_dir: str | os.PathLike,
    models: Sequence[str] = (),
    *,
    out: str | os.PathLike | None = None,
    rule: str = DEFAULT_RULE,
    prior_files: Mapping[str, str | os.PathLike] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | None = "auto",
    cache_dir: str | os.PathLike | None = None,
    cuts: Sequence[int] = (),
    top: int = TOP_CLASSES,
    path_column: str | None = None,
    label_column: str | None = None,
) -> ScoreReport:
    """Scan ``data_dir``, load the candidate models and score them (mirrors ``autotl score``).

    The split is the one ``fit`` makes with the same ``val_fraction`` and ``seed``: only its
    training part is read. With ``out`` the report and the DATL weights are saved there.
    ``data_dir`` may be a label file (``path_column``/``label_column``: see ``autotl.fit``).
    """
    from ..data import scan_dataset
    from ..models import create_source_model, set_torch_threads
    from ..device import pick_device

    from ..options import check_score_options

    _check_options(rule, top)  # before the models load: a typo costs nothing
    check_score_options(out=out, val_fraction=val_fraction, seed=seed, device=device, cache_dir=cache_dir, cuts=cuts,
                        path_column=path_column, label_column=label_column, data_dir=data_dir)
    set_torch_threads()
    index = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed, path_column=path_column, label_column=label_column)
    _console.log(index.summary_table())
    sources = [create_source_model(m) for m in (list(models) or default_models())]
    for s in sources:
        _console.log(f"candidate [bold]{s.label}[/]: {s.weights_origin}")
    return score_models(index, sources, run_dir=out, prior_files=prior_files, rule=rule, cuts=cuts, top=top,
                        cache_dir=cache_dir, device=str(pick_device(device)))
