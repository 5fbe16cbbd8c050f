"""The stage report's evaluator: what each cascade stage contributes, on a COCO data set.

:class:`StageEvaluator` is a Detectron2 ``DatasetEvaluator`` used next to the COCO evaluator in
``inference_on_dataset``, while :func:`~cmrcnn_ext.modeling.stage_outputs.record_stage_outputs`
records each batch's stages. Per image it keeps, in the original image's coordinates:

- the detections of each stage on its own (stage k's boxes, scored by stage k's classifier),
  and of the mean classifier of stages 1..k (at k = last: the cascade's own output), made with
  the cascade's test-time score threshold, NMS and top-k, then scaled as the model's output;
- the final detections (the model's output) and, with masks, each mask head's masks on them;
- the IoU of each stage's input boxes with their best ground truth (histogram);
- the ground-truth coverage of the RPN's top-N proposals (:func:`greedy_cover`).

``evaluate()`` gathers them from every process (as Detectron2's COCOEvaluator does), computes
COCO AP of every row with the project's COCOeval backend, AP at each IoU threshold, the IoU
shift and the proposal recall (:mod:`cmrcnn_ext.evaluation.stage_metrics`) and keeps them in
``self.results`` on the main process (it returns {} to Detectron2's loop). The per-row COCO
results can be written as files (``stage_results/<row>.json``), so that any row can be
re-evaluated with pycocotools.
"""

import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils import comm

from cmrcnn_ext.evaluation.stage_metrics import (
    IOU_BINS,
    ap_summary,
    coco_eval,
    greedy_cover,
    load_coco_gt,
    max_iou,
    nan_summary,
    proposal_counts,
    recall_summary,
)
from cmrcnn_ext.modeling.box_inference import fast_rcnn_inference_prefix

logger = logging.getLogger(__name__)

__all__ = ["StageEvaluator", "box_rows", "mask_rows"]


def box_rows(num_stages: int) -> List[str]:
    """Names of the box rows: each stage alone, the mean classifier of stages 1..k, final."""
    rows = ["stage 1"]
    for k in range(2, num_stages + 1):
        rows += [f"stage {k}", f"stages 1-{k} mean"]
    return rows + ["final"]


def mask_rows(mask_stages: Sequence[int]) -> List[str]:
    """Names of the mask rows: each mask head on the final boxes, their mean, final."""
    rows = [f"mask head {s + 1}" for s in mask_stages]
    if len(mask_stages) > 1:
        rows.append("mask heads mean")
    return rows + ["final"]


