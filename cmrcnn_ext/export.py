"""Export a trained model to TorchScript (or ONNX) that runs with only torch + torchvision.

    python -m cmrcnn_ext.export --run output/mydata --output model.ts \\
        [--format torchscript|onnx] [--sample-image IMG] [--mask-format bool|probs] [KEY VALUE ...]
    python -m cmrcnn_ext.export --config-file cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml \\
        --weights output/demo/model_final.pth --output model.ts

``--run`` takes a training run's ``OUTPUT_DIR`` (its ``config.yaml`` and final checkpoint); no
data set is read, and the class names stored with the exported model come from the config.

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

import argparse
import json
import logging
import os
import statistics
import time
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms

from .cli import add_debug_argument, run

logger = logging.getLogger("cmrcnn_ext.export")

MASK_FORMATS = ("bool", "probs")
FORMATS = ("torchscript", "onnx")
#: Name of the JSON metadata stored in an exported TorchScript file (``_extra_files``).
METADATA_NAME = "cmrcnn_export.json"
OUTPUT_NAMES = ("boxes", "scores", "classes", "masks")


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
        heads = list(rh.mask_head) if isinstance(rh.mask_head, nn.ModuleList) else [rh.mask_head]
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

    @staticmethod
    def _mask_probs(head, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities (R, M, M) of each box's class (``mask_rcnn_inference``)."""
        logits = head.layers(x)
        predictor = getattr(head, "predictor", None)
        agnostic = predictor.out_channels == 1 if predictor is not None else logits.shape[1] == 1
        if agnostic:
            return logits[:, 0].sigmoid()
        index = torch.arange(logits.shape[0], device=logits.device)
        return logits[index, classes].sigmoid()

    def _masks(self, features, boxes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        rh = self.model.roi_heads
        # One extra box, whose mask is dropped, so that the mask head never runs on an empty
        # batch: ONNX Runtime's GroupNorm (a Reshape to (0, groups, -1)) fails on 0 ROIs. Every
        # layer works per ROI, so the other masks are unchanged.
        boxes = torch.cat([boxes, boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]])])
        classes = torch.cat([classes, classes.new_zeros(1)])
        x = self._pool(rh.mask_pooler, [features[f] for f in rh.mask_in_features], boxes)
        heads = list(rh.mask_head) if isinstance(rh.mask_head, nn.ModuleList) else [rh.mask_head]
        if not self.merge_mean:
            probs = self._mask_probs(heads[-1], x, classes)
        else:
            probs = sum(self._mask_probs(h, x, classes) for h in heads) / len(heads)
        return probs[:-1]

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


# --------------------------------------------------------------------------------------- build
def build_exportable(cfg, weights=None, mask_format="bool"):
    """Build the model of ``cfg``, load ``weights`` (default ``cfg.MODEL.WEIGHTS``; "" = keep the
    random init) and wrap it in :class:`ExportableCascadeMaskRCNN` (eval mode)."""
    from detectron2.modeling import build_model

    from .checkpoint import CMRCNNCheckpointer

    model = build_model(cfg)
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    if weights:
        CMRCNNCheckpointer(model, for_inference=True).load(weights)
    model.eval()
    return ExportableCascadeMaskRCNN(model, mask_format=mask_format).eval()


def _example_image(cfg, seed=0):
    """A random (3, H, W) float32 image at the config's test size (4:3 landscape)."""
    short = int(cfg.INPUT.MIN_SIZE_TEST) or 800
    long_ = min(int(round(short * 4 / 3)), int(cfg.INPUT.MAX_SIZE_TEST))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, short, long_, generator=g) * 255


