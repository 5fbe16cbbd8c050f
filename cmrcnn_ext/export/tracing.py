"""The traceable inference path of a Cascade Mask R-CNN, for TorchScript / ONNX export.

This is the one place where cmrcnn_ext re-implements Detectron2's inference code: tracing needs
it without Python-side sizes. Its equality with Detectron2's own inference is the link, tested
in tests/test_export.py (eager wrapper == Detectron2 exactly; traced == eager).

The exported model (see docs/export.md) takes ONE image and returns plain tensors:

    input   image: (3, H, W) float32 (or uint8), values 0-255, channels in the config's
            INPUT.FORMAT order ("BGR" or "RGB"), at the size the model should run at: resizing
            is the caller's job (the checkpoint was trained and evaluated with the short side =
            INPUT.MIN_SIZE_TEST, the long side <= INPUT.MAX_SIZE_TEST). Any H, W works.
    output  (boxes, scores, classes, masks):
            boxes   (N, 4) float32, x0 y0 x1 y1 in input-image pixels, clipped to the image;
            scores  (N,) float32, sorted in decreasing order;
            classes (N,) int64, 0-based contiguous class ids;
            masks   (N, H, W), pasted into the input image: bool (probability >= 0.5, the same
                    as Detectron2's ``pred_masks``) or, with ``mask_format="probs"``, float32
                    mask probabilities in [0, 1].

The model is what ``GeneralizedRCNN.inference`` + ``detector_postprocess`` compute (Detectron2's
``DefaultPredictor`` without its resize), rewritten by :class:`ExportableCascadeMaskRCNN` as plain
tensor code for one image so that tracing records no Python-side sizes: the number of
proposals and detections and the image size may change from call to call. Differences to the
eager model: ROIAlign is torchvision's kernel even with ``MODEL.CMRCNN.FAST_ROI_ALIGN`` (same
numbers to ~1e-6), the mask head stays NCHW with ``MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD`` (~1e-7);
NMS does not switch algorithm on the number of boxes as torchvision's
``batched_nms`` does eagerly: the RPN's per-level NMS is always the per-group loop (what
Detectron2 runs for > 1,000 boxes), the final per-class NMS always the coordinate-offset trick
(what it runs for <= 1,000 candidates); the two differ only by float rounding of IoUs at the
threshold. The un-traced wrapper gives Detectron2's numbers exactly (tests/test_export.py).
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from cmrcnn_ext.modeling.mask_head import class_mask_probs, mask_heads

#: Mask formats of the exported model's output.
MASK_FORMATS = ("bool", "probs")


def _clamp_int(n, high: int):
    """min(n, high) for an int (eager) or a 0-dim tensor (tracing: stays traced)."""
    if isinstance(n, torch.Tensor):
        return torch.clamp(n, max=high)
    return min(n, high)


def _size_vector(values, device) -> torch.Tensor:
    """1-D float tensor of sizes that are ints (eager) or 0-dim tensors (tracing)."""
    if any(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([torch.as_tensor(v) for v in values]).to(device, torch.float32)
    return torch.tensor(values, dtype=torch.float32, device=device)


def _clip(boxes: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Detectron2's ``Boxes.clip``: clamp x to [0, w] and y to [0, h]; bound = [w, h, w, h]."""
    return torch.min(boxes.clamp(min=0), bound)


