"""``autotl score``: rank candidate source models before training anything (issue 3).

For every candidate, ONE forward pass over the target *training* split (never val/test) yields
the pooled penultimate features and the source-head logits (``FeatureExtractor.extract``, cached
on disk so the training that follows reuses it). From those arrays only:

- **DATL weights** (Ngiam et al. 2018): P_t(y) = mean source-head softmax over the target images,
  P_s(y) = source label prior, w(y) = P_t(y) / P_s(y) per source class. P_s for an ImageNet-1k
  head is *uniform*: the true ILSVRC-2012 class counts are not bundled (``scoring.imagenet_prior``
  says so in its origin string, and so does every report). Other heads take a class-count file
  (``prior_files`` / ``--prior MODEL=counts.csv``), else uniform, again said so. The scalar DATL
  relevance score is KL(P_t || P_s) in nats (0 = the source head sees nothing specific in the
  target; larger = the target concentrates on a few identifiable source classes). P_t, P_s and w
  are saved per model in ``<run>/datl/<model>.npz``; ``load_datl_weights`` reads them back.
- **LogME** (evidence maximisation on the pooled features), **LEEP** (from the source-class
  probabilities) and the **shrinkage H-score** (Ledoit-Wolf), all "higher = more transferable".

**Ranking rule.** A rule is a set of metrics; models are ordered by their mean rank across those
metrics (``scoring.combine_ranks``; ties keep the order given). ``DEFAULT_RULE`` is ``"logme"``,
picked by ``bench/scoring.py`` (Kendall tau between each rule and the validation accuracy after a
fixed fine-tuning protocol, on cats_vs_dogs and a 10 % subset of its training set; results in
``bench/results/scoring.json``; table at ``DEFAULT_RULE``).

Use from ``fit``: score the candidates with the extractors training will use, keep the top k::

    report = score_models(index, sources, run_dir=run_dir, extractors=extractors, cuts=cuts)
    best = report.top_k(k)            # ScoreRow objects: .label, .source, .extractor
    scoring = report.to_json()        # for FitResult.scoring / the model card
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import typer

from . import _console
from ._io import atomic_path, atomic_write_json
from .errors import AutotlError

METRICS = ("datl", "logme", "leep", "hscore")
METRIC_TITLES = {"datl": "DATL KL", "logme": "LogME", "leep": "LEEP", "hscore": "H-score"}

#: name -> metrics whose mean rank orders the models (rank 1 = best = highest score).
RULES: dict[str, tuple[str, ...]] = {
    "logme": ("logme",),
    "leep": ("leep",),
    "hscore": ("hscore",),
    "datl": ("datl",),
    "logme+leep": ("logme", "leep"),
    "logme+hscore": ("logme", "hscore"),
    "leep+hscore": ("leep", "hscore"),
    "logme+leep+hscore": ("logme", "leep", "hscore"),
    "all": ("datl", "logme", "leep", "hscore"),
}

#: The default ranking rule, chosen by measurement (bench/scoring.py -> bench/results/scoring.json),
#: not by taste. Kendall tau between each score and the validation accuracy after the fixed
#: fine-tuning protocol (last stage + head), 7 candidates (Lite0/1/2 native, Lite2@160, Lite0@128,
#: Lite0+reinit1, Lite0+reinit2):
#:
#:     score / rule         cats_vs_dogs (2000 train)   10 % subset (200 train)   mean
#:     LogME                +0.78                       +0.52                     +0.65
#:     H-score (shrinkage)  +0.78                       +0.52                     +0.65
#:     LogME + H-score      +0.78                       +0.52                     +0.65
#:     LogME + LEEP + H     +0.58                       +0.31                     +0.44
#:     LogME + LEEP         +0.35                       +0.10                     +0.22
#:     LEEP                  0.00                       -0.14                     -0.07
#:     DATL KL(P_t||P_s)    -0.39                       -0.33                     -0.36
#:
#: LogME and the shrinkage H-score ordered the 7 models identically on both datasets; LogME is
#: the default because the tie-break prefers one metric over two and then the order of RULES
#: (and for 2 classes the H-score is squeezed under its ceiling of K - 1 = 1: 0.94-0.99 here).
#: LEEP and the DATL score reward a *confident* ImageNet head: at a mismatched low resolution
#: the head is more peaked on cats and dogs while the fine-tuned accuracy drops, so both rank
#: those candidates too high. The DATL score says which source classes the target resembles
#: (what the DATL weights are for); it is not a transferability predictor and is not in the default.
DEFAULT_RULE = "logme"

TOP_CLASSES = 10  # source classes shown per model ("your images look like: ...")
SCORED_SPLIT_NOTE = "scored on the training split only; validation and test images are never used for scoring"


# --------------------------------------------------------------------------- report


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def safe_label(label: str) -> str:
    """A model label as a file name (``datl/<safe_label>.npz``)."""
    return re.sub(r"[^A-Za-z0-9_.@+\-]", "_", str(label)).strip(".") or "model"


@dataclass
class ScoreRow:
    """Every number ``autotl score`` knows about one candidate source model."""

    label: str
    spec: str
    weights_origin: str
    input_size: int
    params: int
    num_source_classes: int
    feature_dim: int
    n_images: int
    feature_pass_s: float  # wall time of the (single) feature pass; ~0 when it came from the cache
    forward_batches: int  # batches this call pushed through the backbone (0 = cache hit)
    metrics_s: float  # wall time of DATL + LogME + LEEP + H-score on the cached arrays
    scores: dict[str, float]  # METRICS -> value (NaN: not available, e.g. no source head)
    datl: dict[str, Any] | None = None  # score_name, score, top_mass_10, prior, top_classes
    notes: list[str] = field(default_factory=list)
    mean_rank: float = float("nan")
    rank: int = 0
    # not serialised: what fit reuses
    source: Any = field(default=None, repr=False, compare=False)
    extractor: Any = field(default=None, repr=False, compare=False)
    weights: Any = field(default=None, repr=False, compare=False)  # scoring.DatlWeights
    class_names: list[str] | None = field(default=None, repr=False, compare=False)

    @property
    def cached(self) -> bool:
        return self.forward_batches == 0

    @property
    def seconds(self) -> float:
        return self.feature_pass_s + self.metrics_s

    def looks_like(self, k: int = TOP_CLASSES) -> str:
        if not self.datl:
            return "(no source classifier)"
        return ", ".join(_short_name(t["name"]) for t in self.datl["top_classes"][:k])

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "model": self.label,
            "spec": self.spec,
            "weights_origin": self.weights_origin,
            "input_size": self.input_size,
            "params": self.params,
            "num_source_classes": self.num_source_classes,
            "feature_dim": self.feature_dim,
            "n_images": self.n_images,
            "feature_pass_s": round(self.feature_pass_s, 3),
            "forward_batches": self.forward_batches,
            "cached": self.cached,
            "metrics_s": round(self.metrics_s, 3),
            "scores": {k: _finite_or_none(v) for k, v in self.scores.items()},
            "mean_rank": _finite_or_none(self.mean_rank),
            "datl": self.datl,
            "notes": list(self.notes),
        }


def _short_name(name: str) -> str:
    """'tabby, tabby cat' -> 'tabby' (ImageNet descriptions list synonyms)."""
    return str(name).split(",")[0].strip()


def rank_rows(rows: Sequence[ScoreRow], rule: str) -> list[ScoreRow]:
    """Set ``mean_rank`` and ``rank`` of ``rows`` by ``rule``; returns them best first."""
    from .scoring import combine_ranks

    metrics = _rule_metrics(rule)
    rows = list(rows)
    if not rows:
        return rows
    mean = combine_ranks({str(i): {m: r.scores.get(m, float("nan")) for m in metrics} for i, r in enumerate(rows)},
                         list(metrics))
    for i, r in enumerate(rows):
        r.mean_rank = mean[str(i)]
    order = sorted(range(len(rows)), key=lambda i: (rows[i].mean_rank, i))  # ties: order given
    for pos, i in enumerate(order, start=1):
        rows[i].rank = pos
    return [rows[i] for i in order]


def _rule_metrics(rule: str) -> tuple[str, ...]:
    if rule not in RULES:
        raise AutotlError(f"--rule {rule!r}: unknown ranking rule; use one of {', '.join(RULES)}")
    return RULES[rule]


@dataclass
class ScoreReport:
    """Scores of every candidate, best first by ``rule``."""

    rows: list[ScoreRow]
    rule: str
    data: dict[str, Any]
    seconds: float
    run_dir: Path | None = None

    def ranking(self) -> list[str]:
        """Model labels, best first."""
        return [r.label for r in self.rows]

    def top_k(self, k: int) -> list[ScoreRow]:
        """The ``k`` best rows (each has ``.source`` and ``.extractor`` for training)."""
        if int(k) < 1:
            raise AutotlError(f"--top-k {k}: keep at least one source model (k >= 1)")
        return self.rows[: int(k)]

    def row(self, label: str) -> ScoreRow:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"no scored model {label!r}; scored: {', '.join(self.ranking())}")

    def rerank(self, rule: str) -> "ScoreReport":
        """The same scores ordered by another rule (no recomputation)."""
        self.rows = rank_rows(self.rows, rule)
        self.rule = rule
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": {"name": self.rule, "metrics": list(RULES[self.rule]), "default": DEFAULT_RULE,
                     "how": "models ordered by their mean rank across the rule's metrics (1 = best)"},
            "data": dict(self.data),
            "note": SCORED_SPLIT_NOTE,
            "metrics": {
                "datl": "KL(P_t || P_s) in nats; P_t = mean source-head softmax over the target training images, "
                        "P_s = source label prior; w(y) = P_t(y) / P_s(y) saved in datl/<model>.npz",
                "logme": "LogME log evidence per sample on pooled penultimate features (You et al. 2021)",
                "leep": "LEEP from source-head probabilities (Nguyen et al. 2020)",
                "hscore": "shrinkage H-score with Ledoit-Wolf covariance (Ibrahim et al. 2022)",
            },
            "ranking": self.ranking(),
            "models": [r.to_json() for r in self.rows],
            "seconds": round(self.seconds, 3),
        }

    def table(self):
        """A rich table (model, input size, params, feature-pass time, scores, rank); the DATL top
        classes are in ``looks_like_lines()``."""
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=f"source models ranked by '{self.rule}' ({' + '.join(METRIC_TITLES[m] for m in RULES[self.rule])})",
                  title_justify="left")
        t.add_column("rank", justify="right")
        t.add_column("model", no_wrap=True)
        t.add_column("input", justify="right")
        t.add_column("params", justify="right")
        t.add_column("pass s", justify="right")
        for m in METRICS:
            t.add_column(METRIC_TITLES[m], justify="right")
        t.add_column("mean rank", justify="right")
        for r in self.rows:
            t.add_row(
                str(r.rank), escape(r.label), str(r.input_size), f"{r.params / 1e6:.2f}M",
                "cached" if r.cached else f"{r.feature_pass_s:.1f}",
                *(_fmt(r.scores.get(m)) for m in METRICS), _fmt(r.mean_rank, 2),
            )
        priors = sorted({r.datl["prior"] for r in self.rows if r.datl})
        d = self.data
        t.caption = (f"{SCORED_SPLIT_NOTE} ({d.get('n_images')} images, {d.get('n_classes')} classes). "
                     f"Higher is better for every score. P_s: {'; '.join(priors) or 'n/a'}.")
        t.caption_justify = "left"
        return t

    def looks_like_lines(self, k: int = TOP_CLASSES) -> list[str]:
        """Per model: 'MODEL: your images look like: tabby (w=123), Egyptian cat (w=80), ...'."""
        out = []
        for r in self.rows:
            if not r.datl:
                out.append(f"{r.label}: no source classifier, no DATL weights")
                continue
            tops = ", ".join(f"{_short_name(c['name'])} (w={c['w']:.1f})" for c in r.datl["top_classes"][:k])
            out.append(f"{r.label}: your images look like: {tops}")
        return out

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``datl/<model>.npz`` (p_t, p_s, w, class_names) per model, then ``scoring.json``."""
        run_dir = Path(run_dir)
        for r in self.rows:
            if r.weights is None:
                continue
            path = run_dir / "datl" / f"{safe_label(r.label)}.npz"
            names = r.class_names or [str(i) for i in range(r.weights.p_t.size)]
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(
                        fh, p_t=r.weights.p_t, p_s=r.weights.p_s, w=r.weights.w,
                        class_names=np.array([str(n) for n in names]), model=np.array(r.label),
                        prior=np.array(r.datl["prior"]), score=np.array(r.weights.score),
                    )
        doc = self.to_json()
        for m in doc["models"]:
            if m["datl"] is not None:
                m["datl"]["weights_file"] = f"datl/{safe_label(m['model'])}.npz"
        out = atomic_write_json(run_dir / "scoring.json", doc)
        self.run_dir = run_dir
        return out


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def load_datl_weights(run_dir: str | os.PathLike, model_label: str) -> tuple[np.ndarray, list[str]]:
    """(w, source class names) saved by ``autotl score`` / ``fit`` for one model of a run."""
    folder = Path(run_dir) / "datl"
    path = folder / f"{safe_label(model_label)}.npz"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []
        raise AutotlError(
            f"{path}: no DATL weights for model {model_label!r} in this run"
            + (f" (have: {', '.join(have)})" if have else "")
            + "; run `autotl score` with --out on this run folder first"
        )
    with np.load(path, allow_pickle=False) as z:
        return np.array(z["w"], dtype=np.float64), [str(n) for n in z["class_names"]]


