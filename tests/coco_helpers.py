"""COCO JSON files and images written by the data tests (tests/test_coco_data.py,
test_coco_quirks.py; ``_quirky`` also by test_train_cli.py and test_tta.py)."""

import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from cmrcnn_ext.data.coco import (
    CocoDataError,
    validate_coco_json,
)

W, H = 32, 24


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Cleaned JSON copies go to the test's tmp dir."""
    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "clean_cache"))


def _save_image(path, size=(W, H), mode="RGB", **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path, **kwargs)


def _square(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def _ann(ann_id, image_id, poly=None, category_id=1, **extra):
    poly = poly if poly is not None else _square(2, 2, 8)
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0}
    ann.update(segmentation=[poly], bbox=[2, 2, 8, 8], area=64.0)
    ann.update(extra)
    return ann


def _dataset(tmp_path, n_images=2):
    """Two 32x24 JPEGs in tmp_path/images, each with 2 valid polygon annotations."""
    images, anns = [], []
    for i in range(1, n_images + 1):
        _save_image(str(tmp_path / "images" / f"{i}.jpg"))
        images.append({"id": i, "file_name": f"{i}.jpg", "width": W, "height": H})
        anns += [_ann(2 * i - 1, i), _ann(2 * i, i, _square(12, 6, 10), bbox=[12, 6, 10, 10])]
    cats = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _write(tmp_path, data, name="train.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def _errors(tmp_path, data, name="bad.json"):
    path = _write(tmp_path, data, name)
    with pytest.raises(CocoDataError) as info:
        validate_coco_json(path, tmp_path / "images")
    msg = str(info.value)
    assert name in msg, msg
    return msg


def _uncompressed_rle(mask):
    """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat, counts, current, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _quirky(tmp_path):
    root = tmp_path / "imgs"
    _save_image(str(root / "sub" / "dir" / "gray.png"), (40, 30), "L")
    _save_image(str(root / "sub" / "rgba.png"), (40, 30), "RGBA")
    _save_image(str(root / "empty.jpg"), (40, 30))
    images = [
        {"id": 10, "file_name": "sub/dir/gray.png", "width": 40, "height": 30},
        {"id": 20, "file_name": "sub/rgba.png", "width": 40, "height": 30},
        {"id": 30, "file_name": "empty.jpg", "width": 40, "height": 30},
    ]
    cats = [
        {"id": 42, "name": "zebra"},
        {"id": 0, "name": "background"},
        {"id": 7, "name": "cat"},
        {"id": 3, "name": "dog"},
    ]
    mask_a = np.zeros((30, 40), dtype=np.uint8)
    mask_a[5:15, 8:30] = 1
    mask_b = np.zeros((30, 40), dtype=np.uint8)
    mask_b[18:28, 2:12] = 1
    mask_b[0:3, 35:40] = 1
    compressed = mask_util.encode(np.asfortranarray(mask_a))
    compressed["counts"] = compressed["counts"].decode("ascii")
    segms = {
        1: [_square(3, 3, 10)],
        2: [_square(20, 5, 6), [30, 20, 38, 20, 34, 28]],
        3: compressed,
        4: _uncompressed_rle(mask_b),
    }
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "segmentation": segms[1], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "segmentation": segms[2], "iscrowd": 0},
        {"id": 3, "image_id": 20, "category_id": 42, "segmentation": segms[3], "iscrowd": 0},
        {"id": 4, "image_id": 20, "category_id": 7, "segmentation": segms[4], "iscrowd": 1},
    ]
    for ann in anns:
        rle = _to_rle(ann["segmentation"], 30, 40)
        ann.update(bbox=mask_util.toBbox(rle).tolist(), area=float(mask_util.area(rle)))
    data = {"images": images, "annotations": anns, "categories": cats}
    return _write(tmp_path, data, "quirky.json"), str(root), segms


def _to_rle(segm, h, w):
    if isinstance(segm, list):
        return mask_util.merge(mask_util.frPyObjects(segm, h, w))
    return mask_util.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
