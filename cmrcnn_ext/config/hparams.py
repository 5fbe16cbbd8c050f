"""Every tuning knob of cmrcnn_ext in one place: key, default, allowed values and meaning.

:data:`HPARAMS` is the single source of truth for the hyperparameter documentation (README's
"Hyperparameters" table is generated from it) and for the value ranges that
:func:`cmrcnn_ext.config.validate.validate_config` enforces. Keys are Detectron2's own config keys
wherever Detectron2 has one; only ``MODEL.CMRCNN.*``, ``DATASETS.CMRCNN.*``, ``TEST.CMRCNN_EVALUATOR`` and
``SOLVER.CMRCNN_*`` are added by cmrcnn_ext (see :mod:`cmrcnn_ext.config.defaults`).

``default`` is the value in the packaged ``cascade_mask_rcnn_R_50_FPN_reference.yaml`` (the product's
reference preset); ``detectron2_default`` the value in Detectron2's ``get_cfg()`` (``None`` for
cmrcnn_ext's own keys); ``detectron2_zoo`` the value in Detectron2's model-zoo config
``Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml``. The tests check all three against the configs.

Command line::

    python -m cmrcnn_ext.config.hparams                          # aligned table for the terminal
    python -m cmrcnn_ext.config.hparams --markdown               # Markdown table
    python -m cmrcnn_ext.config.hparams --update-readme README.md
"""
import argparse
import math
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

README_BEGIN = "<!-- HPARAMS:BEGIN -->"
README_END = "<!-- HPARAMS:END -->"
UPDATE_COMMAND = "python -m cmrcnn_ext.config.hparams --update-readme README.md"
#: Reference preset whose values are the ``default`` column.
REFERENCE_CONFIG = "cascade_mask_rcnn_R_50_FPN_reference.yaml"
#: Detectron2 model-zoo config whose values are the ``detectron2_zoo`` field.
DETECTRON2_ZOO_CONFIG = "Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml"
#: ``MODEL.RESNETS.DEPTH`` values Detectron2's ResNet builds.
RESNET_DEPTHS = (18, 34, 50, 101, 152)
#: ``MODEL.ROI_HEADS.NAME`` values that build a cascade (class-agnostic regression required).
CASCADE_ROI_HEADS = ("CascadeMaskROIHeads", "CascadeROIHeads")
_SAME = object()  # detectron2_zoo: same as detectron2_default


