"""Detectron2's own config keys that cmrcnn_ext tunes or documents.

:data:`TUNED` lists, for each Detectron2 key that matters for Cascade Mask R-CNN: its value in
cmrcnn_ext's reference preset (``reference``, from :data:`REFERENCE_CONFIG`), Detectron2's
default (``detectron2_default``, from ``detectron2.config.get_cfg()``), the value in Detectron2's
model-zoo cascade config (``detectron2_zoo``, :data:`DETECTRON2_ZOO_CONFIG`), the allowed
values (enforced by :mod:`cmrcnn_ext.config.validate`) and what the key does. Tests check the
three values against those configs. cmrcnn_ext's own keys are in
:mod:`cmrcnn_ext.config.schema`, not here.
"""

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from cmrcnn_ext.config.values import Allowed, ListOf, Number, OneOf

__all__ = [
    "DETECTRON2_ZOO_CONFIG",
    "REFERENCE_CONFIG",
    "RESNET_DEPTHS",
    "TUNED",
    "TUNED_BY_NAME",
    "Tuned",
    "load_reference_config",
]

#: cmrcnn_ext's reference preset, whose values are the ``reference`` field.
REFERENCE_CONFIG = "cascade_mask_rcnn_R_50_FPN_reference.yaml"
#: Detectron2 model-zoo config whose values are the ``detectron2_zoo`` field.
DETECTRON2_ZOO_CONFIG = "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"
#: ``MODEL.RESNETS.DEPTH`` values Detectron2's ResNet builds.
RESNET_DEPTHS = (18, 34, 50, 101, 152)
_SAME = object()  # detectron2_zoo: the same as detectron2_default


@dataclass(frozen=True)
class Tuned:
    """One Detectron2 config key with cmrcnn_ext's reference value.

    Attributes:
        key: full config key, e.g. ``"MODEL.RPN.IOU_THRESHOLDS"``.
        reference: value in the reference preset (:data:`REFERENCE_CONFIG`).
        detectron2_default: value in Detectron2's ``get_cfg()``.
        allowed: allowed values.
        meaning: what it does and when to change it.
        detectron2_zoo: value in :data:`DETECTRON2_ZOO_CONFIG` (default: ``detectron2_default``).
    """

    key: str
    reference: Any
    detectron2_default: Any
    allowed: Allowed
    meaning: str
    detectron2_zoo: Any = _SAME

    def __post_init__(self):
        if self.detectron2_zoo is _SAME:
            object.__setattr__(self, "detectron2_zoo", self.detectron2_default)


_POS_INT = Number(1, integer=True)
_NONNEG_INT = Number(0, integer=True)
_UNIT = Number(0, 1)
_R50_ZOO = "detectron2://Misc/cascade_mask_rcnn_R_50_FPN_3x/144998488/model_final_480dd8.pkl"
_REG_W = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
_IOUS = (0.5, 0.6, 0.7)
_MS = (640, 672, 704, 736, 768, 800)
_NMS = "With FPN, PRE_NMS_TOPK_* counts per FPN level and POST_NMS_TOPK_* per image."

