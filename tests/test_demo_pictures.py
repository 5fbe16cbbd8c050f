"""The demo's prediction pictures: ground truth left, the model's detections drawn right."""
import numpy as np
import torch
from PIL import Image

from cmrcnn_ext.demo import draw_predictions
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model

from conftest import tiny_cfg
from reliability_helpers import make_data


def test_pictures_show_ground_truth_and_predictions(tmp_path):
    root = make_data(tmp_path / "data", num_train=2, num_val=0)
    register_coco_instances("pictures_test", {}, str(root / "train.json"), str(root / "train"))
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64)
    torch.manual_seed(0)
    model = build_model(cfg)
    drawn = draw_predictions(cfg, model, "pictures_test", str(tmp_path / "pics"), num_images=2,
                             score_thresh=0.0)
    assert len(drawn) == 2
    from detectron2.data import DatasetCatalog

    for path, d in zip(drawn, DatasetCatalog.get("pictures_test")):
        canvas = np.asarray(Image.open(path).convert("RGB")).astype(int)
        img = np.asarray(Image.open(d["file_name"]).convert("RGB")).astype(int)
        big = img.repeat(2, 0).repeat(2, 1)  # the pictures are drawn at scale 2
        h, w = big.shape[:2]
        assert canvas.shape == (h, 2 * w + 8, 3)
        left, right = canvas[:, :w], canvas[:, w + 8:]
        # both halves draw over the image: many pixels differ from it on each side
        assert (np.abs(left - big).sum(2) > 30).mean() > 0.01
        assert (np.abs(right - big).sum(2) > 30).mean() > 0.01
        assert not np.array_equal(left, right)
