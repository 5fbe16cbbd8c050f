"""SOLVER.AMP.ENABLED on the CPU: train_net.py trains with bfloat16 autocast.

Detectron2 v0.6's AMPTrainer asserts CUDA at its first step; cmrcnn_ext's Trainer runs the
forward pass under ``torch.autocast("cpu", torch.bfloat16)`` instead, weights and checkpoints
staying float32.
"""

import os

import pytest
import torch

from cmrcnn_ext.engine import Trainer  # the real class (tests patch the app's name)

from reliability_helpers import load_train_net, make_data, read_metrics, train_argv


def test_cpu_amp_trains_in_bfloat16_and_saves_float32(tmp_path, monkeypatch):
    from detectron2.engine import HookBase

    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "cache"))
    make_data(tmp_path / "data", num_val=2)
    train_net = load_train_net()
    seen = {}

    class DtypeProbe(HookBase):
        def before_train(self):
            model = self.trainer.model
            model = getattr(model, "module", model)
            model.backbone.bottom_up.stem.conv1.register_forward_hook(
                lambda m, i, o: seen.setdefault("stem", set()).add(o.dtype)
            )
            model.roi_heads.box_predictor[2].cls_score.register_forward_hook(
                lambda m, i, o: seen.setdefault("cls", set()).add(o.dtype)
            )

        def after_step(self):
            seen.setdefault("weights", set()).update(
                p.dtype for p in self.trainer.model.parameters()
            )

    class ProbedTrainer(Trainer):
        def build_hooks(self):
            return [DtypeProbe()] + super().build_hooks()

    monkeypatch.setattr("cmrcnn_ext.apps.train.Trainer", ProbedTrainer)
    out = tmp_path / "out"
    args = train_net.get_parser().parse_args(
        train_argv(tmp_path / "data", out, ["SOLVER.MAX_ITER", 3, "SOLVER.AMP.ENABLED", True])
    )
    train_net.main(args)
    # training forwards ran in bfloat16; evaluation (after training, no autocast) in float32
    assert torch.bfloat16 in seen["stem"] and torch.bfloat16 in seen["cls"]
    assert torch.float32 in seen["stem"]
    assert seen["weights"] == {torch.float32}
    losses, evaluation = read_metrics(out)
    assert max(losses) == 2  # metrics.json: the last iteration (written every 20)
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in losses.values())
    assert evaluation is not None and "segm/AP" in evaluation
    state = torch.load(
        os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False
    )["model"]
    assert all(v.dtype != torch.bfloat16 for v in state.values())
    assert not any(k.startswith("model.") for k in state)  # the autocast wrapper is not saved
    assert "backbone.bottom_up.stem.conv1.weight" in state


def test_cpu_amp_builds_no_cuda_grad_scaler(tmp_path, monkeypatch):
    """Detectron2 main builds its CUDA AMPTrainer (and a GradScaler, which warns without CUDA)
    when SOLVER.AMP.ENABLED; cmrcnn_ext's Trainer must not let it on the CPU."""
    import warnings

    from cmrcnn_ext.config import setup_cfg
    from cmrcnn_ext.engine import CPUAutocastTrainer, Trainer
    from cmrcnn_ext.engine.setup import command_line_opts

    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "cache"))
    make_data(tmp_path / "data", num_val=0)
    train_net = load_train_net()
    args = train_net.get_parser().parse_args(
        train_argv(tmp_path / "data", tmp_path / "out", ["SOLVER.AMP.ENABLED", True], val=False)
    )
    cfg = setup_cfg(args.config_file, command_line_opts(args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg)
    scaler = [str(w.message) for w in caught if "GradScaler" in str(w.message)]
    assert not scaler, scaler
    assert type(trainer._trainer) is CPUAutocastTrainer
    assert trainer.cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.ENABLED


@pytest.mark.parametrize("native", [True, False])
def test_cpu_amp_warns_where_bf16_is_emulated(tmp_path, monkeypatch, caplog, native):
    """Without AVX512-BF16 / AMX, bfloat16 autocast is many times slower than float32: the
    Trainer says so and how to train in float32, and warns about nothing on other CPUs."""
    from cmrcnn_ext.config import setup_cfg
    from cmrcnn_ext.engine import trainer
    from cmrcnn_ext.engine.setup import command_line_opts

    monkeypatch.setattr(trainer, "native_bf16", lambda: native)
    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "cache"))
    make_data(tmp_path / "data", num_val=0)
    args = (
        load_train_net()
        .get_parser()
        .parse_args(
            train_argv(tmp_path / "data", tmp_path / "out", ["SOLVER.AMP.ENABLED", True], val=False)
        )
    )
    with caplog.at_level("WARNING", logger="cmrcnn_ext.engine.trainer"):
        trainer.Trainer(setup_cfg(args.config_file, command_line_opts(args)))
    warned = [r.getMessage() for r in caplog.records if "AVX512-BF16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert native or "SOLVER.AMP.ENABLED False" in warned[0]
