"""The order a search spends its budget in: the cheap family first, fine-tunes on evidence.

A solved probe trial (``frozen_stages: all``) costs a fraction of a second; a fine-tune seconds to
minutes, and on small sets it has not won once in ``bench/suite.py`` (45 selections) while its
pruned and not-started trials took a fifth of the search. So the study samples only the cheap
family until the sampler has *covered* it: ``COVERED_AFTER`` of its own cheap proposals in a row
(the portfolio's entries are not the sampler's) found no better value, repeats of measured
configurations included. Then fine-tunes may be sampled as long as they have taken under
``FINETUNE_SHARE`` of the time spent in trials, and for good once one of them beats the best
probe (evidence). On the cheap family alone, the study stops when ``STOP_REPEATS`` of the last
``REPEAT_WINDOW`` cheap proposals repeated measured configurations: the sampler has converged and
the rest of the budget would buy little.

The stage is a function of the study's trials (a resumed study picks up where it was); it reaches
the sampler through Optuna's ``PartialFixedSampler``, which fixes ``frozen_stages`` to ``all``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from .._recipe import FROZEN, Recipe
from ._distributed import OVER_BUDGET

CHEAP = "all"  # the frozen_stages value of the cheap family: a linear probe on frozen features
COVERED_AFTER = 8  # the sampler's cheap proposals in a row without a better value: the family is covered
# of the time spent in trials, what fine-tunes may take while none beats the best probe: on the
# suite's small sets, a fine-tune pruned after a fold or two every few dozen probe trials
FINETUNE_SHARE = 0.1
REPEAT_WINDOW = 10  # the last cheap proposals the stop looks at ...
STOP_REPEATS = 5  # ... and how many of them must have repeated measured configurations


@dataclass(frozen=True)
class Stage:
    """Where a study is, and why: which family the sampler draws from, whether to stop."""

    kind: str  # "uncovered" | "evidence" | "share" | "cheap" | "converged"
    why: str

    @property
    def cheap_only(self) -> bool:
        return self.kind in ("uncovered", "cheap", "converged")

    @property
    def stop(self) -> bool:
        return self.kind == "converged"


def is_repeat(trial) -> bool:
    """A trial not started because a complete trial already measured its parameters."""
    return "not_started" in trial.user_attrs and not trial.user_attrs.get(OVER_BUDGET)


def stage_of(trials) -> Stage:
    """The stage after ``trials`` (Optuna ``FrozenTrial``s of the study)."""
    from optuna.trial import TrialState

    best_cheap = best_tune = -math.inf
    quiet = 0
    covered = False
    seconds = tune_seconds = 0.0
    recent: list[bool] = []  # whether each cheap proposal since coverage repeated a measured one
    for t in sorted(trials, key=lambda t: t.number):
        if not t.state.is_finished():
            continue
        value = t.value if t.state == TrialState.COMPLETE and t.value is not None else None
        took = t.duration.total_seconds() if t.duration is not None else 0.0
        seconds += took
        if t.params.get(FROZEN, CHEAP) != CHEAP:
            tune_seconds += took
            if value is not None:
                best_tune = max(best_tune, value)
            continue
        if value is not None and value > best_cheap:
            best_cheap, quiet = value, 0
        elif (value is not None or is_repeat(t)) and not t.user_attrs.get("baseline"):
            quiet += 1
        if covered:
            recent.append(is_repeat(t))
        covered = covered or quiet >= COVERED_AFTER
    if not covered:
        return Stage("uncovered", f"the cheap family alone until {COVERED_AFTER} of the sampler's "
                     f"proposals in a row find no better value ({quiet} so far)")
    if best_tune > best_cheap:
        return Stage("evidence", f"a fine-tune beat the best probe ({best_tune:.4f} > {best_cheap:.4f}): "
                     "fine-tunes stay")
    spent = f"fine-tunes took {tune_seconds:.0f}s of the {seconds:.0f}s in trials"
    if tune_seconds < FINETUNE_SHARE * seconds:
        return Stage("share", f"the cheap family is covered; {spent}, under their "
                     f"{FINETUNE_SHARE:.0%} share: fine-tunes may be sampled")
    repeats = sum(recent[-REPEAT_WINDOW:])
    if repeats >= STOP_REPEATS:
        return Stage("converged", f"{repeats} of the last {REPEAT_WINDOW} proposals repeated measured "
                     "configurations: the sampler has converged")
    return Stage("cheap", f"{spent}, their {FINETUNE_SHARE:.0%} share, and "
                 + ("none beat" if best_tune > -math.inf else "none completed to challenge")
                 + f" the best probe ({best_cheap:.4f}): the cheap family alone")


def schedule_for(study, recipe: Recipe, fixed: dict[str, Any], log=None) -> FamilySchedule | None:
    """The study's family schedule (``run_study`` and every ``autotl worker``), or None when the space
    has one family only: a user's flag fixed ``frozen_stages``, or the budget left one."""
    dim = recipe.dimension(FROZEN)
    if FROZEN in fixed or dim is None or dim.kind != "categorical" or CHEAP not in dim.choices or len(dim.choices) < 2:
        return None
    return FamilySchedule(study, log=log)


class FamilySchedule:
    """An ``optimize`` callback (and the starting point of a resumed study): sets the study's sampler
    to the stage's family, records the first time each stage is reached (and logs it), and stops
    the study when the stage says so."""

    def __init__(self, study, log=None):
        import optuna

        self.base = study.sampler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.cheap_sampler = optuna.samplers.PartialFixedSampler({FROZEN: CHEAP}, self.base)
        self.log = log
        self.stopped = False
        self.changes: list[dict[str, Any]] = []
        self.apply(study)

    def apply(self, study) -> Stage:
        trials = study.get_trials(deepcopy=False)
        stage = stage_of(trials)
        study.sampler = self.cheap_sampler if stage.cheap_only else self.base
        if stage.kind not in {c["stage"] for c in self.changes}:
            n = sum(t.state.is_finished() for t in trials)
            self.changes.append({"after_trials": n, "stage": stage.kind, "cheap_only": stage.cheap_only, "why": stage.why})
            if self.log is not None and stage.kind != "uncovered":
                self.log(("search stops: " if stage.stop else "") + stage.why)
        if stage.stop:
            self.stopped = True
            study.stop()
        return stage

    def __call__(self, study, trial) -> None:
        self.apply(study)
