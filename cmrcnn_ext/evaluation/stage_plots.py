"""The stage report's two figures (the Cascade R-CNN paper's analysis, for your model and data).

- ``ap_vs_iou.png``: COCO AP at each IoU threshold 0.50-0.95, one line per stage on its own
  (solid), per mean classifier of stages 1..k (dashed) and for the final output (black).
- ``iou_shift.png``: per stage, the histogram of its input boxes' IoU with their best ground
  truth, from IoU 0.5 up (the boxes that can be positives), with the IoU the stage is trained
  for marked: the paper's figure of the distribution moving right from stage to stage.
"""

import os
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cmrcnn_ext.evaluation.stage_metrics import IOU_BINS  # noqa: E402

__all__ = ["plot_ap_vs_iou", "plot_iou_shift"]


def plot_ap_vs_iou(box_rows: dict, path: str, title: str = "Box AP by IoU threshold") -> str:
    """Plot AP against the IoU threshold for every row of ``report["box"]``; returns ``path``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    stage_rows = [r for r in box_rows if r.startswith("stage ")]
    for i, row in enumerate(stage_rows):
        thresholds, values = _series(box_rows[row])
        ax.plot(thresholds, values, "o-", color=colors[i % len(colors)], label=row, ms=3)
    for i, row in enumerate(r for r in box_rows if r.startswith("stages ")):
        thresholds, values = _series(box_rows[row])
        ax.plot(thresholds, values, "--", color=colors[(i + 1) % len(colors)], label=row)
    if "final" in box_rows:
        thresholds, values = _series(box_rows["final"])
        ax.plot(thresholds, values, "k:", lw=2, label="final output")
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("AP")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_iou_shift(iou_shift: List[dict], path: str) -> str:
    """Histogram (IoU >= 0.5) of each stage's input boxes; returns ``path``."""
    edges = np.linspace(0.0, 1.0, IOU_BINS + 1)
    first = int(np.searchsorted(edges, 0.5 - 1e-9))
    fig, axes = plt.subplots(1, len(iou_shift), figsize=(3.4 * len(iou_shift), 3.2), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, stage in zip(axes, iou_shift):
        counts = np.asarray(stage["histogram"], dtype=float)[first:]
        share = counts / max(1, counts.sum())
        ax.bar(edges[first:-1], share, width=edges[1] - edges[0], align="edge", alpha=0.8)
        ax.axvline(stage["trained_iou"], color="k", ls="--", lw=1)
        over = stage["fraction_at_or_above"].get(f"{stage['trained_iou']:.2f}", float("nan"))
        ax.set_title(
            f"stage {stage['stage']} input (trained at {stage['trained_iou']:.2f})\n"
            f"{100 * over:.1f}% of {stage['input_boxes']} boxes >= {stage['trained_iou']:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("IoU with best ground truth")
        ax.set_xlim(0.5, 1.0)
    axes[0].set_ylabel("share of the boxes with IoU >= 0.5")
    fig.tight_layout()
    _save(fig, path)
    return path


def _series(row: dict):
    items = sorted(row["AP@IoU"].items(), key=lambda kv: float(kv[0]))
    return [float(k) for k, _ in items], [v for _, v in items]


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
