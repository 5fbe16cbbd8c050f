"""Numbers of the stage report: COCO AP at every IoU threshold, proposal recall, IoU histograms.

AP comes from the same COCOeval as the project's COCO evaluator (faster-coco-eval or
pycocotools, ``TEST.CMRCNN.EVALUATOR``), with Detectron2's conventions: results x 100,
``maxDets`` [1, 10, 100], the ``bbox`` key dropped from mask results. AP at one IoU threshold is
pycocotools' ``summarize`` restricted to that threshold (area "all", the largest ``maxDets``), so
the values at 0.50 and 0.75 are exactly AP50 and AP75, and their mean is AP
(``tests/test_stage_report.py`` checks this against pycocotools).

Proposal recall follows Detectron2's ``_evaluate_box_proposals`` (and Hosang et al.): each
ground-truth box (``iscrowd`` 0) is covered by at most one proposal, assigned greedily by the
largest IoU first; recall at IoU t is the share of ground truth covered at >= t; AR is the mean
recall over t = 0.50:0.05:0.95.
"""

import contextlib
import copy
import io
import math
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.structures import Boxes, pairwise_iou

#: COCO's IoU thresholds 0.50:0.05:0.95, rounded as pycocotools' ``params.iouThrs`` prints them.
IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
#: Histogram bins of the IoU of a stage's input boxes with their best ground truth.
IOU_BINS = 20

__all__ = [
    "IOU_BINS",
    "IOU_THRESHOLDS",
    "ap_summary",
    "coco_eval",
    "greedy_cover",
    "load_coco_gt",
    "max_iou",
    "recall_summary",
]


def load_coco_gt(json_file: str, backend: str):
    """The ground truth as the backend's ``COCO`` object (``"faster"`` or ``"pycocotools"``)."""
    if backend == "faster":
        import faster_coco_eval

        return faster_coco_eval.COCO(json_file)
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(json_file)


def coco_eval(coco_gt, results: List[dict], iou_type: str, backend: str):
    """Evaluated, accumulated and summarised COCOeval of ``results`` (COCO category ids).

    Args:
        coco_gt: from :func:`load_coco_gt` with the same ``backend``.
        results: COCO results (not modified).
        iou_type: "bbox" or "segm".
        backend: "faster" (faster-coco-eval) or "pycocotools".
    """
    if backend == "faster":
        from cmrcnn_ext.evaluation.coco import evaluate_predictions_on_coco_faster

        return evaluate_predictions_on_coco_faster(
            coco_gt, results, iou_type, print_function=lambda *a, **k: None
        )
    from pycocotools.cocoeval import COCOeval

    results = copy.deepcopy(results)
    if iou_type == "segm":  # as Detectron2: mask areas from the masks, not the boxes
        for r in results:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def ap_summary(evaluator) -> Dict[str, object]:
    """AP, AP50, AP75, APs, APm, APl (x 100, as Detectron2's COCOEvaluator reports them) and
    ``"AP@IoU"``: {threshold: AP at that IoU threshold}, from an evaluated COCOeval."""
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    out = {
        n: float(evaluator.stats[i] * 100) if evaluator.stats[i] >= 0 else float("nan")
        for i, n in enumerate(names)
    }
    precision = np.asarray(evaluator.eval["precision"])  # (T, R, K, A, M)
    area = list(evaluator.params.areaRngLbl).index("all")
    per_iou = {}
    for t, threshold in enumerate(evaluator.params.iouThrs):
        p = precision[t, :, :, area, -1]
        valid = p[p > -1]
        per_iou[f"{threshold:.2f}"] = float(np.mean(valid) * 100) if valid.size else float("nan")
    out["AP@IoU"] = per_iou
    return out


def nan_summary() -> Dict[str, object]:
    """:func:`ap_summary` of a row without any detection (Detectron2 reports NaN then)."""
    out = {n: float("nan") for n in ["AP", "AP50", "AP75", "APs", "APm", "APl"]}
    out["AP@IoU"] = {f"{t:.2f}": float("nan") for t in IOU_THRESHOLDS}
    return out


def max_iou(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(R,) IoU of each box with its best-matching ground-truth box (0 without ground truth)."""
    if len(gt) == 0 or len(boxes) == 0:
        return boxes.new_zeros(len(boxes))
    return pairwise_iou(Boxes(boxes), Boxes(gt)).max(dim=1).values


def greedy_cover(proposals: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """IoU at which each ground-truth box is covered, one proposal per ground truth.

    Args:
        proposals: (P, 4) xyxy, in the order in which they count (top-N = the first N).
        gt: (G, 4) xyxy.

    Returns:
        (G,) float32: the IoU of the proposal assigned to each ground truth (0 if none is
        left), assigning the largest remaining IoU first.
    """
    cover = np.zeros(len(gt), dtype=np.float32)
    if len(gt) == 0 or len(proposals) == 0:
        return cover
    iou = pairwise_iou(Boxes(proposals.float().cpu()), Boxes(gt.float().cpu())).numpy()
    for _ in range(min(len(proposals), len(gt))):
        best_per_gt = iou.max(axis=0)
        g = int(best_per_gt.argmax())
        if best_per_gt[g] < 0:
            break
        p = int(iou[:, g].argmax())
        cover[g] = iou[p, g]
        iou[p, :] = -1
        iou[:, g] = -1
    return cover


def recall_summary(covers: np.ndarray) -> Dict[str, float]:
    """Recall at IoU 0.5 and 0.7 and AR (mean recall at 0.50:0.05:0.95), x 100, from the
    concatenated :func:`greedy_cover` values of every image."""
    if covers.size == 0:
        return {"R@0.5": float("nan"), "R@0.7": float("nan"), "AR": float("nan")}
    # float32 IoUs and thresholds, as Detectron2 compares them
    covers = torch.as_tensor(covers, dtype=torch.float32)
    thresholds = torch.arange(0.5, 0.95 + 1e-5, 0.05, dtype=torch.float32)
    recalls = torch.stack([(covers >= t).float().sum() / covers.numel() for t in thresholds])
    return {
        "R@0.5": float(recalls[0] * 100),
        "R@0.7": float(recalls[4] * 100),
        "AR": float(recalls.mean() * 100),
    }


def proposal_counts(post_nms_topk: int, counts: Sequence[int] = (100, 300, 1000)) -> List[int]:
    """The numbers of top proposals at which recall is reported: COCO's usual counts below the
    count the model uses, and that count."""
    return sorted({c for c in counts if c < post_nms_topk} | {int(post_nms_topk)})


def is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
