"""Users' own COCO files as other tools write them, and the mistakes users make.

Each test writes such a file (or runs such a command) and checks the outcome against an oracle:
the rasterised masks of the nested polygon form, pycocotools' AP of perfect predictions, the
project's own error before any model is built, one message without a traceback on the
command line.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from cmrcnn_ext.data.coco import CocoDataError, load_coco_instances, validate_coco_json

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


def _stops_before_any_model(monkeypatch, argv, error=CocoDataError):
    """train_net.main's error (the message), raised before a model is built."""
    train_net = load_train_net()
    monkeypatch.setattr(train_net.Trainer, "build_model", lambda *a: pytest.fail("model built"))
    with pytest.raises(error) as info:
        train_net.main(train_net.get_parser().parse_args(argv))
    return str(info.value)


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


# ------------------------------------------------------- a trained own-data run and its files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-iteration train_net.py run on own data (2 classes) with evaluation."""
    tmp = tmp_path_factory.mktemp("own_run")
    old = os.environ.get("CMRCNN_EXT_CACHE_DIR")
    os.environ["CMRCNN_EXT_CACHE_DIR"] = str(tmp / "clean_cache")
    try:
        train = write(tmp / "train.json", make_polygons(tmp, n=4))
        val = write(tmp / "val.json", make_polygons(tmp, n=2, seed=1, folder="val"))
        train_net = load_train_net()
        args = train_net.get_parser().parse_args(
            train_args(train, tmp / "images", tmp / "out", val, tmp / "val")
        )
        train_net.main(args)
    finally:
        if old is None:
            os.environ.pop("CMRCNN_EXT_CACHE_DIR")
        else:
            os.environ["CMRCNN_EXT_CACHE_DIR"] = old
    with open(tmp / "out" / "results.json") as f:
        results = json.load(f)["results"]
    return {"tmp": tmp, "out": tmp / "out", "train": train, "val": val, "results": results}


