"""cmrcnn_ext.config.validate: every rule names its key; all problems are reported at once."""
import glob
import os

import pytest

import cmrcnn_ext
from cmrcnn_ext.config.hparams import get_hparam
from cmrcnn_ext.config.validate import ConfigError, config_problems, validate_config

from conftest import CONFIGS

REFERENCE = os.path.join(CONFIGS, "cascade_mask_rcnn_R_50_FPN_reference.yaml")
RUNNABLE = sorted(
    p
    for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))
    if not os.path.basename(p).startswith("Base-")
)
TWO_STAGES = ["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.6)]
TWO_REG_WEIGHTS = ["MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", ((10.0,) * 4, (20.0,) * 4)]

# (case id, config overrides of the reference preset, key that the single problem must name)
CASES = [
    ("rpn_lower_gt_upper", ["MODEL.RPN.IOU_THRESHOLDS", [0.8, 0.3]], "MODEL.RPN.IOU_THRESHOLDS"),
    ("rpn_above_1", ["MODEL.RPN.IOU_THRESHOLDS", [0.3, 1.5]], "MODEL.RPN.IOU_THRESHOLDS"),
    ("rpn_negative", ["MODEL.RPN.IOU_THRESHOLDS", [-0.1, 0.7]], "MODEL.RPN.IOU_THRESHOLDS"),
    ("rpn_zero_lower", ["MODEL.RPN.IOU_THRESHOLDS", [0.0, 0.7]], "MODEL.RPN.IOU_THRESHOLDS"),
    ("rpn_three_values", ["MODEL.RPN.IOU_THRESHOLDS", [0.3, 0.5, 0.7]], "MODEL.RPN.IOU_THRESHOLDS"),
    (
        "cascade_not_increasing",
        ["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.7, 0.6)],
        "MODEL.ROI_BOX_CASCADE_HEAD.IOUS",
    ),
    (
        "cascade_equal",
        ["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.6, 0.6)],
        "MODEL.ROI_BOX_CASCADE_HEAD.IOUS",
    ),
    (
        "cascade_iou_1",
        ["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", (0.5, 0.6, 1.0)],
        "MODEL.ROI_BOX_CASCADE_HEAD.IOUS",
    ),
    (
        "reg_weights_count",
        TWO_STAGES + ["MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, 0.5]],
        "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS",
    ),
    (
        "stage_loss_weights_count",
        TWO_STAGES + TWO_REG_WEIGHTS,
        "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS",
    ),
    (
        "reg_weight_zero",
        ["MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS", ((10.0, 10.0, 5.0, 0.0),) * 3],
        "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS",
    ),
    (
        "stage_loss_weight_negative",
        ["MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, -0.5, 0.25]],
        "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS",
    ),
    (
        "first_iou_mismatch",
        ["MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.4]],
        "MODEL.ROI_HEADS.IOU_THRESHOLDS",
    ),
    (
        "post_gt_pre_train",
        ["MODEL.RPN.POST_NMS_TOPK_TRAIN", 5000],
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    ),
    ("post_gt_pre_test", ["MODEL.RPN.POST_NMS_TOPK_TEST", 3000], "MODEL.RPN.POST_NMS_TOPK_TEST"),
    ("post_zero_train", ["MODEL.RPN.POST_NMS_TOPK_TRAIN", 0], "MODEL.RPN.POST_NMS_TOPK_TRAIN"),
    ("post_zero_test", ["MODEL.RPN.POST_NMS_TOPK_TEST", 0], "MODEL.RPN.POST_NMS_TOPK_TEST"),
    ("pre_zero_train", ["MODEL.RPN.PRE_NMS_TOPK_TRAIN", 0], "MODEL.RPN.PRE_NMS_TOPK_TRAIN"),
    ("pre_zero_test", ["MODEL.RPN.PRE_NMS_TOPK_TEST", 0], "MODEL.RPN.PRE_NMS_TOPK_TEST"),
    ("freeze_at_6", ["MODEL.BACKBONE.FREEZE_AT", 6], "MODEL.BACKBONE.FREEZE_AT"),
    ("freeze_at_negative", ["MODEL.BACKBONE.FREEZE_AT", -1], "MODEL.BACKBONE.FREEZE_AT"),
    (
        "box_pooler_0",
        ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 0],
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
    ),
    (
        "mask_pooler_0",
        ["MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 0],
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION",
    ),
    (
        "box_sampling_negative",
        ["MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", -1],
        "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO",
    ),
    (
        "mask_sampling_negative",
        ["MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", -2],
        "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO",
    ),
    ("num_conv_negative", ["MODEL.ROI_BOX_HEAD.NUM_CONV", -1], "MODEL.ROI_BOX_HEAD.NUM_CONV"),
    ("num_fc_negative", ["MODEL.ROI_BOX_HEAD.NUM_FC", -1], "MODEL.ROI_BOX_HEAD.NUM_FC"),
    (
        "box_head_empty",
        ["MODEL.ROI_BOX_HEAD.NUM_CONV", 0, "MODEL.ROI_BOX_HEAD.NUM_FC", 0],
        "MODEL.ROI_BOX_HEAD.NUM_CONV",
    ),
    ("mask_stages_unknown", ["MODEL.CMRCNN.MASK_STAGES", "middle"], "MODEL.CMRCNN.MASK_STAGES"),
    (
        "test_mask_merge_unknown",
        ["MODEL.CMRCNN.TEST_MASK_MERGE", "max"],
        "MODEL.CMRCNN.TEST_MASK_MERGE",
    ),
    (
        "mean_without_all",
        ["MODEL.CMRCNN.MASK_STAGES", "last"],
        "MODEL.CMRCNN.TEST_MASK_MERGE",
    ),
    (
        "class_specific_regression",
        ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False],
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
    ),
    ("depth_unknown", ["MODEL.RESNETS.DEPTH", 42], "MODEL.RESNETS.DEPTH"),
    ("r18_res2_256", ["MODEL.RESNETS.DEPTH", 18], "MODEL.RESNETS.RES2_OUT_CHANNELS"),
    (
        "r34_resnext",
        ["MODEL.RESNETS.DEPTH", 34, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
        + ["MODEL.RESNETS.NUM_GROUPS", 32],
        "MODEL.RESNETS.NUM_GROUPS",
    ),
    (
        "num_classes_0_without_json",
        ["MODEL.ROI_HEADS.NUM_CLASSES", 0],
        "MODEL.ROI_HEADS.NUM_CLASSES",
    ),
    ("num_classes_negative", ["MODEL.ROI_HEADS.NUM_CLASSES", -3], "MODEL.ROI_HEADS.NUM_CLASSES"),
    ("steps_not_increasing", ["SOLVER.STEPS", (250000, 210000)], "SOLVER.STEPS"),
    ("step_equals_max_iter", ["SOLVER.STEPS", (210000, 270000)], "SOLVER.STEPS"),
    ("base_lr_zero", ["SOLVER.BASE_LR", 0.0], "SOLVER.BASE_LR"),
    (
        "score_thresh_above_1",
        ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 1.5],
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    ),
    ("ims_per_batch_0", ["SOLVER.IMS_PER_BATCH", 0], "SOLVER.IMS_PER_BATCH"),
    ("optimizer_unknown", ["SOLVER.CMRCNN_OPTIMIZER", "Adam"], "SOLVER.CMRCNN_OPTIMIZER"),
    ("betas_one", ["SOLVER.CMRCNN_BETAS", [0.9, 1.0]], "SOLVER.CMRCNN_BETAS"),
    ("betas_three", ["SOLVER.CMRCNN_BETAS", [0.9, 0.99, 0.5]], "SOLVER.CMRCNN_BETAS"),
]


def reference(*opts):
    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(REFERENCE)
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.mark.parametrize("opts,key", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(opts, key):
    cfg = reference(*opts)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    err = info.value
    assert isinstance(err, ValueError)
    assert len(err.problems) == 1, err.problems
    (line,) = err.problems
    assert line.startswith(key + " = "), line
    assert "Allowed:" in line and "Fix:" in line, line
    assert key in str(err)


def test_post_nms_message_explains_per_level_counts():
    (line,) = config_problems(reference("MODEL.RPN.POST_NMS_TOPK_TRAIN", 5000))
    assert "MODEL.RPN.PRE_NMS_TOPK_TRAIN = 4000" in line and "per FPN level" in line


def test_num_classes_0_with_train_json_is_valid():
    cfg = reference("MODEL.ROI_HEADS.NUM_CLASSES", 0, "DATASETS.CMRCNN.TRAIN_JSON", "a.json")
    assert validate_config(cfg) is cfg


@pytest.mark.parametrize("path", RUNNABLE, ids=os.path.basename)
def test_runnable_configs_are_valid(path):
    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(path)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES == 0:  # a config for your own data: with its JSON
        cfg.DATASETS.CMRCNN.TRAIN_JSON = "train.json"
    cfg.freeze()
    assert config_problems(cfg) == []
    assert validate_config(cfg) is cfg


def test_plain_detectron2_config_is_valid():
    from detectron2.config import get_cfg

    assert config_problems(get_cfg()) == []


def test_all_problems_reported_at_once():
    cfg = reference(
        "MODEL.RPN.IOU_THRESHOLDS", [0.7, 0.3],
        "MODEL.BACKBONE.FREEZE_AT", 9,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 9999,
        "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", -1,
        "MODEL.CMRCNN.MASK_STAGES", "first",
        "MODEL.RESNETS.DEPTH", 7,
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    keys = [p.split(" = ")[0] for p in info.value.problems]
    assert sorted(keys) == sorted(
        [
            "MODEL.RPN.IOU_THRESHOLDS",
            "MODEL.BACKBONE.FREEZE_AT",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO",
            "MODEL.CMRCNN.TEST_MASK_MERGE",
            "MODEL.RESNETS.DEPTH",
        ]
    )
    message = str(info.value)
    assert message.startswith("Invalid config: 6 problems found")
    assert all(p in message for p in info.value.problems)


def test_allowed_values_come_from_hparams(monkeypatch):
    """One source of truth: narrowing an HParam's allowed range changes what is rejected."""
    cfg = reference("MODEL.BACKBONE.FREEZE_AT", 4)
    assert config_problems(cfg) == []
    monkeypatch.setattr(get_hparam("MODEL.BACKBONE.FREEZE_AT").allowed, "high", 3)
    (line,) = config_problems(cfg)
    assert line.startswith("MODEL.BACKBONE.FREEZE_AT = 4")
