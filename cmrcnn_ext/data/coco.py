"""Robust loading of users' own COCO-format instance-segmentation data into Detectron2.

:func:`validate_coco_json` checks a JSON before training: structural problems raise one
:class:`CocoDataError` naming the file, the ids and the fix; bad samples (degenerate boxes or
polygons, masks outside the image, missing or undecodable images) are skipped, counted and logged.
:func:`load_coco_instances` feeds the cleaned data to Detectron2's ``load_coco_json``.

Cleaned copies: if anything was skipped or filled in (``area``, ``iscrowd``, ``bbox``, image
size), the cleaned JSON is written once to ``$CMRCNN_EXT_CACHE_DIR`` (default
``<tempdir>/cmrcnn_ext_clean``) as ``<stem>.<hash>.json`` and the metadata ``json_file`` (read by
``COCOEvaluator``) points at it; ``original_json_file`` keeps the user's path, ``json_cleaned``
tells which is used. Otherwise ``json_file`` is the user's file.
"""

import hashlib
import json
import logging
import math
import os
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pycocotools.mask as mask_util
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

logger = logging.getLogger(__name__)

__all__ = ["CocoDataError", "ValidationReport", "validate_coco_json", "load_coco_instances"]
__all__ += ["register_coco_dataset", "num_classes_from_json", "check_num_classes"]

CACHE_DIR_ENV = "CMRCNN_EXT_CACHE_DIR"
_MAX_LISTED = 20  # problems listed in a CocoDataError before "... and N more"
_MAX_EXAMPLES = 5  # example ids kept per skip reason
_EXIF_ORIENTATION = 0x0112
_ID = (int, str)
_HINTS = {  # how to fix each skip reason, for the logged summary
    "invalid_bbox": "bbox must be 4 finite numbers [x, y, w, h] with w, h > 0",
    "polygon_too_few_points": "a polygon needs >= 3 points",
    "polygon_odd_coordinates": "a polygon is [x1, y1, x2, y2, ...]",
    "polygon_not_numeric": "a polygon is a flat list of numbers",
    "no_valid_polygon": "no usable polygon left; fix or delete the annotation",
    "outside_image": "the object lies outside the image; check coordinates / image size",
    "empty_segmentation": "the mask has no pixels",
    "invalid_rle": "RLE size must be [height, width] of the image and counts must sum to h*w",
    "missing_segmentation": "give every non-crowd annotation a mask (or none of them)",
    "missing_image": "copy the image or fix file_name / image_root",
    "unreadable_image": "re-save or delete the image",
    "image_size_mismatch": "fix width/height in the JSON",
    "annotation_of_skipped_image": "its image was skipped",
}
_CACHE = {}  # (json path, mtime, size, image_root, check_images) -> (report, json to use)


class CocoDataError(ValueError):
    """A COCO JSON file that cannot be used; ``problems`` lists every problem found."""

    def __init__(self, json_file, problems):
        self.json_file, self.problems = os.fspath(json_file), list(problems)
        lines = [f"  - {p}" for p in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - _MAX_LISTED} more")
        head = f"{len(self.problems)} problem(s) in COCO file '{self.json_file}':\n"
        super().__init__(head + "\n".join(lines))


@dataclass
class ValidationReport:
    """What :func:`validate_coco_json` found.

    Attributes:
        categories: the ``categories`` entries sorted by id (the class order).
        num_images / num_annotations: kept; ``total_images`` / ``total_annotations``: in file.
        skipped: count per reason of skipped images, annotations and (``polygon_*``) polygons.
        examples: per reason, up to 5 descriptions naming the image / annotation id.
        fixed: count per field filled in (``area_added``, ``iscrowd_added``,
            ``bbox_from_segmentation``, ``size_from_image``).
        segmentation_types: kept annotations per ``polygon``/``rle``/``uncompressed_rle``/``none``.
    """

    json_file: str
    image_root: str
    categories: list = field(default_factory=list)
    total_images: int = 0
    total_annotations: int = 0
    num_images: int = 0
    num_annotations: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    fixed: Counter = field(default_factory=Counter)
    segmentation_types: Counter = field(default_factory=Counter)

    @property
    def thing_classes(self):
        """Class names in category-id order (index = Detectron2's contiguous id)."""
        return [c["name"] for c in self.categories]

    @property
    def id_map(self):
        """Dataset category id -> contiguous id, as ``load_coco_json`` builds it."""
        return {c["id"]: i for i, c in enumerate(self.categories)}

    @property
    def needs_cleaning(self):
        """Whether the usable data differs from the file (something skipped or filled in)."""
        return bool(sum(self.skipped.values()) or sum(self.fixed.values()))

    @property
    def has_rle(self):
        """RLE masks need ``INPUT.MASK_FORMAT = "bitmask"`` in Detectron2's mapper."""
        return bool(self.segmentation_types["rle"] + self.segmentation_types["uncompressed_rle"])

    def skip(self, reason, what):
        """Counts one skipped item (returns None, for ``return report.skip(...)``)."""
        self.skipped[reason] += 1
        if len(self.examples[reason]) < _MAX_EXAMPLES:
            self.examples[reason].append(what)

    def summary(self):
        """Multi-line, human-readable summary (what is logged)."""
        lines = [
            f"COCO file '{self.json_file}': kept {self.num_images}/{self.total_images} images, "
            f"{self.num_annotations}/{self.total_annotations} annotations, "
            f"{len(self.categories)} categories."
        ]
        for reason, n in sorted(self.skipped.items()):
            hint = f" ({_HINTS[reason]})" if reason in _HINTS else ""
            lines.append(
                f"  skipped {n} x {reason}{hint}, e.g. " + "; ".join(self.examples[reason])
            )
        return "\n".join(lines + [f"  filled in {n} x {k}" for k, n in sorted(self.fixed.items())])