def format_value(value: Any) -> str:
    """Config value as text: tuples as lists, strings quoted."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


class Allowed:
    """A set of allowed values: ``contains(value)`` and a human description (``str()``)."""

    def __init__(self, text: str):
        self.text = text

    def contains(self, value: Any) -> bool:  # noqa: D102 (free text: anything passes)
        return True

    def __str__(self) -> str:
        return self.text


class OneOf(Allowed):
    """One of a fixed set of values."""

    def __init__(self, *values: Any, text: Optional[str] = None):
        self.values = values
        super().__init__(text or ", ".join(format_value(v) for v in values))

    def contains(self, value: Any) -> bool:  # noqa: D102
        return type(value) in {type(v) for v in self.values} and value in self.values


class Number(Allowed):
    """A number (or integer) within optional bounds, each closed or open."""

    def __init__(
        self,
        low=None,
        high=None,
        *,
        integer=False,
        low_open=False,
        high_open=False,
        text: Optional[str] = None,
    ):
        self.low, self.high, self.integer = low, high, integer
        self.low_open, self.high_open = low_open, high_open
        super().__init__(text or self._describe())

    def _describe(self) -> str:
        kind = "integer" if self.integer else "number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None and self.integer:
            return f"{kind} {lo}..{hi}"
        if lo is not None and hi is not None:
            left, right = "(["[not self.low_open], ")]"[not self.high_open]
            return f"{kind} in {left}{lo}, {hi}{right}"
        if lo is not None:
            return f"{kind} {'>' if self.low_open else '>='} {lo}"
        if hi is not None:
            return f"{kind} {'<' if self.high_open else '<='} {hi}"
        return kind

    def contains(self, value: Any) -> bool:  # noqa: D102
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True


class Text(Allowed):
    """A non-empty string."""

    def __init__(self, text: str = "non-empty text"):
        super().__init__(text)

    def contains(self, value: Any) -> bool:  # noqa: D102
        return isinstance(value, str) and bool(value.strip())


class ListOf(Allowed):
    """A list or tuple whose items are all allowed by ``item`` (optionally of fixed length)."""

    def __init__(
        self,
        item: Allowed,
        *,
        length: Optional[int] = None,
        min_length: int = 0,
        text: Optional[str] = None,
    ):
        self.item, self.length, self.min_length = item, length, min_length
        size = f"{length} " if length is not None else ""
        super().__init__(text or f"list of {size}values, each {item}")

    def contains(self, value: Any) -> bool:  # noqa: D102
        if not isinstance(value, (list, tuple)) or len(value) < self.min_length:
            return False
        if self.length is not None and len(value) != self.length:
            return False
        return all(self.item.contains(v) for v in value)


@dataclass(frozen=True)
class HParam:
    """One documented config key.

    Attributes:
        key: full config key, e.g. ``"MODEL.RPN.IOU_THRESHOLDS"``.
        default: value in the reference preset (:data:`REFERENCE_CONFIG`).
        allowed: allowed values; :func:`cmrcnn_ext.config.validate.validate_config` enforces them.
        meaning: what it does and when to change it.
        detectron2_default: value in Detectron2's ``get_cfg()``; ``None``: cmrcnn_ext's key.
        note: caveats (units, how Detectron2 interprets it).
        detectron2_zoo: value in Detectron2's :data:`DETECTRON2_ZOO_CONFIG`.
    """

    key: str
    default: Any
    allowed: Allowed
    meaning: str
    detectron2_default: Any = None
    note: str = ""
    detectron2_zoo: Any = _SAME

    def __post_init__(self):
        if self.detectron2_zoo is _SAME:
            object.__setattr__(self, "detectron2_zoo", self.detectron2_default)

    def detectron2_column(self, fmt=format_value) -> str:
        """Detectron2's default as shown in the table: "same" where it equals ``default``.

        Args:
            fmt: formats a value (e.g. in a Markdown code span).
        """
        d2, zoo = self.detectron2_default, self.detectron2_zoo
        if d2 is None:
            return "n/a (cmrcnn_ext key)"
        if plain_value(d2) == plain_value(self.default) and plain_value(zoo) == plain_value(
            self.default
        ):
            return "same"
        text = fmt(d2)
        if plain_value(zoo) != plain_value(d2):
            text += f" (its cascade R50-FPN 3x config: {fmt(zoo)})"
        return text


def plain_value(value: Any) -> Any:
    """Tuples as lists, recursively, so that config values compare equal to literals."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


_POS_INT = Number(1, integer=True)
_NONNEG_INT = Number(0, integer=True)
_UNIT = Number(0, 1)
_R50_ZOO = "detectron2://Misc/cascade_mask_rcnn_R_50_FPN_3x/144998488/model_final_480dd8.pkl"
_REG_W = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
_IOUS = (0.5, 0.6, 0.7)
_NMS = "In Detectron2 with FPN, PRE_NMS_TOPK_* counts per FPN level and POST_NMS_TOPK_* per image."
_ANY_PATH = Allowed('file path, URL or ""')
_DIR = Allowed('folder path or ""')

