"""Initial weights in every layout: Detectron2 model-zoo files, one mask head to every stage and
back, other class counts, torchvision ResNets (cmrcnn_ext/engine/checkpoint.py)."""

import pickle

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from cmrcnn_ext.engine.checkpoint import CMRCNNCheckpointer
from cmrcnn_ext.engine.torchvision_weights import convert_torchvision_resnet, is_torchvision_resnet

from conftest import tiny_cfg

# Detectron2's built-in cascade, as in its model zoo's Misc/cascade_mask_rcnn_R_50_FPN_*
BUILTIN = (
    "MODEL.ROI_HEADS.NAME",
    "CascadeROIHeads",
    "MODEL.ROI_MASK_HEAD.NAME",
    "MaskRCNNConvUpsampleHead",
)
# what torchvision's ResNets need in Detectron2
TORCHVISION = ("MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.STRIDE_IN_1X1", False)
MASK_HEAD = "roi_heads.mask_head."


def _model(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(*opts))


def _zoo_pkl(path, state, **extra):
    """A Detectron2 model-zoo .pkl: numpy arrays in {"model": ..., "__author__": ...}."""
    model = {k: v.detach().numpy().copy() for k, v in state.items()}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo", **extra}, f)
    return str(path)


@pytest.fixture(scope="module")
def builtin_state():
    return {k: v.clone() for k, v in _model(*BUILTIN, seed=1).state_dict().items()}


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("heuristics", [False, True])
def test_model_zoo_cascade_pkl_loads_every_tensor(tmp_path, builtin_state, log_text, heuristics):
    for key in [
        "roi_heads.box_head.0.fc1.weight",
        "roi_heads.box_predictor.2.cls_score.weight",
        "roi_heads.mask_head.mask_fcn1.weight",
        "backbone.bottom_up.res2.0.conv1.weight",
    ]:
        assert key in builtin_state  # the model zoo's layout
    path = _zoo_pkl(
        tmp_path / "model_final.pkl",
        builtin_state,
        **({"matching_heuristics": True} if heuristics else {}),
    )
    model = _model(seed=2)
    assert model.state_dict().keys() == builtin_state.keys()
    CMRCNNCheckpointer(model).load(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, builtin_state[key]), key
    n = len(builtin_state)
    assert f"Loaded {n} of the model's {n} tensors from {path}; skipped 0" in log_text()


def test_one_mask_head_to_every_stage_and_back(tmp_path, builtin_state, log_text):
    heads = [k for k in builtin_state if k.startswith(MASK_HEAD)]
    torch.save(builtin_state, tmp_path / "builtin.pth")
    model = _model("MODEL.CMRCNN.MASK_STAGES", "all", seed=2)
    CMRCNNCheckpointer(model).load(str(tmp_path / "builtin.pth"))
    state = model.state_dict()
    for key in heads:
        for stage in range(3):
            assert torch.equal(
                state[key.replace(MASK_HEAD, f"{MASK_HEAD}{stage}.")], builtin_state[key]
            )
    for key in set(builtin_state) - set(heads):
        assert torch.equal(state[key], builtin_state[key]), key
    assert "copied it to the mask heads of stages 1, 2, 3" in log_text()
    assert f"Loaded {len(state)} of the model's {len(state)} tensors" in log_text()

    # per-stage heads -> one head: the last stage's
    staged = _model("MODEL.CMRCNN.MASK_STAGES", "all", seed=3).state_dict()
    assert not torch.equal(
        staged[MASK_HEAD + "0.predictor.weight"], staged[MASK_HEAD + "2.predictor.weight"]
    )
    torch.save({"model": staged, "iteration": 99}, tmp_path / "staged.pth")
    single = _model(seed=4)
    CMRCNNCheckpointer(single).load(str(tmp_path / "staged.pth"))
    state = single.state_dict()
    for key in heads:
        assert torch.equal(state[key], staged[key.replace(MASK_HEAD, MASK_HEAD + "2.")]), key
    assert "loaded the last stage's (stage 3) head" in log_text()


