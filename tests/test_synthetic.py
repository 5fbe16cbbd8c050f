"""Tests for the synthetic shapes dataset (cmrcnn_ext.data.synthetic)."""

import json
import os
import uuid

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from cmrcnn_ext.data import synthetic
from cmrcnn_ext.data.synthetic import CLASS_NAMES, generate_dataset

NUM_IMAGES = 8
IMAGE_SIZE = 128


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _image_bytes(out_dir, split="train"):
    image_dir = os.path.join(out_dir, split)
    return {
        name: _read_bytes(os.path.join(image_dir, name)) for name in sorted(os.listdir(image_dir))
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("shapes"))
    json_path = generate_dataset(out_dir, NUM_IMAGES, seed=3, image_size=IMAGE_SIZE)
    return out_dir, json_path


def test_layout(dataset):
    out_dir, json_path = dataset
    assert json_path == os.path.join(out_dir, "train.json")
    assert os.path.isfile(os.path.join(out_dir, "train.done"))
    assert len(os.listdir(os.path.join(out_dir, "train"))) == NUM_IMAGES


def test_determinism(dataset, tmp_path):
    out_dir, json_path = dataset
    same = generate_dataset(str(tmp_path / "same"), NUM_IMAGES, seed=3, image_size=IMAGE_SIZE)
    assert _read_bytes(same) == _read_bytes(json_path)
    assert _image_bytes(str(tmp_path / "same")) == _image_bytes(out_dir)

    other = generate_dataset(str(tmp_path / "other"), NUM_IMAGES, seed=4, image_size=IMAGE_SIZE)
    assert _read_bytes(other) != _read_bytes(json_path)
    other_images = _image_bytes(str(tmp_path / "other"))
    assert all(other_images[name] != data for name, data in _image_bytes(out_dir).items())


def test_annotations_are_exact(dataset):
    _, json_path = dataset
    coco = COCO(json_path)
    assert len(coco.getImgIds()) == NUM_IMAGES
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASS_NAMES
    assert min(coco.getCatIds()) == 1
    assert len(coco.getAnnIds()) >= NUM_IMAGES
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        union = np.zeros((info["height"], info["width"]), dtype=np.int32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            assert ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)
            mask = coco.annToMask(ann)
            assert mask.shape == union.shape
            assert int(mask.sum()) == ann["area"] >= synthetic.MIN_VISIBLE_PIXELS
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            tight = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
            assert ann["bbox"] == tight
            assert mask_util.toBbox(ann["segmentation"]).tolist() == tight
            union += mask
        assert union.max() <= 1, "visible masks of one image must not overlap"


def test_variety(dataset):
    _, json_path = dataset
    with open(json_path) as f:
        anns = json.load(f)["annotations"]
    assert len({a["category_id"] for a in anns}) >= 4
    box_areas = [a["bbox"][2] * a["bbox"][3] for a in anns]
    assert min(box_areas) < 32 * 32
    assert max(box_areas) > 16 * 16


def test_cache_reuse_and_regeneration(tmp_path):
    out_dir = str(tmp_path)
    json_path = generate_dataset(out_dir, 4, seed=0, image_size=64)
    image_path = os.path.join(out_dir, "train", "000000.png")
    stat_json, stat_image = os.stat(json_path).st_mtime_ns, os.stat(image_path).st_mtime_ns
    original = _read_bytes(json_path)

    assert generate_dataset(out_dir, 4, seed=0, image_size=64) == json_path
    assert os.stat(json_path).st_mtime_ns == stat_json
    assert os.stat(image_path).st_mtime_ns == stat_image

    generate_dataset(out_dir, 4, seed=1, image_size=64)
    assert _read_bytes(json_path) != original

    generate_dataset(out_dir, 3, seed=1, image_size=64)
    with open(json_path) as f:
        assert len(json.load(f)["images"]) == 3
    assert sorted(os.listdir(os.path.join(out_dir, "train"))) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]

    generate_dataset(out_dir, 4, seed=0, image_size=64)
    assert _read_bytes(json_path) == original