def trace(wrapper: ExportableCascadeMaskRCNN, example: torch.Tensor):
    """``torch.jit.trace`` a copy of the wrapper, without gradients, on one example image
    (3, H, W). The trace is valid for other sizes and detection counts (checked by
    tests/test_export.py); ``check_trace`` is off because it would re-run the model to compare
    graphs, which data-dependent sizes make differ anyway."""
    import copy
    import warnings

    wrapper = copy.deepcopy(wrapper).eval().requires_grad_(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(wrapper, (example,), check_trace=False, strict=False)


def metadata(cfg, mask_format):
    """The contract of an exported model, stored with it (JSON-serialisable dict)."""
    from .runs import class_names

    return {
        "input": "image (3, H, W) float32 or uint8, 0-255, channel order input_format, "
        "resized by the caller (e.g. short side min_size_test, long side <= max_size_test)",
        "outputs": list(OUTPUT_NAMES),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "mask_format": mask_format,
        "score_thresh_test": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
        "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),
        "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        "class_names": class_names(cfg),
        "mask_stages": cfg.MODEL.CMRCNN.MASK_STAGES,
        "test_mask_merge": cfg.MODEL.CMRCNN.TEST_MASK_MERGE,
        "device": str(cfg.MODEL.DEVICE),
    }


def export_torchscript(wrapper, example, path, meta=None):
    """Trace ``wrapper`` on ``example`` and save it (with ``meta`` as JSON extra file)."""
    traced = trace(wrapper, example)
    extra = {METADATA_NAME: json.dumps(meta or {}, indent=1)}
    torch.jit.save(traced, path, _extra_files=extra)
    return traced


def export_onnx(wrapper, example, path, opset=17, meta=None):
    """Export ``wrapper`` to ONNX with torch's TorchScript-based exporter (``dynamo=False``):
    dynamic image height / width and number of detections; ``meta`` goes into the model's
    ``metadata_props`` under ``cmrcnn_export`` (when the ``onnx`` package is installed).
    Needs opset >= 16 (``RoiAlign`` with half-pixel coordinates, ``GridSample``)."""
    import inspect
    import warnings

    if opset < 16:
        raise ValueError(
            f"opset {opset} < 16: torchvision exports roi_align(aligned=True) as RoiAlign with "
            "coordinate_transformation_mode='half_pixel' (opset 16) and mask pasting needs "
            "GridSample (opset 16)"
        )
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    wrapper.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), path, opset_version=opset,
            input_names=["image"], output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                "boxes": {0: "num_detections"},
                "scores": {0: "num_detections"},
                "classes": {0: "num_detections"},
                "masks": {0: "num_detections", 1: "height", 2: "width"},
            },
            **kwargs,
        )  # fmt: skip
    if meta is not None:
        try:
            import onnx
        except ImportError:
            logger.warning("onnx is not installed: no metadata stored in %s", path)
            return
        proto = onnx.load(path)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_NAME.split(".")[0], json.dumps(meta)
        onnx.save(proto, path)


def load_metadata(path):
    """The metadata dict stored in an exported TorchScript or ONNX file ({} if none)."""
    if str(path).endswith(".onnx"):
        import onnx

        props = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
        return json.loads(props.get(METADATA_NAME.split(".")[0], "{}"))
    extra = {METADATA_NAME: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_NAME] or "{}")


def match_detections(a, b, tol=1e-4):
    """Indices ``perm`` with ``b[perm]`` in the order of ``a``: detection i of ``a`` is paired
    with the one of ``b`` of the same class whose box and score are closest (largest absolute
    difference). Detections with (nearly) equal scores may come out of NMS / sorting in a
    different order in different runtimes; this pairs them up. Returns None when the counts
    differ or some detection has no partner within ``tol``."""
    boxes_a, scores_a, classes_a = a[:3]
    boxes_b, scores_b, classes_b = b[:3]
    if len(boxes_a) != len(boxes_b):
        return None
    if len(boxes_a) == 0:
        return torch.zeros(0, dtype=torch.long)
    dist = (boxes_a[:, None] - boxes_b[None]).abs().amax(-1)
    dist = torch.maximum(dist, (scores_a[:, None] - scores_b[None]).abs())
    dist[classes_a[:, None] != classes_b[None]] = float("inf")
    diag = dist.diagonal()
    if bool((diag <= tol).all()):  # same order: the usual case
        return torch.arange(len(boxes_a))
    perm = dist.argmin(1)
    if len(set(perm.tolist())) != len(perm) or not bool((dist.min(1).values <= tol).all()):
        return None
    return perm


def compare_outputs(a, b, tol=1e-4):
    """Compare two (boxes, scores, classes, masks) tuples (``a`` the reference).

    Detections are paired with :func:`match_detections` (order of equal scores may differ).
    Returns a dict with the counts, whether the order is the same, the largest box / score /
    mask-probability differences or the fraction of differing mask pixels (bool masks), and
    ``ok``: same count, every detection paired (same class, box and score within ``tol``),
    mask probabilities within ``tol`` or bool masks with < 0.1 % of pixels different.
    """
    a = [t.detach().cpu() for t in a]
    b = [t.detach().cpu() for t in b]
    res = {"n": (len(a[0]), len(b[0]))}
    perm = match_detections(a, b, tol)
    if perm is None or a[3].shape[1:] != b[3].shape[1:]:
        res["ok"] = False
        return res
    b = [t[perm] for t in b]
    res["same_order"] = bool(torch.equal(perm, torch.arange(len(perm))))
    res["classes_equal"] = bool(torch.equal(a[2], b[2]))
    res["boxes"] = float((a[0] - b[0]).abs().max()) if len(a[0]) else 0.0
    res["scores"] = float((a[1] - b[1]).abs().max()) if len(a[0]) else 0.0
    if a[3].dtype == torch.bool:
        res["mask_pixels_differ"] = float((a[3] != b[3]).float().mean()) if a[3].numel() else 0.0
        mask_ok = res["mask_pixels_differ"] < 1e-3
    else:
        res["masks"] = float((a[3].float() - b[3].float()).abs().max()) if a[3].numel() else 0.0
        mask_ok = res["masks"] <= tol
    res["ok"] = res["classes_equal"] and res["boxes"] <= tol and res["scores"] <= tol and mask_ok
    return res


