"""Synthetic COCO ground truth + model outputs for testing and timing COCO evaluators.

No images are written: COCO evaluation only needs the ground-truth JSON (image sizes and
annotations) and the predictions. Everything is generated with numpy from a seed:

- ground truth: ellipses, rectangles and diamonds of areas from a few pixels to a large part of
  the image (so COCO's small / medium / large ranges are all populated), stored mostly as
  compressed RLE, some as polygons, and a few ``iscrowd=1`` regions as uncompressed RLE (as in
  COCO); some images have no annotation; category ids are not contiguous;
- predictions, as Detectron2 ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``,
  ``pred_masks``): each ground-truth object is detected with probability ``recall`` with a
  jittered shape (mask) and an independently jittered box, sometimes with the wrong class,
  sometimes twice; detections inside crowd regions; false positives of random shape and class;
  some scores rounded so that ties occur.

Used by ``tests/test_evaluation.py`` and ``benchmarks/bench_eval.py``.
"""
import math
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_util

from detectron2.structures import Boxes, Instances

#: Non-contiguous COCO category ids and their names (contiguous ids follow the sorted ids).
CATEGORIES = [(1, "disk"), (3, "box"), (4, "kite"), (8, "egg"), (10, "brick"), (17, "gem")]
_KINDS = ("ellipse", "rect", "diamond")


def _window(shape, h, w):
    kind, cx, cy, a, b = shape
    x0, x1 = max(0, int(math.floor(cx - a))), min(w, int(math.ceil(cx + a)) + 1)
    y0, y1 = max(0, int(math.floor(cy - b))), min(h, int(math.ceil(cy + b)) + 1)
    return x0, x1, y0, y1


def rasterize(shape, h, w) -> np.ndarray:
    """Boolean (h, w) mask of ``shape = (kind, cx, cy, a, b)`` (half-axes a, b)."""
    kind, cx, cy, a, b = shape
    mask = np.zeros((h, w), dtype=bool)
    x0, x1, y0, y1 = _window(shape, h, w)
    if x1 <= x0 or y1 <= y0:
        return mask
    dx = (np.arange(x0, x1)[None, :] + 0.5 - cx) / a
    dy = (np.arange(y0, y1)[:, None] + 0.5 - cy) / b
    if kind == "ellipse":
        inside = dx**2 + dy**2 <= 1.0
    elif kind == "rect":
        inside = (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    else:  # diamond
        inside = np.abs(dx) + np.abs(dy) <= 1.0
    mask[y0:y1, x0:x1] = inside
    return mask


def _polygon(shape) -> List[float]:
    kind, cx, cy, a, b = shape
    if kind == "ellipse":
        t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        pts = np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], 1)
    elif kind == "rect":
        pts = np.array([[cx - a, cy - b], [cx + a, cy - b], [cx + a, cy + b], [cx - a, cy + b]])
    else:
        pts = np.array([[cx, cy - b], [cx + a, cy], [cx, cy + b], [cx - a, cy]])
    return [round(float(v), 2) for v in pts.ravel()]


