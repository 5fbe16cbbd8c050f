"""Test-time box post-processing of the cascade: score threshold, class-wise NMS, top-k.

Detectron2's ``fast_rcnn_inference`` runs class-wise NMS over *every* (box, class) candidate
above ``SCORE_THRESH_TEST`` and then keeps the ``DETECTIONS_PER_IMAGE`` best. With a low score
threshold and many classes that is tens of thousands of candidates (R50-FPN, 1000 proposals x 80
classes at threshold 0: 80,000), and Detectron2 then loops over the classes, one NMS call and one
host-device synchronisation each: on a GPU this step took more than half of the inference time in
``benchmarks/bench_inference.py``.

:func:`prefix_batched_nms` gives the same kept detections from a prefix of the candidates. Greedy
NMS decides about a candidate only from candidates with a higher score, so NMS run on the ``k``
highest-scoring candidates keeps exactly the boxes that NMS over all of them keeps among those
``k``, in the same order. Once that prefix keeps at least ``topk`` boxes, the first ``topk`` are
the final answer; otherwise the prefix grows (x4) until it does or covers every candidate. Each
round is one NMS call over all classes (boxes shifted apart per class), in float64 so that the
shift does not change the IoUs that float32 would compute by more than rounding.

The result equals Detectron2's up to float rounding of IoUs that lie within ~1e-7 of the NMS
threshold (``tests/test_box_inference.py`` compares the two on many random candidate sets).
"""

from typing import List, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torchvision.ops import nms

#: The first prefix holds this many candidates per kept detection (grown x4 when too few survive).
PREFIX_FACTOR = 4
MIN_PREFIX = 1024


def prefix_batched_nms(boxes, scores, classes, iou_threshold: float, topk: int) -> torch.Tensor:
    """Indices of the first ``topk`` boxes that class-wise NMS keeps, by decreasing score.

    Args:
        boxes: (N, 4) xyxy.
        scores: (N,).
        classes: (N,) integer class of each box; NMS never compares boxes of different classes.
        iou_threshold: boxes overlapping a kept box of their class by more than this are dropped.
        topk: how many kept boxes are wanted; < 0 for all.

    Returns:
        int64 tensor of at most ``topk`` indices into ``boxes``, highest score first: what
        ``torchvision.ops.batched_nms(boxes, scores, classes, iou_threshold)[:topk]`` returns.
    """
    n = scores.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    order = scores.argsort(descending=True)
    k = n if topk < 0 else min(n, max(PREFIX_FACTOR * topk, MIN_PREFIX))
    while True:
        idx = order[:k]
        b = boxes[idx].double()
        # shift each class into its own region: boxes of different classes never overlap
        low = b.min()
        span = b.max() - low + 1
        shifted = (b - low) + (classes[idx].double() * span)[:, None]
        keep = idx[nms(shifted, scores[idx].double(), iou_threshold)]
        if k == n or keep.numel() >= topk:
            return keep if topk < 0 else keep[:topk]
        k = min(n, k * PREFIX_FACTOR)


def fast_rcnn_inference_prefix(
    boxes: List[torch.Tensor],
    scores: List[torch.Tensor],
    image_shapes: List[Tuple[int, int]],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
):
    """Drop-in for Detectron2's ``fast_rcnn_inference`` (same arguments and results), with the
    class-wise NMS of :func:`prefix_batched_nms`."""
    results = [
        _single_image(b, s, shape, score_thresh, nms_thresh, topk_per_image)
        for b, s, shape in zip(boxes, scores, image_shapes)
    ]
    return [r[0] for r in results], [r[1] for r in results]


def _single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk):
    # rows with a non-finite box or score are dropped, as Detectron2 does
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not finite.all():
        boxes, scores = boxes[finite], scores[finite]
    fg_scores = scores[:, :-1]  # the last column is background
    per_class = boxes.shape[1] // 4  # 1 for class-agnostic box regression
    clipped = Boxes(boxes.reshape(-1, 4))
    clipped.clip(image_shape)
    clipped = clipped.tensor.view(-1, per_class, 4)

    candidates = fg_scores > score_thresh
    rows, cls = candidates.nonzero().unbind(1)
    cand_boxes = clipped[rows, 0] if per_class == 1 else clipped[candidates]
    cand_scores = fg_scores[candidates]
    keep = prefix_batched_nms(cand_boxes, cand_scores, cls, nms_thresh, topk)

    result = Instances(image_shape)
    result.pred_boxes = Boxes(cand_boxes[keep])
    result.scores = cand_scores[keep]
    result.pred_classes = cls[keep]
    return result, rows[keep]