# --------------------------------------------------------------------------- scoring


def _resolve_prior(source, prior_path) -> tuple[np.ndarray, str, list[str]]:
    from .scoring import imagenet_prior, load_prior

    c = source.num_source_classes
    names = list(source.source_classes) if source.source_classes else [str(i) for i in range(c)]
    if prior_path is not None:
        return load_prior(prior_path, names), f"class counts from {prior_path}", names
    if c == 1000 and source.source_classes is not None:
        p, origin = imagenet_prior()
        return p, origin, names
    return (np.full(c, 1.0 / c), f"uniform (no class-count file for this {c}-class source head; "
            f"give --prior {source.label}=counts.csv)", names)


def _resolve_extractors(sources, extractors, cache_dir, device, batch_size):
    from .features import FeatureExtractor

    if extractors is None:
        if cache_dir is None:
            from .fit import default_cache_dir

            cache_dir = default_cache_dir()
        return [FeatureExtractor(s, device=device, cache_dir=cache_dir, batch_size=batch_size) for s in sources]
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


def score_models(
    index,
    sources: Sequence[Any],
    *,
    run_dir: str | os.PathLike | None = None,
    extractors: Mapping[str, Any] | Sequence[Any] | None = None,
    prior_files: Mapping[str, str | os.PathLike] | None = None,
    rule: str = DEFAULT_RULE,
    cuts: Sequence[int] = (),
    top: int = TOP_CLASSES,
    cache_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> "ScoreReport":
    """Score every source model on ``index.train`` with one feature pass each; rank by ``rule``.

    ``extractors``: ``FeatureExtractor`` per source (a mapping by label, or a list aligned with
    ``sources``); by default one per source on ``cache_dir`` (default: autotl's feature cache).
    Pass the ones training will use: their memory and disk caches then serve training without a
    second pass. ``cuts``: prefix activations to compute in the same pass (negative = from the
    end, as ``frozen_stages``: ``[-1]`` for a trial that trains the last stage). ``prior_files``:
    class-count file per model label (``"*"`` = every model without its own entry).
    ``run_dir``: where to save ``scoring.json`` and ``datl/<model>.npz``.
    """
    from .scoring import datl_weights, hscore, leep, logme, softmax
    from .stages import resolve_frozen

    start = time.monotonic()
    _rule_metrics(rule)
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

    rows = []
    for source, ext in zip(sources, exts):
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
            p_s, prior_origin, names = _resolve_prior(source, prior_files.get(source.label, prior_files.get("*")))
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
        rows.append(ScoreRow(
            label=source.label, spec=str(source.spec), weights_origin=source.weights_origin,
            input_size=int(size[-1]), params=source.num_params(), num_source_classes=source.num_source_classes,
            feature_dim=int(feats.shape[1]), n_images=len(train), feature_pass_s=t_pass,
            forward_batches=ext.forward_batches - before, metrics_s=time.monotonic() - t1, scores=scores,
            datl=datl, notes=notes, source=source, extractor=ext, weights=weights, class_names=names,
        ))
    rows = rank_rows(rows, rule)
    counts = {}
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
    from .models import DEFAULT_MODEL, list_packaged_models

    return list_packaged_models() or [DEFAULT_MODEL]


def parse_priors(values: Sequence[str]) -> dict[str, str]:
    """``--prior MODEL=FILE`` (one model) or ``--prior FILE`` (every model) -> {label or '*': path}."""
    from .models import ModelSpec

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
) -> ScoreReport:
    """Scan ``data_dir``, load the candidate models and score them (mirrors ``autotl score``).

    The split is the one ``fit`` makes with the same ``val_fraction`` and ``seed``: only its
    training part is read. With ``out`` the report and the DATL weights are saved there.
    """
    from .data import scan_dataset
    from .models import create_source_model, set_torch_threads
    from .train import pick_device

    _rule_metrics(rule)
    set_torch_threads()
    index = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed)
    _console.log(index.summary_table())
    sources = [create_source_model(m) for m in (list(models) or default_models())]
    for s in sources:
        _console.log(f"candidate [bold]{s.label}[/]: {s.weights_origin}")
    return score_models(index, sources, run_dir=out, prior_files=prior_files, rule=rule, cuts=cuts, top=top,
                        cache_dir=cache_dir, device=str(pick_device(device)))


