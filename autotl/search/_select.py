"""Picking the winner: the one-standard-error rule toward the simpler, cheaper strategy.

Trial scores are means over cross-validation folds, and on small data two strategies a fraction
of a standard error apart are the same strategy as far as the data can tell. Taking the raw
maximum then rewards whichever complex strategy got lucky on the folds. The rule (Breiman et al.;
Hastie, Tibshirani & Friedman, ESL §7.10): among the trials whose mean is within one standard
error of the best mean, take the simplest — fewest trainable stages, then no retrieval, no
dropout, no regulariser, then the higher-ranked source model — and among equally simple ones the
best mean. (Trial seconds are not a tie-break: among probes they differ by noise, and picking the
faster of two equally simple trials picked a lower score — measured on the suite's fmnist20.)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..strategy import create_strategies


def _num(v: Any, default: float = 0.0) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def complexity(params: dict[str, Any], user_attrs: dict[str, Any], candidates: Sequence[str] = ()) -> tuple:
    """A sort key: smaller = simpler / cheaper (see the module docstring for the order)."""
    frozen, n = user_attrs.get("frozen"), user_attrs.get("num_stages")
    trainable = (int(n) - int(frozen)) if frozen is not None and n is not None else 0
    active = {s.name for s in create_strategies() if s.is_active(params)}
    regularised = params.get("regularizer", "none") not in (None, "none")
    model = params.get("model")
    rank = list(candidates).index(model) if model in candidates else 0
    return (trainable, "retrieval" in active, len(active - {"retrieval"}), regularised, bool(params.get("dtnh")), rank)


def standard_error(user_attrs: dict[str, Any]) -> float:
    """The trial score's standard error (stored by the objective; 0 when unknown)."""
    return max(0.0, _num(user_attrs.get("value_se")))


def select_one_se(trials: Sequence[Any], params_of, candidates: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """``(winner, how)`` among COMPLETE trials with a value; ``(None, {})`` when there is none.

    ``params_of(trial)`` gives a trial's parameters by target (the recipe's mapping). ``how`` says
    which trial had the best mean, the bar, and which trials were within it.
    """
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    if not done:
        return None, {}
    best = max(done, key=lambda t: (t.value, -_num(t.user_attrs.get("val_loss")), -t.number))
    se = standard_error(best.user_attrs)
    bar = best.value - se
    within = [t for t in done if t.value >= bar - 1e-12]
    winner = min(within, key=lambda t: (complexity(params_of(t), t.user_attrs, candidates), -t.value, t.number))
    return winner, {
        "rule": "one standard error toward the simpler strategy",
        "best_mean_trial": best.number, "best_mean": best.value, "best_se": se, "bar": bar,
        "within_one_se": sorted(t.number for t in within), "selected": winner.number,
    }
