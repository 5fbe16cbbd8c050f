"""The demo's prediction pictures: ground truth left, the model's detections drawn right."""

import numpy as np
import torch
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from PIL import Image

from cmrcnn_ext.apps.demo import draw_predictions

from conftest import tiny_cfg
from reliability_helpers import make_data


def test_pictures_show_ground_truth_and_predictions(tmp_path):
    root = make_data(tmp_path / "data", num_train=2, num_val=0)
    register_coco_instances("pictures_test", {}, str(root / "train.json"), str(root / "train"))
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64)
    torch.manual_seed(0)
    model = build_model(cfg)
    drawn = draw_predictions(
        cfg, model, "pictures_test", str(tmp_path / "pics"), num_images=2, score_thresh=0.0
    )
    assert len(drawn) == 2
    from detectron2.data import DatasetCatalog

    for path, d in zip(drawn, DatasetCatalog.get("pictures_test")):
        canvas = np.asarray(Image.open(path).convert("RGB")).astype(int)
        img = np.asarray(Image.open(d["file_name"]).convert("RGB")).astype(int)
        big = img.repeat(2, 0).repeat(2, 1)  # the pictures are drawn at scale 2
        h, w = big.shape[:2]
        assert canvas.shape == (h, 2 * w + 8, 3)
        left, right = canvas[:, :w], canvas[:, w + 8 :]
        # both halves draw over the image: many pixels differ from it on each side
        assert (np.abs(left - big).sum(2) > 30).mean() > 0.01
        assert (np.abs(right - big).sum(2) > 30).mean() > 0.01
        assert not np.array_equal(left, right)


def test_demo_seeds_every_rng_from_cfg_seed(monkeypatch, tmp_path):
    """The demo seeds as train_net.py's default_setup does: with SEED >= 0 two runs build the
    model and draw the training images from the same random state; SEED < 0 draws anew."""
    import pytest

    import cmrcnn_ext.apps.demo as demo

    class Stop(Exception):
        pass

    draws = []

    def fake_trainer(cfg):  # the trainer builds the model and the data loader from these RNGs
        draws.append((torch.rand(4), np.random.rand(4)))
        raise Stop

    monkeypatch.setattr(demo, "Trainer", fake_trainer)
    for seed in (7, 7, 8, -1, -1):
        monkeypatch.setattr(demo, "setup_cfg", lambda *a, seed=seed, **k: tiny_cfg("SEED", seed))
        torch.manual_seed(123)  # whatever state the process is in
        np.random.seed(123)
        with pytest.raises(Stop):
            demo.main(["--output", str(tmp_path / "out")])
    same = [torch.equal(draws[0][0], d[0]) and np.array_equal(draws[0][1], d[1]) for d in draws]
    assert same == [True, True, False, False, False]
    assert not torch.equal(draws[3][0], draws[4][0])