# fmt: off
HPARAMS: List[HParam] = [
    # --- backbone and initial weights
    HParam("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
           Allowed("a BACKBONE_REGISTRY name with outputs matching the FPN/RPN IN_FEATURES"),
           "Network the detector is built on. Keep the ResNet-FPN builder and pick the ResNet "
           "with MODEL.RESNETS.*; a custom backbone needs FPN-style outputs p2-p6.",
           "build_resnet_backbone", detectron2_zoo="build_resnet_fpn_backbone"),
    HParam("MODEL.RESNETS.DEPTH", 50, OneOf(*RESNET_DEPTHS),
           "ResNet depth. Deeper is more accurate and slower; 18/34 suit CPUs and small data.",
           50, "18/34 need RES2_OUT_CHANNELS 64 and NUM_GROUPS 1."),
    HParam("MODEL.RESNETS.NUM_GROUPS", 1, _POS_INT,
           "Groups of the bottleneck 3x3 convs: 1 = ResNet, 32 = ResNeXt (with WIDTH_PER_GROUP "
           "4 or 8), more accurate at a similar cost.", 1, "Depth 50/101/152 only."),
    HParam("MODEL.RESNETS.WIDTH_PER_GROUP", 64, _POS_INT,
           "Channels per group in res2's bottleneck: 64 for ResNet, 4 (32x4d) or 8 (32x8d) for "
           "ResNeXt.", 64),
    HParam("MODEL.RESNETS.RES2_OUT_CHANNELS", 256, _POS_INT,
           "Output channels of res2: 256 for depth >= 50; must be 64 for R18/R34.", 256),
    HParam("MODEL.RESNETS.NORM", "FrozenBN",
           OneOf("FrozenBN", "BN", "SyncBN", "GN", "", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N",
                 text='"FrozenBN", "BN", "SyncBN", "GN", "" (none), Detectron2\'s naiveSyncBN'),
           "Normalisation in the ResNet: FrozenBN to fine-tune pretrained weights; GN or SyncBN "
           "to train from scratch or with large per-GPU batches.", "FrozenBN"),
    HParam("MODEL.WEIGHTS", _R50_ZOO, _ANY_PATH,
           "Initial weights. The reference starts from Detectron2's R50 Cascade Mask R-CNN COCO "
           "weights; use ImageNet weights for another backbone, \"\" for random init. "
           "Fine-tuning to other classes reinitialises only the class-specific layers.",
           "", "detectron2:// URLs are downloaded once, then cached.",
           "detectron2://ImageNetPretrained/MSRA/R-50.pkl"),
    HParam("MODEL.BACKBONE.FREEZE_AT", 2, Number(0, 5, integer=True),
           "Backbone stages that get no gradient: 0 none, 1 the stem, k the stem + res2..res(k). "
           "Saves memory and time; freezing too much hurts accuracy. 0 when training from "
           "scratch.", 2, "Frozen stages' BN layers become FrozenBN."),
    # --- RPN
    HParam("MODEL.RPN.IOU_THRESHOLDS", [0.3, 0.7],
           ListOf(Number(0, 1, low_open=True), length=2,
                  text="[lower, upper], 0 < lower <= upper <= 1"),
           "An anchor with IoU >= upper to a ground-truth box is an object, < lower background, "
           "in between ignored. 0.3/0.7 is the robust choice.", [0.3, 0.7],
           "Each ground truth's best anchor is an object whatever its IoU."),
    HParam("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 4000, _POS_INT,
           "Top-scoring proposals that NMS considers in training. Fewer: lower recall.",
           12000, _NMS, 2000),
    HParam("MODEL.RPN.POST_NMS_TOPK_TRAIN", 1000, _POS_INT,
           "Proposals kept after NMS in training, which the ROI heads sample from. Fewer: lower "
           "recall, higher precision.", 2000, "Must be <= PRE_NMS_TOPK_TRAIN. " + _NMS),
    HParam("MODEL.RPN.PRE_NMS_TOPK_TEST", 2000, _POS_INT,
           "Top-scoring proposals that NMS considers at test time. Fewer: faster; more: better "
           "accuracy.", 6000, _NMS, 1000),
    HParam("MODEL.RPN.POST_NMS_TOPK_TEST", 1000, _POS_INT,
           "Proposals that reach the box head at test time. Fewer: faster inference; more: "
           "better accuracy.", 1000, "Must be <= PRE_NMS_TOPK_TEST. " + _NMS),
    # --- box and mask heads
    HParam("MODEL.ROI_BOX_HEAD.NUM_CONV", 4, _NONNEG_INT,
           "Conv layers of every stage's box head. More learns richer features, with "
           "diminishing and eventually negative returns.", 0, "NUM_CONV + NUM_FC must be > 0."),
    HParam("MODEL.ROI_BOX_HEAD.NUM_FC", 2, _NONNEG_INT,
           "FC layers of every stage's box head. 2 is the usual start; more costs compute and "
           "can overfit.", 0, "", 2),
    HParam("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7, _POS_INT,
           "Side of the pooled ROI features for the box head.", 14, "", 7),
    HParam("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14, _POS_INT,
           "Side of the pooled ROI features for the mask head (masks are twice as large).", 14),
    HParam("MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2, _NONNEG_INT,
           "ROIAlign samples ratio x ratio points per output bin of the box pooler (2: 4 "
           "points); 0 = adaptive, ceil(ROI size / output size).", 0),
    HParam("MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", 2, _NONNEG_INT,
           "The same for the mask pooler.", 0),
    # --- cascade
    HParam("MODEL.ROI_BOX_CASCADE_HEAD.IOUS", _IOUS,
           ListOf(Number(0, 1, low_open=True, high_open=True), min_length=1,
                  text="strictly increasing, each in (0, 1)"),
           "Foreground IoU threshold of each cascade stage; their count is the number of stages. "
           "Raise the last one for better high-IoU boxes.", _IOUS,
           "One BBOX_REG_WEIGHTS and STAGE_LOSS_WEIGHTS entry per stage."),
    HParam("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", _REG_W,
           ListOf(ListOf(Number(0, low_open=True), length=4), min_length=1,
                  text="one [wx, wy, ww, wh] per stage, each > 0"),
           "Box-regression target scaling of each stage; larger weights for later stages, whose "
           "boxes need finer corrections.", _REG_W),
    HParam("MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.5],
           ListOf(Number(0, 1, low_open=True), min_length=1, text="[IOUS[0]] (cascade heads)"),
           "Foreground IoU of the first stage's proposal sampling.", [0.5],
           "Must equal ROI_BOX_CASCADE_HEAD.IOUS[0]."),
    HParam("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True, OneOf(True, False),
           "One box regression shared by all classes. Cascade ROI heads require True.", False,
           "", True),
    HParam("MODEL.CMRCNN.MASK_STAGES", "all", OneOf("first", "last", "all"),
           "Stages with a mask head in training: first (Detectron2's cascade), last (the "
           "authors' Detectron) or all (one head per stage, the paper's best).",
           note="Masks are always predicted on the final boxes."),
    HParam("MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, 0.5, 0.25],
           ListOf(Number(0), min_length=1, text="one number >= 0 per stage"),
           "Weight of each stage's box losses and of its mask loss. [1, 0.5, 0.25] is the "
           "paper's and MMDetection's; [1, 1, 1] reproduces Detectron2."),
    HParam("MODEL.CMRCNN.TEST_MASK_MERGE", "mean", OneOf("last", "mean"),
           "Test-time masks from the last stage's head, or the mean of every stage head's "
           "mask probabilities.", note="\"mean\" needs MASK_STAGES \"all\"."),
    HParam("MODEL.CMRCNN.FAST_ROI_ALIGN", True, OneOf(True, False),
           "Compute the box and mask poolers' ROIAlign as a weighted gather on the CPU: same "
           "numbers as torchvision's kernel (to ~1e-6), faster in training and inference.",
           note="CPU only; with POOLER_SAMPLING_RATIO 0 (adaptive) in inference only. "
           "Otherwise torchvision's kernel. False = exactly Detectron2's poolers."),
    HParam("MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD", True, OneOf(True, False),
           "CPU inference path of the mask head(s): convolutions in channels-last memory "
           "format, and the 2x2 deconv + ReLU + 1x1 predictor as two matrix products; same "
           "numbers up to float rounding (~1e-7), ~1.6x faster mask heads.",
           note="CPU inference only. False = Detectron2's NCHW layout, bit for bit."),
    HParam("MODEL.CMRCNN.PREFIX_NMS", True, OneOf(True, False),
           "Test-time class-wise NMS on the best-scoring candidates first, grown until "
           "DETECTIONS_PER_IMAGE survive: Detectron2's detections in one NMS call instead of one "
           "per class; much faster on a GPU with many candidates.",
           None, "Detectron2 runs NMS over every candidate. False = Detectron2's code path."),
    HParam("MODEL.CMRCNN.CLASS_NAMES", [], ListOf(Text(), text="list of class names, or []"),
           "Names of the model's classes in output order; set from the training data and saved "
           "in OUTPUT_DIR/config.yaml, so prediction and export name the classes without the "
           "data set.", None, "Must match the data's categories and NUM_CLASSES when set."),
    # --- your data
    HParam("DATASETS.CMRCNN.TRAIN_JSON", "", _ANY_PATH,
           "Your COCO-format training JSON, registered as \"user_train\" and used as "
           "DATASETS.TRAIN.", note="\"\": use DATASETS.TRAIN as registered."),
    HParam("DATASETS.CMRCNN.TRAIN_IMAGE_ROOT", "", _DIR,
           "Folder that the training JSON's file_name entries are relative to."),
    HParam("DATASETS.CMRCNN.VAL_JSON", "", _ANY_PATH,
           "Your COCO-format evaluation JSON, registered as \"user_val\" and used as "
           "DATASETS.TEST.", note="\"\": use DATASETS.TEST as registered."),
    HParam("DATASETS.CMRCNN.VAL_IMAGE_ROOT", "", _DIR,
           "Folder that the evaluation JSON's file_name entries are relative to."),
    HParam("MODEL.ROI_HEADS.NUM_CLASSES", 80,
           Number(0, integer=True, text="integer >= 1 (0: the count in TRAIN_JSON)"),
           "Number of object classes (COCO: 80); set it for your data when fine-tuning.", 80,
           "0 only with DATASETS.CMRCNN.TRAIN_JSON set."),
    # --- input and schedule
    HParam("INPUT.MIN_SIZE_TRAIN", (640, 672, 704, 736, 768, 800),
           ListOf(_POS_INT, min_length=1, text="list of integers >= 1"),
           "Shorter image side in training, drawn from the list (multi-scale augmentation).",
           (800,), "", (640, 672, 704, 736, 768, 800)),
    HParam("INPUT.MAX_SIZE_TRAIN", 1333, _POS_INT, "Cap on the longer side in training.", 1333),
    HParam("INPUT.MIN_SIZE_TEST", 800, _NONNEG_INT,
           "Shorter image side at test time (0: no resize); larger finds smaller objects, "
           "slower.", 800),
    HParam("INPUT.MAX_SIZE_TEST", 1333, _POS_INT, "Cap on the longer side at test time.", 1333),
    HParam("SOLVER.IMS_PER_BATCH", 16, _POS_INT,
           "Images per iteration over all GPUs; scale BASE_LR linearly with it.", 16,
           "Must be divisible by the number of GPUs."),
    HParam("SOLVER.BASE_LR", 0.02, Number(0, low_open=True),
           "Learning rate after warmup: 0.02 for 16 images per batch.", 0.001, "", 0.02),
    HParam("SOLVER.STEPS", (210000, 250000),
           ListOf(_POS_INT, text="strictly increasing integers >= 1, none equal to MAX_ITER"),
           "Iterations where the learning rate is multiplied by SOLVER.GAMMA; scale them with "
           "MAX_ITER.", (30000,), "Steps > MAX_ITER are ignored (with a warning).",
           (210000, 250000)),
    HParam("SOLVER.MAX_ITER", 270000, _POS_INT,
           "Training length in iterations (3x schedule: 270k at 16 images per batch).",
           40000, "", 270000),
    HParam("SOLVER.WARMUP_ITERS", 1000, _NONNEG_INT,
           "Iterations of linear learning-rate warmup; raise it if early losses diverge.", 1000),
    HParam("SOLVER.AMP.ENABLED", False, OneOf(True, False),
           "Mixed-precision training: on CUDA Detectron2's AMPTrainer (float16 + loss scaling); "
           "on the CPU bfloat16 autocast (cmrcnn_ext's Trainer; ~1.5x faster training steps on "
           "CPUs with AVX512-BF16 or AMX). Weights and checkpoints stay float32.",
           False, "Detectron2 v0.6: CUDA only (its AMPTrainer asserts CUDA)."),
    HParam("SOLVER.CMRCNN_OPTIMIZER", "SGD", OneOf("SGD", "AdamW"),
           "Optimizer: Detectron2's SGD with momentum, or AdamW (decoupled weight decay), which "
           "learns much faster from scratch at small batch sizes (the CPU demo uses it with "
           "BASE_LR 1e-3). Same parameter groups, LR schedule and gradient clipping either way.",
           None, "Detectron2 always uses SGD."),
    HParam("SOLVER.CMRCNN_BETAS", [0.9, 0.999], ListOf(Number(0, 1, high_open=True), length=2),
           "AdamW's (beta1, beta2); ignored by SGD.", None),
    # --- inference
    HParam("TEST.CMRCNN_EVALUATOR", "faster", OneOf("faster", "pycocotools"),
           "COCO box/mask evaluator of train_net.py: faster-coco-eval (same AP to 4 decimals, "
           "about 3x faster on 500 images) or Detectron2's pycocotools path."),
    HParam("TEST.DETECTIONS_PER_IMAGE", 100, _POS_INT,
           "Maximum detections returned per image (COCO evaluation uses 100).", 100),
    HParam("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05, _UNIT,
           "Minimum score of a returned detection: raise it for cleaner visual output, keep it "
           "low for mAP evaluation.", 0.05),
    HParam("MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.5, _UNIT,
           "Per-class NMS IoU threshold on the final detections; higher keeps more overlapping "
           "objects.", 0.5),
]
# fmt: on

