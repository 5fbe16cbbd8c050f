"""cmrcnn_ext's own config keys, each declared once.

Every key that cmrcnn_ext adds to Detectron2's config is one :class:`Key` in :data:`KEYS`: its
full name, its default (the value :func:`cmrcnn_ext.config.defaults.add_cmrcnn_config` sets),
its allowed values (:mod:`cmrcnn_ext.config.values`; enforced by
:mod:`cmrcnn_ext.config.validate`) and what it means. All of them live under a ``CMRCNN`` node:
``MODEL.CMRCNN.*``, ``DATASETS.CMRCNN.*``, ``SOLVER.CMRCNN.*`` and ``TEST.CMRCNN.*``.

:data:`RENAMED` maps former key names to their current ones; a config file or command line that
uses a former name fails with an error that names the current one.

``docs/config.md`` and README's key table are generated from this module
(``python tools/gen_config_docs.py``).
"""

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from cmrcnn_ext.config.values import Allowed, ListOf, Number, OneOf, Text

__all__ = ["KEYS", "KEYS_BY_NAME", "RENAMED", "RENAMED_NOTE", "Key", "allowed_values", "get_key"]


@dataclass(frozen=True)
class Key:
    """One config key added by cmrcnn_ext.

    Attributes:
        key: full config key, e.g. ``"MODEL.CMRCNN.MASK_STAGES"``.
        default: the value :func:`~cmrcnn_ext.config.defaults.add_cmrcnn_config` sets.
        allowed: allowed values.
        meaning: what it does and when to change it.
    """

    key: str
    default: Any
    allowed: Allowed
    meaning: str


_BOOL = OneOf(True, False)
_JSON = Allowed('file path or ""')
_DIR = Allowed('folder path or ""')

# fmt: off
KEYS: Tuple[Key, ...] = (
    # --- the cascade's mask heads (cmrcnn_ext.modeling.roi_heads)
    Key("MODEL.CMRCNN.MASK_STAGES", "first", OneOf("first", "last", "all"),
        'Cascade stages with a mask head in training: "first" (Detectron2\'s cascade), "last" '
        '(the Cascade R-CNN authors\' Detectron) or "all" (one head per stage, the paper\'s '
        "best); masks are always predicted on the final boxes."),
    Key("MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, 1.0, 1.0],
        ListOf(Number(0), min_length=1, text="one number >= 0 per stage"),
        "Weight of each stage's box losses and of its mask head's loss, one per cascade stage: "
        "[1, 0.5, 0.25] is the paper's and MMDetection's, [1, 1, 1] Detectron2's."),
    Key("MODEL.CMRCNN.TEST_MASK_MERGE", "last", OneOf("last", "mean"),
        'Test-time masks from the last stage\'s mask head, or "mean" of every stage head\'s mask '
        'probabilities (needs MASK_STAGES "all").'),
    # --- faster CPU/GPU code paths with Detectron2's results
    Key("MODEL.CMRCNN.FAST_ROI_ALIGN", False, _BOOL,
        "Box and mask poolers' ROIAlign as a weighted gather, forward and backward, fixed or "
        "adaptive (POOLER_SAMPLING_RATIO 0) grid: torchvision's numbers up to float rounding, "
        "faster on the CPU (on a GPU torchvision's kernel is faster: keep False there); False "
        "= exactly Detectron2's poolers."),
    Key("MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD", False, _BOOL,
        "CPU float32 inference: mask head convolutions in channels-last layout and the deconv "
        "+ predictor as two matrix products: the same masks up to float rounding, faster; "
        "False = Detectron2's NCHW layers, bit for bit."),
    Key("MODEL.CMRCNN.PREFIX_NMS", True, _BOOL,
        "Test-time class-wise NMS on the best-scoring candidates first, grown until "
        "DETECTIONS_PER_IMAGE survive: Detectron2's detections in one NMS call; False = "
        "Detectron2's fast_rcnn_inference."),
    Key("MODEL.CMRCNN.CLASS_NAMES", [], ListOf(Text(), text="list of class names, or []"),
        "The model's class names in output order, set from the training data and saved in "
        "OUTPUT_DIR/config.yaml so prediction and export need no data set; when set, one per "
        "class of MODEL.ROI_HEADS.NUM_CLASSES."),
    # --- your own COCO-format data (cmrcnn_ext.data.register)
    Key("DATASETS.CMRCNN.TRAIN_JSON", "", _JSON,
        'Your COCO-format training JSON, registered as "user_train" and used as DATASETS.TRAIN '
        '("": DATASETS.TRAIN as registered).'),
    Key("DATASETS.CMRCNN.TRAIN_IMAGE_ROOT", "", _DIR,
        "Folder that the training JSON's file_name entries are relative to."),
    Key("DATASETS.CMRCNN.VAL_JSON", "", _JSON,
        'Your COCO-format evaluation JSON, registered as "user_val" and used as DATASETS.TEST '
        '("": DATASETS.TEST as registered).'),
    Key("DATASETS.CMRCNN.VAL_IMAGE_ROOT", "", _DIR,
        "Folder that the evaluation JSON's file_name entries are relative to."),
    # --- training (cmrcnn_ext.engine.trainer.Trainer.build_optimizer)
    Key("SOLVER.CMRCNN.OPTIMIZER", "SGD", OneOf("SGD", "AdamW"),
        "Detectron2's SGD (SOLVER.MOMENTUM; for pretrained backbones) or torch's AdamW "
        "(decoupled SOLVER.WEIGHT_DECAY; learns faster from scratch at small batches), with "
        "Detectron2's parameter groups, LR schedule and gradient clipping either way."),
    Key("SOLVER.CMRCNN.BETAS", [0.9, 0.999], ListOf(Number(0, 1, high_open=True), length=2),
        "AdamW's (beta1, beta2); ignored by SGD."),
    # --- long runs (cmrcnn_ext.engine.preemption, cmrcnn_ext.engine.checkpoint)
    Key("SOLVER.CMRCNN.STOP_SIGNALS", ["SIGTERM", "SIGUSR1"],
        ListOf(OneOf("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")),
        "Signals on which training finishes the current iteration, saves a checkpoint and exits "
        "with code 75 (pre-emption; continue with --resume); [] keeps Python's default handling."),
    Key("SOLVER.CMRCNN.COLLECTIVE_TIMEOUT", 30.0, Number(0, low_open=True),
        "Minutes the processes of a multi-process run wait in a collective for one that stopped "
        "answering (a dead node) before they stop with an error; keep it above the longest "
        "evaluation (the other ranks wait while rank 0 computes COCO AP)."),
    Key("SOLVER.CMRCNN.KEEP_CHECKPOINTS", 3, Number(0, integer=True),
        "How many periodic checkpoints (model_<iter>.pth) to keep, newest first; --resume falls "
        "back to an older one when the newest is damaged. 0 keeps all (Detectron2's behaviour)."),
    # --- evaluation (cmrcnn_ext.evaluation.coco.build_coco_evaluator)
    Key("TEST.CMRCNN.EVALUATOR", "faster", OneOf("faster", "pycocotools"),
        "COCO box/mask evaluator: faster-coco-eval (the same AP as pycocotools, faster) or "
        "Detectron2's COCOEvaluator with pycocotools."),
)
# fmt: on

