"""Trials as rows, a rich leaderboard, and a strategy in words."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

from ._recipe import FROZEN, MODEL, Recipe

_REG_NAMES = {"l2sp": "L2-SP", "kd": "feature-map KD", "none": "no regulariser"}
_SHORT = {"l2sp": "L2-SP", "kd": "KD"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.4g}"
    return str(v)


def describe_strategy(params: dict[str, Any], *, frozen: int | None = None, num_stages: int | None = None,
                      stage_names: list[str] | None = None, epochs_run: int | None = None,
                      solved_l2: float | None = None) -> str:
    """One sentence: what is frozen, how it is trained and regularised, which strategies are on.
    ``solved_l2``: a linear probe solved to its optimum with this penalty (no lr, no epochs)."""
    from ..strategy import create_strategies
    from ..train import TrainConfig

    base = TrainConfig()
    model = params.get(MODEL, "the source model")
    if solved_l2 is not None:
        parts = [f"linear probe (L2 logistic regression to its optimum, λ={_fmt(float(solved_l2))}) on frozen features"]
        parts += [s.describe(params) for s in create_strategies() if s.is_active(params)]
        return "; ".join(parts)
    if frozen is not None and num_stages is not None and frozen >= num_stages:
        what = f"linear probe on frozen {model} features"
    elif frozen is not None and num_stages is not None:
        tail = f" ({', '.join(stage_names[frozen:])})" if stage_names else ""
        what = f"fine-tune the last {num_stages - frozen} of {num_stages} stages of {model}{tail} + a new head, first {frozen} frozen"
    else:
        what = f"{model}, frozen_stages={params.get(FROZEN, base.frozen_stages)}"
    lr = params.get("lr", base.lr)
    epochs = params.get("epochs", base.epochs)
    parts = [what, f"lr {_fmt(lr)}", f"{epochs} epochs max" + (f" ({epochs_run} run)" if epochs_run else "")]
    reg = params.get("regularizer", "none")
    if reg != "none":
        lam = params.get("reg_lambda", base.reg_lambda)
        text = _REG_NAMES.get(reg, reg)
        if reg == "l2sp":
            text += f" (α={_fmt(lam)}, β={_fmt(params.get('reg_beta', base.reg_beta))})"
        else:
            text += f" (λ={_fmt(lam)})"
        decay = params.get("reg_decay", base.reg_decay)
        if decay != 1.0:
            text += f", decayed ×{_fmt(decay)}/epoch"
        if params.get("dtnh", False):
            text += ", with DTNH (regulariser gradient projected where it conflicts with the loss)"
        parts.append(text)
    for key in ("weight_decay", "label_smoothing", "backbone_lr_ratio", "batch_size", "optimizer"):
        if key in params:
            parts.append(f"{key} {_fmt(params[key])}")
    if params.get("mixup_alpha"):
        parts.append(f"mixup α={_fmt(params['mixup_alpha'])}")
    if params.get("rand_augment"):
        parts.append(f"RandAugment magnitude {params['rand_augment']}")
    for strategy in create_strategies():
        if strategy.is_active(params):
            parts.append(strategy.describe(params))
    return "; ".join(parts)


def trial_rows(study, recipe: Recipe, candidates: list[str], objective: str) -> list[dict[str, Any]]:
    """Every trial as a plain dict, best first (complete by value, then pruned, then failed)."""
    from ._distributed import interrupted_numbers, is_interrupted

    cut = interrupted_numbers(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        try:
            params = recipe.params_of(t.params, candidates)
        except KeyError:  # failed before all its parameters were sampled
            params = dict(t.params)
        ua = t.user_attrs
        row = {
            "number": t.number, "state": t.state.name, "value": t.value, "objective": objective,
            "params": params, "accuracy": ua.get("accuracy"), "macro_f1": ua.get("macro_f1"), "val_loss": ua.get("val_loss"),
            "frozen": ua.get("frozen"), "num_stages": ua.get("num_stages"), "best_epoch": ua.get("best_epoch"),
            "epochs_run": ua.get("epochs_run") or (len(t.intermediate_values) or None), "seconds": ua.get("seconds"),
            "cached": ua.get("cached"), "forward_batches": ua.get("forward_batches"), "baseline": bool(ua.get("baseline")),
            "interrupted": is_interrupted(t, cut), "error": ua.get("error"),
            "value_std": ua.get("value_std"), "value_se": ua.get("value_se"), "n_folds": ua.get("n_folds"),
            "decide_score": ua.get("decide_score"), "estimated_seconds": ua.get("estimated_seconds"),
            "not_started": ua.get("not_started"),
        }
        if t.state.name == "PRUNED" and row["value"] is None and t.intermediate_values:
            row["value"] = t.intermediate_values[max(t.intermediate_values)]
        row["probe_l2"] = ua.get("lambda") if ua.get("probe") else None
        row["description"] = describe_strategy(params, frozen=row["frozen"], num_stages=row["num_stages"],
                                               solved_l2=row["probe_l2"])
        rows.append(row)
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
    rows.sort(key=lambda r: (order.get(r["state"], 5), -(r["value"] if r["value"] is not None else -1e9),
                             r["val_loss"] if r["val_loss"] is not None else 1e9, r["number"]))
    return rows


def leaderboard_table(rows: list[dict[str, Any]], *, objective: str, top: int = 20, best: int | None = None,
                      show_model: bool = False) -> Table:
    """The best ``top`` trials; ``*`` marks enqueued baselines, the selected trial is green."""
    table = Table(title=f"trials by held-out {objective} (mean ± std over folds)", title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("trial", "right"), ("state", "left"), ({"macro_f1": "F1"}.get(objective, "acc"), "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    if show_model:
        table.add_column("model")
    for name, justify in (("frozen", "right"), ("lr", "right"), ("ep", "right"), ("regulariser", "left"),
                          ("s", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    short = {"COMPLETE": "ok", "PRUNED": "pruned", "FAIL": "fail", "RUNNING": "running", "WAITING": "waiting"}
    for r in rows[:top]:
        p = r["params"]
        reg = p.get("regularizer", "none")
        if reg != "none":
            reg = f"{_SHORT.get(reg, reg)} {p.get('reg_lambda', 0.0):.1e}" + (" +DTNH" if p.get("dtnh") else "")
        else:
            reg = "-"
        frozen = f"{r['frozen']}/{r['num_stages']}" if r["frozen"] is not None else str(p.get(FROZEN, "?"))
        epochs = f"{r['epochs_run'] or '?'}/{p.get('epochs', '?')}"
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        if r["value"] is not None and r.get("value_std") is not None and r["state"] == "COMPLETE":
            value += f" ± {r['value_std']:.3f}"
        state = ("cut off" if r["interrupted"] else short.get(r["state"], r["state"].lower())) + ("*" if r["baseline"] else "")
        style = "bold green" if r["number"] == best else ("dim" if r["state"] != "COMPLETE" else None)
        lr = p.get("lr")
        lr_text = f"{lr:.1e}" if isinstance(lr, float) else str(lr or "-")
        if r.get("probe_l2") is not None:  # solved probe: a penalty, no learning rate or epochs
            lr_text, epochs = f"λ {r['probe_l2']:.0e}", "-"
        cells = [str(r["number"]), state, value]
        if show_model:
            cells.append(str(p.get(MODEL) or f"#{p.get('backbones') or 1}"))
        cells += [frozen, lr_text, epochs, reg,
                  (f"{r['seconds']:.1f}" if r["seconds"] is not None else "-") + ("" if r["cached"] is not False else " img")]
        table.add_row(*cells, style=style)
    notes = ["s: seconds per trial (img: trained on images, not on cached activations)"]
    if any(r["baseline"] for r in rows):
        notes.append("*: enqueued baseline (plain `autotl fit`)")
    caption = "; ".join(notes)
    if len(rows) > top:
        caption += f"{'; ' if caption else ''}{len(rows) - top} more trial(s) in leaderboard.json"
    table.caption = caption or None
    return table
