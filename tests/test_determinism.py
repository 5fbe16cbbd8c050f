"""train_net.py --deterministic: two CPU runs with the same SEED give identical losses."""

import pytest
import torch

from cmrcnn_ext.engine import Trainer  # the real class (tests patch the app's name)

from reliability_helpers import load_train_net, make_data, train_argv

NUM_ITER = 3


@pytest.fixture
def restore_torch_flags():
    """enable_determinism changes process-wide torch flags: put them back afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:]


def _losses_per_iteration(tmp_path, name, seed, monkeypatch, num_iter=NUM_ITER):
    """Runs train_net.main; returns {iteration: {loss name: value}} from a hook after each step."""
    from detectron2.engine import HookBase

    train_net = load_train_net()
    recorded = {}

    class Recorder(HookBase):
        def after_step(self):
            it = self.trainer.iter
            recorded[it] = {
                k: v
                for k, (v, i) in self.trainer.storage.latest().items()
                if i == it and ("loss" in k)
            }

    class RecordingTrainer(Trainer):
        def build_hooks(self):
            return super().build_hooks() + [Recorder()]

    monkeypatch.setattr("cmrcnn_ext.apps.train.Trainer", RecordingTrainer)
    args = train_net.get_parser().parse_args(
        train_argv(
            tmp_path / "data",
            tmp_path / name,
            ["SOLVER.MAX_ITER", num_iter, "SOLVER.IMS_PER_BATCH", 1, "SEED", seed],
            val=False,
            extra_args=["--deterministic"],
        )
    )
    train_net.main(args)
    assert torch.are_deterministic_algorithms_enabled()
    return recorded


def test_same_seed_gives_identical_losses(tmp_path, monkeypatch, restore_torch_flags):
    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "cache"))
    make_data(tmp_path / "data", num_val=0)
    a = _losses_per_iteration(tmp_path, "a", 0, monkeypatch)
    b = _losses_per_iteration(tmp_path, "b", 0, monkeypatch)
    assert sorted(a) == list(range(NUM_ITER))
    assert all("total_loss" in a[i] and len(a[i]) >= 10 for i in a)  # every term, every step
    assert a == b  # exactly, every term at every iteration
    # and the comparison can fail: another seed (initial weights, samples) changes the losses
    c = _losses_per_iteration(tmp_path, "c", 1, monkeypatch, num_iter=1)
    assert a[0]["total_loss"] != c[0]["total_loss"]


def test_deterministic_needs_a_fixed_seed(tmp_path, restore_torch_flags):
    from cmrcnn_ext.engine.determinism import enable_determinism

    from conftest import tiny_cfg

    with pytest.raises(ValueError, match="SEED is -1"):
        enable_determinism(tiny_cfg("SEED", -1))
    with pytest.raises(ValueError, match="CUDNN_BENCHMARK"):
        enable_determinism(tiny_cfg("SEED", 0, "CUDNN_BENCHMARK", True))