# ----------------------------------------------------------------------------------- benchmark
def benchmark_exported(path, images: Sequence[torch.Tensor], warmup: int = 3, iters: int = 10):
    """Median latency in seconds of one image through an exported model.

    Args:
        path: a ``.ts`` / ``.pt`` TorchScript file (``torch.jit.load``, on the device it was
            exported for), a ``.onnx`` file (onnxruntime on the CPU, with
            ``torch.get_num_threads()`` threads) or any callable taking one image.
        images: (3, H, W) tensors following the model's input contract.
        warmup: passes over ``images`` before timing.
        iters: timed passes over ``images``; each image is timed on its own.

    Returns:
        float: the median over the ``iters * len(images)`` timed calls, in seconds.
    """
    if isinstance(path, (str, os.PathLike)) and str(path).endswith(".onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(img):
            return session.run(None, {"image": img.float().numpy()})

    else:
        model = (
            torch.jit.load(str(path))  # on the device it was exported for
            if isinstance(path, (str, os.PathLike))
            else path
        )
        model = model.eval() if hasattr(model, "eval") else model

        def run(img):
            out = model(img)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            return out

    images = list(images)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            for img in images:
                run(img)
        for _ in range(iters):
            for img in images:
                t0 = time.perf_counter()
                run(img)
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ CLI
def _read_sample(path, cfg):
    from detectron2.data.detection_utils import read_image
    from detectron2.data.transforms import ResizeShortestEdge

    img = read_image(path, format=cfg.INPUT.FORMAT)
    if cfg.INPUT.MIN_SIZE_TEST > 0:
        aug = ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        img = aug.get_transform(img).apply_image(img)
    return torch.as_tensor(img.astype("float32").transpose(2, 0, 1).copy())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run", help="a training run's OUTPUT_DIR: its config.yaml and final checkpoint"
    )
    parser.add_argument("--config-file", help="config (path or packaged name); default: --run's")
    parser.add_argument("--weights", help="checkpoint (.pth / .pkl); default: --run's")
    parser.add_argument("--output", required=True, help="exported file (e.g. model.ts, model.onnx)")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument(
        "--sample-image",
        help="image traced on and checked (resized like DefaultPredictor); default: a random "
        "image at INPUT.MIN_SIZE_TEST",
    )
    parser.add_argument("--mask-format", choices=MASK_FORMATS, default="bool")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16)")
    parser.add_argument("--no-check", action="store_true", help="skip the eager-vs-export check")
    add_debug_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    from detectron2.utils.logger import setup_logger

    from .runs import inference_config

    setup_logger(name="cmrcnn_ext")
    cfg = inference_config(args.config_file, args.weights, args.run, args.opts)
    wrapper = build_exportable(cfg, mask_format=args.mask_format)
    example = _read_sample(args.sample_image, cfg) if args.sample_image else _example_image(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.format == "torchscript":
        exported = export_torchscript(
            wrapper, example, args.output, metadata(cfg, args.mask_format)
        )
        exported = torch.jit.load(args.output, map_location=cfg.MODEL.DEVICE)
    else:
        export_onnx(wrapper, example, args.output, args.opset, metadata(cfg, args.mask_format))
        exported = None
        try:
            import onnxruntime as ort
        except ImportError:
            print("onnxruntime is not installed: the ONNX file is not checked")
        else:
            session = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"])

            def exported(img):
                outs = session.run(None, {"image": img.float().cpu().numpy()})
                return tuple(torch.from_numpy(o) for o in outs)

    print(f"exported {args.format} -> {args.output}")
    if not args.no_check and exported is not None:
        h, w = example.shape[-2:]
        checks = [
            example,
            F.interpolate(example[None], size=(max(32, h * 3 // 4), w), mode="bilinear")[0],
        ]
        with torch.no_grad():
            for img in checks:
                res = compare_outputs(wrapper(img), exported(img))
                print(f"check at {tuple(img.shape[-2:])}: {res}")
                if not res["ok"]:
                    raise SystemExit(f"exported model differs from the eager one: {res}")
    return args.output


if __name__ == "__main__":
    run(main)
