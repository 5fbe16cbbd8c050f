"""Predict on images with a trained checkpoint: overlay PNGs and a COCO results JSON.

    python -m cmrcnn_ext.predict --config-file cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml \\
        --weights output/demo/model_final.pth --input "photos/*.jpg" --output output/predictions

``--input`` takes image files, folders and glob patterns (several allowed). The results JSON
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

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("cmrcnn_ext.predict")


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
            raise FileNotFoundError(f"--input {item!r} matches no image file")
        paths.extend(sorted(found))
    return list(dict.fromkeys(paths))


def instances_to_coco(instances, image_id, category_ids):
    """COCO result dicts for one image's ``Instances`` (on the CPU)."""
    boxes = instances.pred_boxes.tensor.numpy()
    scores = instances.scores.numpy().tolist()
    classes = instances.pred_classes.numpy().tolist()
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
    out = []
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        res = {
            "image_id": image_id,
            "category_id": category_ids[classes[i]],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": scores[i],
        }
        if masks is not None:
            rle = mask_util.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            res["segmentation"] = rle
        out.append(res)
    return out


def build_predictor(cfg):
    """Detectron2's ``DefaultPredictor`` for ``cfg`` whose ``MODEL.WEIGHTS`` are loaded by
    :class:`~cmrcnn_ext.checkpoint.CMRCNNCheckpointer` (the loader of ``train_net.py``: every
    checkpoint layout, clear errors, ``weights_only`` reading)."""
    from detectron2.engine import DefaultPredictor

    from .checkpoint import CMRCNNCheckpointer

    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""  # DefaultPredictor keeps its random init; loaded below
    predictor = DefaultPredictor(bare)
    predictor.cfg = cfg.clone()
    CMRCNNCheckpointer(predictor.model).load(cfg.MODEL.WEIGHTS)
    return predictor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="checkpoint (.pth / .pkl)")
    parser.add_argument("--input", nargs="+", required=True, help="images, folders or globs")
    parser.add_argument("--output", required=True, help="folder for PNGs and the JSON")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--coco-json", help="ground-truth JSON whose image/category ids to use")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    import torch

    from detectron2.data import MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.logger import setup_logger
    from detectron2.utils.visualizer import ColorMode, Visualizer

    from .engine import setup_cfg

    setup_logger(name="cmrcnn_ext")
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"--weights {args.weights!r} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = list(args.opts) + [
        "MODEL.WEIGHTS", args.weights,
        "MODEL.DEVICE", device,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", args.score_thresh,
    ]  # fmt: skip
    cfg = setup_cfg(args.config_file, opts)
    predictor = build_predictor(cfg)
    names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
    meta = MetadataCatalog.get(names[0]) if names else MetadataCatalog.get("__unused")
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    category_ids = list(range(1, num_classes + 1))
    image_ids = {}
    if args.coco_json:
        with open(args.coco_json) as f:
            gt = json.load(f)
        category_ids = sorted(c["id"] for c in gt["categories"])
        image_ids = {im["file_name"]: im["id"] for im in gt["images"]}
    elif hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        inverse = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        category_ids = [inverse[i] for i in range(num_classes)]

    paths = collect_inputs(args.input)
    os.makedirs(args.output, exist_ok=True)
    results = []
    from tqdm import tqdm

    for n, path in enumerate(tqdm(paths, desc="predict", unit="img"), start=1):
        img = read_image(path, format="BGR")
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
    print(f"{len(paths)} images, {len(results)} detections -> {args.output} ({out_json})")
    return out_json


if __name__ == "__main__":
    main()
