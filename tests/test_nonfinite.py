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
    opts = ["SOLVER.IMS_PER_BATCH", 1] + list(opts)
    return train_net.get_parser().parse_args(train_argv(data, out, opts, val=False))


def _assert_last_checkpoint_is(out, name, iteration):
    """``last_checkpoint`` names ``name``, which loads, holds finite weights and ``iteration``."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from cmrcnn_ext.config import setup_cfg

    with open(out / "last_checkpoint") as f:
        assert f.read().strip() == name
    cfg = setup_cfg(os.path.join(out, "config.yaml"))
    model = build_model(cfg)
    extra = DetectionCheckpointer(model, save_dir=str(out)).resume_or_load("", resume=True)
    assert extra["iteration"] == iteration
    weights = [p for p in model.state_dict().values() if p.is_floating_point()]
    assert all(torch.isfinite(p).all() for p in weights)


def test_nan_loss_stops_at_its_iteration_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    """NaN / inf loss terms at iteration 2; a checkpoint after every iteration."""
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.utils.events import get_event_storage

    from cmrcnn_ext.engine.nonfinite import NonFiniteLossError

    forward = GeneralizedRCNN.forward

    def forward_with_nan_at_2(self, batched_inputs):
        losses = forward(self, batched_inputs)
        if self.training and get_event_storage().iter == 2:
            losses = dict(losses)
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
            losses["loss_rpn_cls"] = losses["loss_rpn_cls"] + float("inf")
        return losses

    monkeypatch.setattr(GeneralizedRCNN, "forward", forward_with_nan_at_2)
    train_net = load_train_net()
    out = tmp_path / "out"
    args = _args(train_net, data, out, ["SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 1])
    with pytest.raises(FloatingPointError) as info:
        train_net.main(args)
    err = info.value
    assert isinstance(err, NonFiniteLossError)
    msg = str(err)
    print(msg)
    assert "Non-finite loss at iteration 2: loss_mask=nan, loss_rpn_cls=inf." in msg
    assert "loss_cls_stage0=" in msg  # the finite terms, for context
    assert str(out / "model_0000001.pth") in msg
    assert err.iteration == 2 and set(err.bad_terms) == {"loss_mask", "loss_rpn_cls"}
    # nothing was saved at or after the failed iteration 2
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
        "model_0000000.pth",
        "model_0000001.pth",
    ]
    _assert_last_checkpoint_is(out, "model_0000001.pth", 1)


def test_nan_gradient_with_finite_losses_stops_before_saving_weights(data, tmp_path, monkeypatch):
    """At iteration 1 a loss term gets + sqrt(|0|): its value is 0, its gradient NaN, so the
    optimizer step turns weights into NaN although every loss is finite."""
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.utils.events import get_event_storage

    from cmrcnn_ext.engine.nonfinite import NonFiniteWeightsError

    forward = GeneralizedRCNN.forward

    def forward_with_nan_gradient_at_1(self, batched_inputs):
        losses = forward(self, batched_inputs)
        if self.training and get_event_storage().iter == 1:
            w = self.roi_heads.box_predictor[0].cls_score.weight
            losses = dict(losses)
            losses["loss_mask"] = losses["loss_mask"] + torch.sqrt((w - w.detach()).sum().abs())
        return losses

    monkeypatch.setattr(GeneralizedRCNN, "forward", forward_with_nan_gradient_at_1)
    train_net = load_train_net()
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError) as info:
        opts = ["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 1]
        train_net.main(_args(train_net, data, out, opts))
    err = info.value
    print(err)
    assert isinstance(err, NonFiniteWeightsError)
    assert err.iteration == 1
    assert "roi_heads.box_predictor.0.cls_score.weight" in err.parameters
    assert "Non-finite weights after the update of iteration 1" in str(err)
    assert all(math.isfinite(v) for v in err.losses.values()) and "loss_mask" in err.losses
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000000.pth"]
    _assert_last_checkpoint_is(out, "model_0000000.pth", 0)


def _nan_on_rank1_worker(argv, out_dir):
    """Spawned worker: loss_mask is NaN on rank 1 only, at iteration 1; saves what it raised."""
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.utils import comm
    from detectron2.utils.events import get_event_storage

    from cmrcnn_ext.engine.nonfinite import NonFiniteLossError

    forward = GeneralizedRCNN.forward

    def forward_with_nan(self, batched_inputs):
        losses = forward(self, batched_inputs)
        if self.training and get_event_storage().iter == 1 and comm.get_rank() == 1:
            losses = dict(losses, loss_mask=losses["loss_mask"] * float("nan"))
        return losses

    GeneralizedRCNN.forward = forward_with_nan
    train_net = load_train_net()
    try:
        train_net.main(train_net.get_parser().parse_args(argv))
        message = "no error"
    except NonFiniteLossError as e:
        message = str(e)
    with open(os.path.join(out_dir, f"error.rank{comm.get_rank()}.txt"), "w") as f:
        f.write(message)


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(data, tmp_path):
    """2 CPU processes: a NaN on rank 1 alone stops both at the same iteration, no hang."""
    from datetime import timedelta

    from cmrcnn_ext.engine.launch import launch

    out = tmp_path / "out"
    argv = train_argv(data, out, ["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 1], val=False)
    launch(
        _nan_on_rank1_worker,
        2,
        dist_url="auto",
        args=(argv, str(tmp_path)),
        timeout=timedelta(seconds=120),
    )
    messages = [open(tmp_path / f"error.rank{r}.txt").read() for r in range(2)]
    assert messages[0] == messages[1]
    expected = "Non-finite loss at iteration 1: loss_mask=nan (rank 1). Training stopped."
    assert expected in messages[0]
    assert "Finite terms (rank 1): " in messages[0]
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000000.pth"]


def test_weight_check_sum_overflow_is_not_reported_and_inf_is():
    """The per-step weight check sums every tensor: a float32 sum that overflows although all
    weights are finite is re-checked element-wise and passes; one inf weight is reported."""
    from types import SimpleNamespace

    from cmrcnn_ext.engine.nonfinite import NonFiniteLossGuard, NonFiniteWeightsError, _sum_all

    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(3e38)  # finite, but 16 of them sum to inf in float32
    assert not torch.isfinite(_sum_all(list(model.parameters())))
    guard = NonFiniteLossGuard()
    guard.trainer = SimpleNamespace(model=model, iter=7)
    guard.after_step()  # no error
    with torch.no_grad():
        model.bias[2] = float("inf")
    with pytest.raises(NonFiniteWeightsError) as info:
        guard.after_step()
    assert info.value.parameters == ["bias"] and info.value.iteration == 7
