"""Ranking rules: which metrics order the candidate models, and the mean-rank ordering itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import AutotlError

if TYPE_CHECKING:
    from ._row import ScoreRow

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


def rule_metrics(rule: str) -> tuple[str, ...]:
    """The metrics of ``rule``; ``AutotlError`` naming ``--rule`` when there is no such rule."""
    if rule not in RULES:
        raise AutotlError(f"--rule {rule!r}: unknown ranking rule; use one of {', '.join(RULES)}")
    return RULES[rule]


def rank_rows(rows: Sequence[ScoreRow], rule: str) -> list[ScoreRow]:
    """Set ``mean_rank`` and ``rank`` of ``rows`` by ``rule``; returns them best first."""
    from ..transferability import combine_ranks

    metrics = rule_metrics(rule)
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