KEYS_BY_NAME: Dict[str, Key] = {k.key: k for k in KEYS}

#: Former key names -> current ones (yacs raises an error naming the current one).
RENAMED: Dict[str, str] = {
    "SOLVER.CMRCNN_OPTIMIZER": "SOLVER.CMRCNN.OPTIMIZER",
    "SOLVER.CMRCNN_BETAS": "SOLVER.CMRCNN.BETAS",
    "TEST.CMRCNN_EVALUATOR": "TEST.CMRCNN.EVALUATOR",
}
#: Why keys were renamed (appended to yacs' "Key ... was renamed to ..." error).
RENAMED_NOTE = (
    "cmrcnn_ext's keys all live under CMRCNN nodes: MODEL.CMRCNN, DATASETS.CMRCNN, "
    "SOLVER.CMRCNN, TEST.CMRCNN."
)


def get_key(name: str) -> Key:
    """The :class:`Key` named ``name``.

    Args:
        name: full config key, e.g. ``"TEST.CMRCNN.EVALUATOR"``.

    Returns:
        Key

    Raises:
        KeyError: if cmrcnn_ext does not add that key.
    """
    return KEYS_BY_NAME[name]


def allowed_values(name: str) -> Tuple[Any, ...]:
    """The allowed values of a key with a fixed set of them, e.g. ``("SGD", "AdamW")``.

    Args:
        name: full config key whose ``allowed`` is a :class:`~cmrcnn_ext.config.values.OneOf`.

    Returns:
        tuple: the allowed values.

    Raises:
        KeyError: if cmrcnn_ext does not add that key.
        TypeError: if the key's allowed values are not a fixed set.
    """
    allowed = get_key(name).allowed
    if not isinstance(allowed, OneOf):
        raise TypeError(f"{name} allows {allowed}, not a fixed set of values")
    return tuple(allowed.values)
