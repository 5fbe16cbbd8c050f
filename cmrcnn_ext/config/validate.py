"""Config validation: every problem found at once, before any model is built.

Detectron2 checks few config values, and those with bare ``assert`` statements deep inside model
construction (or not at all: a sampling ratio of -1 or a post-NMS count above the pre-NMS count
runs silently). This module holds every config rule of cmrcnn_ext, once: the allowed values of
cmrcnn_ext's keys (:mod:`cmrcnn_ext.config.schema`) and of the tuned Detectron2 keys
(:mod:`cmrcnn_ext.config.tuned`), and the rules that relate several keys. It reports all
problems in one :class:`ConfigError`, one line each naming the key, its value, what is allowed
and how to fix it.

The rules read either a whole config (:func:`validate_config`) or a flat ``{dotted key: value}``
mapping of some keys (:func:`check_values`, which :class:`~cmrcnn_ext.modeling.roi_heads.
CascadeMaskROIHeads` calls with its constructor's arguments); rules whose keys are absent are
skipped.

Example::

    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file("cascade_mask_rcnn_R_50_FPN_reference.yaml")
    validate_config(cfg)  # raises ConfigError listing every problem
    predictor = DefaultPredictor(cfg)
"""

from typing import Any, Callable, List, Mapping, Optional, Set

from cmrcnn_ext.config.schema import KEYS
from cmrcnn_ext.config.tuned import TUNED, Tuned
from cmrcnn_ext.config.values import cfg_value, format_value
from cmrcnn_ext.errors import UserError

__all__ = ["ConfigError", "check_values", "config_problems", "validate_config"]

#: ``MODEL.ROI_HEADS.NAME`` values that build a cascade (class-agnostic regression required).
CASCADE_ROI_HEADS = ("CascadeMaskROIHeads", "CascadeROIHeads")
# every key with declared allowed values: cmrcnn_ext's own, then the tuned Detectron2 ones
DOCUMENTED = KEYS + TUNED
_IOUS = "MODEL.ROI_BOX_CASCADE_HEAD.IOUS"
_PER_LEVEL = (
    "In Detectron2 with FPN, PRE_NMS_TOPK_* counts proposals per FPN level and POST_NMS_TOPK_* "
    "per image, so Detectron2 itself accepts this; cmrcnn_ext requires post <= pre so that NMS "
    "has at least as many candidates on every level as it may return."
)
# fixes that say more than "use an allowed value"
_FIXES = {
    "MODEL.BACKBONE.FREEZE_AT": "use 0 (train every stage) .. 5 (freeze the whole ResNet); 2 "
    "freezes the stem and res2",
    "MODEL.ROI_HEADS.NUM_CLASSES": "set the number of classes of your data set (COCO: 80)",
}


