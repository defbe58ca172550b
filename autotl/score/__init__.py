"""``autotl score``: rank candidate source models before training anything.

For every candidate, ONE forward pass over the target *training* split (never val/test) yields
the pooled penultimate features and the source-head logits (``FeatureExtractor.extract``, cached
on disk so the training that follows reuses it). From those arrays only:

- **DATL weights** (Ngiam et al. 2018): P_t(y) = mean source-head softmax over the target images,
  P_s(y) = source label prior, w(y) = P_t(y) / P_s(y) per source class. P_s for an ImageNet-1k
  head is *uniform*: the true ILSVRC-2012 class counts are not bundled, and the prior's origin
  string (in scoring.json and every report) says so. Other heads take a class-count file
  (``prior_files`` / ``--prior MODEL=counts.csv``), else uniform, again said so. The scalar DATL
  relevance score is KL(P_t || P_s) in nats (0 = the source head sees nothing specific in the
  target; larger = the target concentrates on a few identifiable source classes). P_t, P_s and w
  are saved per model in ``<run>/datl/<model>.npz``; ``load_datl_weights`` reads them back.
- **LogME** (evidence maximisation on the pooled features), **LEEP** (from the source-class
  probabilities) and the **shrinkage H-score** (Ledoit-Wolf), all "higher = more transferable".

**Ranking rule.** A rule is a set of metrics; models are ordered by their mean rank across those
metrics (``transferability.combine_ranks``; ties keep the order given). ``DEFAULT_RULE`` is ``"logme"``,
picked by ``bench/scoring.py`` (table at ``_rules.DEFAULT_RULE``).

Use from ``fit``: score the candidates with the extractors training will use, keep the top k::

    report = score_models(index, sources, run_dir=run_dir, extractors=extractors, cuts=cuts)
    best = report.top_k(k)            # ScoreRow objects: .label, .source, .extractor
    scoring = report.to_json()        # for FitResult.scoring / the model card

Modules: ``_compute`` (feature pass + metrics, ``score_models``, ``score``), ``_rules`` (ranking),
``_row`` (one model's scores), ``_report`` (the ranked report, JSON), ``_datl_files`` (``datl/*.npz``), ``_text`` (tables for people).
"""

from __future__ import annotations

from ._compute import default_models, default_score_dir, parse_priors, score, score_models
from ._datl_files import load_datl_weights, safe_label
from ._report import ScoreReport
from ._row import ScoreRow
from ._rules import DEFAULT_RULE, METRIC_TITLES, METRICS, RULES, rank_rows
from ._text import TOP_CLASSES

__all__ = ["METRICS", "METRIC_TITLES", "RULES", "DEFAULT_RULE", "TOP_CLASSES", "ScoreRow", "ScoreReport",
           "score_models", "score", "rank_rows", "load_datl_weights", "parse_priors", "default_models",
           "default_score_dir", "safe_label"]
