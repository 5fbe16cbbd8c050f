"""Tests of cmrcnn_ext.data.coco: validation errors, and skipping and counting bad items."""

import json
import logging

import pytest
from coco_helpers import (
    H,
    W,
    _ann,
    _cache_dir,  # noqa: F401  (autouse fixture: a clean cache folder per test)
    _dataset,
    _errors,
    _square,
    _write,
)

from cmrcnn_ext.data.coco import (
    CocoDataError,
    load_coco_instances,
    validate_coco_json,
)

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
