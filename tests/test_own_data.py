"""Users' own COCO files as other tools write them, and the mistakes users make.

Each test writes such a file (or runs such a command) and checks the outcome against an oracle:
the rasterised masks of the nested polygon form, pycocotools' AP of perfect predictions, the
project's own error before any model is built, one message without a traceback on the
command line.
"""

import json
import os

import numpy as np
import pytest
import torch
from own_data_helpers import (
    SIZE,
    _cache_dir,  # noqa: F401  (autouse fixture: a clean cache folder per test)
    _stops_before_any_model,
    make_polygons,
    train_args,
    write,
)

from cmrcnn_ext.data.coco import CocoDataError, load_coco_instances, validate_coco_json

from conftest import DEMO_CONFIG
from reliability_helpers import load_train_net

# --------------------------------------------------------------------- flat polygons


def test_flat_polygon_is_read_as_one_polygon(tmp_path, caplog):
    nested = make_polygons(tmp_path)
    flat = json.loads(json.dumps(nested))
    for ann in flat["annotations"]:
        ann["segmentation"] = ann["segmentation"][0]  # what GIS / labelling exporters write
    root = str(tmp_path / "images")
    dicts = {}
    for name, data in (("nested", nested), ("flat", flat)):
        path = write(tmp_path / f"{name}.json", data)
        report = validate_coco_json(path, root)
        assert report.num_annotations == len(data["annotations"]) == 12
        dicts[name] = load_coco_instances(path, root, f"poly_{name}_{tmp_path.name}")
    assert "repaired 12 x flat_polygon_read_as_one" in report.summary()
    from detectron2.data import detection_utils as utils

    for a, b in zip(dicts["nested"], dicts["flat"]):
        masks = [
            utils.annotations_to_instances(
                d["annotations"], (SIZE, SIZE), "bitmask"
            ).gt_masks.tensor
            for d in (a, b)
        ]
        assert masks[0].sum() > 0 and torch.equal(masks[0], masks[1])


def test_flat_polygons_train(tmp_path):
    data = make_polygons(tmp_path)
    for ann in data["annotations"]:
        ann["segmentation"] = ann["segmentation"][0]
    path = write(tmp_path / "flat.json", data)
    train_net = load_train_net()
    args = train_net.get_parser().parse_args(
        train_args(path, tmp_path / "images", tmp_path / "out")
    )
    train_net.main(args)
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")


def test_mixed_segmentation_is_refused_by_name(tmp_path):
    data = make_polygons(tmp_path, n=2)
    data["annotations"][0]["segmentation"] = [data["annotations"][0]["segmentation"][0], 3, 4]
    report = validate_coco_json(write(tmp_path / "mixed.json", data), tmp_path / "images")
    assert report.skipped == {"segmentation_mixed": 1}
    assert "not a mix of numbers and lists" in report.summary()


# ----------------------------------------------------------- everything skipped, categories


def test_every_annotation_skipped_stops_before_training(tmp_path, monkeypatch):
    data = make_polygons(tmp_path, n=3)
    for ann in data["annotations"]:
        ann["segmentation"] = [[1, 2, 3, 4]]  # two points: no polygon left
    path = write(tmp_path / "bad.json", data)
    msg = _stops_before_any_model(
        monkeypatch, train_args(path, tmp_path / "images", tmp_path / "out")
    )
    assert "bad.json" in msg and "all 6 annotations were dropped" in msg
    assert "no_valid_polygon" in msg and "polygon_too_few_points" in msg


def test_other_validation_categories_are_an_error(tmp_path, monkeypatch):
    train = make_polygons(tmp_path, n=3)
    val = make_polygons(tmp_path, n=2, seed=1)
    val["categories"][1]["name"] = "circle"
    paths = [write(tmp_path / "train.json", train), write(tmp_path / "val.json", val)]
    msg = _stops_before_any_model(
        monkeypatch, train_args(paths[0], tmp_path / "images", tmp_path / "out", paths[1])
    )
    assert "val.json" in msg and "train.json" in msg
    assert "['triangle']" in msg and "['circle']" in msg


