"""The order a search spends its budget in: the cheap family first, fine-tunes on evidence.

A solved probe trial (``frozen_stages: all``) costs a fraction of a second; a fine-tune seconds to
minutes, and on small sets it has not won once in ``bench/suite.py`` while its pruned and
not-started trials took a fifth of the search. So the study samples only the cheap family until
that family is *covered* (``COVERED_AFTER`` cheap trials in a row found no better value, repeats of
measured configurations included); then the whole space. Under a time budget the fine-tunes keep
their place only on evidence: until they have spent ``FINETUNE_SHARE`` of the budget, or for good
once one of them beats the best probe. Back on the cheap family alone, the study stops when
``STOP_AFTER_REPEATS`` proposals in a row repeated measured configurations: the sampler has nothing
new to try, and the rest of the budget would buy nothing.

The stage is a function of the study's trials (a resumed study picks up where it was); it reaches
the sampler through Optuna's ``PartialFixedSampler``, which fixes ``frozen_stages`` to ``all``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .._recipe import FROZEN, Recipe
from ._cost import MAX_TRIAL_SHARE
from ._distributed import OVER_BUDGET

CHEAP = "all"  # the frozen_stages value of the cheap family: a linear probe on frozen features
COVERED_AFTER = 8  # cheap trials in a row without a better value: the cheap family is covered
# of the time budget, what fine-tunes may spend before one must beat the best probe: room for the
# largest trial the budget allows (``_cost``), or for a few smaller ones
FINETUNE_SHARE = MAX_TRIAL_SHARE
STOP_AFTER_REPEATS = 5  # proposals in a row that repeat measured configurations: nothing new to try


@dataclass(frozen=True)
class Stage:
    """Where a study is: which family the sampler draws from, and whether to stop."""

    cheap_only: bool
    stop: bool
    why: str


def is_repeat(trial) -> bool:
    """A trial not started because a complete trial already measured its parameters."""
    return "not_started" in trial.user_attrs and not trial.user_attrs.get(OVER_BUDGET)


def stage_of(trials, budget: float | None) -> Stage:
    """The stage after ``trials`` (Optuna ``FrozenTrial``s of the study) under ``budget`` seconds."""
    from optuna.trial import TrialState

    best_cheap = best_tune = -math.inf
    quiet = repeats = 0
    covered = False
    tune_seconds = 0.0
    for t in sorted(trials, key=lambda t: t.number):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        value = t.value if t.state == TrialState.COMPLETE and t.value is not None else None
        if t.params.get(FROZEN, CHEAP) == CHEAP:
            if value is not None and value > best_cheap:
                best_cheap, quiet = value, 0
            elif value is not None or is_repeat(t):
                quiet += 1
            repeats = repeats + 1 if is_repeat(t) else 0
            covered = covered or quiet >= COVERED_AFTER
        else:
            tune_seconds += t.duration.total_seconds() if t.duration is not None else 0.0
            if value is not None:
                best_tune = max(best_tune, value)
            repeats = 0
    if not covered:
        return Stage(True, False, f"the cheap family is not covered yet ({quiet} of {COVERED_AFTER} trials in a row without a better value)")
    if best_tune > best_cheap:
        return Stage(False, False, f"a fine-tune beat the best probe ({best_tune:.4f} > {best_cheap:.4f})")
    if budget is None or tune_seconds < FINETUNE_SHARE * budget:
        return Stage(False, False, "the cheap family is covered: fine-tunes may be sampled"
                     + (f" ({tune_seconds:.0f}s of their {FINETUNE_SHARE * budget:.0f}s spent)" if budget else ""))
    why = (f"fine-tunes spent {tune_seconds:.0f}s ({FINETUNE_SHARE:.0%} of the {budget:.0f}s budget) without beating "
           f"the best probe ({best_tune:.4f} vs {best_cheap:.4f}): back to the cheap family")
    if repeats >= STOP_AFTER_REPEATS:
        return Stage(True, True, f"{repeats} proposals in a row repeated measured configurations: nothing new to try")
    return Stage(True, False, why)


def schedules(recipe: Recipe, fixed: dict[str, Any]) -> bool:
    """Whether the space has both families for the schedule to order (not when a user's flag fixed
    ``frozen_stages``, or the budget left only one family)."""
    dim = recipe.dimension(FROZEN)
    return (FROZEN not in fixed and dim is not None and dim.kind == "categorical"
            and CHEAP in dim.choices and len(dim.choices) > 1)


class FamilySchedule:
    """An ``optimize`` callback (and the starting point of a resumed study): sets the study's sampler
    to the stage's family, logs each change, and stops the study when the stage says so."""

    def __init__(self, study, budget: float | None, log=None):
        import optuna

        self.base = study.sampler
        self.cheap_sampler = optuna.samplers.PartialFixedSampler({FROZEN: CHEAP}, self.base)
        self.budget = budget
        self.log = log
        self.stage: Stage | None = None
        self.stopped = False
        self.changes: list[dict[str, Any]] = []
        self.apply(study)

    def apply(self, study) -> Stage:
        trials = study.get_trials(deepcopy=False)
        stage = stage_of(trials, self.budget)
        study.sampler = self.cheap_sampler if stage.cheap_only else self.base
        if self.stage is None or stage.cheap_only != self.stage.cheap_only or stage.stop:
            n = sum(t.state.is_finished() for t in trials)
            self.changes.append({"after_trials": n, "cheap_only": stage.cheap_only, "stop": stage.stop, "why": stage.why})
            if self.log is not None and (self.stage is not None or not stage.cheap_only):
                self.log(("search stops: " if stage.stop else "") + stage.why)
        self.stage = stage
        if stage.stop:
            self.stopped = True
            study.stop()
        return stage

    def __call__(self, study, trial) -> None:
        self.apply(study)
