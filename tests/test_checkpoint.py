"""Initial weights in every layout, clear errors, weights_only loading and atomic saving
(cmrcnn_ext/engine/checkpoint.py)."""

import argparse
import io
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import nn

from cmrcnn_ext.engine.checkpoint import CheckpointError, CMRCNNCheckpointer
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


@pytest.fixture
def log_text():
    """Messages of cmrcnn_ext's loggers (own handler: works whatever propagation is set)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("cmrcnn_ext")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lambda: "\n".join(records)
    log.removeHandler(handler)
    log.setLevel(level)


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


# ------------------------------------------------------------------------------ errors


def _small(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
    elif kind == "json":
        path.write_text('{"model": {"weight": [1, 2, 3]}}')
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        buf = io.BytesIO()
        torch.save(_small().state_dict(), buf)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "corrupt_pkl":
        path = tmp_path / "corrupt.pkl"
        path.write_bytes(pickle.dumps({"model": {"a": np.zeros(3)}}, protocol=4)[:40])
    elif kind == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "config": "abc"}, path)
    return path


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "folder",
        "json",
        "random",
        "empty",
        "truncated",
        "corrupt_pkl",
        "not_a_dict",
        "no_tensors",
    ],
)
def test_bad_files_give_a_clear_error(tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(CheckpointError) as info:
        CMRCNNCheckpointer(_small()).resume_or_load(str(path), resume=False)
    message = str(info.value)
    assert str(path) in message and "Accepted formats:" in message and ".pkl" in message
    # one clear error, not a chained pickle / zip stack trace
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------ weights_only


def test_state_dict_and_training_checkpoint_load_with_weights_only(tmp_path, log_text, monkeypatch):
    src = _small(seed=1)
    optimizer = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    torch.save(
        {"model": src.state_dict(), "iteration": 5, "optimizer": optimizer.state_dict()},
        tmp_path / "d2.pth",
    )
    torch.save(
        {"model": {k: v.numpy() for k, v in src.state_dict().items()}}, tmp_path / "numpy.pth"
    )

    calls = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k)
    )
    for name in ["plain.pth", "d2.pth", "numpy.pth"]:
        model = _small(seed=2)
        extra = CMRCNNCheckpointer(model).load(str(tmp_path / name), checkpointables=[])
        for key, value in src.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
    assert calls == [True, True, True]  # never weights_only=False
    assert extra == {}
    assert "PICKLE" not in log_text()

    # resuming restores the optimizer and returns the rest
    model = _small(seed=2)
    resumed = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    extra = CMRCNNCheckpointer(model, optimizer=resumed).load(str(tmp_path / "d2.pth"))
    assert extra == {"iteration": 5}
    assert resumed.param_groups[0]["lr"] == 0.1
    for p_src, p_res in zip(src.parameters(), model.parameters()):
        assert torch.equal(
            optimizer.state[p_src]["momentum_buffer"], resumed.state[p_res]["momentum_buffer"]
        )


class _FakePathManager:
    def get_local_path(self, path):
        return path.replace("https://example.com/", "")


def test_full_unpickling_only_for_files_the_user_named(tmp_path, log_text, monkeypatch):
    src = _small(seed=1)
    path = tmp_path / "old_style.pth"
    torch.save(
        {"model": src.state_dict(), "iteration": 5, "args": argparse.Namespace(lr=0.1)}, path
    )
    model = _small(seed=2)
    extra = CMRCNNCheckpointer(model).load(str(path))
    assert torch.equal(model[0].weight, src[0].weight)
    assert extra["iteration"] == 5 and extra["args"].lr == 0.1
    text = log_text()
    assert (
        "argparse.Namespace" in text and "weights_only=False" in text and "RUNS PICKLE CODE" in text
    )

    with pytest.raises(CheckpointError, match="argparse.Namespace.*allow_pickle=False"):
        CMRCNNCheckpointer(_small(), allow_pickle=False).load(str(path))
    checkpointer = CMRCNNCheckpointer(_small())
    checkpointer.path_manager = _FakePathManager()  # "downloads" to the local file
    with pytest.raises(CheckpointError, match="fetched from a URL"):
        checkpointer.load("https://example.com/" + str(path))

    # the same for a .pkl holding more than numpy arrays
    pkl = tmp_path / "with_args.pkl"
    with open(pkl, "wb") as f:
        model_np = {k: v.numpy() for k, v in src.state_dict().items()}
        pickle.dump({"model": model_np, "__author__": "someone", "args": argparse.Namespace()}, f)
    model = _small(seed=2)
    CMRCNNCheckpointer(model).load(str(pkl))
    assert torch.equal(model[0].weight, src[0].weight)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        CMRCNNCheckpointer(_small(), allow_pickle=False).load(str(pkl))


# ------------------------------------------------------------------------------ saving


def _half_then_crash(real_save):
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise RuntimeError("simulated crash")

    return save


def test_save_is_atomic(tmp_path, monkeypatch):
    model = nn.Linear(64, 64)
    checkpointer = CMRCNNCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000002", iteration=2)
    good = (tmp_path / "model_0000002.pth").read_bytes()
    first = model.weight.detach().clone()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", _half_then_crash(torch.save))
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpointer.save("model_0000005", iteration=5)
    assert not (tmp_path / "model_0000005.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert (tmp_path / "model_0000002.pth").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000002.pth"]  # no temp file

    # a crash while tagging: the new checkpoint is complete, the tag still names the old one
    monkeypatch.undo()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("last_checkpoint"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        checkpointer.save("model_0000005", iteration=5)
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert torch.load(tmp_path / "model_0000005.pth", weights_only=True)["iteration"] == 5

    # a temporary file left by a killed process is removed by the next save
    (tmp_path / ".model_0000003.pth.k1ll3d.tmp").write_bytes(b"partial")
    checkpointer.save("model_0000006", iteration=6)
    assert not (tmp_path / ".model_0000003.pth.k1ll3d.tmp").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000006.pth"
    os.remove(tmp_path / "model_0000006.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000002.pth")

    # resuming uses the intact checkpoint
    restored = nn.Linear(64, 64)
    extra = CMRCNNCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 2 and torch.equal(restored.weight, first)

    # for contrast: Detectron2's own save leaves a truncated file under the final name
    monkeypatch.setattr(torch, "save", _half_then_crash(torch.save))
    with pytest.raises(RuntimeError):
        DetectionCheckpointer(model, str(tmp_path)).save("model_0000008")
    monkeypatch.undo()
    assert (tmp_path / "model_0000008.pth").stat().st_size < len(good)
    with pytest.raises(CheckpointError, match="model_0000008.pth"):
        CMRCNNCheckpointer(nn.Linear(64, 64)).load(str(tmp_path / "model_0000008.pth"))