def _uncompressed_rle(mask: np.ndarray) -> Dict:
    """COCO uncompressed RLE (counts as a list, column-major, starting with zeros)."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _mask_bbox(mask: np.ndarray) -> List[float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    x0, y0 = float(cols[0]), float(rows[0])
    return [x0, y0, float(cols[-1]) - x0 + 1, float(rows[-1]) - y0 + 1]


def _random_shape(rng, h, w, r_min=2.5, r_max=None):
    r_max = r_max or 0.3 * min(h, w)
    r = math.exp(rng.uniform(math.log(r_min), math.log(r_max)))
    asp = math.exp(rng.uniform(-0.7, 0.7))
    a, b = r * math.sqrt(asp), r / math.sqrt(asp)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    return (_KINDS[int(rng.integers(len(_KINDS)))], cx, cy, a, b)


def _jitter(rng, shape, s=0.12):
    kind, cx, cy, a, b = shape
    return (
        kind,
        cx + rng.normal(0, s * a),
        cy + rng.normal(0, s * b),
        a * math.exp(rng.normal(0, 0.75 * s)),
        b * math.exp(rng.normal(0, 0.75 * s)),
    )


def make_coco_eval_set(
    num_images: int,
    seed: int = 0,
    min_size: int = 240,
    max_size: int = 640,
    max_objects: int = 12,
    max_false_positives: int = 8,
    recall: float = 0.85,
    crowd_prob: float = 0.04,
    polygon_prob: float = 0.2,
    empty_image_prob: float = 0.03,
    tie_prob: float = 0.1,
) -> Tuple[Dict, List[Dict]]:
    """Ground truth (a COCO instances dict) and compact per-image detections.

    Returns:
        (gt, detections): ``gt`` is a COCO dict (``images``, ``annotations``, ``categories``);
        ``detections`` has one dict per image: ``image_id``, ``height``, ``width``, ``shapes``
        (list of shape tuples for the masks), ``boxes`` (N, 4) XYXY, ``scores`` (N,),
        ``classes`` (N,) contiguous ids. Turn them into model outputs with
        :func:`iter_model_outputs`.
    """
    rng = np.random.default_rng(seed)
    cat_ids = [c for c, _ in CATEGORIES]
    images, annotations, detections = [], [], []
    for i in range(num_images):
        image_id = 1000 + 3 * i  # ids need not be contiguous
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        n = 0 if rng.random() < empty_image_prob else int(rng.integers(1, max_objects + 1))
        shapes, boxes, scores, classes = [], [], [], []

        def add_det(shape, cls, score, box_jitter):
            x0, x1, y0, y1 = _window(shape, h, w)
            box = np.array([x0, y0, x1, y1], dtype=float)
            box += rng.normal(0, box_jitter * max(x1 - x0, y1 - y0, 1), 4)
            box = np.clip(box, 0, [w, h, w, h])
            x_lo, x_hi = sorted((box[0], box[2]))
            y_lo, y_hi = sorted((box[1], box[3]))
            shapes.append(shape)
            boxes.append([x_lo, y_lo, x_hi, y_hi])
            scores.append(score)
            classes.append(cls)

        for _ in range(n):
            shape = _random_shape(rng, h, w)
            mask = rasterize(shape, h, w)
            area = int(mask.sum())
            if area < 4:
                continue
            cls = int(rng.integers(len(cat_ids)))
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[cls]}
            if rng.random() < crowd_prob:
                ann.update(iscrowd=1, segmentation=_uncompressed_rle(mask), area=area,
                           bbox=_mask_bbox(mask))
                for _ in range(int(rng.integers(1, 4))):  # detections inside the crowd region
                    kind, cx, cy, a, b = shape
                    sub = (kind, cx + rng.uniform(-0.5, 0.5) * a, cy + rng.uniform(-0.5, 0.5) * b,
                           0.3 * a, 0.3 * b)
                    add_det(sub, cls, float(rng.uniform(0.1, 0.9)), 0.05)
            elif rng.random() < polygon_prob:
                poly = _polygon(shape)
                rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
                xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
                box = [float(xs.min()), float(ys.min()), float(np.ptp(xs)), float(np.ptp(ys))]
                ann.update(iscrowd=0, segmentation=[poly], area=float(mask_util.area(rle)), bbox=box)
            else:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                ann.update(iscrowd=0, area=area, bbox=_mask_bbox(mask),
                           segmentation={"size": [h, w], "counts": rle["counts"].decode("ascii")})
            annotations.append(ann)
            if ann["iscrowd"]:
                continue
            if rng.random() < recall:
                det_cls = cls if rng.random() < 0.9 else int(rng.integers(len(cat_ids)))
                add_det(_jitter(rng, shape), det_cls, float(rng.uniform(0.3, 1.0)), 0.05)
            if rng.random() < 0.15:  # duplicate: a worse, lower-scored copy
                add_det(_jitter(rng, shape, 0.3), cls, float(rng.uniform(0.05, 0.6)), 0.1)
        for _ in range(int(rng.integers(0, max_false_positives + 1))):
            add_det(_random_shape(rng, h, w), int(rng.integers(len(cat_ids))),
                    float(rng.uniform(0.01, 0.5)), 0.05)
        scores = np.asarray(scores, dtype=np.float64)
        ties = rng.random(len(scores)) < tie_prob
        scores[ties] = np.round(scores[ties], 1)
        detections.append({
            "image_id": image_id, "height": h, "width": w, "shapes": shapes,
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "scores": scores.astype(np.float32), "classes": np.asarray(classes, dtype=np.int64),
        })
    gt = {
        "info": {"description": "cmrcnn_ext synthetic evaluation set"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": name} for c, name in CATEGORIES],
    }
    return gt, detections


def iter_model_outputs(detections: List[Dict]) -> Iterator[Tuple[List[Dict], List[Dict]]]:
    """Yield ``(inputs, outputs)`` for ``evaluator.process`` one image at a time (masks are
    rasterised on the fly, so memory stays small)."""
    for det in detections:
        h, w = det["height"], det["width"]
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.from_numpy(det["boxes"]))
        inst.scores = torch.from_numpy(det["scores"])
        inst.pred_classes = torch.from_numpy(det["classes"])
        masks = np.zeros((len(det["shapes"]), h, w), dtype=bool)
        for k, shape in enumerate(det["shapes"]):
            masks[k] = rasterize(shape, h, w)
        inst.pred_masks = torch.from_numpy(masks)
        yield [{"image_id": det["image_id"], "height": h, "width": w}], [{"instances": inst}]


def register_eval_set(name: str, json_file: str):
    """Register the metadata ``COCOEvaluator`` needs for dataset ``name``: the ground-truth
    JSON, class names and the COCO id -> contiguous id map (replacing an earlier entry)."""
    from detectron2.data import MetadataCatalog

    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        thing_classes=[n for _, n in CATEGORIES],
        thing_dataset_id_to_contiguous_id={c: i for i, (c, _) in enumerate(CATEGORIES)},
        evaluator_type="coco",
    )