def test_ensure_and_register(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = str(tmp_path / "root")
    splits = synthetic.ensure_synthetic_dataset(root, num_train=3, num_val=2, image_size=64)
    assert splits["train"] == (os.path.join(root, "train.json"), os.path.join(root, "train"))
    with open(splits["val"][0]) as f:
        assert json.load(f)["info"]["seed"] == 1000

    prefix = f"test_shapes_{uuid.uuid4().hex[:8]}"
    names = synthetic.register_synthetic_dataset(
        root, num_train=3, num_val=2, image_size=64, prefix=prefix
    )
    try:
        assert names == (f"{prefix}_train", f"{prefix}_val")
        # Registering again is a no-op rather than an error.
        synthetic.register_synthetic_dataset(
            root, num_train=3, num_val=2, image_size=64, prefix=prefix
        )
        dicts = DatasetCatalog.get(names[0])
        assert len(dicts) == 3
        assert sum(len(d["annotations"]) for d in dicts) > 0
        assert all(os.path.isfile(d["file_name"]) for d in dicts)
        assert len(DatasetCatalog.get(names[1])) == 2
        for name in names:
            assert MetadataCatalog.get(name).thing_classes == CLASS_NAMES
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_holdout_split_is_separate_and_registered_only_when_named(tmp_path, monkeypatch):
    """``cmrcnn_shapes_holdout``: 200 images from seed + 2000, none equal to a val image, and
    generated only when a config names it."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = str(tmp_path / "root")
    synthetic.ensure_synthetic_dataset(root, num_train=2, num_val=3, seed=5, image_size=64)
    monkeypatch.setattr(synthetic, "HOLDOUT_IMAGES", 4)  # 200 in use; 4 keep the test quick
    prefix = f"test_holdout_{uuid.uuid4().hex[:8]}"
    name = synthetic.register_holdout_split(root, seed=5, image_size=64, prefix=prefix)
    try:
        assert name == f"{prefix}_holdout"
        with open(os.path.join(root, "holdout.json")) as f:
            info = json.load(f)["info"]
        assert (info["seed"], info["num_images"]) == (5 + 2000, 4)
        assert MetadataCatalog.get(name).thing_classes == CLASS_NAMES
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 4 and all(os.path.isfile(d["file_name"]) for d in dicts)
        held = set(_image_bytes(root, "holdout").values())
        assert not held & set(_image_bytes(root, "val").values())
        assert not held & set(_image_bytes(root, "train").values())
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_project_datasets_generate_the_holdout_split_only_when_named(tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog

    from cmrcnn_ext.data import register as register_mod

    made = []
    monkeypatch.setattr(synthetic, "register_synthetic_dataset", lambda prefix: None)
    monkeypatch.setattr(synthetic, "register_holdout_split", lambda prefix: made.append(prefix))
    from detectron2.config import get_cfg

    from cmrcnn_ext.config import add_cmrcnn_config

    cfg = get_cfg()
    add_cmrcnn_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("cmrcnn_shapes_train",), ("cmrcnn_shapes_val",)
    register_mod.register_project_datasets(cfg)
    assert made == []
    cfg.DATASETS.TEST = ("cmrcnn_shapes_val", "cmrcnn_shapes_holdout")
    register_mod.register_project_datasets(cfg)
    assert made == ["cmrcnn_shapes"]
    assert "cmrcnn_shapes_holdout" not in DatasetCatalog.list()  # the stub registered nothing


def test_an_image_that_cannot_be_written_stops_generation_before_the_json(tmp_path, monkeypatch):
    """The writer thread's error reaches the caller, and no JSON or cache stamp claims a split
    whose images are missing."""
    real = synthetic._save_png

    def failing(image, path):
        if path.endswith("000002.png"):
            raise OSError(28, "No space left on device")
        real(image, path)

    monkeypatch.setattr(synthetic, "_save_png", failing)
    out_dir = str(tmp_path / "shapes")
    with pytest.raises(OSError, match="No space left"):
        generate_dataset(out_dir, 12, seed=0, image_size=64)
    assert not os.path.exists(os.path.join(out_dir, "train.json"))
    assert not os.path.exists(os.path.join(out_dir, "train.done"))
