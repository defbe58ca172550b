"""Pruning a trial on the folds it has run, against the best trial on the same folds.

Every trial of a study is scored on the same folds (``_folds.Selection``), so after fold k a running
trial can be compared with the best complete trial *on those k folds*: a paired comparison, free of
the between-fold spread that makes an unpaired median rule prune good trials on a hard fold and keep
bad ones on an easy fold. A trial is pruned when its mean over the folds so far trails the best
trial's mean over the same folds by more than ``margin_se`` standard errors of the best trial's
mean, the error grown to what k folds can tell (``se * sqrt(n_folds / k)``). Solved probes report
no intermediate values (they run every fold at once), so this only ever stops trained trials —
the expensive ones, whose budget should go elsewhere once the evidence is against them.
"""

from __future__ import annotations

import math

import optuna


class PairedFoldPruner(optuna.pruners.BasePruner):
    """Prune when the running mean trails the best complete trial's mean on the same folds (module docstring)."""

    def __init__(self, margin_se: float = 1.0, min_folds: int = 1):
        if margin_se < 0:
            raise ValueError("margin_se must be >= 0")
        self.margin_se = float(margin_se)
        self.min_folds = max(1, int(min_folds))

    def prune(self, study: "optuna.study.Study", trial: "optuna.trial.FrozenTrial") -> bool:
        step = trial.last_step
        if step is None or step + 1 < self.min_folds:
            return False
        value = trial.intermediate_values[step]
        best = _best_complete(study)
        if best is None or best.number == trial.number:
            return False
        scores = best.user_attrs.get("fold_scores") or []
        k = step + 1
        if len(scores) < k:
            return False
        reference = sum(scores[:k]) / k
        se = float(best.user_attrs.get("value_se") or 0.0) * math.sqrt(len(scores) / k)
        return value < reference - self.margin_se * se - 1e-12


def _best_complete(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None
