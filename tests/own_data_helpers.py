"""Writing users' own COCO files in tests: small polygon data sets and the training command
(tests/test_own_data.py, test_own_data_run.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from cmrcnn_ext.data.coco import CocoDataError

from conftest import DEMO_CONFIG, ROOT
from reliability_helpers import SMALL_OPTS, load_train_net

SIZE = 64
CATS = [{"id": 1, "name": "square"}, {"id": 2, "name": "triangle"}]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "clean_cache"))


def _polygon(kind, x, y, s):
    if kind == 1:
        return [x, y, x + s, y, x + s, y + s, x, y + s]
    return [x, y + s, x + s / 2, y, x + s, y + s]


def make_polygons(root, n=6, seed=0, folder="images"):
    """``n`` 64x64 images, 2 objects each (a square and a triangle), nested polygons."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        img = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        name = f"{i}.png"
        for kind in (1, 2):
            x, y, s = (int(v) for v in rng.integers(4, 30, 3))
            poly = _polygon(kind, x, y, max(s, 10))
            rle = mask_util.frPyObjects([poly], SIZE, SIZE)
            img[mask_util.decode(rle)[..., 0].astype(bool)] = (200, 60 * kind, 90)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": kind,
                    "iscrowd": 0,
                    "segmentation": [poly],
                    "bbox": mask_util.toBbox(rle)[0].tolist(),
                    "area": float(mask_util.area(rle)[0]),
                }
            )
        Image.fromarray(img).save(os.path.join(root, folder, name))
        images.append({"id": i, "file_name": name, "width": SIZE, "height": SIZE})
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in CATS]}


def write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def train_args(train_json, images, out, val_json=None, val_images=None, opts=(), extra=()):
    argv = [
        "--config-file",
        DEMO_CONFIG,
        "--train-json",
        str(train_json),
        "--train-images",
        str(images),
    ]
    if val_json:
        argv += ["--val-json", str(val_json), "--val-images", str(val_images or images)]
    opts = (
        [str(x) for x in SMALL_OPTS] + ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)] + list(opts)
    )
    return list(extra) + argv + opts


def run_cli(args, cwd=ROOT, env=None, timeout=300):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _stops_before_any_model(monkeypatch, argv, error=CocoDataError):
    """train_net.main's error (the message), raised before a model is built."""
    train_net = load_train_net()
    monkeypatch.setattr(train_net.Trainer, "build_model", lambda *a: pytest.fail("model built"))
    with pytest.raises(error) as info:
        train_net.main(train_net.get_parser().parse_args(argv))
    return str(info.value)
