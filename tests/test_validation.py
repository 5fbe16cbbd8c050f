"""cmrcnn_ext.config.validate: every rule names its key; all problems are reported at once;
the ROI heads' constructor and former key names go through the same rules."""

import glob
import os

import pytest
import yaml

import cmrcnn_ext
from cmrcnn_ext.config import load_config, schema
from cmrcnn_ext.config.tuned import TUNED, TUNED_BY_NAME
from cmrcnn_ext.config.validate import ConfigError, check_values, config_problems, validate_config
from cmrcnn_ext.config.values import Allowed, cfg_value, plain_value

from conftest import CONFIGS, DEMO_CONFIG, tiny_cfg

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
    ("optimizer_unknown", ["SOLVER.CMRCNN.OPTIMIZER", "Adam"], "SOLVER.CMRCNN.OPTIMIZER"),
    ("betas_one", ["SOLVER.CMRCNN.BETAS", [0.9, 1.0]], "SOLVER.CMRCNN.BETAS"),
    ("betas_three", ["SOLVER.CMRCNN.BETAS", [0.9, 0.99, 0.5]], "SOLVER.CMRCNN.BETAS"),
    ("evaluator_unknown", ["TEST.CMRCNN.EVALUATOR", "fast"], "TEST.CMRCNN.EVALUATOR"),
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
        "MODEL.RPN.IOU_THRESHOLDS",
        [0.7, 0.3],
        "MODEL.BACKBONE.FREEZE_AT",
        9,
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        9999,
        "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO",
        -1,
        "MODEL.CMRCNN.MASK_STAGES",
        "first",
        "MODEL.RESNETS.DEPTH",
        7,
    )
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


def test_allowed_values_come_from_the_declarations(monkeypatch):
    """One source of truth: narrowing a declared allowed range changes what is rejected."""
    cfg = reference("MODEL.BACKBONE.FREEZE_AT", 4, "SOLVER.CMRCNN.OPTIMIZER", "AdamW")
    assert config_problems(cfg) == []
    monkeypatch.setattr(TUNED_BY_NAME["MODEL.BACKBONE.FREEZE_AT"].allowed, "high", 3)
    monkeypatch.setattr(schema.get_key("SOLVER.CMRCNN.OPTIMIZER").allowed, "values", ("SGD",))
    keys = [p.split(" = ")[0] for p in config_problems(cfg)]
    assert keys == ["SOLVER.CMRCNN.OPTIMIZER", "MODEL.BACKBONE.FREEZE_AT"]


_NOT_ALLOWED = ["__invalid__", -1, 0.5, [-1], [[-1.0]], None]


@pytest.mark.parametrize(
    "entry",
    [e for e in schema.KEYS + TUNED if type(e.allowed) is not Allowed],
    ids=lambda e: e.key,
)
def test_every_declared_key_is_validated(entry):
    """Each key with checkable allowed values is rejected, by name, with a value outside them
    (given as a flat mapping: the rules read mappings as they read configs)."""
    bad = next(v for v in _NOT_ALLOWED if not entry.allowed.contains(v))
    with pytest.raises(ConfigError) as info:
        check_values({entry.key: bad})
    (line,) = info.value.problems
    assert line.startswith(f"{entry.key} = ") and str(entry.allowed) in line, line


def test_free_text_keys_are_documented_as_such():
    free = {e.key for e in schema.KEYS + TUNED if type(e.allowed) is Allowed}
    assert free == {
        "MODEL.BACKBONE.NAME",
        "MODEL.WEIGHTS",
        "DATASETS.CMRCNN.TRAIN_JSON",
        "DATASETS.CMRCNN.TRAIN_IMAGE_ROOT",
        "DATASETS.CMRCNN.VAL_JSON",
        "DATASETS.CMRCNN.VAL_IMAGE_ROOT",
    }


# ROI heads' arguments that the constructor rejects (overrides of the tiny demo config)
CONSTRUCTOR_CASES = [
    ["MODEL.CMRCNN.MASK_STAGES", "middle"],
    ["MODEL.CMRCNN.TEST_MASK_MERGE", "max"],
    ["MODEL.CMRCNN.TEST_MASK_MERGE", "mean"],  # the demo config's MASK_STAGES is "last"
    ["MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, 0.5]],
    ["MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, -0.5, 1.0]],
    ["MODEL.CMRCNN.MASK_STAGES", "all", "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, 1.0]],
]


@pytest.mark.parametrize("opts", CONSTRUCTOR_CASES, ids=lambda o: "-".join(map(str, o)))
def test_constructor_and_validate_config_reject_the_same(opts):
    """CascadeMaskROIHeads' check is validate_config's rules: the same problem lines."""
    from detectron2.modeling import build_model

    cfg = tiny_cfg(*opts)
    expected = config_problems(cfg)
    assert expected
    with pytest.raises(ConfigError) as info:
        build_model(cfg)
    assert info.value.problems == expected


def test_constructor_accepts_valid_arguments():
    check_values(
        {
            "MODEL.CMRCNN.MASK_STAGES": "all",
            "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS": [1.0, 0.5],
            "MODEL.CMRCNN.TEST_MASK_MERGE": "mean",
        },
        num_stages=2,
    )


def _nested(key, value):
    """{"A": {"B": value}} for key "A.B"."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@pytest.mark.parametrize("old,new", sorted(schema.RENAMED.items()))
def test_former_key_names_fail_naming_the_new_one(old, new, tmp_path):
    value = schema.get_key(new).default
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(dict(_nested(old, value), _BASE_=DEMO_CONFIG)))
    for config_file, opts, source in (
        (str(path), [], str(path)),
        (DEMO_CONFIG, [old, str(value)], "the command line"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(config_file, opts)
        (line,) = info.value.problems
        assert f"{old} was renamed to {new}" in line and source in line, line
    cfg = load_config(DEMO_CONFIG, [new, str(value)])  # the new name works
    assert plain_value(cfg_value(cfg, new)) == plain_value(value)


def test_packaged_configs_use_current_key_names():
    for path in glob.glob(os.path.join(CONFIGS, "*.yaml")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for old in schema.RENAMED:
            assert old.split(".")[-1] not in text, (path, old)


def test_evaluator_and_optimizer_names_are_the_schemas():
    """The evaluator's defensive check accepts exactly the schema's names."""
    from cmrcnn_ext.evaluation.coco import EVALUATOR_BACKENDS

    assert tuple(EVALUATOR_BACKENDS) == schema.allowed_values("TEST.CMRCNN.EVALUATOR")
    assert schema.allowed_values("SOLVER.CMRCNN.OPTIMIZER") == ("SGD", "AdamW")
    with pytest.raises(TypeError):
        schema.allowed_values("SOLVER.CMRCNN.BETAS")
