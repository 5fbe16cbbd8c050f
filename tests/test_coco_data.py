"""Tests of cmrcnn_ext.data.coco: validation, skipping, loading and registration of COCO JSON."""

import json
import logging
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
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


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(CocoDataError, match="(?s)nope.json.*not found"):
        validate_coco_json(tmp_path / "nope.json", tmp_path)


def test_invalid_json_reports_line_and_column(tmp_path):
    text = json.dumps(_dataset(tmp_path), indent=1)
    path = tmp_path / "truncated.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CocoDataError) as info:
        validate_coco_json(path, tmp_path / "images")
    msg = str(info.value)
    assert "truncated.json" in msg and "invalid JSON at line" in msg and "column" in msg
    assert isinstance(info.value, ValueError)


def test_missing_top_level_key(tmp_path):
    data = _dataset(tmp_path)
    del data["annotations"]
    assert "missing top-level key 'annotations'" in _errors(tmp_path, data)


def test_duplicate_image_id(tmp_path):
    data = _dataset(tmp_path)
    data["images"][1]["id"] = 1
    assert "image id=1 is used 2 times" in _errors(tmp_path, data)


def test_duplicate_file_name(tmp_path):
    data = _dataset(tmp_path)
    data["images"][1]["file_name"] = "1.jpg"
    assert "file_name '1.jpg' is listed under image ids [1, 2]" in _errors(tmp_path, data)


def test_unknown_category_id(tmp_path):
    data = _dataset(tmp_path)
    data["annotations"][2]["category_id"] = 99
    msg = _errors(tmp_path, data)
    assert "annotation id=3 (image id=2) has category_id=99" in msg
    assert "add that category or fix it" in msg


def test_duplicate_category_id(tmp_path):
    data = _dataset(tmp_path)
    data["categories"][1]["id"] = 1
    assert "category id=1 is defined 2 times" in _errors(tmp_path, data)


def test_annotation_with_unknown_image_id(tmp_path):
    data = _dataset(tmp_path)
    data["annotations"][0]["image_id"] = 77
    assert "annotation id=1 refers to image_id=77" in _errors(tmp_path, data)


def test_empty_dataset(tmp_path):
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    assert "'images' is empty" in _errors(tmp_path, data)


def test_all_problems_listed_then_truncated(tmp_path):
    data = _dataset(tmp_path)
    data["annotations"] += [_ann(100 + i, 1, category_id=50 + i) for i in range(30)]
    msg = _errors(tmp_path, data)
    assert "30 problem(s)" in msg and "category_id=50" in msg and "... and 10 more" in msg


def test_no_usable_image_points_at_image_root(tmp_path):
    data = _dataset(tmp_path)
    path = _write(tmp_path, data)
    with pytest.raises(
        CocoDataError, match="(?s)none of the 2 images is usable; check image_root.*wrong_root"
    ):
        validate_coco_json(path, tmp_path / "wrong_root")


# ---------------------------------------------------------------- skip and count


def _skip_one(tmp_path, data, expected):
    """Validates and loads; checks skip counts and that the 4 good annotations survive."""
    path = _write(tmp_path, data)
    report = validate_coco_json(path, tmp_path / "images")
    assert {k: v for k, v in report.skipped.items() if v} == expected
    dicts = load_coco_instances(path, tmp_path / "images")
    good = sorted(a["bbox"][0] for d in dicts for a in d["annotations"])
    assert good == [2, 2, 12, 12]
    return report, dicts


@pytest.mark.parametrize("bbox", [[1, 1, 0, 5], [1, 1, 5, -2], [1, float("nan"), 5, 5]])
def test_skip_bad_box(tmp_path, bbox):
    data = _dataset(tmp_path)
    data["annotations"].append(_ann(9, 1, bbox=bbox))
    report, _ = _skip_one(tmp_path, data, {"invalid_bbox": 1})
    assert "annotation id=9 (image id=1)" in report.examples["invalid_bbox"][0]


def test_skip_polygon_with_two_points(tmp_path):
    data = _dataset(tmp_path)
    data["annotations"].append(_ann(9, 1, [1, 1, 5, 5]))
    _skip_one(tmp_path, data, {"polygon_too_few_points": 1, "no_valid_polygon": 1})


def test_bad_polygon_dropped_annotation_kept(tmp_path):
    data = _dataset(tmp_path)
    data["annotations"][0]["segmentation"].append([1, 1, 5, 5])
    report, dicts = _skip_one(tmp_path, data, {"polygon_too_few_points": 1})
    first = [a for a in dicts[0]["annotations"] if a["bbox"][0] == 2][0]
    assert first["segmentation"] == [_square(2, 2, 8)]


def test_skip_polygon_with_odd_coordinates(tmp_path):
    data = _dataset(tmp_path)
    data["annotations"].append(_ann(9, 2, [1, 1, 5, 1, 5, 5, 1]))
    _skip_one(tmp_path, data, {"polygon_odd_coordinates": 1, "no_valid_polygon": 1})


def test_skip_segmentation_outside_image(tmp_path):
    data = _dataset(tmp_path)
    data["annotations"].append(_ann(9, 2, _square(W + 5, 3, 6), bbox=[2, 2, 3, 3]))
    report, _ = _skip_one(tmp_path, data, {"outside_image": 1})
    assert "annotation id=9" in report.examples["outside_image"][0]


def test_skip_missing_image_file(tmp_path):
    data = _dataset(tmp_path)
    data["images"].append({"id": 3, "file_name": "gone.jpg", "width": W, "height": H})
    data["annotations"] += [_ann(9, 3), _ann(10, 3)]
    report, dicts = _skip_one(
        tmp_path, data, {"missing_image": 1, "annotation_of_skipped_image": 2}
    )
    assert "image id=3 ('gone.jpg')" in report.examples["missing_image"][0]
    assert len(dicts) == 2 and report.num_images == 2 and report.num_annotations == 4


def test_skip_corrupt_image_file(tmp_path):
    data = _dataset(tmp_path)
    (tmp_path / "images" / "3.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    data["images"].append({"id": 3, "file_name": "3.jpg", "width": W, "height": H})
    data["annotations"].append(_ann(9, 3))
    report, _ = _skip_one(tmp_path, data, {"unreadable_image": 1, "annotation_of_skipped_image": 1})
    assert "image id=3 ('3.jpg'): cannot decode" in report.examples["unreadable_image"][0]


def test_check_images_false_keeps_missing_images(tmp_path):
    data = _dataset(tmp_path)
    data["images"].append({"id": 3, "file_name": "gone.jpg", "width": W, "height": H})
    report = validate_coco_json(_write(tmp_path, data), tmp_path / "images", check_images=False)
    assert report.num_images == 3 and not report.needs_cleaning


def test_skips_are_logged(tmp_path, caplog):
    data = _dataset(tmp_path)
    data["annotations"].append(_ann(9, 1, bbox=[1, 1, 0, 0]))
    with caplog.at_level(logging.WARNING, logger="cmrcnn_ext.data.coco"):
        validate_coco_json(_write(tmp_path, data), tmp_path / "images")
    assert "skipped 1 x invalid_bbox" in caplog.text and "train.json" in caplog.text


# ---------------------------------------------------------------- quirks


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