# fmt: off
TUNED: Tuple[Tuned, ...] = (
    # --- backbone and initial weights
    Tuned("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "build_resnet_backbone",
          Allowed("a BACKBONE_REGISTRY name with outputs matching the FPN/RPN IN_FEATURES"),
          "Network the detector is built on. Keep the ResNet-FPN builder and pick the ResNet "
          "with MODEL.RESNETS.*; a custom backbone needs FPN-style outputs p2-p6.",
          "build_resnet_fpn_backbone"),
    Tuned("MODEL.RESNETS.DEPTH", 50, 50, OneOf(*RESNET_DEPTHS),
          "ResNet depth. Deeper is more accurate and slower; 18/34 suit CPUs and small data and "
          "need RES2_OUT_CHANNELS 64 and NUM_GROUPS 1."),
    Tuned("MODEL.RESNETS.NUM_GROUPS", 1, 1, _POS_INT,
          "Groups of the bottleneck 3x3 convs: 1 = ResNet, 32 = ResNeXt (with WIDTH_PER_GROUP "
          "4 or 8), more accurate at a similar cost. Depth 50/101/152 only."),
    Tuned("MODEL.RESNETS.WIDTH_PER_GROUP", 64, 64, _POS_INT,
          "Channels per group in res2's bottleneck: 64 for ResNet, 4 (32x4d) or 8 (32x8d) for "
          "ResNeXt."),
    Tuned("MODEL.RESNETS.RES2_OUT_CHANNELS", 256, 256, _POS_INT,
          "Output channels of res2: 256 for depth >= 50; must be 64 for R18/R34."),
    Tuned("MODEL.RESNETS.NORM", "FrozenBN", "FrozenBN",
          OneOf("FrozenBN", "BN", "SyncBN", "GN", "", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N",
                text='"FrozenBN", "BN", "SyncBN", "GN", "" (none), Detectron2\'s naiveSyncBN'),
          "Normalisation in the ResNet: FrozenBN to fine-tune pretrained weights; GN or SyncBN "
          "to train from scratch or with large per-GPU batches."),
    Tuned("MODEL.WEIGHTS", _R50_ZOO, "", Allowed('file path, URL or ""'),
          "Initial weights. The reference starts from Detectron2's R50 Cascade Mask R-CNN COCO "
          "weights; use ImageNet weights for another backbone, \"\" for random init. "
          "Fine-tuning to other classes reinitialises only the class-specific layers. "
          "detectron2:// URLs are downloaded once, then cached.",
          "detectron2://ImageNetPretrained/MSRA/R-50.pkl"),
    Tuned("MODEL.BACKBONE.FREEZE_AT", 2, 2, Number(0, 5, integer=True),
          "Backbone stages that get no gradient: 0 none, 1 the stem, k the stem + res2..res(k); "
          "their BN layers become FrozenBN. Saves memory and time; freezing too much hurts "
          "accuracy. 0 when training from scratch."),
    # --- RPN
    Tuned("MODEL.RPN.IOU_THRESHOLDS", [0.3, 0.7], [0.3, 0.7],
          ListOf(Number(0, 1, low_open=True), length=2,
                 text="[lower, upper], 0 < lower <= upper <= 1"),
          "An anchor with IoU >= upper to a ground-truth box is an object, < lower background, "
          "in between ignored; each ground truth's best anchor is an object whatever its IoU. "
          "0.3/0.7 is the robust choice."),
    Tuned("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 4000, 12000, _POS_INT,
          "Top-scoring proposals that NMS considers in training. Fewer: lower recall. " + _NMS,
          2000),
    Tuned("MODEL.RPN.POST_NMS_TOPK_TRAIN", 1000, 2000, _POS_INT,
          "Proposals kept after NMS in training, which the ROI heads sample from; at most "
          "PRE_NMS_TOPK_TRAIN. Fewer: lower recall, higher precision. " + _NMS),
    Tuned("MODEL.RPN.PRE_NMS_TOPK_TEST", 2000, 6000, _POS_INT,
          "Top-scoring proposals that NMS considers at test time. Fewer: faster; more: better "
          "accuracy. " + _NMS, 1000),
    Tuned("MODEL.RPN.POST_NMS_TOPK_TEST", 1000, 1000, _POS_INT,
          "Proposals that reach the box head at test time; at most PRE_NMS_TOPK_TEST. Fewer: "
          "faster inference; more: better accuracy. " + _NMS),
    # --- box and mask heads
    Tuned("MODEL.ROI_BOX_HEAD.NUM_CONV", 4, 0, _NONNEG_INT,
          "Conv layers of every stage's box head (NUM_CONV + NUM_FC >= 1). More learns richer "
          "features, with diminishing and eventually negative returns."),
    Tuned("MODEL.ROI_BOX_HEAD.NUM_FC", 2, 0, _NONNEG_INT,
          "FC layers of every stage's box head. 2 is the usual start; more costs compute and "
          "can overfit.", 2),
    Tuned("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, 14, _POS_INT,
          "Side of the pooled ROI features for the box head.", 7),
    Tuned("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14, 14, _POS_INT,
          "Side of the pooled ROI features for the mask head (masks are twice as large)."),
    Tuned("MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2, 0, _NONNEG_INT,
          "ROIAlign samples ratio x ratio points per output bin of the box pooler (2: 4 "
          "points); 0 = adaptive, ceil(ROI size / output size)."),
    Tuned("MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", 2, 0, _NONNEG_INT,
          "The same for the mask pooler."),
    # --- cascade
    Tuned("MODEL.ROI_BOX_CASCADE_HEAD.IOUS", _IOUS, _IOUS,
          ListOf(Number(0, 1, low_open=True, high_open=True), min_length=1,
                 text="strictly increasing, each in (0, 1)"),
          "Foreground IoU threshold of each cascade stage; their count is the number of stages "
          "(one BBOX_REG_WEIGHTS and STAGE_LOSS_WEIGHTS entry each). Raise the last one for "
          "better high-IoU boxes."),
    Tuned("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", _REG_W, _REG_W,
          ListOf(ListOf(Number(0, low_open=True), length=4), min_length=1,
                 text="one [wx, wy, ww, wh] per stage, each > 0"),
          "Box-regression target scaling of each stage; larger weights for later stages, whose "
          "boxes need finer corrections."),
    Tuned("MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.5], [0.5],
          ListOf(Number(0, 1, low_open=True), min_length=1, text="[IOUS[0]] (cascade heads)"),
          "Foreground IoU of the first stage's proposal sampling; equal to "
          "ROI_BOX_CASCADE_HEAD.IOUS[0]."),
    Tuned("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True, False, OneOf(True, False),
          "One box regression shared by all classes. Cascade ROI heads require True.", True),
    Tuned("MODEL.ROI_HEADS.NUM_CLASSES", 80, 80,
          Number(0, integer=True, text="integer >= 1 (0: the count in TRAIN_JSON)"),
          "Number of object classes (COCO: 80); set it for your data when fine-tuning, or 0 "
          "with DATASETS.CMRCNN.TRAIN_JSON to take it from that JSON."),
    # --- input and schedule
    Tuned("INPUT.MIN_SIZE_TRAIN", _MS, (800,),
          ListOf(_POS_INT, min_length=1, text="list of integers >= 1"),
          "Shorter image side in training, drawn from the list (multi-scale augmentation).",
          _MS),
    Tuned("INPUT.MAX_SIZE_TRAIN", 1333, 1333, _POS_INT, "Cap on the longer side in training."),
    Tuned("INPUT.MIN_SIZE_TEST", 800, 800, _NONNEG_INT,
          "Shorter image side at test time (0: no resize); larger finds smaller objects, "
          "slower."),
    Tuned("INPUT.MAX_SIZE_TEST", 1333, 1333, _POS_INT, "Cap on the longer side at test time."),
    Tuned("SOLVER.IMS_PER_BATCH", 16, 16, _POS_INT,
          "Images per iteration over all GPUs (divisible by their number); scale BASE_LR "
          "linearly with it."),
    Tuned("SOLVER.BASE_LR", 0.02, 0.001, Number(0, low_open=True),
          "Learning rate after warmup: 0.02 for SGD at 16 images per batch.", 0.02),
    Tuned("SOLVER.STEPS", (210000, 250000), (30000,),
          ListOf(_POS_INT, text="strictly increasing integers >= 1, none equal to MAX_ITER"),
          "Iterations where the learning rate is multiplied by SOLVER.GAMMA; scale them with "
          "MAX_ITER (steps beyond it are ignored, with a warning).", (210000, 250000)),
    Tuned("SOLVER.MAX_ITER", 270000, 40000, _POS_INT,
          "Training length in iterations (3x schedule: 270k at 16 images per batch).", 270000),
    Tuned("SOLVER.WARMUP_ITERS", 1000, 1000, _NONNEG_INT,
          "Iterations of linear learning-rate warmup; raise it if early losses diverge."),
    Tuned("SOLVER.AMP.ENABLED", False, False, OneOf(True, False),
          "Mixed-precision training: on CUDA Detectron2's AMPTrainer (float16 + loss scaling); "
          "on the CPU bfloat16 autocast (cmrcnn_ext's Trainer; fast on CPUs with AVX512-BF16 "
          "or AMX; Detectron2's own AMPTrainer is CUDA-only). Weights and checkpoints stay "
          "float32."),
    # --- inference
    Tuned("TEST.DETECTIONS_PER_IMAGE", 100, 100, _POS_INT,
          "Maximum detections returned per image (COCO evaluation uses 100)."),
    Tuned("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05, 0.05, _UNIT,
          "Minimum score of a returned detection: raise it for cleaner visual output, keep it "
          "low for mAP evaluation."),
    Tuned("MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.5, 0.5, _UNIT,
          "Per-class NMS IoU threshold on the final detections; higher keeps more overlapping "
          "objects."),
)
# fmt: on

TUNED_BY_NAME: Dict[str, Tuned] = {t.key: t for t in TUNED}


def load_reference_config():
    """The reference preset (:data:`REFERENCE_CONFIG`) merged into ``cmrcnn_ext.get_cfg()``.

    Returns:
        CfgNode: not validated, not frozen.
    """
    from cmrcnn_ext.model_zoo import get_config

    return get_config(REFERENCE_CONFIG)