class ConfigError(UserError, ValueError):
    """Invalid config values; ``problems`` holds one line per problem (also in the message)."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"Invalid config: {n} problem{'s' if n != 1 else ''} found"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))


class _Checker:
    """Collects problem lines; keys already reported are skipped by cross-key rules.

    Args:
        cfg: a ``CfgNode`` or a flat ``{dotted key: value}`` mapping.
        num_stages: the number of cascade stages, when ``cfg`` does not give it through
            ``MODEL.ROI_BOX_CASCADE_HEAD.IOUS`` (the ROI heads' constructor).
    """

    def __init__(self, cfg, num_stages: Optional[int] = None):
        self.cfg = cfg
        self.num_stages = num_stages
        self.problems: List[str] = []
        self.bad: Set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return cfg_value(self.cfg, key)
        except KeyError:
            return default

    def has(self, *keys: str) -> bool:
        """Whether all ``keys`` exist in the config and none has been reported yet."""
        missing = object()
        return all(k not in self.bad and self.get(k, missing) is not missing for k in keys)

    def add(self, key: str, problem: str, allowed: str, fix: str) -> None:
        """Record a problem of ``key`` (whose value is read from the config)."""
        value = format_value(self.get(key))
        self.problems.append(f"{key} = {value}: {problem}. Allowed: {allowed}. Fix: {fix}.")
        self.bad.add(key)


def _check_documented_keys(c: _Checker) -> None:
    """Every key of :data:`DOCUMENTED` present in the config, against its ``allowed``."""
    for entry in DOCUMENTED:
        if not c.has(entry.key) or entry.allowed.contains(c.get(entry.key)):
            continue
        if entry.key in _FIXES:
            fix = _FIXES[entry.key]
        elif isinstance(entry, Tuned):
            fix = f"set an allowed value, e.g. the reference {format_value(entry.reference)}"
        else:
            fix = f"set an allowed value, e.g. the default {format_value(entry.default)}"
        c.add(entry.key, "not an allowed value", str(entry.allowed), fix)


def _check_rpn(c: _Checker) -> None:
    key = "MODEL.RPN.IOU_THRESHOLDS"
    if c.has(key):
        lower, upper = c.get(key)
        if lower > upper:
            c.add(
                key,
                f"lower threshold {lower} > upper threshold {upper}",
                "[lower, upper], 0 < lower <= upper <= 1",
                f"swap them: [{upper}, {lower}] (reference [0.3, 0.7])",
            )
    for mode in ("TRAIN", "TEST"):
        pre, post = f"MODEL.RPN.PRE_NMS_TOPK_{mode}", f"MODEL.RPN.POST_NMS_TOPK_{mode}"
        if c.has(pre, post) and c.get(post) > c.get(pre):
            c.add(
                post,
                f"more than {pre} = {c.get(pre)}",
                f"1 .. {pre}",
                f"lower {post} or raise {pre}. {_PER_LEVEL.rstrip('.')}",
            )


def _check_box_head(c: _Checker) -> None:
    conv, fc = "MODEL.ROI_BOX_HEAD.NUM_CONV", "MODEL.ROI_BOX_HEAD.NUM_FC"
    if c.get("MODEL.ROI_BOX_HEAD.NAME") == "FastRCNNConvFCHead" and c.has(conv, fc):
        if c.get(conv) == 0 and c.get(fc) == 0:
            c.add(
                conv,
                f"and {fc} = 0: the box head would have no layer",
                "NUM_CONV + NUM_FC >= 1",
                f"set {conv} 4 and {fc} 2 (reference) or {fc} 2",
            )


def _check_cascade(c: _Checker) -> None:
    if c.get("MODEL.ROI_HEADS.NAME") not in CASCADE_ROI_HEADS:
        return
    agnostic = "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"
    if c.has(agnostic) and not c.get(agnostic):
        c.add(
            agnostic,
            f"but MODEL.ROI_HEADS.NAME is {c.get('MODEL.ROI_HEADS.NAME')!r}, whose "
            "stages regress class-agnostic boxes",
            "True",
            f"set {agnostic} True",
        )
    if not c.has(_IOUS):
        return
    ious = list(c.get(_IOUS))
    if any(b <= a for a, b in zip(ious, ious[1:])):
        c.add(
            _IOUS,
            "not strictly increasing",
            "strictly increasing, each in (0, 1)",
            "sort them, e.g. [0.5, 0.6, 0.7]",
        )
    first = "MODEL.ROI_HEADS.IOU_THRESHOLDS"
    if c.has(first) and list(c.get(first))[:1] != ious[:1]:
        c.add(
            first,
            f"differs from {_IOUS}[0] = {ious[0]}",
            f"[{ious[0]}]",
            f"set {first} [{ious[0]}]: the first stage samples proposals at its own IoU",
        )


def _check_stage_counts(c: _Checker) -> None:
    """One entry per cascade stage in the per-stage lists.

    The stage count is ``len(IOUS)`` in a config with cascade ROI heads, or ``num_stages``
    given to the checker; the mask heads' loss weights are checked for CascadeMaskROIHeads.
    """
    name = c.get("MODEL.ROI_HEADS.NAME")
    n = c.num_stages
    if n is None:
        if name not in CASCADE_ROI_HEADS or not c.has(_IOUS):
            return
        n = len(c.get(_IOUS))
    counts = [("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", "(wx, wy, ww, wh)")]
    if name in (None, "CascadeMaskROIHeads"):
        counts.append(("MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", "weight"))
    for key, what in counts:
        if c.has(key) and len(c.get(key)) != n:
            c.add(
                key,
                f"{len(c.get(key))} values but {_IOUS} has {n} stages",
                f"one {what} per stage",
                f"give {n} values, one per cascade stage",
            )


def _check_cmrcnn(c: _Checker) -> None:
    merge, stages = "MODEL.CMRCNN.TEST_MASK_MERGE", "MODEL.CMRCNN.MASK_STAGES"
    if c.has(merge, stages) and c.get(merge) == "mean" and c.get(stages) != "all":
        c.add(
            merge,
            f'"mean" averages per-stage mask heads but {stages} = '
            f"{format_value(c.get(stages))} builds only one",
            f'"mean" only with {stages} "all"',
            f'set {stages} "all" or {merge} "last"',
        )


def _check_backbone(c: _Checker) -> None:
    if "resnet" not in str(c.get("MODEL.BACKBONE.NAME", "")).lower():
        return
    depth, res2, groups = (
        "MODEL.RESNETS.DEPTH",
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "MODEL.RESNETS.NUM_GROUPS",
    )
    if not c.has(depth) or c.get(depth) not in (18, 34):
        return
    d = c.get(depth)
    if c.has(res2) and c.get(res2) != 64:
        c.add(
            res2,
            f"but {depth} = {d} (basic blocks)",
            "64 for R18/R34",
            f"set {res2} 64, or use depth >= 50",
        )
    if c.has(groups) and c.get(groups) > 1:
        c.add(
            groups,
            f"but {depth} = {d}: ResNeXt groups need bottleneck blocks",
            "1 for R18/R34",
            f"set {groups} 1, or use depth 50/101/152 for ResNeXt",
        )


def _check_class_names(c: _Checker) -> None:
    names, num = "MODEL.CMRCNN.CLASS_NAMES", "MODEL.ROI_HEADS.NUM_CLASSES"
    if c.has(names, num) and c.get(names) and c.get(num) and len(c.get(names)) != c.get(num):
        c.add(
            names,
            f"{len(c.get(names))} names but {num} = {c.get(num)}",
            "one name per class, or []",
            f"give {c.get(num)} names, or [] to take them from the data",
        )


def _check_data_and_solver(c: _Checker) -> None:
    key, json_key = "MODEL.ROI_HEADS.NUM_CLASSES", "DATASETS.CMRCNN.TRAIN_JSON"
    if c.has(key) and c.get(key) == 0 and not c.get(json_key, ""):
        c.add(
            key,
            f"{json_key} is not set, and 0 means 'take the count from that JSON'",
            f"integer >= 1, or 0 with {json_key}",
            "set the number of classes of your data set (COCO: 80)",
        )
    steps, max_iter = "SOLVER.STEPS", "SOLVER.MAX_ITER"
    if c.has(steps, max_iter):
        values, n = list(c.get(steps)), c.get(max_iter)
        if any(b <= a for a, b in zip(values, values[1:])):
            c.add(
                steps,
                "not strictly increasing",
                "strictly increasing iterations",
                "sort them and drop duplicates",
            )
        elif n in values:
            c.add(
                steps,
                f"contains {max_iter} = {n} (Detectron2's scheduler rejects it)",
                f"steps < {max_iter}",
                f"drop {n} from {steps}",
            )


_RULES: List[Callable[[_Checker], None]] = [
    _check_documented_keys,
    _check_rpn,
    _check_box_head,
    _check_cascade,
    _check_stage_counts,
    _check_cmrcnn,
    _check_backbone,
    _check_class_names,
    _check_data_and_solver,
]


def config_problems(cfg, num_stages: Optional[int] = None) -> List[str]:
    """All problems of ``cfg``, one line each (empty if it is valid).

    Args:
        cfg: a Detectron2 ``CfgNode``, usually from :func:`cmrcnn_ext.get_cfg`, or a flat
            ``{dotted key: value}`` mapping. Keys it lacks (e.g. ``MODEL.CMRCNN.*`` in a plain
            Detectron2 config) are not checked.
        num_stages (int or None): the number of cascade stages, for a mapping without
            ``MODEL.ROI_BOX_CASCADE_HEAD.IOUS``.

    Returns:
        list[str]: each line names the key, its value, the allowed values and a fix.
    """
    checker = _Checker(cfg, num_stages)
    for rule in _RULES:
        rule(checker)
    return checker.problems


def validate_config(cfg):
    """Check ``cfg`` before a model is built; raise one error that lists every problem.

    Call it after the last ``merge_from_file`` / ``merge_from_list`` and before
    ``build_model``, ``DefaultPredictor`` or ``DefaultTrainer``.

    Args:
        cfg (CfgNode): the config to check (not modified; may be frozen).

    Returns:
        CfgNode: ``cfg``, for chaining.

    Raises:
        ConfigError: (a ``ValueError``) if anything is wrong; ``.problems`` lists the lines.
    """
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def check_values(values: Mapping[str, Any], num_stages: Optional[int] = None) -> None:
    """Check some config values, given as ``{dotted key: value}``, with the config's rules.

    Example::

        check_values({"MODEL.CMRCNN.MASK_STAGES": "all", "MODEL.CMRCNN.TEST_MASK_MERGE": "mean"})

    Args:
        values: config keys and their values; rules about other keys are skipped.
        num_stages (int or None): the number of cascade stages that per-stage lists
            (``MODEL.CMRCNN.STAGE_LOSS_WEIGHTS``...) must match.

    Raises:
        ConfigError: (a ``ValueError``) listing every problem.
    """
    problems = config_problems(values, num_stages)
    if problems:
        raise ConfigError(problems)