def _nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Detectron2's ``Boxes.nonempty``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def batched_nms_per_group(boxes, scores, groups, num_groups: int, iou_threshold: float):
    """torchvision's ``batched_nms`` per-group loop (``_batched_nms_vanilla``) over a fixed
    number of groups, so that it traces: one ``nms`` per group on the untouched coordinates.
    Returns the kept indices sorted by decreasing score, as torchvision does."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for g in range(num_groups):
        idx = torch.where(groups == g)[0]
        keep_mask[idx[nms(boxes[idx], scores[idx], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


def batched_nms_offsets(boxes, scores, groups, iou_threshold: float):
    """torchvision's ``batched_nms`` coordinate trick (``_batched_nms_coordinate_trick``), which
    it uses for <= 1,000 boxes on the CPU and always when tracing, made safe for 0 boxes when
    traced (torchvision decides that in Python, so a trace would call ``max()`` on nothing)."""
    boxes = boxes.float()
    # boxes.max(), and 0 when there are none; the same value as torchvision's for boxes with
    # coordinates >= 0, which the trick needs anyway (clipped boxes)
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = groups.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height, width) -> torch.Tensor:
    """Detectron2's ``_do_paste_mask(skip_empty=False)``: bilinear resampling of (N, M, M) mask
    probabilities into (N, height, width) images, each into its box (ROIAlign's pixel model)."""
    n = masks.shape[0]
    device = masks.device
    img_y = torch.arange(0, height, device=device, dtype=torch.float32) + 0.5
    img_x = torch.arange(0, width, device=device, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)  # each (N, 1)
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1  # (N, height)
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1  # (N, width)
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0]