# --------------------------------------------------------------------------- CLI


def _default_out(data_dir: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(data_dir).resolve().name}-score-{stamp}"


def score_command(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class, or train/ val/ \\[test/]."),
    model: List[str] = typer.Option([], "--model", "-m",
                                    help="Candidate timm model NAME\\[@SIZE]\\[+reinitK]\\[=CHECKPOINT|random]; repeatable "
                                         "(default: every model with packaged weights)."),
    rule: str = typer.Option(DEFAULT_RULE, "--rule", help=f"Ranking rule: {', '.join(RULES)}."),
    prior: List[str] = typer.Option([], "--prior",
                                    help="Source class-count file (CSV 'class,count' or JSON) as MODEL=FILE, or FILE "
                                         "for every model; ImageNet-1k heads default to a uniform prior."),
    top: int = typer.Option(TOP_CLASSES, "--top", help="Source classes shown per model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Folder for scoring.json and datl/<model>.npz (default runs/<data>-score-<time>)."),
    val_fraction: float = typer.Option(0.1, help="Validation share per class when there is no val/ folder (as fit)."),
    seed: int = typer.Option(0, help="Seed of the train/val split (as fit)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (default ~/.cache/autotl/features)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Rank candidate source models on DATA_DIR by DATL weights, LogME, LEEP and H-score (train split only)."""
    import json
    import sys

    _console.set_quiet(as_json)
    if top < 1:
        raise AutotlError(f"--top {top}: show at least one source class (--top 1 or more)")
    out = out if out is not None else _default_out(data_dir)
    report = score(data_dir, model, out=out, rule=rule, prior_files=parse_priors(prior), val_fraction=val_fraction,
                   seed=seed, device=device, cache_dir=cache_dir, top=top)
    if as_json:
        doc = report.to_json()
        doc["run_dir"] = str(out)
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        sys.stdout.flush()
        return
    console = _console.console
    width = console.width
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        console.width = max(width, 150)
    try:
        console.print(report.table())
        for line in report.looks_like_lines(top):
            console.print(line, markup=False)
    finally:
        console.width = width
    _console.console.print(f"best: {report.ranking()[0]}; saved {out / 'scoring.json'} and {out / 'datl'}/", markup=False)


__all__ = ["METRICS", "RULES", "DEFAULT_RULE", "ScoreRow", "ScoreReport", "score_models", "score", "score_command",
           "rank_rows", "load_datl_weights", "parse_priors", "default_models", "safe_label"]
