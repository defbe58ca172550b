"""Recipes: the strategy search space, declared in YAML (``recipes/*.yaml``).

A recipe names the trial count, the optional time budget, the sampler and pruner settings and
the *space*: one entry per dimension, keyed by its Optuna parameter name::

    trials: 20
    time_budget: 20m                       # optional; --time-budget overrides
    sampler: {n_startup_trials: 8}         # seeded multivariate TPE
    pruner: {type: median, n_startup_trials: 4, n_warmup_steps: 1}   # or hyperband / none
    baselines:                             # enqueued first in a new study
      - {frozen_stages: all, probe_lr: 0.003, probe_epochs: 15}
    space:
      model: {top_k: 2}                    # choose among the first 2 candidate source models
      frozen_stages: [all, -1, -2]         # a list = categorical choices
      lr: {low: 0.0003, high: 0.03, log: true}
      epochs: {low: 3, high: 10}           # two ints = an int range
      regularizer: {choices: [none, l2sp, kd], when: {frozen_stages: {not: all}}}
      l2sp_alpha: {param: reg_lambda, low: 0.001, high: 0.1, log: true, when: {regularizer: l2sp}}
      batch_size: 64                       # a plain value = fixed

Every dimension sets a *target*: a ``TrainConfig`` field, a registered strategy parameter
(``autotl.strategy.STRATEGIES``) or ``model``. The target is the key itself unless ``param:``
names another, so two dimensions may set the same field under mutually exclusive ``when``
clauses (e.g. different epoch ranges for probes and fine-tunes). ``when`` makes a dimension
conditional on earlier ones: ``{key: value}``, ``{key: [v1, v2]}`` or ``{key: {not: v}}``; a
dimension whose condition fails is not sampled (the field keeps its base value).

``frozen_stages`` is relative to the end so one recipe fits every architecture: ``all`` (linear
probe), ``-N`` (all but the last N stages frozen) or ``N >= 0`` (the first N frozen), clamped to
the stages a model has.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import AutotlError

MODEL = "model"
FROZEN = "frozen_stages"
RECIPE_SUFFIXES = (".yaml", ".yml")
_NOT_SEARCHABLE = {
    "objective": "the objective is chosen by --objective (values of different objectives do not compare)",
}
_DIM_KEYS = {"choices", "low", "high", "log", "step", "type", "value", "when", "param", "top_k"}
_TOP_KEYS = {"name", "description", "trials", "time_budget", "sampler", "pruner", "baselines", "space"}
_PRUNERS = ("median", "hyperband", "paired", "none")
_SAMPLER_KEYS = {"type", "n_startup_trials", "multivariate", "group", "seed"}
_PRUNER_KEYS = {"type", "n_startup_trials", "n_warmup_steps", "interval_steps", "min_resource", "max_resource",
                "reduction_factor", "margin_se", "min_folds"}


# --------------------------------------------------------------------------------------- durations
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s|)")


def parse_duration(text: str | float | int | None, what: str = "--time-budget") -> float | None:
    """Seconds in ``"90s"``, ``"20m"``, ``"1h"``, ``"1h30m"``, ``"1.5h"`` or a plain number (seconds)."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION_RE.finditer(s):
            if m.start() != pos:
                break
            seconds += float(m[1]) * {"h": 3600, "m": 60, "s": 1, "": 1}[m[2]]
            pos = m.end()
        if not s or pos != len(s):
            raise AutotlError(f"{what} {text!r}: give a duration like 90s, 20m, 1h or 1h30m")
    if not math.isfinite(seconds) or seconds <= 0:
        raise AutotlError(f"{what} {text!r}: the duration must be positive")
    return seconds


# --------------------------------------------------------------------------------------- frozen
def resolve_frozen_relative(value: int | str | None, num_stages: int) -> int:
    """Recipe ``frozen_stages`` → frozen stage count for a model with ``num_stages`` stages.

    ``all``/None → all; ``-N`` → all but the last N (0 when N exceeds the stages); ``N`` → N,
    clamped to ``num_stages``.
    """
    if value is None or value == "all":
        return num_stages
    n = int(value)
    return max(0, num_stages + n) if n < 0 else min(n, num_stages)


