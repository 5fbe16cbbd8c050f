"""Every runnable config loads, builds and runs a forward pass; predictor and registration."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

import cmrcnn_ext

from conftest import CONFIGS, DEMO_CONFIG, ROOT, make_batch

RUNNABLE = sorted(
    p
    for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))
    if not os.path.basename(p).startswith("Base-")
)


def test_there_are_configs():
    names = {os.path.basename(p) for p in RUNNABLE}
    assert {
        "cascade_mask_rcnn_R_50_FPN_1x.yaml",
        "cascade_mask_rcnn_R_50_FPN_3x.yaml",
        "cascade_mask_rcnn_R_50_FPN_reference.yaml",
        "cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml",
    } <= names


@pytest.mark.parametrize("path", RUNNABLE, ids=os.path.basename)
def test_config_builds_and_runs(path):
    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES == 0:  # taken from the training JSON; make_batch's 5
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.roi_heads).__name__ == "CascadeMaskROIHeads"
    model.eval()
    batch = make_batch(num_images=1, size=160, with_gt=False)
    with torch.no_grad():
        (out,) = model(batch)
    inst = out["instances"]
    assert {"pred_boxes", "scores", "pred_classes", "pred_masks"} <= set(inst.get_fields())
    assert inst.pred_masks.shape[1:] == (160, 160)
    model.train()
    from detectron2.utils.events import EventStorage

    with EventStorage():
        losses = model(make_batch(num_images=1, size=160))
    assert all(torch.isfinite(v) for v in losses.values())


def test_reference_preset_values():
    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "cascade_mask_rcnn_R_50_FPN_reference.yaml"))
    m = cfg.MODEL
    assert list(m.RPN.IOU_THRESHOLDS) == [0.3, 0.7]
    assert (m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.NUM_FC) == (4, 2)
    assert (m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN) == (4000, 1000)
    assert (m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST) == (2000, 1000)
    assert (m.ROI_BOX_HEAD.POOLER_RESOLUTION, m.ROI_MASK_HEAD.POOLER_RESOLUTION) == (7, 14)
    assert m.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO == m.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO == 2


def test_drop_in_configs_match_detectron2_misc():
    """Our 1x/3x differ from Detectron2's Misc configs only in the head names."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    for sched in ("1x", "3x"):
        ours = cmrcnn_ext.get_cfg()
        ours.merge_from_file(os.path.join(CONFIGS, f"cascade_mask_rcnn_R_50_FPN_{sched}.yaml"))
        theirs = cmrcnn_ext.add_cmrcnn_config(get_cfg())
        theirs.merge_from_file(
            model_zoo.get_config_file(f"Misc/cascade_mask_rcnn_R_50_FPN_{sched}.yaml")
        )
        assert ours.MODEL.ROI_HEADS.NAME == "CascadeMaskROIHeads"
        ours.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
        ours.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
        assert yaml.safe_load(ours.dump()) == yaml.safe_load(theirs.dump())


def test_default_predictor_returns_instances():
    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(DEMO_CONFIG)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    predictor = DefaultPredictor(cfg)
    img = np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8)
    inst = predictor(img)["instances"]
    assert {"pred_boxes", "scores", "pred_classes", "pred_masks"} <= set(inst.get_fields())
    assert len(inst) > 0
    assert inst.pred_masks.shape[1:] == (200, 240) and inst.pred_masks.dtype == torch.bool
    assert inst.image_size == (200, 240)


@pytest.mark.parametrize(
    "code",
    [
        "import detectron2.modeling as m; import cmrcnn_ext",
        "import cmrcnn_ext; import detectron2.modeling as m",
        "from detectron2.modeling import build_model; from detectron2.modeling import "
        "ROI_HEADS_REGISTRY; import cmrcnn_ext.modeling.roi_heads; import detectron2.modeling as m",
    ],
)
def test_registration_whatever_was_imported_first(code):
    code += (
        "\nm.ROI_HEADS_REGISTRY.get('CascadeMaskROIHeads')"
        "\nfrom detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY as R"
        "\nR.get('CMRCNNConvUpsampleHead'); print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
