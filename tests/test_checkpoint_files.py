"""Checkpoint files: clear errors for bad files, weights_only loading (full unpickling only for
files the user named) and atomic saving (cmrcnn_ext/engine/checkpoint.py)."""

import argparse
import io
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from cmrcnn_ext.engine.checkpoint import CheckpointError, CMRCNNCheckpointer

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