class ExportableCascadeMaskRCNN(nn.Module):
    """One-image inference of a Cascade Mask R-CNN ``GeneralizedRCNN`` as plain tensor code.

    It uses the model's own modules (backbone, RPN head and anchors, box poolers / heads /
    predictors of every stage, mask pooler and head(s)) and reproduces the glue of
    ``GeneralizedRCNN.inference`` (preprocess, ``find_top_rpn_proposals``, the cascade's
    ``_forward_box``, ``fast_rcnn_inference``, ``_forward_mask`` with cmrcnn_ext's
    ``TEST_MASK_MERGE``) and of ``detector_postprocess`` at the input size, without
    ``Instances`` / ``Boxes`` and without Python logic on data-dependent sizes, so that
    ``torch.jit.trace`` gives a model valid for any image size and number of detections.

    Args:
        model: a ``GeneralizedRCNN`` in eval mode with an RPN, cascade ROI heads
            (cmrcnn_ext's ``CascadeMaskROIHeads`` or Detectron2's ``CascadeROIHeads``) and masks.
        mask_format: "bool" (masks >= 0.5) or "probs" (float32 probabilities).

    ``forward(image)``: see the module docstring for the input / output contract.
    """

    def __init__(self, model: nn.Module, mask_format: str = "bool"):
        super().__init__()
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format={mask_format!r} is not one of {MASK_FORMATS}")
        for attr in ("backbone", "proposal_generator", "roi_heads", "pixel_mean", "pixel_std"):
            if getattr(model, attr, None) is None:
                raise ValueError(f"export needs a GeneralizedRCNN with {attr}; got {type(model)}")
        rpn, rh = model.proposal_generator, model.roi_heads
        if not hasattr(rpn, "anchor_generator") or not hasattr(rpn, "rpn_head"):
            raise ValueError(f"export needs Detectron2's RPN; got {type(rpn).__name__}")
        if not hasattr(rh, "num_cascade_stages"):
            raise ValueError(f"export needs cascade ROI heads; got {type(rh).__name__}")
        if not getattr(rh, "mask_on", False) or getattr(rh, "mask_pooler", None) is None:
            raise ValueError("export needs MODEL.MASK_ON True with a mask pooler")
        for predictor in rh.box_predictor:
            if predictor.bbox_pred.out_features != 4:
                raise ValueError("export needs class-agnostic box regression (cascade heads)")
            if getattr(predictor, "use_sigmoid_ce", False) or getattr(
                predictor, "use_fed_loss", False
            ):
                raise ValueError("export supports softmax box classifiers only")
        self.model = model.eval()
        self.mask_format = mask_format
        self.size_divisibility = int(model.backbone.size_divisibility)
        self.box_dim = int(rpn.anchor_generator.box_dim)
        self.rpn_in_features = list(rpn.in_features)
        self.rpn_nms_thresh = float(rpn.nms_thresh)
        self.rpn_pre_topk = int(rpn.pre_nms_topk[False])
        self.rpn_post_topk = int(rpn.post_nms_topk[False])
        self.rpn_min_box_size = float(rpn.min_box_size)
        last = rh.box_predictor[-1]
        self.score_thresh = float(last.test_score_thresh)
        self.nms_thresh = float(last.test_nms_thresh)
        self.topk = int(last.test_topk_per_image)
        heads = mask_heads(rh.mask_head)
        self.merge_mean = len(heads) > 1 and getattr(rh, "test_mask_merge", "last") == "mean"
        self.eval()

    # ----------------------------------------------------------------------------------- parts
    def _pool(self, pooler, features: List[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """``ROIPooler.forward`` for one image's (R, 4) boxes."""
        rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)
        if len(pooler.level_poolers) == 1:
            return pooler.level_poolers[0](features[0], rois)
        # assign_boxes_to_levels
        box_sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        levels = torch.floor(
            pooler.canonical_level + torch.log2(box_sizes / pooler.canonical_box_size + 1e-8)
        )
        levels = torch.clamp(levels, min=pooler.min_level, max=pooler.max_level)
        levels = levels.to(torch.int64) - pooler.min_level
        out_h, out_w = pooler.output_size
        output = features[0].new_zeros((rois.shape[0], features[0].shape[1], out_h, out_w))
        for level, level_pooler in enumerate(pooler.level_poolers):
            inds = torch.where(levels == level)[0]
            output.index_put_((inds,), level_pooler(features[level], rois[inds]))
        return output

    def _proposals(self, features, bound: torch.Tensor) -> torch.Tensor:
        """RPN proposals (R, 4) of one image: ``RPN.forward`` + ``find_top_rpn_proposals``."""
        rpn = self.model.proposal_generator
        features = [features[f] for f in self.rpn_in_features]
        anchors = rpn.anchor_generator(features)
        logits, deltas = rpn.rpn_head(features)
        device = features[0].device
        batch_idx = torch.arange(1, device=device)
        boxes_l, scores_l, levels_l = [], [], []
        for level, (anchors_i, logits_i, deltas_i) in enumerate(zip(anchors, logits, deltas)):
            logits_i = logits_i.permute(0, 2, 3, 1).flatten(1)  # (1, Hi*Wi*A)
            deltas_i = (
                deltas_i.view(
                    deltas_i.shape[0], -1, self.box_dim, deltas_i.shape[-2], deltas_i.shape[-1]
                )
                .permute(0, 3, 4, 1, 2)
                .flatten(1, -2)
            )  # (1, Hi*Wi*A, 4)
            proposals_i = rpn.box2box_transform.apply_deltas(
                deltas_i.reshape(-1, self.box_dim), anchors_i.tensor
            ).view(1, -1, self.box_dim)
            k = _clamp_int(logits_i.shape[1], self.rpn_pre_topk)
            logits_i, idx = logits_i.sort(descending=True, dim=1)
            topk_idx = idx.narrow(1, 0, k)
            scores_l.append(logits_i.narrow(1, 0, k)[0])
            boxes_l.append(proposals_i[batch_idx[:, None], topk_idx][0])
            levels_l.append(torch.full((k,), level, dtype=torch.int64, device=device))
        boxes, scores, levels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(levels_l)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        boxes = _clip(boxes, bound)
        keep = _nonempty(boxes, self.rpn_min_box_size)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = batched_nms_per_group(boxes, scores, levels, len(boxes_l), self.rpn_nms_thresh)
        return boxes[keep[: self.rpn_post_topk]]

    def _detect(self, features, proposals: torch.Tensor, bound: torch.Tensor):
        """The cascade's ``_forward_box`` at test time + ``fast_rcnn_inference_single_image``."""
        rh = self.model.roi_heads
        features = [features[f] for f in rh.box_in_features]
        boxes = proposals
        probs = []
        for k in range(rh.num_cascade_stages):
            if k > 0:
                boxes = _clip(boxes, bound)  # _create_proposals_from_boxes (no filtering)
            x = rh.box_head[k](self._pool(rh.box_pooler, features, boxes))
            class_logits, deltas = rh.box_predictor[k](x)
            probs.append(F.softmax(class_logits, dim=-1))
            if k < rh.num_cascade_stages - 1:
                boxes = rh.box_predictor[k].box2box_transform.apply_deltas(deltas, boxes)
        scores = sum(probs) * (1.0 / rh.num_cascade_stages)
        boxes = rh.box_predictor[-1].box2box_transform.apply_deltas(deltas, boxes)
        # fast_rcnn_inference_single_image (class-agnostic boxes)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
        boxes, scores = boxes[valid], scores[valid]
        scores = scores[:, :-1]
        boxes = _clip(boxes, bound)
        filter_inds = (scores > self.score_thresh).nonzero()
        boxes = boxes[filter_inds[:, 0]]
        scores = scores[filter_inds[:, 0], filter_inds[:, 1]]
        classes = filter_inds[:, 1]
        keep = batched_nms_offsets(boxes, scores, classes, self.nms_thresh)
        if self.topk >= 0:
            keep = keep[: self.topk]
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        # detector_postprocess at the input size: scale 1, clip (a no-op here), drop empty boxes
        keep = _nonempty(boxes)
        return boxes[keep], scores[keep], classes[keep]

    def _masks(self, features, boxes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        rh = self.model.roi_heads
        # One extra box, whose mask is dropped, so that the mask head never runs on an empty
        # batch: ONNX Runtime's GroupNorm (a Reshape to (0, groups, -1)) fails on 0 ROIs. Every
        # layer works per ROI, so the other masks are unchanged.
        boxes = torch.cat([boxes, boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]])])
        classes = torch.cat([classes, classes.new_zeros(1)])
        x = self._pool(rh.mask_pooler, [features[f] for f in rh.mask_in_features], boxes)
        heads = mask_heads(rh.mask_head)
        used = heads if self.merge_mean else heads[-1:]
        probs = sum(class_mask_probs(h.layers(x), classes) for h in used) / len(used)
        return probs[:-1, 0]

    # --------------------------------------------------------------------------------- forward
    def forward(
        self, image: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        height, width = image.shape[-2], image.shape[-1]
        x = image.to(device=model.pixel_mean.device, dtype=torch.float32)
        x = (x - model.pixel_mean) / model.pixel_std
        d = self.size_divisibility
        if d > 1:  # ImageList.from_tensors: pad bottom / right to a multiple of d
            x = F.pad(
                x, [0, (width + d - 1) // d * d - width, 0, (height + d - 1) // d * d - height]
            )
        features = model.backbone(x[None])
        bound = _size_vector([width, height, width, height], x.device)
        proposals = self._proposals(features, bound)
        boxes, scores, classes = self._detect(features, proposals, bound)
        probs = self._masks(features, boxes, classes)
        masks = paste_masks(probs, boxes, height, width)
        if self.mask_format == "bool":
            masks = masks >= 0.5
        return boxes, scores, classes, masks


def build_exportable(cfg, weights=None, mask_format="bool"):
    """Build the model of ``cfg``, load ``weights`` (default ``cfg.MODEL.WEIGHTS``; "" = keep the
    random init) and wrap it in :class:`ExportableCascadeMaskRCNN` (eval mode)."""
    from detectron2.modeling import build_model

    from cmrcnn_ext.engine.checkpoint import CMRCNNCheckpointer

    model = build_model(cfg)
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    if weights:
        CMRCNNCheckpointer(model, for_inference=True).load(weights)
    model.eval()
    return ExportableCascadeMaskRCNN(model, mask_format=mask_format).eval()
