"""What a training or evaluation run leaves in ``OUTPUT_DIR`` for a user comparing runs.

- ``results.json``: COCO AP per task (AP, AP50, AP75, APs/m/l and per class), the config and
  command-line overrides, and timings (:func:`write_results`);
- ``training_curves.png``: total, RPN and per-stage losses and the learning rate from
  Detectron2's ``metrics.json`` (:func:`plot_training_curves`).

:class:`RunReportHook` writes both when training ends; :class:`DataSummaryHook` repeats the data
check's summary when training starts, below the model dump, where a user sees it.
"""

import json
import logging
import os
import time

from detectron2.engine import HookBase

__all__ = [
    "DataSummaryHook",
    "RunReportHook",
    "nest_results",
    "plot_training_curves",
    "write_results",
]

logger = logging.getLogger(__name__)


def plot_training_curves(metrics_json, out_png):
    """Plot total / RPN / per-stage losses and the learning rate from ``metrics.json``.

    Returns:
        str or None: ``out_png``, or None if the file has no training rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = []
    with open(metrics_json) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                if "total_loss" in row:
                    rows.append(row)
    if not rows:
        return None
    it = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].plot(it, [r["total_loss"] for r in rows], label="total_loss", color="black")
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        axes[0].plot(it, [r.get(k, np.nan) for r in rows], label=k, alpha=0.7)
    axes[0].set_title("total and RPN losses")
    stage_keys = sorted(k for k in rows[0] if k.startswith("loss_") and "rpn" not in k)
    for k in stage_keys:
        axes[1].plot(it, [r.get(k, np.nan) for r in rows], label=k)
    axes[1].set_title("per-stage box and mask losses")
    axes[2].plot(it, [r.get("lr", np.nan) for r in rows], color="tab:red")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def nest_results(flat):
    """``{"bbox/AP": 1.0, ...}`` (EventStorage names) -> ``{"bbox": {"AP": 1.0}, ...}``."""
    out = {}
    for key, value in flat.items():
        task, _, metric = key.partition("/")
        if metric:
            out.setdefault(task, {})[metric] = value
    return out


def write_results(output_dir, results, seconds, cfg=None, extra=None):
    """Write ``OUTPUT_DIR/results.json``.

    Args:
        output_dir (str): the run's folder.
        results (dict): ``{task: {metric: value}}`` as Detectron2's evaluators return it
            (AP in percent; ``AP-<class>`` per class).
        seconds (dict): timings (e.g. ``train``, ``eval``, ``total``).
        cfg (CfgNode or None): the run's config: its classes and iterations are recorded.
        extra (dict or None): more entries.

    Returns:
        str: the file's path.
    """
    summary = {"results": results, "seconds": seconds}
    if cfg is not None:
        summary["classes"] = list(cfg.MODEL.CMRCNN.CLASS_NAMES)
        summary["max_iter"] = int(cfg.SOLVER.MAX_ITER)
        summary["datasets"] = {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)}
    summary.update(extra or {})
    path = os.path.join(output_dir, "results.json")
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=float)
    return path


class DataSummaryHook(HookBase):
    """Logs the data check's summary of every split (kept, dropped and why, repairs, instances
    per class) when training starts."""

    def __init__(self, cfg):
        self.cfg = cfg

    def before_train(self):
        from cmrcnn_ext.data.register import data_summary

        text = data_summary(self.cfg)
        if text:
            logger.info("Data used by this run:\n%s", text)


class RunReportHook(HookBase):
    """Writes ``results.json`` and ``training_curves.png`` when training ends (main process).

    Put it after Detectron2's hooks: the final evaluation (``EvalHook``) has then stored its
    results in the event storage and the writers have flushed ``metrics.json``.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self._start = self._last_step = None

    def before_train(self):
        self._start = time.perf_counter()

    def after_step(self):
        self._last_step = time.perf_counter()

    def after_train(self):
        from detectron2.utils import comm

        if not comm.is_main_process() or self._last_step is None:
            return
        now = time.perf_counter()
        latest = {k: v for k, (v, _) in self.trainer.storage.latest().items()}
        results = nest_results({k: v for k, v in latest.items() if k.split("/")[0] in _TASKS})
        iters = self.trainer.iter + 1 - self.trainer.start_iter
        seconds = {
            "train": self._last_step - self._start,
            "seconds_per_iter": (self._last_step - self._start) / max(1, iters),
            "eval_after_training": now - self._last_step,
        }
        out = self.cfg.OUTPUT_DIR
        path = write_results(out, results, seconds, self.cfg)
        curves = os.path.join(out, "metrics.json")
        png = None
        if os.path.isfile(curves):
            png = plot_training_curves(curves, os.path.join(out, "training_curves.png"))
        logger.info("Wrote %s%s", path, f" and {png}" if png else "")


_TASKS = ("bbox", "segm", "keypoints", "box_proposals", "timing")
_TASKS += tuple(t + "_TTA" for t in _TASKS)
