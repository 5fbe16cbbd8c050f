"""The report's figures (matplotlib, Agg): Pareto front, parameter importances, slice plots.

Each function returns the PNG's path, or None when there is not enough to plot yet (fewer than
two complete trials, no varied parameter). Files are written to a temporary name and renamed.
"""

import json
import logging
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

from cmrcnn_ext.fileio import atomic_write

__all__ = ["plot_importances", "plot_pareto", "plot_slices", "pareto_front"]

logger = logging.getLogger(__name__)


def _figure(width=5.0, height=3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(width, height))


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def pareto_front(points: List[Tuple[float, float]]) -> List[int]:
    """Indices of the points ``(ms, ap)`` that no other point beats on both (less or equal time
    and more or equal AP, one of them strictly)."""
    front = []
    for i, (t, ap) in enumerate(points):
        dominated = any(
            t2 <= t and ap2 >= ap and (t2 < t or ap2 > ap)
            for j, (t2, ap2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def plot_pareto(study, rows: List[Dict[str, Any]], study_dir: str) -> Optional[str]:
    """Mask AP (or the objective) against inference ms/image; the Pareto front joined."""
    done = [
        r
        for r in rows
        if r["status"] == "complete" and r["ms_per_image"] is not None and r["value"] is not None
    ]
    if len(done) < 2:
        return None
    points = [(r["ms_per_image"], r["value"]) for r in done]
    front = sorted(pareto_front(points), key=lambda i: points[i][0])
    plt, (fig, ax) = _figure()
    ax.scatter([p[0] for p in points], [p[1] for p in points], c="0.6", label="trials")
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "o-",
        c="C3",
        label="Pareto front",
    )
    for i in front:
        ax.annotate(str(done[i]["number"]), points[i], textcoords="offset points", xytext=(4, 4))
    ident = study.user_attrs.get("cmrcnn_ext", {})
    ax.set_xlabel("inference ms / image")
    ax.set_ylabel(ident.get("metric", "objective"))
    ax.legend()
    return _save(plt, fig, os.path.join(study_dir, "pareto.png"))


def _importances(study) -> Dict[str, float]:
    import optuna

    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(study, target=target)


def plot_importances(study, study_dir: str) -> Optional[str]:
    """Optuna's parameter importances (fANOVA over the complete trials) as a bar chart."""
    try:
        imp = _importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few / identical trials
        logger.debug("no parameter importances yet: %s", e)
        return None
    if not imp:
        return None
    keys = list(imp)[::-1]
    plt, (fig, ax) = _figure(6.0, 0.4 * len(keys) + 1.2)
    ax.barh(range(len(keys)), [imp[k] for k in keys], color="C0")
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    return _save(plt, fig, os.path.join(study_dir, "importances.png"))


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def plot_slices(rows, study_dir: str, metric: str) -> List[Tuple[str, str]]:
    """One scatter per parameter: the objective of each complete trial against its value."""
    done = [r for r in rows if r["status"] == "complete" and r["value"] is not None]
    keys: List[str] = []
    for r in done:
        keys += [k for k in r["params"] if k not in keys]
    out = []
    for key in keys:
        pts = [(r["params"][key], r["value"]) for r in done if key in r["params"]]
        if len({json.dumps(v) for v, _ in pts}) < 2:
            continue
        plt, (fig, ax) = _figure(4.5, 3.2)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in pts)
        if numeric:
            xs = [v for v, _ in pts]
        else:
            labels = sorted({json.dumps(v) for v, _ in pts})
            xs = [labels.index(json.dumps(v)) for v, _ in pts]
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.scatter(xs, [y for _, y in pts], c="C0")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(metric)
        path = _save(plt, fig, os.path.join(study_dir, f"slice_{_safe(key)}.png"))
        out.append((key, path))
    return out
