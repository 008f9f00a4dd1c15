"""Writing the suite's results: ``<out>/report.json`` (metrics, details, the config used),
``<out>/n2g_explanations.json`` (kept apart: it is large and read by dashboards, not people),
one PNG per figure, and TensorBoard scalars and images."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from sae_lit.common import save_figure, write_json_atomic


def _clean(obj):
    """JSON has no NaN/inf: write them as null; tensors and numpy scalars as numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _write_json(path: Path, obj) -> None:
    write_json_atomic(path, _clean(obj))


def write_report(report: dict, figures: dict, out_dir: str | os.PathLike, merge: bool = True) -> Path:
    """Write (or, with merge, update: several callbacks may share one report) the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    n2g = report.get("details", {}).get("n2g", {})
    if "explanations" in n2g:
        _write_json(out / "n2g_explanations.json", n2g["explanations"])
        report["details"] = {**report["details"], "n2g": {k: v for k, v in n2g.items() if k != "explanations"}}
        report["details"]["n2g"]["explanations_file"] = "n2g_explanations.json"
    path = out / "report.json"
    if merge and path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        for key, value in report.items():
            if isinstance(value, dict) and isinstance(old.get(key), dict):
                old[key].update(value)
            else:
                old[key] = value
        report = old
    figure_files = dict(report.get("figures", {}))
    for tag, fig in figures.items():
        name = tag.replace("/", "_") + ".png"
        save_figure(fig, out / name)
        figure_files[tag] = name
    report["figures"] = figure_files
    _write_json(path, report)
    return path


def log_tensorboard(experiment, metrics: dict, figures: dict, step: int) -> None:
    """``experiment``: a torch.utils.tensorboard SummaryWriter (TensorBoardLogger.experiment)."""
    for name, value in metrics.items():
        if value is not None and math.isfinite(value):
            experiment.add_scalar(name, value, step)
    for tag, fig in figures.items():
        experiment.add_figure(tag, fig, step, close=False)
    experiment.flush()


def close_figures(figures: dict) -> None:
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)