HPARAMS_BY_KEY: Dict[str, HParam] = {h.key: h for h in HPARAMS}


def get_hparam(key: str) -> HParam:
    """The :class:`HParam` entry of ``key`` (``KeyError`` if it is not documented)."""
    return HPARAMS_BY_KEY[key]


def cfg_value(cfg, key: str) -> Any:
    """Value of the dotted ``key`` in ``cfg``; raises ``KeyError`` if a part is missing."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _rows(code: bool = False) -> List[Tuple[str, ...]]:
    def fmt(value: Any) -> str:
        text = format_value(value)
        return f"`{text}`" if code else text

    rows = []
    for h in HPARAMS:
        meaning = h.meaning + (f" {h.note}" if h.note else "")
        key = f"`{h.key}`" if code else h.key
        rows.append((key, fmt(h.default), str(h.allowed), h.detectron2_column(fmt), meaning))
    if code:  # Markdown: "|" would end a cell; "*" could start emphasis outside code spans
        rows = [
            tuple(
                c.replace("|", "\\|").replace("*", "\\*" if i in (2, 4) else "*")
                for i, c in enumerate(row)
            )
            for row in rows
        ]
    return rows


_HEADER = ("key", "default", "allowed", "Detectron2 default", "what it does / when to change")


def render_markdown() -> str:
    """The hyperparameter table in Markdown (ends with a newline)."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(code=True)]
    return "\n".join(lines) + "\n"


