"""Run the stage report: one pass of the model over each test data set, both evaluators.

:func:`analyze` evaluates ``model`` on every data set of ``cfg.DATASETS.TEST`` with the COCO
evaluator of ``train_net.py --eval-only`` (:meth:`Trainer.build_evaluator`) and a
:class:`~cmrcnn_ext.evaluation.stage_report.StageEvaluator` side by side, inside
:func:`~cmrcnn_ext.modeling.stage_outputs.record_stage_outputs`; :func:`write_report` writes the
JSON, the plots and the summary.
"""

import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List

from detectron2.evaluation import DatasetEvaluators

from cmrcnn_ext.evaluation.stage_plots import plot_ap_vs_iou, plot_iou_shift
from cmrcnn_ext.evaluation.stage_report import StageEvaluator
from cmrcnn_ext.evaluation.stage_summary import summary_markdown
from cmrcnn_ext.modeling.stage_outputs import cascade_heads_of, record_stage_outputs

logger = logging.getLogger(__name__)

__all__ = ["analyze", "write_report"]


def analyze(cfg, model) -> Dict[str, dict]:
    """The stage report of ``model`` on each data set of ``cfg.DATASETS.TEST``.

    Returns:
        {data set name: report} on the main process (each report as
        :meth:`StageEvaluator.evaluate` builds it, plus ``"coco"``: the COCO evaluator's
        results of the final output); {} on the other processes.
    """
    from cmrcnn_ext.engine import Trainer

    heads = cascade_heads_of(model)
    backend = cfg.TEST.CMRCNN.EVALUATOR
    with record_stage_outputs(model) as recorder:
        evaluators, stage_evaluators = [], []
        for name in cfg.DATASETS.TEST:
            coco = Trainer.build_evaluator(cfg, name)  # writes the COCO JSON if there is none
            stage = StageEvaluator(
                name,
                recorder,
                heads,
                cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS,
                cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
                backend=backend,
                output_dir=_report_folder(cfg, name),
            )
            evaluators.append(DatasetEvaluators([coco, stage]))
            stage_evaluators.append(stage)
        results = Trainer.test(cfg, model, evaluators)
    reports = OrderedDict()
    for name, stage in zip(cfg.DATASETS.TEST, stage_evaluators):
        if stage.results is None:  # not the main process
            continue
        coco = results[name] if len(cfg.DATASETS.TEST) > 1 else results
        report = dict(stage.results)
        report["coco"] = {k: dict(v) for k, v in coco.items() if k in ("bbox", "segm")}
        _check_final(report)
        reports[name] = report
    return reports


def _report_folder(cfg, name):
    return cfg.OUTPUT_DIR if len(cfg.DATASETS.TEST) == 1 else os.path.join(cfg.OUTPUT_DIR, name)


def _check_final(report) -> None:
    """The ``final`` rows must be the COCO evaluator's numbers: same outputs, same COCOeval."""
    for key, task in (("box", "bbox"), ("mask", "segm")):
        if key not in report or task not in report["coco"]:
            continue
        mine, coco = report[key]["final"], report["coco"][task]
        for metric in ("AP", "AP50", "AP75"):
            a, b = mine[metric], coco[metric]
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                raise AssertionError(
                    f"stage report: final {task} {metric} {a} differs from the COCO evaluator's {b}"
                )


def write_report(report: dict, folder: str, header: str = "") -> List[str]:
    """Write ``stage_report.json``, ``ap_vs_iou.png``, ``iou_shift.png`` and ``summary.md``.

    Returns:
        The paths written.
    """
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, "stage_report.json")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1)
    paths.append(plot_ap_vs_iou(report["box"], os.path.join(folder, "ap_vs_iou.png")))
    paths.append(plot_iou_shift(report["iou_shift"], os.path.join(folder, "iou_shift.png")))
    paths.append(os.path.join(folder, "summary.md"))
    with open(paths[-1], "w") as f:
        f.write(summary_markdown(report, header))
    return paths