def test_other_number_of_classes_skips_only_class_dependent_tensors(
    tmp_path, builtin_state, log_text
):
    path = _zoo_pkl(tmp_path / "five_classes.pkl", builtin_state)
    model = _model("MODEL.ROI_HEADS.NUM_CLASSES", 3, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    CMRCNNCheckpointer(model).load(path)
    state = model.state_dict()
    skipped = {k for k in state if state[k].shape != builtin_state[k].shape}
    assert skipped == {
        f"roi_heads.box_predictor.{s}.cls_score.{p}" for s in range(3) for p in ("weight", "bias")
    } | {MASK_HEAD + "predictor.weight", MASK_HEAD + "predictor.bias"}
    for key in state:
        expected = before[key] if key in skipped else builtin_state[key]  # bbox_pred: loaded
        assert torch.equal(state[key], expected), key
    text = log_text()
    assert "8 class-dependent tensor(s)" in text and "checkpoint: 5 classes, model: 3" in text
    assert all(key in text for key in skipped)
    n = len(state)
    assert f"Loaded {n - 8} of the model's {n} tensors from {path}; skipped 8" in text


def _torchvision_resnet(depth):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(depth)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    with torch.no_grad():  # non-trivial BN parameters and statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return net


def _trunk(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_is_detected_and_converted(tmp_path, log_text, depth):
    net = _torchvision_resnet(depth)
    tv_state = net.state_dict()
    assert is_torchvision_resnet(tv_state)
    torch.save(tv_state, tmp_path / f"resnet{depth}.pth")
    opts = TORCHVISION + ("MODEL.RESNETS.DEPTH", depth)
    opts += ("MODEL.RESNETS.RES2_OUT_CHANNELS", 256) if depth == 50 else ()
    model = _model(*opts).eval()
    CMRCNNCheckpointer(model).load(str(tmp_path / f"resnet{depth}.pth"))
    assert "is a torchvision ResNet state_dict" in log_text()

    state = model.state_dict()
    converted = convert_torchvision_resnet(tv_state)
    kept = [
        k for k in tv_state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]
    assert len(converted) == len(kept)
    assert set(converted) == {k for k in state if k.startswith("backbone.bottom_up.")}  # all of it
    for key, value in converted.items():
        assert torch.equal(state[key], value), key
    for ours, theirs in [
        ("stem.conv1.weight", "conv1.weight"),
        ("stem.conv1.norm.running_var", "bn1.running_var"),
        ("res2.0.conv1.weight", "layer1.0.conv1.weight"),
        ("res2.1.conv2.norm.weight", "layer1.1.bn2.weight"),
        ("res3.0.shortcut.weight", "layer2.0.downsample.0.weight"),
        ("res3.0.shortcut.norm.running_mean", "layer2.0.downsample.1.running_mean"),
        ("res5.1.conv2.norm.bias", "layer4.1.bn2.bias"),
    ]:
        assert torch.equal(state["backbone.bottom_up." + ours], tv_state[theirs])
    # and it is the same network
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.backbone.bottom_up(x)["res5"], _trunk(net, x), atol=1e-4, rtol=1e-4
        )


def test_ddp_saved_torchvision_resnet_loads_directly(tmp_path):
    """A torchvision ResNet state_dict saved from DistributedDataParallel ("module." names) is
    MODEL.WEIGHTS as it is: no separate conversion step."""
    tv_state = _torchvision_resnet(18).state_dict()
    torch.save({"module." + k: v for k, v in tv_state.items()}, tmp_path / "r18.pth")
    model = _model(*TORCHVISION)
    CMRCNNCheckpointer(model).load(str(tmp_path / "r18.pth"))
    state = model.state_dict()
    for key, value in convert_torchvision_resnet(tv_state).items():
        assert torch.equal(state[key], value), key