def _valid_frozen(v: Any) -> bool:
    return v == "all" or (isinstance(v, int) and not isinstance(v, bool))


# --------------------------------------------------------------------------------------- targets
def _train_fields() -> dict[str, Any]:
    from .train_config import TrainConfig

    base = TrainConfig()
    return {name: getattr(base, name) for name in TrainConfig.__dataclass_fields__}


def _strategy_params() -> set[str]:
    from .strategy import strategy_params

    return set(strategy_params())


def _allowed_values(target: str) -> tuple | None:
    if target == "regularizer":
        from .regularizers import list_regularizers

        return tuple(list_regularizers())
    if target == "optimizer":
        return ("adamw", "sgd")
    return None


# --------------------------------------------------------------------------------------- dimension
@dataclass(frozen=True)
class Condition:
    """``when`` clause of one dimension: the value of dimension ``key`` is (not) among ``values``."""

    key: str
    values: tuple
    negate: bool = False

    def holds(self, values: Mapping[str, Any]) -> bool:
        if self.key not in values:  # the dimension it depends on was not sampled
            return False
        inside = _contains(self.values, values[self.key])
        return not inside if self.negate else inside

    def to_json(self) -> dict:
        vals = list(self.values) if len(self.values) != 1 else self.values[0]
        return {self.key: {"not": vals} if self.negate else vals}


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _contains(choices: Iterable, value: Any) -> bool:
    return any(_same(c, value) for c in choices)


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) dimension: Optuna parameter ``name`` setting ``target``."""

    name: str
    target: str
    kind: str  # "categorical" | "int" | "float" | "fixed" | "model"
    choices: tuple = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    value: Any = None
    when: tuple[Condition, ...] = ()
    top_k: int | None = None  # model dimension: how many candidates

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(c.holds(values) for c in self.when)

    def suggest(self, trial, models: list[str] | None = None) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "model":
            choices = list(models or [])
            return choices[0] if len(choices) == 1 else trial.suggest_categorical(self.name, choices)
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def values_for_cache(self) -> list[Any]:
        """Every value this dimension can take (for ``frozen_stages``: which prefixes to cache)."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return []

    def contains(self, value: Any) -> bool:
        if self.kind == "fixed":
            return _same(value, self.value)
        if self.kind == "categorical":
            return _contains(self.choices, value)
        if self.kind in ("int", "float"):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high
        return True

    def to_json(self) -> dict:
        d: dict[str, Any] = {"param": self.target, "type": self.kind}
        if self.kind == "fixed":
            d["value"] = self.value
        elif self.kind == "categorical":
            d["choices"] = list(self.choices)
        elif self.kind == "model":
            d["top_k"] = self.top_k
        else:
            d.update(low=self.low, high=self.high, log=self.log, **({"step": self.step} if self.step else {}))
        if self.when:
            d["when"] = {k: v for c in self.when for k, v in c.to_json().items()}
        return d


