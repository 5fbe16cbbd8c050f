"""One weight-loading path: a checkpoint of Detectron2's built-in cascade (one mask head) loads
into MASK_STAGES first / last / all the same way through every entry point.

The layout mapping lives in ``CascadeMaskROIHeads._load_from_state_dict``, so Detectron2's own
``DetectionCheckpointer`` and ``DefaultPredictor`` get it as well as the project's checkpointer
(``train_net.py``), the prediction command and export. The oracle: the model's tensors equal
the checkpoint's, with the single head copied to every stage for "all".
"""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image

from cmrcnn_ext import export
from cmrcnn_ext.apps import predict
from cmrcnn_ext.config import setup_cfg
from cmrcnn_ext.engine import Trainer
from cmrcnn_ext.engine.checkpoint import CheckpointError, CMRCNNCheckpointer

from conftest import DEMO_CONFIG
from reliability_helpers import SMALL_OPTS, make_data

BUILTIN = [
    "MODEL.ROI_HEADS.NAME",
    "CascadeROIHeads",
    "MODEL.ROI_MASK_HEAD.NAME",
    "MaskRCNNConvUpsampleHead",
]
MODES = {
    "first": ["MODEL.CMRCNN.MASK_STAGES", "first"],
    "last": ["MODEL.CMRCNN.MASK_STAGES", "last"],
    "all": ["MODEL.CMRCNN.MASK_STAGES", "all"],
}
HEAD = "roi_heads.mask_head."


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """Tiny training data, the options of a small demo model, and a checkpoint of Detectron2's
    built-in cascade for that model (seeded random weights)."""
    root = tmp_path_factory.mktemp("weights")
    make_data(root / "data", num_train=3, num_val=0)
    opts = [str(x) for x in SMALL_OPTS] + [
        "DATASETS.CMRCNN.TRAIN_JSON",
        str(root / "data" / "train.json"),
        "DATASETS.CMRCNN.TRAIN_IMAGE_ROOT",
        str(root / "data" / "train"),
        "OUTPUT_DIR",
        str(root / "out"),
    ]
    torch.manual_seed(1)
    model = build_model(setup_cfg(DEMO_CONFIG, opts + BUILTIN))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = str(root / "builtin_cascade.pth")
    torch.save({"model": state, "iteration": 10}, path)
    return {"root": root, "opts": opts, "path": path, "state": state}


def _cfg(setting, mode, *extra):
    return setup_cfg(
        DEMO_CONFIG,
        setting["opts"] + MODES[mode] + ["MODEL.WEIGHTS", setting["path"]] + list(extra),
    )


def _expected(state, mode):
    if mode != "all":
        return state
    out = {k: v for k, v in state.items() if not k.startswith(HEAD)}
    for k, v in state.items():
        if k.startswith(HEAD):
            for stage in range(3):
                out[HEAD + f"{stage}." + k[len(HEAD) :]] = v
    return out


def _assert_loaded(model, setting, mode):
    state = model.state_dict()
    expected = _expected(setting["state"], mode)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key].cpu(), value), key


def _fresh(cfg, seed=7):
    torch.manual_seed(seed)  # other random weights than the checkpoint's
    return build_model(cfg)


@pytest.mark.parametrize("mode", list(MODES))
def test_detectron2_checkpointer_and_default_predictor(setting, mode):
    cfg = _cfg(setting, mode)
    model = _fresh(cfg)
    DetectionCheckpointer(model).load(setting["path"])  # a user's own script
    _assert_loaded(model, setting, mode)
    _assert_loaded(DefaultPredictor(cfg).model, setting, mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_train_net_loading(setting, mode):
    cfg = _cfg(setting, mode)
    # --eval-only: Trainer.build_model + the project's checkpointer (train_net.main)
    model = Trainer.build_model(cfg)
    CMRCNNCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False
    )
    _assert_loaded(model, setting, mode)
    # training from MODEL.WEIGHTS
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    _assert_loaded(trainer.model, setting, mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_export_loading(setting, mode):
    wrapper = export.build_exportable(_cfg(setting, mode))
    _assert_loaded(wrapper.model, setting, mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_prediction_command_uses_the_checkpoint(setting, mode, tmp_path):
    cfg = _cfg(setting, mode)
    _assert_loaded(predict.build_predictor(cfg).model, setting, mode)
    # the command's detections are those of a model holding the checkpoint's weights
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "pred"
    predict.main(
        [
            "--config-file",
            str(config),
            "--weights",
            setting["path"],
            "--input",
            str(tmp_path / "img.png"),
            "--output",
            str(out),
            "--score-thresh",
            "0.0",
        ]
    )
    with open(out / "coco_results.json") as f:
        got = json.load(f)
    reference = DefaultPredictor(cfg)(img[:, :, ::-1].copy())["instances"]  # read_image gives BGR
    assert len(got) == len(reference) > 0
    boxes = reference.pred_boxes.tensor.numpy()
    np.testing.assert_allclose([r["bbox"][:2] for r in got], boxes[:, :2], atol=1e-3)
    np.testing.assert_allclose([r["score"] for r in got], reference.scores.numpy(), atol=1e-5)


# ------------------------------------------------------------------ Detectron2's path syntax


def test_matching_heuristics_query(setting):
    """``file.pth?matching_heuristics=True`` (Detectron2's syntax) loads by name matching: a
    checkpoint whose backbone names lack the ``backbone.bottom_up.`` prefix still loads."""
    renamed = {k.replace("backbone.bottom_up.", ""): v for k, v in setting["state"].items()}
    path = str(setting["root"] / "renamed.pth")
    torch.save({"model": renamed}, path)
    cfg = _cfg(setting, "first")
    stem = "backbone.bottom_up.stem.conv1.weight"

    model = _fresh(cfg)
    CMRCNNCheckpointer(model).load(path)  # plain: the stem is not found
    assert not torch.equal(model.state_dict()[stem], setting["state"][stem])

    model = _fresh(cfg)
    CMRCNNCheckpointer(model).load(path + "?matching_heuristics=True")
    _assert_loaded(model, setting, "first")

    with pytest.raises(CheckpointError, match="Unsupported query"):
        CMRCNNCheckpointer(_fresh(cfg)).load(path + "?heuristics=1")


def test_checkpointer_usable_after_a_failed_load(setting, tmp_path):
    cfg = _cfg(setting, "all")
    model = _fresh(cfg)
    checkpointer = CMRCNNCheckpointer(model)
    bad = tmp_path / "truncated.pth"
    with open(setting["path"], "rb") as f:
        bad.write_bytes(f.read()[:1000])
    for path in (str(bad), str(tmp_path / "missing.pth")):
        with pytest.raises(CheckpointError):
            checkpointer.load(path)
    checkpointer.load(setting["path"])
    _assert_loaded(model, setting, "all")


def test_trainer_reports_missing_weights_clearly(setting):
    cfg = _cfg(setting, "first", "MODEL.WEIGHTS", os.path.join(str(setting["root"]), "nope.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(cfg).resume_or_load(resume=False)
