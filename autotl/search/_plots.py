"""Optuna's plots (plotly) as HTML files in the run folder; they open offline (plotly.min.js is
copied beside them once)."""

from __future__ import annotations

import warnings
from pathlib import Path

from .. import _console

PLOTS = {
    "history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def save_plots(study, out_dir: str | Path) -> dict[str, str]:
    """Write each plot that the study's trials allow; returns {name: path}. Never raises."""
    try:
        import plotly  # noqa: F401
        import optuna.visualization as vis
    except ImportError:
        _console.log("[yellow]plots skipped[/]: plotly is not installed (pip install plotly)")
        return {}
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = {}, []
    for name, fn in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = getattr(vis, fn)(study)
            path = out_dir / f"{name}.html"
            fig.write_html(str(path), include_plotlyjs="directory", full_html=True)
            written[name] = str(path)
        except Exception as exc:  # noqa: BLE001 - e.g. importance needs two completed trials
            skipped.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})")
    if skipped:
        _console.log(f"[dim]plots skipped: {'; '.join(skipped)}[/]")
    return written