def test_run_writes_results_curves_and_the_data_summary(run):
    out = run["out"]
    with open(out / "results.json") as f:
        report = json.load(f)
    assert set(report["results"]) == {"bbox", "segm", "timing"}
    assert report["results"]["timing"]["inference_ms_per_image"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert report["results"]["segm"]["AP"] == pytest.approx(metrics[-1]["segm/AP"])
    assert {"AP-square", "AP-triangle"} <= set(report["results"]["bbox"])
    assert report["classes"] == ["square", "triangle"] and report["seconds"]["train"] > 0
    assert (out / "training_curves.png").stat().st_size > 1000
    log = (out / "log.txt").read_text()
    # the data check's summary is in log.txt: at registration and again when training starts
    assert log.count("kept 4/4 images, 8/8 annotations, 2 categories") == 2
    assert "instances per class: square: 4, triangle: 4" in log
    assert log.index("Data used by this run") > log.index("Model:")
    with open(out / "config.yaml") as f:
        assert "CLASS_NAMES:\n    - square\n    - triangle" in f.read()


def test_eval_only_needs_trained_weights(run, monkeypatch):
    from cmrcnn_ext.engine.runs import UntrainedEvaluationError

    base = train_args(
        run["train"], run["tmp"] / "images", run["tmp"] / "eval", run["val"], run["tmp"] / "val"
    )
    for weights, match in (
        ("", "MODEL.WEIGHTS is empty"),
        ("detectron2://ImageNetPretrained/MSRA/R-50.pkl", "ImageNet weights"),
    ):
        argv = ["--eval-only"] + base + ["MODEL.WEIGHTS", weights]
        assert match in _stops_before_any_model(monkeypatch, argv, UntrainedEvaluationError)


def test_eval_only_of_the_run_and_untrained_on_request(run):
    from cmrcnn_ext.engine.checkpoint import CheckpointError

    train_net = load_train_net()
    base = train_args(
        run["train"], run["tmp"] / "images", run["tmp"] / "eval", run["val"], run["tmp"] / "val"
    )
    args = train_net.get_parser().parse_args(
        ["--eval-only"] + base + ["MODEL.WEIGHTS", str(run["out"] / "model_final.pth")]
    )
    res = train_net.main(args)
    assert res["segm"]["AP"] == pytest.approx(run["results"]["segm"]["AP"])
    assert os.path.isfile(run["tmp"] / "eval" / "results.json")
    # a checkpoint of another model (the synthetic shapes' 5 classes) does not fit: an error
    torch.manual_seed(0)
    from detectron2.modeling import build_model

    from cmrcnn_ext.config import setup_cfg

    five = str(run["tmp"] / "five_classes.pth")
    torch.save(
        {
            "model": build_model(
                setup_cfg(
                    DEMO_CONFIG,
                    [str(x) for x in SMALL_OPTS[:8]] + ["MODEL.ROI_HEADS.NUM_CLASSES", 5],
                )
            ).state_dict()
        },
        five,
    )
    args = train_net.get_parser().parse_args(["--eval-only"] + base + ["MODEL.WEIGHTS", five])
    with pytest.raises(
        CheckpointError, match="class layers are for 5 classes, the config's model has 2"
    ):
        train_net.main(args)
    args = train_net.get_parser().parse_args(
        ["--eval-only", "--eval-untrained"] + base + ["MODEL.WEIGHTS", ""]
    )
    assert set(train_net.main(args)) == {"bbox", "segm", "timing"}


def test_predict_with_the_run_folder(run, tmp_path):
    """The README's prediction command on an own-data model: the run folder gives the config
    and classes; the packaged demo config (5 classes) is refused; no data set is generated."""
    image = sorted((run["tmp"] / "val").glob("*.png"))[0]
    env = {"CMRCNN_DATA": str(tmp_path / "no_data_here")}
    proc = run_cli(
        [
            "-m",
            "cmrcnn_ext.apps.predict",
            "--run",
            str(run["out"]),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "pred"),
            "--score-thresh",
            "0",
        ],
        cwd=str(tmp_path),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "pred" / "coco_results.json") as f:
        results = json.load(f)
    assert results and {r["category_id"] for r in results} <= {1, 2}
    assert not os.path.exists(tmp_path / "no_data_here") and not os.path.exists(
        tmp_path / "datasets"
    )
    # the demo config with this checkpoint: one clear error, no traceback
    proc = run_cli(
        [
            "-m",
            "cmrcnn_ext.apps.predict",
            "--config-file",
            os.path.basename(DEMO_CONFIG),
            "--weights",
            str(run["out"] / "model_final.pth"),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "pred2"),
        ],
        cwd=str(tmp_path),
        env=env,
    )
    assert proc.returncode == 2
    assert (
        "error: Checkpoint" in proc.stderr
        and "for 2 classes, the config's model has 5" in proc.stderr
    )
    assert "--run OUTPUT_DIR" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "no_data_here") and not os.path.exists(
        tmp_path / "datasets"
    )


def test_class_names_come_with_the_model(run):
    from cmrcnn_ext.engine.runs import class_names, inference_config

    cfg = inference_config(run=str(run["out"]))
    assert class_names(cfg) == ["square", "triangle"]
    assert cfg.MODEL.WEIGHTS.endswith("model_final.pth")


# ------------------------------------------------------------------ command-line errors


@pytest.mark.parametrize("case", ["config", "data", "weights"])
def test_cli_errors_are_one_message(tmp_path, case):
    data = make_polygons(tmp_path, n=2)
    path = write(tmp_path / "train.json", data)
    args = train_args(path, tmp_path / "images", tmp_path / "out")
    if case == "config":
        args[args.index("--config-file") + 1] = "nope.yaml"
        expected = "is not the name of a config shipped with cmrcnn_ext"
    elif case == "data":
        data["annotations"][0]["category_id"] = 9
        write(tmp_path / "train.json", data)
        expected = "has category_id=9, which is not in 'categories'"
    else:
        args = ["--eval-only"] + args + ["MODEL.WEIGHTS", str(tmp_path / "missing.pth")]
        expected = "does not exist"
    proc = run_cli(["train_net.py"] + args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("error: ") == 1
    if case == "data":  # --debug is one switch of the shared error wrapper: checked once
        debug = run_cli(["train_net.py", "--debug"] + args)
        assert debug.returncode != 0 and "Traceback" in debug.stderr and expected in debug.stderr