class StageEvaluator(DatasetEvaluator):
    """Per-stage box AP, per-head mask AP, IoU shift and proposal recall of a cascade model.

    Args:
        dataset_name: a registered data set with a COCO JSON (``json_file``).
        recorder: the :class:`~cmrcnn_ext.modeling.stage_outputs.StageRecorder` of the model.
        roi_heads: the model's :class:`CascadeMaskROIHeads` (thresholds, NMS, mask heads).
        stage_ious: the IoU threshold each stage is trained for (``ROI_BOX_CASCADE_HEAD.IOUS``).
        post_nms_topk: the RPN's proposals per image at test time.
        backend: COCOeval implementation, "faster" or "pycocotools".
        output_dir: where ``stage_results/<row>.json`` are written (None: not written).
    """

    def __init__(
        self,
        dataset_name: str,
        recorder,
        roi_heads,
        stage_ious: Sequence[float],
        post_nms_topk: int,
        backend: str = "faster",
        output_dir=None,
    ):
        self._dataset_name = dataset_name
        self._json_file = MetadataCatalog.get(dataset_name).json_file
        self._recorder = recorder
        self._heads = roi_heads
        self._num_stages = roi_heads.num_cascade_stages
        self._stage_ious = [float(t) for t in stage_ious]
        self._iou_levels = sorted(set(self._stage_ious) | {0.5})
        self._counts = proposal_counts(post_nms_topk)
        self._backend = backend
        self._output_dir = output_dir
        self._mask_stages = roi_heads.mask_train_stages() if roi_heads.mask_on else []
        with open(self._json_file) as f:
            self._gt = _gt_boxes_by_image(json.load(f))
        self.results = None

    def reset(self):
        self._images = []

    def process(self, inputs, outputs):
        if len(self._recorder.images) != len(inputs):
            raise RuntimeError(
                f"the stage recorder holds {len(self._recorder.images)} images for a batch of "
                f"{len(inputs)}: run the model inside record_stage_outputs(model)"
            )
        for inp, out, stages in zip(inputs, outputs, self._recorder.images):
            self._images.append(self._process_image(inp, out["instances"], stages))

    def _process_image(self, inp, final: Instances, stages) -> dict:
        image_id = inp["image_id"]
        height, width = (
            inp.get("height", final.image_size[0]),
            inp.get("width", final.image_size[1]),
        )
        gt = self._gt.get(image_id, torch.zeros(0, 4))
        rec = {"image_id": image_id, "boxes": {}, "masks": {}}

        def to_json(instances):
            instances = detector_postprocess(instances, height, width)
            return instances_to_coco_json(instances.to("cpu"), image_id)

        probs = [p.cpu() for p in stages.stage_probs]
        for k in range(self._num_stages):
            boxes = stages.stage_boxes[k].cpu()
            rec["boxes"][f"stage {k + 1}"] = to_json(self._detect(boxes, probs[k], stages))
            if k > 0:  # Detectron2's mean: sum(list(...)) * (1.0 / number of stages)
                mean = sum(list(probs[: k + 1])) * (1.0 / (k + 1))
                rec["boxes"][f"stages 1-{k + 1} mean"] = to_json(self._detect(boxes, mean, stages))
        final_cpu = final.to("cpu")
        boxes_only = Instances(final_cpu.image_size)
        for name in ("pred_boxes", "scores", "pred_classes"):
            boxes_only.set(name, final_cpu.get(name))
        rec["boxes"]["final"] = instances_to_coco_json(boxes_only, image_id)
        if self._mask_stages and final.has("pred_masks"):
            rec["masks"]["final"] = instances_to_coco_json(final_cpu, image_id)
            rec["masks"].update(self._head_masks(stages, final_cpu, height, width, image_id))

        # IoU of each stage's input boxes with their best ground truth (original coordinates)
        sx, sy = width / stages.image_size[1], height / stages.image_size[0]
        scale = torch.tensor([sx, sy, sx, sy])
        hist, over, total = [], [], []
        for b in stages.stage_inputs:
            iou = max_iou(b.cpu().float() * scale, gt).numpy()
            hist.append(np.histogram(iou, IOU_BINS, (0.0, 1.0))[0])
            over.append([int((iou >= t).sum()) for t in self._iou_levels])
            total.append(float(iou.sum()))
        rec["iou_hist"], rec["iou_over"], rec["iou_sum"] = np.stack(hist), np.array(over), total
        order = stages.objectness_logits.cpu().argsort(descending=True)
        proposals = stages.proposals.cpu().float()
        if len(order) == len(proposals):
            proposals = proposals[order]
        proposals = proposals * scale
        rec["cover"] = {n: greedy_cover(proposals[:n], gt) for n in self._counts}
        return rec

    def _detect(self, boxes, scores, stages) -> Instances:
        """The cascade's test-time post-processing of one image's (boxes, scores)."""
        predictor = self._heads.box_predictor[-1]
        infer = fast_rcnn_inference_prefix if self._heads.prefix_nms else fast_rcnn_inference
        instances, _ = infer(
            [boxes],
            [scores],
            [stages.image_size],
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        return instances[0]

    def _head_masks(self, stages, final, height, width, image_id) -> Dict[str, list]:
        """Each mask head's masks (and their mean) on the final detections, as COCO results."""
        out = {}
        if stages.final_boxes is None or not stages.mask_probs:
            return out
        probs = {f"mask head {s + 1}": stages.mask_probs[s].cpu() for s in self._mask_stages}
        if len(probs) > 1:
            probs["mask heads mean"] = sum(probs.values()) / len(probs)
        for name, p in probs.items():
            inst = Instances(
                stages.image_size,
                pred_boxes=Boxes(stages.final_boxes.cpu()),
                scores=final.scores,
                pred_classes=final.pred_classes,
                pred_masks=p,
            )
            out[name] = instances_to_coco_json(detector_postprocess(inst, height, width), image_id)
        return out

    def evaluate(self):
        images = comm.gather(self._images, dst=0)
        if not comm.is_main_process():
            return {}
        images = list(itertools.chain(*images))
        coco_gt = load_coco_gt(self._json_file, self._backend)
        report = OrderedDict()
        report["box"] = self._evaluate_rows(images, "boxes", box_rows(self._num_stages), coco_gt)
        if self._mask_stages:
            rows = mask_rows(self._mask_stages)
            report["mask"] = self._evaluate_rows(images, "masks", rows, coco_gt)
        report["iou_shift"] = self._iou_shift(images)
        report["proposals"] = {
            str(n): recall_summary(np.concatenate([im["cover"][n] for im in images]))
            for n in self._counts
        }
        report["num_images"] = len(images)
        self.results = report
        # Detectron2's test loop prints every result as "task -> {metric: float}": the report
        # (nested rows) stays in self.results instead.
        return {}

    def _evaluate_rows(self, images, key, rows, coco_gt) -> Dict[str, dict]:
        iou_type = "bbox" if key == "boxes" else "segm"
        # read now: Detectron2's loader of a registered COCO file sets the id mapping only when
        # the data set is first loaded (as the COCO evaluator, which also reads it late)
        meta = MetadataCatalog.get(self._dataset_name)
        mapping = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
        to_dataset_id = {v: k for k, v in mapping.items()} if mapping else None
        out = OrderedDict()
        for row in rows:
            results = [r for im in images for r in im[key].get(row, [])]
            if to_dataset_id:
                results = [{**r, "category_id": to_dataset_id[r["category_id"]]} for r in results]
            if self._output_dir:
                self._write_results(key, row, results)
            if not results:
                logger.warning("stage report: no detections in row %r (%s)", row, iou_type)
                out[row] = nan_summary()
                continue
            out[row] = ap_summary(coco_eval(coco_gt, results, iou_type, self._backend))
        return out

    def _write_results(self, key, row, results):
        folder = os.path.join(self._output_dir, "stage_results")
        os.makedirs(folder, exist_ok=True)
        name = f"{'bbox' if key == 'boxes' else 'segm'}_{row.replace(' ', '_')}.json"
        with open(os.path.join(folder, name), "w") as f:
            json.dump(results, f)

    def _iou_shift(self, images) -> List[dict]:
        hist = np.sum([im["iou_hist"] for im in images], axis=0)  # (stages, bins)
        over = np.sum([im["iou_over"] for im in images], axis=0)  # (stages, levels)
        iou_sum = np.sum([im["iou_sum"] for im in images], axis=0)  # (stages,)
        out = []
        for k in range(self._num_stages):
            total = int(hist[k].sum())
            out.append(
                {
                    "stage": k + 1,
                    "trained_iou": self._stage_ious[k],
                    "input_boxes": total,
                    "mean_iou": float(iou_sum[k] / total) if total else float("nan"),
                    "histogram": hist[k].astype(int).tolist(),
                    "fraction_at_or_above": {
                        f"{t:.2f}": float(over[k, j] / total) if total else float("nan")
                        for j, t in enumerate(self._iou_levels)
                    },
                }
            )
        return out


def _gt_boxes_by_image(dataset: dict) -> Dict[int, torch.Tensor]:
    """Non-crowd ground-truth boxes (XYXY, float32) of a COCO JSON, by image id."""
    out = {img["id"]: [] for img in dataset.get("images", [])}
    for ann in dataset.get("annotations", []):
        if not ann.get("iscrowd", 0) and ann.get("bbox") is not None:
            out.setdefault(ann["image_id"], []).append(ann["bbox"])
    return {
        i: torch.tensor(
            [BoxMode.convert(list(b), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for b in boxes],
            dtype=torch.float32,
        ).reshape(-1, 4)
        for i, boxes in out.items()
    }