def render_text(width: Optional[int] = None) -> str:
    """The hyperparameter table aligned for a terminal; long cells wrap within their column."""
    width = width or max(100, shutil.get_terminal_size((160, 40)).columns)
    rows = [_HEADER] + _rows()
    caps = (max(len(r[0]) for r in rows), 40, 36, 30)
    widths = [min(max(len(r[i]) for r in rows), caps[i]) for i in range(4)]
    widths.append(max(30, width - sum(widths) - 2 * 4))
    out = []
    for n, row in enumerate(rows):
        cols = [textwrap.wrap(c, w, break_long_words=True) or [""] for c, w in zip(row, widths)]
        for i in range(max(len(c) for c in cols)):
            parts = [(c[i] if i < len(c) else "").ljust(w) for c, w in zip(cols, widths)]
            out.append("  ".join(parts).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def readme_section(text: str) -> Optional[str]:
    """Text between the HPARAMS markers of a README (``None`` if the markers are missing)."""
    match = re.search(re.escape(README_BEGIN) + r"\n(.*?)" + re.escape(README_END), text, re.S)
    return match.group(1) if match else None


def update_readme(path: str) -> bool:
    """Replace the text between ``<!-- HPARAMS:BEGIN -->`` and ``<!-- HPARAMS:END -->`` lines.

    Args:
        path: README file containing both marker lines.

    Returns:
        bool: whether the file changed.

    Raises:
        ValueError: if the markers are missing.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if readme_section(text) is None:
        raise ValueError(f"{path} lacks the lines {README_BEGIN} ... {README_END}")
    pattern = re.compile(re.escape(README_BEGIN) + r"\n.*?" + re.escape(README_END), re.S)
    new = pattern.sub(lambda _: f"{README_BEGIN}\n{render_markdown()}{README_END}", text, count=1)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="cmrcnn_ext's hyperparameters.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--markdown", action="store_true", help="print a Markdown table")
    group.add_argument("--update-readme", metavar="README", help="rewrite its HPARAMS section")
    args = parser.parse_args(argv)
    if args.update_readme:
        changed = update_readme(args.update_readme)
        print(f"{args.update_readme}: {'updated' if changed else 'already up to date'}")
    elif args.markdown:
        sys.stdout.write(render_markdown())
    else:
        sys.stdout.write(render_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