def _read_json(json_file):
    path = os.fspath(json_file)
    if not os.path.isfile(path):
        raise CocoDataError(path, [f"file not found (cwd: {os.getcwd()}); check the JSON path"])
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        msg = f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        raise CocoDataError(
            path, [msg + "; the file is truncated or not JSON, re-export it"]
        ) from e
    except (UnicodeDecodeError, OSError) as e:
        raise CocoDataError(
            path, [f"cannot read the file ({e}); re-export it as UTF-8 JSON"]
        ) from e
    if not isinstance(data, dict):
        raise CocoDataError(path, ["the top level is not a JSON object; expected a COCO dict"])
    fix = "a COCO instances file needs 'images', 'annotations' and 'categories' lists ([] if none)"
    missing = [
        k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)
    ]
    if missing:
        found = f"found keys: {sorted(data)}"
        raise CocoDataError(
            path, [f"missing top-level key '{k}' ({found}); {fix}" for k in missing]
        )
    return data


def _check_categories(data, problems):
    """Appends problems; returns the valid categories sorted by id."""
    names_by_id = defaultdict(list)
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            problems.append(f"categories[{i}] = {c!r:.80} needs an integer 'id' and a 'name'")
        else:
            names_by_id[c["id"]].append(c["name"])
    problems.extend(
        f"category id={i} is defined {len(n)} times ({n}); give every category a unique id"
        for i, n in names_by_id.items()
        if len(n) > 1
    )
    valid = [c for c in data["categories"] if isinstance(c, dict) and c.get("id") in names_by_id]
    return sorted(valid, key=lambda c: c["id"])


def _numbers(values, n=None):
    """Whether ``values`` is a list of finite numbers (of length ``n``)."""
    return (
        isinstance(values, (list, tuple))
        and (n is None or len(values) == n)
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    )


def _probe_image(path):
    """(width, height) as Detectron2's ``read_image`` sees it (EXIF applied), or an error str."""
    if not os.path.isfile(path):
        return "file not found"
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION)
            if img.format == "JPEG":  # decode at 1/8 scale: still reads the whole stream
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.load()
    except Exception as e:  # PIL raises many types for bad files
        return f"cannot decode ({type(e).__name__}: {e})"
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_segmentation(segm, h, w, report, what):
    """Returns (cleaned segmentation, RLE, skip reason); drops bad polygons (counted)."""
    if isinstance(segm, list):
        polys = []
        for poly in segm:
            if not _numbers(poly):
                report.skip("polygon_not_numeric", what)
            elif len(poly) % 2:
                report.skip("polygon_odd_coordinates", f"{what}: {len(poly)} coordinates")
            elif len(poly) < 6:
                report.skip("polygon_too_few_points", f"{what}: {len(poly) // 2} points")
            else:
                polys.append(poly)
        if not polys:
            return None, None, "no_valid_polygon"
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
        if mask_util.area(rle) > 0:
            return polys, rle, None
        xs, ys = [x for p in polys for x in p[0::2]], [y for p in polys for y in p[1::2]]
        outside = max(xs) <= 0 or min(xs) >= w or max(ys) <= 0 or min(ys) >= h
        return None, None, "outside_image" if outside else "empty_segmentation"
    if not (isinstance(segm, dict) and "counts" in segm and "size" in segm):
        return None, None, "invalid_segmentation"
    counts = segm["counts"]
    try:
        if list(segm["size"]) != [h, w]:
            return None, None, "invalid_rle"
        if isinstance(counts, list):
            if not _numbers(counts) or sum(counts) != h * w:
                return None, None, "invalid_rle"
            rle = mask_util.frPyObjects(segm, h, w)
        else:
            rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
        area = mask_util.area(rle)
    except Exception:  # malformed size or compressed counts
        return None, None, "invalid_rle"
    return (segm, rle, None) if area > 0 else (None, None, "empty_segmentation")