def test_validation_with_other_ids_is_matched_by_name(tmp_path, caplog):
    """Same names, other ids (and id order): the evaluation maps them by name; perfect
    predictions in the training class order score AP 100."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from cmrcnn_ext.config import setup_cfg
    from cmrcnn_ext.evaluation.coco import FastCOCOEvaluator

    train = make_polygons(tmp_path, n=3)
    val = make_polygons(tmp_path, n=2, seed=1)
    swap = {1: 7, 2: 3}  # square 7, triangle 3: sorted by id, triangle comes first
    for c in val["categories"]:
        c["id"] = swap[c["id"]]
    for a in val["annotations"]:
        a["category_id"] = swap[a["category_id"]]
    paths = [write(tmp_path / "train.json", train), write(tmp_path / "val.json", val)]
    root = str(tmp_path / "images")
    cfg = setup_cfg(
        DEMO_CONFIG,
        [
            "DATASETS.CMRCNN.TRAIN_JSON",
            paths[0],
            "DATASETS.CMRCNN.TRAIN_IMAGE_ROOT",
            root,
            "DATASETS.CMRCNN.VAL_JSON",
            paths[1],
            "DATASETS.CMRCNN.VAL_IMAGE_ROOT",
            root,
            "MODEL.ROI_HEADS.NUM_CLASSES",
            0,
        ],
    )
    assert list(cfg.MODEL.CMRCNN.CLASS_NAMES) == ["square", "triangle"]
    meta = MetadataCatalog.get("user_val")
    assert meta.thing_classes == ["square", "triangle"]
    assert meta.thing_dataset_id_to_contiguous_id == {7: 0, 3: 1}
    assert "matched to the model's by name" in caplog.text
    from detectron2.data import detection_utils as utils
    from detectron2.structures import Boxes, Instances

    ev = FastCOCOEvaluator("user_val", tasks=("bbox", "segm"), distributed=False)
    ev.reset()
    for d in DatasetCatalog.get("user_val"):
        gt = utils.annotations_to_instances(d["annotations"], (SIZE, SIZE), mask_format="bitmask")
        pred = Instances(
            (SIZE, SIZE),
            pred_boxes=Boxes(gt.gt_boxes.tensor),
            pred_classes=gt.gt_classes,
            scores=torch.ones(len(gt)),
            pred_masks=gt.gt_masks.tensor,
        )
        ev.process([{"image_id": d["image_id"]}], [{"instances": pred}])
    results = ev.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100) and results["bbox"]["AP"] == pytest.approx(
        100
    )


# ------------------------------------------------------------------ exporters' habits


def _perfect_ap(json_file, root, name):
    """bbox / segm AP of the ground truth given as predictions, through the project's
    registration (cleaned copy) and evaluator."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.structures import Boxes, Instances

    from cmrcnn_ext.data.coco import register_coco_dataset
    from cmrcnn_ext.evaluation.coco import FastCOCOEvaluator

    register_coco_dataset(name, json_file, root)
    ev = FastCOCOEvaluator(name, tasks=("bbox", "segm"), distributed=False)
    ev.reset()
    for d in DatasetCatalog.get(name):
        gt = utils.annotations_to_instances(d["annotations"], (SIZE, SIZE), mask_format="bitmask")
        pred = Instances(
            (SIZE, SIZE),
            pred_boxes=Boxes(gt.gt_boxes.tensor),
            pred_classes=gt.gt_classes,
            scores=torch.linspace(1, 0.5, len(gt)),
            pred_masks=gt.gt_masks.tensor,
        )
        ev.process([{"image_id": d["image_id"]}], [{"instances": pred}])
    return ev.evaluate()


