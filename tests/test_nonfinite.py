"""A NaN/inf loss or weight stops training with a clear message; the last checkpoint stays good."""
import math
import os

import pytest
import torch

from reliability_helpers import load_train_net, make_data, train_argv


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "cache"))
    return make_data(tmp_path / "data", num_val=0)


def _args(train_net, data, out, opts):
    return train_net.get_parser().parse_args(train_argv(data, out, opts, val=False))


def _assert_last_checkpoint_is(out, name, iteration):
    """``last_checkpoint`` names ``name``, which loads, holds finite weights and ``iteration``."""
    from cmrcnn_ext.engine import setup_cfg
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    with open(out / "last_checkpoint") as f:
        assert f.read().strip() == name
    cfg = setup_cfg(os.path.join(out, "config.yaml"))
    model = build_model(cfg)
    extra = DetectionCheckpointer(model, save_dir=str(out)).resume_or_load("", resume=True)
    assert extra["iteration"] == iteration
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def test_nan_loss_stops_at_its_iteration_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    from cmrcnn_ext.nonfinite import NonFiniteLossError
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.utils.events import get_event_storage

    forward = GeneralizedRCNN.forward

    def forward_with_nan_at_3(self, batched_inputs):
        losses = forward(self, batched_inputs)
        if self.training and get_event_storage().iter == 3:
            losses = dict(losses)
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
            losses["loss_rpn_cls"] = losses["loss_rpn_cls"] + float("inf")
        return losses

    monkeypatch.setattr(GeneralizedRCNN, "forward", forward_with_nan_at_3)
    train_net = load_train_net()
    out = tmp_path / "out"
    args = _args(train_net, data, out, ["SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2])
    with pytest.raises(FloatingPointError) as info:
        train_net.main(args)
    err = info.value
    assert isinstance(err, NonFiniteLossError)
    msg = str(err)
    print(msg)
    assert "Non-finite loss at iteration 3: loss_mask=nan, loss_rpn_cls=inf." in msg
    assert "loss_cls_stage0=" in msg  # the finite terms, for context
    assert str(out / "model_0000001.pth") in msg
    assert err.iteration == 3 and set(err.bad_terms) == {"loss_mask", "loss_rpn_cls"}
    # nothing was saved at or after the failed iteration 3 (period 2: iterations 1, 3, 5)
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000001.pth"]
    _assert_last_checkpoint_is(out, "model_0000001.pth", 1)


def test_huge_learning_rate_stops_before_saving_infinite_weights(data, tmp_path):
    """Iteration 0 runs at lr 0.01 (warm-up), iteration 1 at ~1e42: its step overflows."""
    from cmrcnn_ext.nonfinite import NonFiniteWeightsError

    train_net = load_train_net()
    out = tmp_path / "out"
    opts = ["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.BASE_LR", 1e45,
            "SOLVER.WARMUP_FACTOR", 1e-47, "SOLVER.WARMUP_ITERS", 1000]  # fmt: skip
    with pytest.raises(FloatingPointError) as info:
        train_net.main(_args(train_net, data, out, opts))
    err = info.value
    print(err)
    assert isinstance(err, NonFiniteWeightsError)
    assert err.iteration == 1 and err.parameters
    assert "Non-finite weights after the update of iteration 1" in str(err)
    assert all(math.isfinite(v) for v in err.losses.values()) and "loss_mask" in err.losses
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000000.pth"]
    _assert_last_checkpoint_is(out, "model_0000000.pth", 0)