def _check_annotation(ann, h, w, has_masks, report):
    """Returns the cleaned annotation, or None if skipped (counted in ``report``)."""
    what, out = f"annotation id={ann['id']} (image id={ann['image_id']})", dict(ann)
    if ann.get("ignore", 0):  # detectron2 asserts on it
        return report.skip("ignore_flag", f"{what}: use iscrowd=1 instead of 'ignore'")
    segm, rle, kind = ann.get("segmentation"), None, "none"
    if segm:
        segm, rle, reason = _check_segmentation(segm, h, w, report, what)
        if reason:
            return report.skip(reason, what)
        out["segmentation"] = segm
        kind = "polygon" if isinstance(segm, list) else "rle"
        kind = "uncompressed_rle" if kind == "rle" and isinstance(segm["counts"], list) else kind
    elif has_masks and not ann.get("iscrowd", 0):  # the mapper needs masks on all or none
        return report.skip("missing_segmentation", f"{what}: other annotations have masks")
    else:
        out.pop("segmentation", None)
    box = ann.get("bbox")
    if box is None and rle is not None:
        out["bbox"] = box = [float(v) for v in mask_util.toBbox(rle)]
        report.fixed["bbox_from_segmentation"] += 1
    if not _numbers(box, 4) or box[2] <= 0 or box[3] <= 0:
        return report.skip("invalid_bbox", f"{what}: bbox={box!r:.60}")
    if box[0] >= w or box[1] >= h or box[0] + box[2] <= 0 or box[1] + box[3] <= 0:
        return report.skip("outside_image", f"{what}: bbox={box} vs {w}x{h} image")
    if not isinstance(ann.get("area"), (int, float)):  # pycocotools' COCOeval needs it
        out["area"] = float(mask_util.area(rle)) if rle is not None else box[2] * box[3]
        report.fixed["area_added"] += 1
    if "iscrowd" not in ann:  # so does COCOeval
        out["iscrowd"] = 0
        report.fixed["iscrowd_added"] += 1
    report.segmentation_types[kind] += 1
    return out


def _check_structure(data, check_images):
    """Returns (problems, categories sorted by id, annotations per image id)."""
    problems = []
    add = problems.append
    categories = _check_categories(data, problems)
    cat_ids = [c["id"] for c in categories]
    if not data["images"]:
        add("'images' is empty: no images to train on; check that you exported the right split")
    img_ids, ids_by_name, ann_ids, anns_by_img = Counter(), defaultdict(set), Counter(), {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), _ID):
            add(f"images[{i}] = {img!r:.80} needs an integer 'id' and a 'file_name'")
            continue
        img_ids[img["id"]] += 1
        what, anns_by_img[img["id"]] = f"image id={img['id']}", []
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            add(f"{what} has no 'file_name'; add the image's path relative to image_root")
        else:
            ids_by_name[os.path.normpath(img["file_name"])].add(img["id"])
        for key in ("height", "width"):
            if key in img and not (isinstance(img[key], int) and img[key] > 0):
                add(f"{what} has {key}={img[key]!r}; it must be an integer > 0")
            elif key not in img and not check_images:
                add(f"{what} has no '{key}'; add it, or validate with check_images=True")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), _ID):
            add(f"annotations[{i}] = {ann!r:.80} needs an integer 'id'; give each a unique id")
            continue
        ann_ids[ann["id"]] += 1
        what, image_id = f"annotation id={ann['id']}", ann.get("image_id")
        if isinstance(image_id, _ID) and image_id in anns_by_img:
            anns_by_img[image_id].append(ann)
        else:
            add(f"{what} refers to image_id={image_id!r}, not in 'images'; add it or drop {what}")
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in cat_ids:
            add(
                f"{what} (image id={image_id!r}) has category_id={ann.get('category_id')!r}, "
                f"which is not in 'categories' (ids {cat_ids}); add that category or fix it"
            )
    for kind, counts in (("image", img_ids), ("annotation", ann_ids)):
        problems += [
            f"{kind} id={i!r} is used {n} times; give every {kind} a unique id"
            for i, n in counts.items()
            if n > 1
        ]
    problems += [
        f"file_name '{name}' is listed under image ids {sorted(ids, key=str)}; keep one entry "
        "and move the others' annotations to its id"
        for name, ids in ids_by_name.items()
        if len(ids) > 1
    ]
    return problems, categories, anns_by_img