def test_annotation_id_zero_does_not_change_ap(tmp_path):
    """pycocotools and faster-coco-eval take annotation id 0 for "unmatched": labelme's export
    starts at 0, and perfect predictions scored below 100. Ids are renumbered in the cleaned
    copy (logged)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = make_polygons(tmp_path)
    for ann in data["annotations"]:
        ann["id"] -= 1  # 0, 1, 2, ...
    path = write(tmp_path / "labelme.json", data)
    # the defect this guards against: pycocotools on the file as it is
    gt = COCO(path)
    dets = gt.loadRes([dict(a, score=1.0 - 0.01 * a["id"]) for a in data["annotations"]])
    raw = COCOeval(gt, dets, "bbox")
    raw.evaluate(), raw.accumulate(), raw.summarize()
    assert raw.stats[0] < 0.99
    report = validate_coco_json(path, tmp_path / "images")
    assert report.fixed["annotation_id_renumbered"] == 1
    results = _perfect_ap(path, str(tmp_path / "images"), f"id0_{tmp_path.name}")
    assert results["bbox"]["AP"] == pytest.approx(100) and results["segm"]["AP"] == pytest.approx(
        100
    )


def test_labelme_background_and_numeric_names(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.visualizer import Visualizer

    from cmrcnn_ext.data.coco import register_coco_dataset

    data = make_polygons(tmp_path, n=2)
    data["categories"] = [
        {"id": 0, "name": "_background_"},
        {"id": 1, "name": 1.0},
        {"id": 2, "name": 2},
    ]
    path = write(tmp_path / "labelme.json", data)
    name = f"labelme_{tmp_path.name}"
    report = register_coco_dataset(name, path, tmp_path / "images")
    assert report.thing_classes == ["1.0", "2"]  # 2 classes, not 3; names as text
    assert report.fixed["unused_background_category_dropped"] == 1
    assert report.fixed["category_name_to_text"] == 2
    meta = MetadataCatalog.get(name)
    d = DatasetCatalog.get(name)[0]
    img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    drawn = Visualizer(img, meta).draw_dataset_dict(d).get_image()  # crashed on float names
    assert drawn.shape[:2] == (SIZE, SIZE)


def test_other_exporters_habits(tmp_path):
    """Missing bbox / area / iscrowd, area 0, iscrowd as bool or text, category ids as text,
    Windows separators and the image folder's name in file_name, absolute paths: all load,
    each repair counted; the masks and boxes are those of the clean file."""
    clean = make_polygons(tmp_path, n=4)
    messy = json.loads(json.dumps(clean))
    anns = messy["annotations"]
    del anns[0]["bbox"], anns[1]["area"], anns[2]["iscrowd"]
    anns[3]["area"] = 0
    anns[4]["iscrowd"], anns[5]["iscrowd"] = False, "0"
    for c in messy["categories"]:
        c["id"] = str(c["id"])
    for a in anns[6:]:
        a["category_id"] = str(a["category_id"])
    images = messy["images"]
    os.makedirs(tmp_path / "images" / "sub", exist_ok=True)
    os.replace(tmp_path / "images" / "2.png", tmp_path / "images" / "sub" / "2.png")
    images[1]["file_name"] = "sub\\2.png"
    images[2]["file_name"] = "images/3.png"
    images[3]["file_name"] = str(tmp_path / "images" / "4.png")
    path = write(tmp_path / "messy.json", messy)
    report = validate_coco_json(path, tmp_path / "images")
    assert report.num_images == 4 and report.num_annotations == 8 and not report.skipped
    assert report.fixed == {
        "bbox_from_segmentation": 1,
        "area_added": 1,
        "area_recomputed": 1,
        "iscrowd_added": 1,
        "iscrowd_to_int": 2,
        "category_id_from_text": 2,
        "file_name_separator": 1,
        "file_name_without_folder": 1,
    }
    dicts = load_coco_instances(path, tmp_path / "images", f"messy_{tmp_path.name}")
    os.replace(tmp_path / "images" / "sub" / "2.png", tmp_path / "images" / "2.png")
    ref = load_coco_instances(write(tmp_path / "clean.json", clean), tmp_path / "images")
    for a, b in zip(dicts, ref):
        assert os.path.isfile(a["file_name"]) or a["image_id"] == 2
        for x, y in zip(a["annotations"], b["annotations"]):
            assert x["category_id"] == y["category_id"] and x["iscrowd"] == 0
            np.testing.assert_allclose(x["bbox"], y["bbox"], atol=1)
            assert x["segmentation"] == y["segmentation"]


def test_box_only_data_with_masks_on_is_an_error(tmp_path):
    from cmrcnn_ext.config import setup_cfg

    data = make_polygons(tmp_path, n=2)
    for ann in data["annotations"]:
        ann["segmentation"] = []  # box-only export
    path = write(tmp_path / "boxes.json", data)
    opts = [
        "DATASETS.CMRCNN.TRAIN_JSON",
        path,
        "DATASETS.CMRCNN.TRAIN_IMAGE_ROOT",
        str(tmp_path / "images"),
        "MODEL.ROI_HEADS.NUM_CLASSES",
        0,
    ]
    with pytest.raises(
        CocoDataError, match="(?s)boxes.json.*no annotation .* has a segmentation.*MASK_ON False"
    ):
        setup_cfg(DEMO_CONFIG, opts)
    cfg = setup_cfg(DEMO_CONFIG, opts + ["MODEL.MASK_ON", False])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2


def test_class_without_training_instances_is_reported(tmp_path, caplog):
    from cmrcnn_ext.config import setup_cfg

    train = make_polygons(tmp_path, n=2)
    train["annotations"] = [a for a in train["annotations"] if a["category_id"] == 1]
    val = make_polygons(tmp_path, n=2, seed=1)
    root = str(tmp_path / "images")
    cfg = setup_cfg(
        DEMO_CONFIG,
        [
            "DATASETS.CMRCNN.TRAIN_JSON",
            write(tmp_path / "t.json", train),
            "DATASETS.CMRCNN.TRAIN_IMAGE_ROOT",
            root,
            "DATASETS.CMRCNN.VAL_JSON",
            write(tmp_path / "v.json", val),
            "DATASETS.CMRCNN.VAL_IMAGE_ROOT",
            root,
            "MODEL.ROI_HEADS.NUM_CLASSES",
            0,
        ],
    )
    assert "class 'triangle' has 2 validation instances but none to train on" in caplog.text
    assert "instances per class: square: 2, triangle: 0" in caplog.text
    from cmrcnn_ext.data.register import data_summary

    assert "  warning: class 'triangle' has 2 validation instances" in data_summary(cfg)