# --------------------------------------------------------------------------------------- recipe
@dataclass
class Recipe:
    """A parsed, validated recipe (see module docstring)."""

    name: str
    source: str
    description: str = ""
    trials: int = 20
    time_budget: float | None = None
    sampler: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=lambda: {"type": "median"})
    baselines: list[dict] = field(default_factory=list)
    dimensions: list[Dimension] = field(default_factory=list)

    # ----------------------------------------------------------------- queries
    @property
    def top_k(self) -> int | None:
        for d in self.dimensions:
            if d.kind == "model":
                return d.top_k
        return None

    def dimension(self, name: str) -> Dimension | None:
        return next((d for d in self.dimensions if d.name == name), None)

    def frozen_values(self, default: int | str) -> list[int | str]:
        """Every ``frozen_stages`` value a trial may use (the base value when not searched)."""
        dims = [d for d in self.dimensions if d.target == FROZEN]
        out = [v for d in dims for v in d.values_for_cache()]
        if not dims or any(d.when for d in dims):
            out.append(default)
        return out

    def searched(self) -> list[Dimension]:
        return [d for d in self.dimensions if d.kind != "fixed"]

    def fingerprint(self) -> str:
        """Identity of the space (what a resumed study must share)."""
        doc = {d.name: d.to_json() for d in self.dimensions}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "name": self.name, "source": self.source, "description": self.description, "trials": self.trials,
            "time_budget_s": self.time_budget, "sampler": self.sampler, "pruner": self.pruner,
            "baselines": self.baselines, "space": {d.name: d.to_json() for d in self.dimensions},
        }

    # ----------------------------------------------------------------- sampling
    def assign(self, pick: Callable[[Dimension], Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Walk the dimensions in order; ``pick(dim)`` gives each active one's value.

        Returns (values by dimension name, values by target) — the latter is what
        ``config_from_params`` and the strategies read.
        """
        by_name: dict[str, Any] = {}
        by_target: dict[str, Any] = {}
        for d in self.dimensions:
            if not d.active(by_name):
                continue
            value = pick(d)
            by_name[d.name] = value
            by_target[d.target] = value
        return by_name, by_target

    def sample(self, trial, models: list[str]) -> dict[str, Any]:
        """Suggest this trial's parameters; returns them by target (``model`` included)."""
        _, by_target = self.assign(lambda d: d.suggest(trial, models))
        by_target.setdefault(MODEL, models[0])
        return by_target

    def params_of(self, trial_params: Mapping[str, Any], models: list[str]) -> dict[str, Any]:
        """Rebuild a finished trial's parameters by target from its Optuna params (+ fixed values)."""
        def pick(d: Dimension) -> Any:
            if d.kind == "fixed":
                return d.value
            if d.name in trial_params:
                return trial_params[d.name]
            if d.kind == "model" and len(models) == 1:
                return models[0]
            raise KeyError(d.name)

        _, by_target = self.assign(pick)
        by_target.setdefault(MODEL, models[0])
        return by_target


# --------------------------------------------------------------------------------------- parsing
def _err(source: str, where: str, message: str) -> AutotlError:
    return AutotlError(f"{source}: {where}: {message}")


def _num(v: Any) -> float | int | None:
    """YAML 1.1 reads ``1e-4`` as a string; accept it as a number."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _check_value(source: str, where: str, target: str, value: Any, fields: dict[str, Any]) -> None:
    """A value for ``target`` has the field's type (and an allowed value where there is a list)."""
    if target == FROZEN:
        if not _valid_frozen(value):
            raise _err(source, where, f"frozen_stages value {value!r}: use 'all', -N (all but the last N) or N")
        return
    if target not in fields:
        return  # strategy parameter: its strategy checks it
    default = fields[target]
    allowed = _allowed_values(target)
    if allowed is not None and value not in allowed:
        raise _err(source, where, f"{target} value {value!r} is not one of {', '.join(map(str, allowed))}")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise _err(source, where, f"{target} needs a {type(default).__name__} value, got {value!r}")


def _parse_when(source: str, where: str, spec: Any, earlier: dict[str, Dimension]) -> tuple[Condition, ...]:
    if not isinstance(spec, Mapping) or not spec:
        raise _err(source, where, "'when' must map earlier dimension names to a value, a list or {not: ...}")
    out = []
    for key, cond in spec.items():
        if key not in earlier:
            known = ", ".join(earlier) or "none"
            raise _err(source, where, f"'when' refers to {key!r}, which is not a dimension declared before it (earlier: {known})")
        negate = False
        if isinstance(cond, Mapping):
            if set(cond) != {"not"}:
                raise _err(source, where, f"'when: {{{key}: ...}}': a mapping condition must be {{not: value-or-list}}")
            cond, negate = cond["not"], True
        values = _as_tuple(cond)
        dim = earlier[key]
        for v in values:
            if dim.kind != "model" and not dim.contains(v):
                raise _err(source, where, f"'when' value {v!r} can never be taken by dimension {key!r}")
        out.append(Condition(key, values, negate))
    return tuple(out)


def _parse_dimension(source: str, name: str, spec: Any, fields: dict[str, Any], strategy_params: set[str],
                     earlier: dict[str, Dimension]) -> Dimension:
    where = f"space.{name}"
    if not isinstance(spec, Mapping):
        spec = {"choices": list(spec)} if isinstance(spec, list) else {"value": spec}
    unknown = set(spec) - _DIM_KEYS
    if unknown:
        raise _err(source, where, f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_DIM_KEYS))}")
    target = spec.get("param", name)
    if target in _NOT_SEARCHABLE:
        raise _err(source, where, _NOT_SEARCHABLE[target])
    if target != MODEL and target not in fields and target not in strategy_params:
        sp = ", ".join(sorted(strategy_params)) or "none registered"
        raise _err(source, where, f"unknown dimension {target!r}: not a TrainConfig field ({', '.join(fields)}) "
                                  f"nor a registered strategy parameter ({sp}), nor 'model'")
    when = _parse_when(source, where, spec["when"], earlier) if "when" in spec else ()

    if target == MODEL:
        if name != MODEL or set(spec) - {"top_k", "when"}:
            raise _err(source, where, "the model dimension is written 'model: {top_k: N}' (optionally with 'when'; the "
                                      "candidates come from --model / scoring)")
        k = spec.get("top_k")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise _err(source, where, f"top_k must be a positive integer, got {k!r}")
        if earlier and not when:
            raise _err(source, where, "declare 'model' first (other dimensions may depend on it), or give it a 'when'")
        return Dimension(name, target, "model", top_k=k, when=when)
    if "top_k" in spec:
        raise _err(source, where, "top_k belongs to the 'model' dimension")

    if "value" in spec:
        if set(spec) - {"value", "when", "param"}:
            raise _err(source, where, "a fixed dimension takes only 'value' (and 'when', 'param')")
        _check_value(source, where, target, spec["value"], fields)
        return Dimension(name, target, "fixed", value=spec["value"], when=when)

    if "choices" in spec:
        if set(spec) & {"low", "high", "log", "step"}:
            raise _err(source, where, "give either 'choices' or a 'low'/'high' range, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise _err(source, where, "'choices' must be a non-empty list")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise _err(source, where, f"choice {c!r}: choices must be numbers, strings, booleans or null")
            _check_value(source, where, target, c, fields)
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise _err(source, where, "'choices' has duplicates")
        return Dimension(name, target, "categorical", choices=tuple(choices), when=when)

    if "low" not in spec or "high" not in spec:
        raise _err(source, where, "give 'choices', a 'low'/'high' range, or a fixed 'value'")
    low, high = _num(spec["low"]), _num(spec["high"])
    if low is None or high is None:
        raise _err(source, where, f"'low' and 'high' must be numbers, got {spec['low']!r}, {spec['high']!r}")
    kind = spec.get("type")
    if kind is None:
        kind = "int" if isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log") else "float"
        if target in fields and isinstance(fields[target], int) and not isinstance(fields[target], bool):
            kind = "int"
    if kind not in ("int", "float"):
        raise _err(source, where, f"type must be int or float, got {kind!r}")
    if target == FROZEN and kind != "int":
        raise _err(source, where, "a frozen_stages range must be of ints")
    if not low < high:
        raise _err(source, where, f"'low' ({low}) must be below 'high' ({high})")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise _err(source, where, "a log range needs low > 0")
    step = _num(spec["step"]) if "step" in spec else None
    if "step" in spec and (step is None or step <= 0 or (log and kind == "float")):
        raise _err(source, where, "'step' must be a positive number (and cannot be used with a float log range)")
    if kind == "int":
        if int(low) != low or int(high) != high:
            raise _err(source, where, f"an int range needs integer bounds, got {low}, {high}")
        low, high = int(low), int(high)
        step = int(step) if step else None
    else:
        low, high = float(low), float(high)
    for v in (low, high):
        _check_value(source, where, target, v, fields)
    return Dimension(name, target, kind, low=low, high=high, log=log, step=step, when=when)


def _disjoint(a: Condition, b: Condition) -> bool:
    """No value of the shared key satisfies both conditions."""
    if a.key != b.key or (a.negate and b.negate):
        return False
    if not a.negate and not b.negate:
        return not any(_contains(b.values, v) for v in a.values)
    pos, neg = (b, a) if a.negate else (a, b)
    return all(_contains(neg.values, v) for v in pos.values)


def _check_exclusive(source: str, dims: list[Dimension]) -> None:
    """Two dimensions that set the same target must have mutually exclusive ``when`` clauses."""
    for i, a in enumerate(dims):
        for b in dims[i + 1 :]:
            if a.target == b.target and not any(_disjoint(ca, cb) for ca in a.when for cb in b.when):
                raise _err(source, f"space.{b.name}", f"sets {b.target!r} like space.{a.name}; give both 'when' "
                                                      "clauses on the same dimension with disjoint values")


def parse_recipe(doc: Any, source: str = "<recipe>", name: str | None = None) -> Recipe:
    """Validate a recipe document (the parsed YAML) and build a :class:`Recipe`."""
    if not isinstance(doc, Mapping):
        raise AutotlError(f"{source}: a recipe is a YAML mapping with a 'space:' section")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise AutotlError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    space = doc.get("space")
    if not isinstance(space, Mapping) or not space:
        raise AutotlError(f"{source}: 'space:' must map dimension names to their ranges")
    fields, strategy_params = _train_fields(), _strategy_params()
    dims: dict[str, Dimension] = {}
    for key, spec in space.items():
        key = str(key)
        dims[key] = _parse_dimension(source, key, spec, fields, strategy_params, dims)
    dim_list = list(dims.values())
    _check_exclusive(source, dim_list)

    trials = doc.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise AutotlError(f"{source}: trials must be a positive integer, got {trials!r}")
    budget = parse_duration(doc.get("time_budget"), f"{source}: time_budget") if doc.get("time_budget") is not None else None

    sampler = dict(doc.get("sampler") or {})
    if set(sampler) - _SAMPLER_KEYS:
        raise AutotlError(f"{source}: sampler: unknown key(s) {', '.join(sorted(set(sampler) - _SAMPLER_KEYS))}; allowed: {', '.join(sorted(_SAMPLER_KEYS))}")
    if sampler.get("type", "tpe") != "tpe":
        raise AutotlError(f"{source}: sampler.type: only 'tpe' (seeded multivariate TPE) is supported")
    pruner = dict(doc.get("pruner") or {"type": "median"})
    if set(pruner) - _PRUNER_KEYS:
        raise AutotlError(f"{source}: pruner: unknown key(s) {', '.join(sorted(set(pruner) - _PRUNER_KEYS))}; allowed: {', '.join(sorted(_PRUNER_KEYS))}")
    if pruner.setdefault("type", "median") not in _PRUNERS:
        raise AutotlError(f"{source}: pruner.type must be one of {', '.join(_PRUNERS)}, got {pruner['type']!r}")

    baselines = doc.get("baselines") or []
    if not isinstance(baselines, list) or not all(isinstance(b, Mapping) for b in baselines):
        raise AutotlError(f"{source}: baselines must be a list of mappings (dimension name: value)")
    for i, b in enumerate(baselines):
        for k, v in b.items():
            d = dims.get(k)
            if d is None or d.kind in ("fixed", "model"):
                raise AutotlError(f"{source}: baselines[{i}].{k}: not a searched dimension of this recipe")
            if not d.contains(_num(v) if d.kind in ("int", "float") else v):
                raise AutotlError(f"{source}: baselines[{i}].{k}: {v!r} is outside the dimension's range")
    baselines = [{k: (_num(v) if dims[k].kind in ("int", "float") else v) for k, v in b.items()} for b in baselines]
    return Recipe(
        name=str(doc.get("name") or name or Path(source).stem), source=source, description=str(doc.get("description") or ""),
        trials=trials, time_budget=budget, sampler=sampler, pruner=pruner, baselines=baselines, dimensions=dim_list,
    )


def add_dimensions(recipe: Recipe, space: Mapping[str, Any]) -> Recipe:
    """``recipe`` with more dimensions appended (validated like the recipe's own; ``when`` may name
    the recipe's dimensions). Its fingerprint changes, so a resumed study must add the same ones."""
    fields, strategy_params = _train_fields(), _strategy_params()
    dims = {d.name: d for d in recipe.dimensions}
    for key, spec in space.items():
        if key in dims:
            raise AutotlError(f"{recipe.source}: dimension {key!r} is already in the recipe")
        dims[key] = _parse_dimension(recipe.source, str(key), spec, fields, strategy_params, dims)
    dim_list = list(dims.values())
    _check_exclusive(recipe.source, dim_list)
    return dataclasses.replace(recipe, dimensions=dim_list)


def fix_targets(recipe: Recipe, fixed: Mapping[str, Any]) -> Recipe:
    """``recipe`` with every dimension that sets a target in ``fixed`` (a user's flags) fixed at that
    value, keeping its ``when``: the sampler no longer varies what the user fixed, and the portfolio's
    entries take the fixed value (entries that become the same are kept once, the first)."""
    if not fixed:
        return recipe
    dims = [dataclasses.replace(d, kind="fixed", value=fixed[d.target], choices=(), low=None, high=None, step=None,
                                log=False) if d.target in fixed and d.kind != "model" else d
            for d in recipe.dimensions]
    names = {d.name: fixed[d.target] for d in recipe.dimensions if d.target in fixed and d.kind != "model"}
    baselines: list[dict[str, Any]] = []
    for b in recipe.baselines:
        entry = {k: (names[k] if k in names else v) for k, v in b.items()}
        if not any(_same_entry(entry, e) for e in baselines):
            baselines.append(entry)
    return dataclasses.replace(recipe, dimensions=dims, baselines=baselines)


def _same_entry(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def restrict_choices(recipe: Recipe, name: str, choices: Iterable[Any]) -> Recipe:
    """``recipe`` with categorical dimension ``name`` limited to ``choices`` (in the recipe's order);
    baselines that use a dropped value are dropped too."""
    keep = list(choices)
    dims = []
    for d in recipe.dimensions:
        if d.name == name:
            d = dataclasses.replace(d, choices=tuple(c for c in d.choices if _contains(keep, c)))
        dims.append(d)
    baselines = [b for b in recipe.baselines if name not in b or _contains(keep, b[name])]
    return dataclasses.replace(recipe, dimensions=dims, baselines=baselines)


# --------------------------------------------------------------------------------------- files
def recipe_dirs() -> list[Path]:
    """Where built-in recipes live, first hit per name wins.

    In a source checkout (editable install) that is the top-level ``recipes/``, their one home in
    git; an installed wheel has them as ``autotl/recipes/``, copied there by the build (setup.py).
    """
    pkg = Path(__file__).resolve().parent
    checkout = pkg.parent
    # Only a checkout has pyproject.toml beside the package; in site-packages a sibling
    # "recipes" folder would belong to some other distribution.
    dirs = [checkout / "recipes"] if (checkout / "pyproject.toml").is_file() else []
    dirs.append(pkg / "recipes")
    return [d for d in dirs if d.is_dir()]


def list_recipes() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.iterdir()):
            if p.suffix in RECIPE_SUFFIXES:
                out.setdefault(p.stem, p)
    return out


def load_recipe(spec: str | Path | Recipe | Mapping | None = None) -> Recipe:
    """A recipe by built-in name (``quick``, ``default``, ``thorough``), YAML path, mapping or Recipe."""
    import yaml

    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Mapping):
        return parse_recipe(spec, "<recipe>")
    spec = "default" if spec is None else spec
    path = Path(spec).expanduser()
    if not (path.suffix in RECIPE_SUFFIXES or path.is_file()):
        known = list_recipes()
        if str(spec) not in known:
            raise AutotlError(f"--recipe {spec}: no such built-in recipe ({', '.join(known) or 'none found'}) "
                              "and not a YAML file; give a name or a path to a .yaml file")
        path = known[str(spec)]
    if not path.is_file():
        raise AutotlError(f"--recipe {spec}: {path} does not exist; give a built-in name ({', '.join(list_recipes())}) or a .yaml file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise AutotlError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    return parse_recipe(doc, str(path), name=path.stem)