def _validate(json_file, image_root, check_images):
    """Returns (report, cleaned COCO dict); raises CocoDataError."""
    path, image_root = os.fspath(json_file), os.fspath(image_root)
    data = _read_json(path)
    problems, categories, anns_by_img = _check_structure(data, check_images)
    if problems:
        raise CocoDataError(path, problems)
    images, anns = data["images"], data["annotations"]
    report = ValidationReport(path, image_root, categories, len(images), len(anns))
    probes = [None] * len(images)
    if check_images:
        paths = [os.path.join(image_root, img["file_name"]) for img in images]
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
            probes = list(pool.map(_probe_image, paths))
    has_masks = any(a.get("segmentation") for a in anns)
    kept_images, kept_anns = [], []
    for img, probe in zip(images, probes):
        img, reason = dict(img), None
        if probe == "file not found":
            reason, msg = "missing_image", f"not found under image_root '{image_root}'"
        elif isinstance(probe, str):
            reason, msg = "unreadable_image", probe
        elif probe is not None and ("width" not in img or "height" not in img):
            img["width"], img["height"] = probe
            report.fixed["size_from_image"] += 1
        elif probe is not None and probe != (img["width"], img["height"]):
            reason = "image_size_mismatch"
            msg = f"the JSON says {img['width']}x{img['height']}, the image (after EXIF rotation)"
            msg += f" is {probe[0]}x{probe[1]}"
        if reason:
            report.skip(reason, f"image id={img['id']} ('{img['file_name']}'): {msg}")
            for ann in anns_by_img[img["id"]]:
                report.skip("annotation_of_skipped_image", f"annotation id={ann['id']}")
            continue
        kept_images.append(img)
        for ann in anns_by_img[img["id"]]:
            ann = _check_annotation(ann, img["height"], img["width"], has_masks, report)
            kept_anns += [ann] if ann is not None else []
    if not kept_images:
        raise CocoDataError(
            path,
            [f"none of the {len(images)} images is usable; check image_root '{image_root}'"]
            + [f"{r}: {e}" for r, examples in report.examples.items() for e in examples],
        )
    report.num_images, report.num_annotations = len(kept_images), len(kept_anns)
    return report, dict(data, images=kept_images, annotations=kept_anns)


def _log(report):
    (logger.warning if report.needs_cleaning else logger.info)(report.summary())
    if report.has_rle:
        logger.info(f"'{report.json_file}' has RLE masks: set INPUT.MASK_FORMAT to 'bitmask'.")
    for c in report.categories:
        if str(c["name"]).strip("_ ").lower() == "background":
            msg = f"'{report.json_file}': category id={c['id']} '{c['name']}' is a real class"
            logger.warning(msg + " (Detectron2 adds its own background); drop it if unused.")


def validate_coco_json(json_file, image_root, check_images=True):
    """Check a COCO instances JSON (and its images) before training.

    Args:
        json_file (str or path-like): the COCO JSON file.
        image_root (str or path-like): folder that image ``file_name``s (sub-folders allowed)
            are relative to.
        check_images (bool): open and decode every image; missing, corrupt or wrongly sized
            ones are skipped. If False, every image needs ``width`` and ``height`` in the JSON.

    Returns:
        ValidationReport: what was kept and what was skipped, per reason (also logged).

    Raises:
        CocoDataError: missing file, invalid JSON, missing top-level keys, duplicate image /
            annotation / category ids or file names, unknown image / category ids, no (usable)
            images. The message lists every problem found.
    """
    report, _ = _validate(json_file, image_root, check_images)
    _log(report)
    return report


def _prepare(json_file, image_root, check_images):
    """Validates (once per unchanged file); returns (report, JSON path for pycocotools)."""
    path, image_root = os.path.abspath(os.fspath(json_file)), os.fspath(image_root)
    st = os.stat(path) if os.path.isfile(path) else None
    key = (path, st and st.st_mtime_ns, st and st.st_size, image_root, bool(check_images))
    if key in _CACHE:
        return _CACHE[key]
    report, cleaned = _validate(path, image_root, check_images)
    _log(report)
    use_json = path
    if report.needs_cleaning:
        blob = json.dumps(cleaned, separators=(",", ":")).encode()
        default_dir = os.path.join(tempfile.gettempdir(), "cmrcnn_ext_clean")
        cache_dir = os.environ.get(CACHE_DIR_ENV) or default_dir
        stem = os.path.splitext(os.path.basename(path))[0]
        use_json = os.path.join(cache_dir, f"{stem}.{hashlib.sha1(blob).hexdigest()[:16]}.json")
        if not os.path.isfile(use_json):
            os.makedirs(cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, use_json)  # atomic: safe when several processes do this
        logger.info(f"Using the cleaned copy '{use_json}' of '{path}'.")
    _CACHE[key] = (report, use_json)
    return report, use_json


