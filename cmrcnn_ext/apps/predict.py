"""Predict on images with a trained checkpoint: overlay PNGs and a COCO results JSON.

    cmrcnn-predict --run output/mydata --input "photos/*.jpg" --output predictions
    cmrcnn-predict --config-file cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml \\
        --weights output/demo/model_final.pth --input "photos/*.jpg" --output predictions

(also ``python -m cmrcnn_ext.apps.predict ...``).

``--run`` takes a training run's ``OUTPUT_DIR``: the model's config (``config.yaml``, with its
class names) and its final checkpoint; no data set is read. A checkpoint that does not fit the
config (another number of classes, ...) is an error, not a half-random model.

``--input`` takes image files, folders and glob patterns (several allowed). Files that cannot
be read (empty, truncated, corrupt, a decompression bomb, an aspect ratio above 200:1) are
skipped and listed at the end with the reason (and in ``skipped_inputs.json``); the others are
all predicted. ``--strict`` then exits with code 1. The results JSON
(``coco_results.json``) is in the COCO results format (``image_id``, ``category_id``, ``bbox``
in xywh, ``score``, ``segmentation`` as compressed RLE); with ``--coco-json`` the image and
category ids are those of that ground-truth file (matched by file name), so pycocotools can
evaluate it directly; otherwise images are numbered from 1 in input order and categories are
1..K in class order.
"""

import argparse
import glob
import json
import logging
import os

from PIL import Image

from cmrcnn_ext.engine.cli import add_debug_argument, run
from cmrcnn_ext.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("cmrcnn_ext.apps.predict")


class InputNotFoundError(UserError, FileNotFoundError):
    """An ``--input`` that matches no image file."""


def collect_inputs(inputs):
    """Expand files, folders and globs into a sorted, de-duplicated list of image paths."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = [
                os.path.join(root, f)
                for root, _, files in os.walk(item)
                for f in files
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        elif os.path.isfile(item):
            found = [item]
        else:
            found = [p for p in glob.glob(item, recursive=True) if os.path.isfile(p)]
        if not found:
            raise InputNotFoundError(
                f"--input {item!r} matches no image file (a file, a folder or a glob pattern "
                f"in quotes; cwd: {os.getcwd()})"
            )
        paths.extend(sorted(found))
    return list(dict.fromkeys(paths))


def instances_to_coco(instances, image_id, category_ids):
    """COCO result dicts for one image's ``Instances`` (on the CPU): Detectron2's
    ``instances_to_coco_json``, with class indices mapped to ``category_ids``."""
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    results = instances_to_coco_json(instances, image_id)
    for r in results:
        r["category_id"] = category_ids[r["category_id"]]
    return results


def build_predictor(cfg):
    """Detectron2's ``DefaultPredictor`` for ``cfg`` whose ``MODEL.WEIGHTS`` are loaded by
    :class:`~cmrcnn_ext.engine.checkpoint.CMRCNNCheckpointer` for inference (the loader of
    ``train_net.py``: every checkpoint layout, clear errors, ``weights_only`` reading; a
    checkpoint that does not fit the config is an error)."""
    from detectron2.engine import DefaultPredictor

    from cmrcnn_ext.engine.checkpoint import CMRCNNCheckpointer

    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""  # DefaultPredictor keeps its random init; loaded below
    predictor = DefaultPredictor(bare)
    predictor.cfg = cfg.clone()
    CMRCNNCheckpointer(predictor.model, for_inference=True).load(cfg.MODEL.WEIGHTS)
    return predictor


def _category_ids(gt, names, json_file):
    """The ground truth's category id of each class, matched by name."""
    by_name = {str(c["name"]): c["id"] for c in gt["categories"]}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(
            f"--coco-json {json_file}: the model's classes {missing} are not among its "
            f"categories {sorted(by_name)}; give the ground truth of the model's classes"
        )
    return [by_name[n] for n in names]


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run", help="a training run's OUTPUT_DIR: its config.yaml and final checkpoint"
    )
    parser.add_argument("--config-file", help="config (path or packaged name); default: --run's")
    parser.add_argument("--weights", help="checkpoint (.pth / .pkl); default: --run's")
    parser.add_argument("--input", nargs="+", required=True, help="images, folders or globs")
    parser.add_argument("--output", required=True, help="folder for PNGs and the JSON")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with code 1 if any input image cannot be read (they are listed either way)",
    )
    parser.add_argument("--coco-json", help="ground-truth JSON whose image/category ids to use")
    add_debug_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)

    import torch
    from detectron2.data import Metadata
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.logger import setup_logger
    from detectron2.utils.visualizer import ColorMode, Visualizer

    from cmrcnn_ext.engine.runs import class_names, inference_config

    setup_logger(name="cmrcnn_ext")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = list(args.opts) + [
        "MODEL.DEVICE",
        device,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        args.score_thresh,
    ]
    cfg = inference_config(args.config_file, args.weights, args.run, opts)
    paths = collect_inputs(args.input)
    predictor = build_predictor(cfg)
    names = class_names(cfg)
    meta = Metadata(name="cmrcnn_predict", thing_classes=names)
    category_ids = list(range(1, len(names) + 1))
    image_ids = {}
    if args.coco_json:
        with open(args.coco_json) as f:
            gt = json.load(f)
        category_ids = _category_ids(gt, names, args.coco_json)
        image_ids = {im["file_name"]: im["id"] for im in gt["images"]}

    os.makedirs(args.output, exist_ok=True)
    results = []
    from tqdm import tqdm

    from cmrcnn_ext.data.coco_items import decode_error, probe_image

    bad = {}  # bad files are listed, not fatal (--strict: exit code 1)
    for n, path in enumerate(tqdm(paths, desc="predict", unit="img"), start=1):
        probe = probe_image(path, decode=False)  # header checks; read_image decodes once
        if isinstance(probe, str):
            bad[path] = probe
            continue
        try:
            img = read_image(path, format="BGR")
        except Exception as e:  # PIL raises many types for truncated / corrupt files
            bad[path] = decode_error(e)
            continue
        inst = predictor(img)["instances"].to("cpu")
        image_id = n
        if image_ids:
            matches = [i for f, i in image_ids.items() if path.endswith(f)]
            image_id = matches[0] if matches else n
        results.extend(instances_to_coco(inst, image_id, category_ids))
        vis = Visualizer(img[:, :, ::-1], meta, instance_mode=ColorMode.IMAGE)
        drawn = vis.draw_instance_predictions(inst).get_image()
        stem = os.path.splitext(os.path.relpath(path))[0].replace(os.sep, "__").lstrip("._")
        Image.fromarray(drawn).save(os.path.join(args.output, stem + ".png"))
    out_json = os.path.join(args.output, "coco_results.json")
    with open(out_json, "w") as f:
        json.dump(results, f)
    done = len(paths) - len(bad)
    print(f"{done} images, {len(results)} detections -> {args.output} ({out_json})")
    if bad:
        with open(os.path.join(args.output, "skipped_inputs.json"), "w") as f:
            json.dump(bad, f, indent=1)
        print(f"{len(bad)} of {len(paths)} inputs could not be read (skipped_inputs.json):")
        for path, reason in bad.items():
            print(f"  {path}: {reason}")
        if args.strict:
            raise SystemExit(1)
    return out_json


def cli():
    """Console script ``cmrcnn-predict``."""
    run(main)


if __name__ == "__main__":
    cli()
