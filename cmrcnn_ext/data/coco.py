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
import os
import tempfile

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from cmrcnn_ext.data.coco_check import CocoDataError, ValidationReport, categories_of, check_coco
from cmrcnn_ext.fileio import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["CocoDataError", "ValidationReport", "validate_coco_json", "load_coco_instances"]
__all__ += ["register_coco_dataset", "num_classes_from_json", "check_num_classes"]

CACHE_DIR_ENV = "CMRCNN_EXT_CACHE_DIR"
_CACHE = {}  # (json path, mtime, size, image_root, check_images) -> (report, json to use)


def _log(report):
    (logger.warning if report.needs_cleaning else logger.info)(report.summary())
    for c in report.categories:
        if str(c["name"]).strip("_ ").lower() == "background":
            msg = f"'{report.json_file}': category id={c['id']} '{c['name']}' has annotations, "
            logger.warning(msg + "so it is a real class (Detectron2 adds its own background).")


def validate_coco_json(json_file, image_root, check_images=True):
    """Check a COCO instances JSON (and its images) before training; the summary is logged.

    Arguments and errors: those of :func:`cmrcnn_ext.data.coco_check.check_coco`.

    Returns:
        ValidationReport: what was kept, skipped (per reason) and repaired.
    """
    report, _ = check_coco(json_file, image_root, check_images)
    _log(report)
    return report


def prepare_coco(json_file, image_root, check_images=True):
    """Validates (once per unchanged file); returns (report, JSON path for pycocotools)."""
    path, image_root = os.path.abspath(os.fspath(json_file)), os.fspath(image_root)
    st = os.stat(path) if os.path.isfile(path) else None
    key = (path, st and st.st_mtime_ns, st and st.st_size, image_root, bool(check_images))
    if key in _CACHE:
        return _CACHE[key]
    report, cleaned = check_coco(path, image_root, check_images)
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
            atomic_write(use_json, lambda f: f.write(blob))  # safe when several processes do this
        logger.info(f"Using the cleaned copy '{use_json}' of '{path}'.")
    _CACHE[key] = (report, use_json)
    return report, use_json


def class_order(report, class_names=None):
    """Dataset category id -> contiguous class index: in category-id order (Detectron2's
    ``load_coco_json``), or in the order of ``class_names`` (matched by name; e.g. a validation
    file whose ids differ from the training file's)."""
    if class_names is None:
        return report.id_map
    return {c["id"]: list(class_names).index(c["name"]) for c in report.categories}


def _set_metadata(name, report, use_json, class_names=None):
    original = os.path.abspath(report.json_file)
    MetadataCatalog.get(name).set(
        thing_classes=list(class_names or report.thing_classes),
        thing_dataset_id_to_contiguous_id=class_order(report, class_names),
        json_file=use_json,
        original_json_file=original,
        json_cleaned=use_json != original,
        image_root=report.image_root,
        evaluator_type="coco",
        cmrcnn_data_summary=report.summary(),
    )


def load_coco_instances(
    json_file, image_root, dataset_name=None, check_images=True, class_names=None
):
    """Validate a COCO JSON, drop what was skipped, and load it with Detectron2.

    Args:
        json_file (str or path-like): the COCO JSON file.
        image_root (str or path-like): folder image ``file_name``s are relative to.
        dataset_name (str or None): if given, the dataset's metadata gets ``thing_classes``,
            ``thing_dataset_id_to_contiguous_id``, ``json_file`` (the cleaned copy if anything
            was cleaned), ``original_json_file``, ``json_cleaned``, ``image_root``,
            ``evaluator_type="coco"`` and ``cmrcnn_data_summary`` (the report's summary).
        check_images (bool): see :func:`validate_coco_json`.
        class_names (list[str] or None): the class order (names of the file's categories);
            default: category-id order.

    Returns:
        list[dict]: Detectron2 dataset dicts with contiguous ``category_id`` 0..K-1;
        uncompressed RLE is converted to compressed RLE.

    Raises:
        CocoDataError: see :func:`validate_coco_json`.
    """
    report, use_json = prepare_coco(json_file, image_root, check_images)
    dicts = load_coco_json(use_json, os.fspath(image_root))  # dataset ids kept: mapped here
    order = class_order(report, class_names)
    for d in dicts:
        for ann in d["annotations"]:
            ann["category_id"] = order[ann["category_id"]]
    if dataset_name is not None:
        _set_metadata(dataset_name, report, use_json, class_names)
    return dicts


def register_coco_dataset(name, json_file, image_root, check_images=True, class_names=None):
    """Register a COCO JSON as dataset ``name`` for training and ``COCOEvaluator``.

    Validation runs now, so bad data fails at start-up; ``DatasetCatalog.get(name)`` builds the
    dicts later (without validating an unchanged file again). The metadata is set as by
    :func:`load_coco_instances`. A dataset of the same name is replaced (with a warning).

    Args:
        name (str): dataset name for ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file (str or path-like): the COCO JSON file.
        image_root (str or path-like): folder image ``file_name``s are relative to.
        check_images (bool): see :func:`validate_coco_json`.
        class_names (list[str] or None): see :func:`load_coco_instances`.

    Returns:
        ValidationReport: the validation result.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    report, use_json = prepare_coco(json_file, image_root, check_images)
    if name in DatasetCatalog.list():
        logger.warning(f"Dataset '{name}' was already registered; replacing it.")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    def load():
        return load_coco_instances(json_file, image_root, name, check_images, class_names)

    DatasetCatalog.register(name, load)
    _set_metadata(name, report, use_json, class_names)
    return report


def num_classes_from_json(json_file):
    """Number of categories in a COCO JSON (unused ones included); raises CocoDataError."""
    return len(categories_of(json_file))


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
    names = [str(c["name"]) for c in categories_of(json_file)]
    n = len(names)
    if cfg_num_classes and cfg_num_classes != n:
        shown = ", ".join(names[:10]) + (", ..." if n > 10 else "")
        msg = f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg_num_classes} but {os.fspath(json_file)} "
        msg += f"defines {n} categories ({shown}); set MODEL.ROI_HEADS.NUM_CLASSES {n} or "
        raise CocoDataError(json_file, [msg + "leave it at 0 to take it from the JSON"])
    return n