def _set_metadata(name, report, use_json):
    original = os.path.abspath(report.json_file)
    MetadataCatalog.get(name).set(
        thing_classes=report.thing_classes,
        thing_dataset_id_to_contiguous_id=report.id_map,
        json_file=use_json,
        original_json_file=original,
        json_cleaned=use_json != original,
        image_root=report.image_root,
        evaluator_type="coco",
    )


def load_coco_instances(json_file, image_root, dataset_name=None, check_images=True):
    """Validate a COCO JSON, drop what was skipped, and load it with Detectron2.

    Args:
        json_file (str or path-like): the COCO JSON file.
        image_root (str or path-like): folder image ``file_name``s are relative to.
        dataset_name (str or None): if given, ``category_id``s become contiguous 0..K-1 (in
            category-id order) and the dataset's metadata gets ``thing_classes``,
            ``thing_dataset_id_to_contiguous_id``, ``json_file`` (the cleaned copy if anything
            was cleaned), ``original_json_file``, ``json_cleaned``, ``image_root`` and
            ``evaluator_type="coco"``.
        check_images (bool): see :func:`validate_coco_json`.

    Returns:
        list[dict]: Detectron2 dataset dicts; uncompressed RLE is converted to compressed RLE.

    Raises:
        CocoDataError: see :func:`validate_coco_json`.
    """
    report, use_json = _prepare(json_file, image_root, check_images)
    dicts = load_coco_json(use_json, os.fspath(image_root), dataset_name)
    if dataset_name is not None:
        _set_metadata(dataset_name, report, use_json)
    return dicts


def register_coco_dataset(name, json_file, image_root, check_images=True):
    """Register a COCO JSON as dataset ``name`` for training and ``COCOEvaluator``.

    Validation runs now, so bad data fails at start-up; ``DatasetCatalog.get(name)`` builds the
    dicts later (without validating an unchanged file again). The metadata is set as by
    :func:`load_coco_instances`. A dataset of the same name is replaced (with a warning).

    Args:
        name (str): dataset name for ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file (str or path-like): the COCO JSON file.
        image_root (str or path-like): folder image ``file_name``s are relative to.
        check_images (bool): see :func:`validate_coco_json`.

    Returns:
        ValidationReport: the validation result.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    report, use_json = _prepare(json_file, image_root, check_images)
    if name in DatasetCatalog.list():
        logger.warning(f"Dataset '{name}' was already registered; replacing it.")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    load = lambda: load_coco_instances(json_file, image_root, name, check_images)  # noqa: E731
    DatasetCatalog.register(name, load)
    _set_metadata(name, report, use_json)
    return report


def _categories_of(json_file):
    data, problems = _read_json(json_file), []
    categories = _check_categories(data, problems)
    if problems:
        raise CocoDataError(json_file, problems)
    return categories


def num_classes_from_json(json_file):
    """Number of categories in a COCO JSON (unused ones included); raises CocoDataError."""
    return len(_categories_of(json_file))


def check_num_classes(cfg_num_classes, json_file):
    """Check ``MODEL.ROI_HEADS.NUM_CLASSES`` against a COCO JSON.

    Args:
        cfg_num_classes (int): the config value; 0 (or None) means "take it from the JSON".
        json_file (str or path-like): the COCO JSON file.

    Returns:
        int: the number of classes to use.

    Raises:
        CocoDataError: ``cfg_num_classes`` is set and differs from the JSON's category count.
    """
    names = [str(c["name"]) for c in _categories_of(json_file)]
    n = len(names)
    if cfg_num_classes and cfg_num_classes != n:
        shown = ", ".join(names[:10]) + (", ..." if n > 10 else "")
        msg = f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg_num_classes} but {os.fspath(json_file)} "
        msg += f"defines {n} categories ({shown}); set MODEL.ROI_HEADS.NUM_CLASSES {n} or "
        raise CocoDataError(json_file, [msg + "leave it at 0 to take it from the JSON"])
    return n
