"""Picking the winner: the one-standard-error rule toward the prior, then the simpler strategy.

Trial scores are means over cross-validation folds, and on small data two strategies a fraction
of a standard error apart are the same strategy as far as the data can tell. Taking the raw
maximum then rewards whichever strategy got lucky on the folds. The rule (Breiman et al.;
Hastie, Tibshirani & Friedman, ESL §7.10): among the trials whose mean is within one standard
error of the best mean (the best mean: ties broken by the lower out-of-fold log loss), take the
one the recipe's portfolio ranks first — the portfolio is ordered by what won on development tasks
(bench/portfolio.py), evidence from outside this data set that the folds cannot overturn within
their own noise — then the simplest: fewest trainable stages, then no retrieval, fewer other
strategies, no regulariser, no DTNH; among equally simple ones the best mean. (The source model's
ranking is not a tie-break: LogME orders the packaged models opposite to their fine-tuned accuracy
in bench/results/scoring.json. Nor are trial seconds: among probes they differ by noise, and
picking the faster of two equally simple trials picked a lower score on the suite's fmnist20.)

Accuracy on a few dozen scored images moves in steps of one image, so "within one standard error"
can put a trial that is clearly worse in *probability* among the equals (a log loss of 0.34 next
to 0.05, one image apart in accuracy). Where trials keep their out-of-fold probabilities, a trial
is an equal only if its per-image out-of-fold log loss is not worse than the best-mean trial's by
more than two paired standard errors (the same scored images, so the difference is paired).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..strategy import create_strategies


def _num(v: Any, default: float = 0.0) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def complexity(params: dict[str, Any], user_attrs: dict[str, Any]) -> tuple:
    """A sort key: smaller = simpler / cheaper (see the module docstring for the order)."""
    frozen, n = user_attrs.get("frozen"), user_attrs.get("num_stages")
    trainable = (int(n) - int(frozen)) if frozen is not None and n is not None else 0
    active = {s.name for s in create_strategies() if s.is_active(params)}
    regularised = params.get("regularizer", "none") not in (None, "none")
    return (trainable, "retrieval" in active, len(active - {"retrieval"}), regularised, bool(params.get("dtnh")))


def standard_error(user_attrs: dict[str, Any]) -> float:
    """The trial score's standard error (stored by the objective; 0 when unknown)."""
    return max(0.0, _num(user_attrs.get("value_se")))


PAIRED_LOSS_SE = 2.0  # a log loss worse by more than this many paired SEs is a real difference


def _per_image_loss(trial, labels) -> Any:
    from ..ensemble import PROB_FLOOR, decode_probs

    text = trial.user_attrs.get("oof")
    if not text or labels is None:
        return None
    probs = decode_probs(text)
    if len(probs) != len(labels):
        return None
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], PROB_FLOOR, 1.0))


def clearly_worse_in_loss(trial, best, labels) -> bool:
    """True when ``trial``'s out-of-fold log loss exceeds ``best``'s by more than ``PAIRED_LOSS_SE``
    paired standard errors (False when either lacks out-of-fold probabilities)."""
    a, b = _per_image_loss(trial, labels), _per_image_loss(best, labels)
    if a is None or b is None or len(a) < 2:
        return False
    d = a - b
    return bool(d.mean() > PAIRED_LOSS_SE * d.std(ddof=1) / math.sqrt(len(d)) + 1e-12)


def portfolio_rank(portfolio: Sequence[dict[str, Any]]):
    """A trial → the position of the first portfolio entry it matches (its dimensions' values), or
    ``len(portfolio)`` when none: the recipe's portfolio is ordered by what won on the development
    tasks, a prior the one-standard-error rule prefers among equals."""
    def rank(trial) -> int:
        for i, entry in enumerate(portfolio):
            if all(k in trial.params and _equal(trial.params[k], v) for k, v in entry.items()):
                return i
        return len(portfolio)
    return rank


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def select_one_se(trials: Sequence[Any], params_of, *, oof_labels: Sequence[int] | None = None, prior=None) -> tuple[Any, dict[str, Any]]:
    """``(winner, how)`` among COMPLETE trials with a value; ``(None, {})`` when there is none.

    ``params_of(trial)`` gives a trial's parameters by target (the recipe's mapping). ``prior(trial)``
    (optional, smaller = preferred; e.g. ``portfolio_rank``) orders the equals before simplicity does.
    ``how`` says which trial had the best mean, the bar, and which trials were within it.
    """
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    if not done:
        return None, {}
    labels = None if oof_labels is None else np.asarray(oof_labels, dtype=int)

    def mean_loss(t) -> float:
        loss = _per_image_loss(t, labels)
        return float(loss.mean()) if loss is not None else 0.0

    # equal means (a few dozen images: frequent) -> the lower out-of-fold log loss is the best mean
    best = max(done, key=lambda t: (t.value, -mean_loss(t), -t.number))
    se = standard_error(best.user_attrs)
    bar = best.value - se
    within = [t for t in done if t.value >= bar - 1e-12]
    worse = [t for t in within if t.number != best.number and clearly_worse_in_loss(t, best, labels)]
    equals = [t for t in within if t not in worse]
    winner = min(equals, key=lambda t: ((prior(t) if prior is not None else 0),
                                        complexity(params_of(t), t.user_attrs), -t.value, t.number))
    return winner, {
        "rule": "one standard error toward the portfolio's prior, then the simpler strategy",
        "best_mean_trial": best.number, "best_mean": best.value, "best_se": se, "bar": bar,
        "within_one_se": sorted(t.number for t in within), "selected": winner.number,
        "worse_in_log_loss": sorted(t.number for t in worse),
        "order_among_equals": ("the recipe's portfolio order (what won on the development tasks), then "
                               "the simpler strategy" if prior is not None else "the simpler strategy"),
    }
