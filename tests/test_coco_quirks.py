"""Tests of cmrcnn_ext.data.coco: exporters' quirks, class counts, registration for the
evaluator, image reading (grey, RGBA, EXIF rotation)."""

import os

import pycocotools.mask as mask_util
import pytest
import torch
from coco_helpers import (
    H,
    W,
    _ann,
    _cache_dir,  # noqa: F401  (autouse fixture: a clean cache folder per test)
    _dataset,
    _quirky,
    _save_image,
    _to_rle,
    _write,
)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.structures import Boxes, Instances
from PIL import Image

from cmrcnn_ext.data.coco import (
    CocoDataError,
    check_num_classes,
    load_coco_instances,
    num_classes_from_json,
    register_coco_dataset,
    validate_coco_json,
)

# ---------------------------------------------------------------- quirks


def test_quirks_load(tmp_path):
    json_file, root, segms = _quirky(tmp_path)
    report = validate_coco_json(json_file, root)
    # the unused "background" category (id 0) is dropped: Detectron2 has its own background
    assert report.fixed == {"unused_background_category_dropped": 1} and report.has_rle
    assert report.segmentation_types == {"polygon": 2, "rle": 1, "uncompressed_rle": 1}

    name = f"quirky_{tmp_path.name}"
    dicts = load_coco_instances(json_file, root, dataset_name=name)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["dog", "cat", "zebra"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 42: 2}
    assert meta.original_json_file == os.path.abspath(json_file) and meta.json_cleaned
    assert meta.image_root == root and meta.evaluator_type == "coco"

    assert [d["image_id"] for d in dicts] == [10, 20, 30]
    assert [len(d["annotations"]) for d in dicts] == [2, 2, 0]
    assert dicts[0]["file_name"] == os.path.join(root, "sub/dir/gray.png")
    anns = [a for d in dicts for a in d["annotations"]]
    assert [a["category_id"] for a in anns] == [0, 1, 2, 1]
    assert [a["iscrowd"] for a in anns] == [0, 0, 0, 1]
    # uncompressed RLE was compressed for the mapper
    assert isinstance(anns[3]["segmentation"]["counts"], (bytes, str))

    expected = [int(mask_util.area(_to_rle(segms[i], 30, 40))) for i in (1, 2, 3, 4)]
    areas = []
    for d in dicts[:2]:
        inst = utils.annotations_to_instances(d["annotations"], (30, 40), mask_format="bitmask")
        areas += inst.gt_masks.tensor.sum(dim=(1, 2)).tolist()
    assert areas == expected and all(a > 0 for a in areas)

    # the full training mapper reads gray / RGBA images and RLE masks (crowd is dropped)
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[],
        image_format="BGR",
        use_instance_mask=True,
        instance_mask_format="bitmask",
    )
    for d, n in zip(dicts, [2, 1, 0]):
        out = mapper(d)
        assert out["image"].shape == (3, 30, 40)
        assert len(out["instances"]) == n


def test_num_classes(tmp_path):
    json_file, _, _ = _quirky(tmp_path)
    assert num_classes_from_json(json_file) == 3  # the unused background is dropped
    assert check_num_classes(0, json_file) == 3
    assert check_num_classes(3, json_file) == 3
    with pytest.raises(CocoDataError) as info:
        check_num_classes(4, json_file)
    msg = str(info.value)
    assert "MODEL.ROI_HEADS.NUM_CLASSES is 4 but" in msg and "quirky.json" in msg
    assert "defines 3 categories (dog, cat, zebra)" in msg
    assert "set MODEL.ROI_HEADS.NUM_CLASSES 3 or leave it at 0" in msg


# ---------------------------------------------------------------- registration / evaluation


def test_register_writes_cleaned_json_for_evaluator(tmp_path):
    from detectron2.evaluation import COCOEvaluator
    from pycocotools.coco import COCO

    data = _dataset(tmp_path)
    data["categories"] = [{"id": 5, "name": "thing"}, {"id": 9, "name": "unused"}]
    for ann in data["annotations"]:
        ann["category_id"] = 5
        del ann["area"], ann["iscrowd"]  # filled in for pycocotools
    data["annotations"].append(_ann(9, 1, [1, 1, 5, 5], category_id=5))  # would be a box
    json_file = _write(tmp_path, data)
    name = f"reg_{tmp_path.name}"
    report = register_coco_dataset(name, json_file, str(tmp_path / "images"))
    register_coco_dataset(name, json_file, str(tmp_path / "images"))  # replacing is fine
    assert report.fixed == {"area_added": 4, "iscrowd_added": 4}

    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["thing", "unused"] and meta.json_cleaned
    assert meta.json_file.startswith(str(tmp_path / "clean_cache"))
    assert meta.original_json_file == os.path.abspath(json_file)
    coco = COCO(meta.json_file)
    assert sorted(coco.anns) == [1, 2, 3, 4]
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in coco.anns.values())

    dicts = DatasetCatalog.get(name)
    assert sum(len(d["annotations"]) for d in dicts) == 4
    assert {a["category_id"] for d in dicts for a in d["annotations"]} == {0}

    # ground truth as predictions: COCOEvaluator on the cleaned JSON gives AP 100
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    evaluator.reset()
    for d in dicts:
        gt = utils.annotations_to_instances(d["annotations"], (H, W), mask_format="bitmask")
        pred = Instances((H, W), pred_boxes=Boxes(gt.gt_boxes.tensor), pred_classes=gt.gt_classes)
        pred.scores = torch.ones(len(gt))
        pred.pred_masks = gt.gt_masks.tensor
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": pred}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)


# ---------------------------------------------------------------- image reading


def test_read_image_gray_rgba_exif(tmp_path):
    gray, rgba, rotated = (str(tmp_path / n) for n in ("g.png", "a.png", "r.jpg"))
    _save_image(gray, (40, 20), "L")
    _save_image(rgba, (40, 20), "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _save_image(rotated, (40, 20), "RGB", exif=exif)
    assert utils.read_image(gray, format="BGR").shape == (20, 40, 3)
    assert utils.read_image(rgba, format="BGR").shape == (20, 40, 3)
    assert utils.read_image(rotated, format="BGR").shape == (40, 20, 3)


def test_exif_rotated_image_size_is_checked(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    _save_image(str(tmp_path / "images" / "r.jpg"), (40, 20), "RGB", exif=exif)
    images = [{"id": 1, "file_name": "r.jpg", "width": 20, "height": 40}]
    data = {"images": images, "annotations": [_ann(1, 1)], "categories": [{"id": 1, "name": "a"}]}
    assert validate_coco_json(_write(tmp_path, data), tmp_path / "images").num_annotations == 1
    images[0].update(width=40, height=20)  # the raw (un-rotated) size: detectron2 would fail
    with pytest.raises(CocoDataError, match="(?s)image_size_mismatch.*image id=1.*EXIF"):
        validate_coco_json(_write(tmp_path, data, "raw.json"), tmp_path / "images")
