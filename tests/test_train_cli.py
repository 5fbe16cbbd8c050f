"""train_net.py on users' quirky COCO files, and the prediction CLI."""

import glob
import json
import os

import numpy as np
import pytest
import torch
from coco_helpers import _quirky
from PIL import Image
from pycocotools.coco import COCO

from conftest import DEMO_CONFIG, ROOT

SMALL = [
    "SOLVER.IMS_PER_BATCH",
    2,
    "SOLVER.MAX_ITER",
    3,
    "SOLVER.WARMUP_ITERS",
    1,
    "DATALOADER.NUM_WORKERS",
    0,
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MIN_SIZE_TEST",
    64,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    64,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    32,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    0.0,  # a 3-iteration model scores low: keep all
]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "clean_cache"))


def load_train_net():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", os.path.join(ROOT, "train_net.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_and_evaluate_on_quirky_coco(tmp_path):
    json_file, root, _ = _quirky(tmp_path)
    # an EXIF-rotated JPEG too (stored 30x40, shown 40x30 after rotation)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 40), (90, 120, 30)).save(os.path.join(root, "exif.jpg"), exif=exif)
    with open(json_file) as f:
        data = json.load(f)
    data["images"].append({"id": 40, "file_name": "exif.jpg", "width": 40, "height": 30})
    data["annotations"].append(
        {
            "id": 9,
            "image_id": 40,
            "category_id": 3,
            "iscrowd": 0,
            "bbox": [2, 2, 10, 10],
            "area": 100.0,
            "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
        }
    )
    with open(json_file, "w") as f:
        json.dump(data, f)

    train_net = load_train_net()
    args = train_net.get_parser().parse_args(  # the packaged config, by name
        [
            "--config-file",
            os.path.basename(DEMO_CONFIG),
            "--train-json",
            json_file,
            "--train-images",
            root,
            "--val-json",
            json_file,
            "--val-images",
            root,
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "0",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ]
        + [str(x) for x in SMALL]
    )
    results = train_net.main(args)
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    # evaluation ran on both tasks (values of a 3-iteration model are near 0, but defined)
    args.eval_only = True
    args.opts += ["MODEL.WEIGHTS", str(tmp_path / "out" / "model_final.pth")]
    results = train_net.main(args)
    assert set(results) == {"bbox", "segm", "timing"}  # timing: inference ms per image
    assert all(np.isfinite(results[t]["AP"]) for t in ("bbox", "segm"))
    from detectron2.data import MetadataCatalog

    assert MetadataCatalog.get("user_train").thing_classes == ["dog", "cat", "zebra"]


def test_num_classes_mismatch_is_a_clear_error(tmp_path):
    json_file, root, _ = _quirky(tmp_path)
    train_net = load_train_net()
    args = train_net.get_parser().parse_args(
        [
            "--config-file",
            DEMO_CONFIG,
            "--train-json",
            json_file,
            "--train-images",
            root,
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "7",
        ]
    )
    with pytest.raises(ValueError, match="NUM_CLASSES is 7 .* 3 categories"):
        train_net.setup(args)


def test_missing_config_file_is_a_clear_error(tmp_path):
    train_net = load_train_net()
    args = train_net.get_parser().parse_args(["--config-file", str(tmp_path / "nope.yaml")])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        train_net.setup(args)


def test_predict_cli_writes_overlays_and_coco_results(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import cmrcnn_ext
    from cmrcnn_ext.apps import predict

    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(DEMO_CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    rng = np.random.default_rng(0)
    images, names = tmp_path / "imgs", ["a.png", "sub/b.jpg", "sub/c.png"]
    for n in names:
        os.makedirs(images / os.path.dirname(n), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(images / n)
    gt = {
        "images": [
            {"id": 100 + i, "file_name": n, "width": 128, "height": 96} for i, n in enumerate(names)
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 100,
                "category_id": 2,
                "bbox": [5, 5, 20, 20],
                "area": 400,
                "iscrowd": 0,
                "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]],
            }
        ],
        "categories": [
            {"id": i + 1, "name": c}
            for i, c in enumerate(["circle", "triangle", "rectangle", "star", "hexagon"])
        ],
    }
    with open(tmp_path / "gt.json", "w") as f:
        json.dump(gt, f)
    out = tmp_path / "pred"
    predict.main(
        [
            "--config-file",
            DEMO_CONFIG,
            "--weights",
            str(tmp_path / "ckpt.pth"),
            "--input",
            str(images / "a.png"),
            str(images / "sub"),
            str(images / "**" / "*.png"),
            "--output",
            str(out),
            "--score-thresh",
            "0.0",
            "--device",
            "cpu",
            "--coco-json",
            str(tmp_path / "gt.json"),
        ]
    )
    assert len(glob.glob(str(out / "*.png"))) == 3  # one per input image, duplicates merged
    coco = COCO(str(tmp_path / "gt.json"))
    dets = coco.loadRes(str(out / "coco_results.json"))
    anns = dets.loadAnns(dets.getAnnIds())
    assert len(anns) > 0
    assert {a["image_id"] for a in anns} <= {100, 101, 102}
    assert all("segmentation" in a and a["category_id"] in range(1, 6) for a in anns)


@pytest.mark.parametrize("where", ["file", "command line"])
def test_unknown_config_key_names_it_and_suggests(tmp_path, where):
    from cmrcnn_ext.config import setup_cfg

    if where == "file":
        path = tmp_path / "bad.yaml"
        path.write_text('_BASE_: "%s"\nMODEL:\n  CMRCNN:\n    MASK_STAGE: all\n' % DEMO_CONFIG)
        args = (str(path), [])
    else:
        args = (DEMO_CONFIG, ["MODEL.CMRCNN.MASK_STAGE", "all"])
    with pytest.raises(
        ValueError, match="Unknown config key 'MODEL.CMRCNN.MASK_STAGE'.*MASK_STAGES"
    ):
        setup_cfg(*args)
