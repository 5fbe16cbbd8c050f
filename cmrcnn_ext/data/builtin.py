"""Registers the data sets a config or command line names, before the trainer is built."""
import logging

logger = logging.getLogger(__name__)

#: Prefix of the built-in synthetic data set's names (``cmrcnn_shapes_train`` / ``_val``).
SYNTHETIC_PREFIX = "cmrcnn_shapes"


def register_project_datasets(cfg, args=None):
    """Register the data sets ``cfg`` uses and set ``MODEL.ROI_HEADS.NUM_CLASSES`` if it is 0.

    - Names starting with ``cmrcnn_shapes`` register the synthetic data set (generated and
      cached on first use).
    - ``DATASETS.CMRCNN.TRAIN_JSON`` / ``VAL_JSON`` (or ``--train-json`` / ``--val-json`` in
      ``args``) register the user's COCO files as ``user_train`` / ``user_val`` and make them
      ``DATASETS.TRAIN`` / ``DATASETS.TEST``.

    Args:
        cfg (CfgNode): not frozen; modified in place.
        args (argparse.Namespace or None): may carry train_json, train_images, val_json,
            val_images.
    """
    data = cfg.DATASETS.CMRCNN
    for key, attr in [
        ("TRAIN_JSON", "train_json"),
        ("TRAIN_IMAGE_ROOT", "train_images"),
        ("VAL_JSON", "val_json"),
        ("VAL_IMAGE_ROOT", "val_images"),
    ]:
        if getattr(args, attr, None):
            data[key] = getattr(args, attr)

    from .coco import check_num_classes, register_coco_dataset

    class_source = None
    for split, json_key, root_key, name, cfg_key in [
        ("train", "TRAIN_JSON", "TRAIN_IMAGE_ROOT", "user_train", "TRAIN"),
        ("val", "VAL_JSON", "VAL_IMAGE_ROOT", "user_val", "TEST"),
    ]:
        if not data[json_key]:
            continue
        if not data[root_key]:
            raise ValueError(
                f"DATASETS.CMRCNN.{json_key} is set but DATASETS.CMRCNN.{root_key} is empty: "
                f"give the folder the JSON's file_name entries are relative to "
                f"(--{split}-images DIR)."
            )
        report = register_coco_dataset(name, data[json_key], data[root_key])
        cfg.DATASETS[cfg_key] = (name,)
        if report.has_rle and cfg.INPUT.MASK_FORMAT != "bitmask":
            logger.info("%s has RLE masks: INPUT.MASK_FORMAT set to 'bitmask'", data[json_key])
            cfg.INPUT.MASK_FORMAT = "bitmask"
        class_source = class_source or data[json_key]

    if data.TRAIN_JSON and not data.VAL_JSON:
        logger.warning(
            "DATASETS.CMRCNN.TRAIN_JSON is set without VAL_JSON: no evaluation data set "
            "(DATASETS.TEST was %s). Give --val-json/--val-images to evaluate.",
            tuple(cfg.DATASETS.TEST),
        )
        cfg.DATASETS.TEST = ()
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n.startswith(SYNTHETIC_PREFIX) for n in names):
        from .synthetic import CLASS_NAMES, register_synthetic_dataset

        register_synthetic_dataset(prefix=SYNTHETIC_PREFIX)
        if cfg.MODEL.ROI_HEADS.NUM_CLASSES == 0:
            cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASS_NAMES)
        elif cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(CLASS_NAMES):
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but the "
                f"synthetic data set has {len(CLASS_NAMES)} classes {CLASS_NAMES}; set it to "
                f"{len(CLASS_NAMES)} or 0."
            )

    if class_source:
        num = check_num_classes(cfg.MODEL.ROI_HEADS.NUM_CLASSES, class_source)
        if num != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            logger.info("MODEL.ROI_HEADS.NUM_CLASSES set to %d from %s", num, class_source)
            cfg.MODEL.ROI_HEADS.NUM_CLASSES = num
    return cfg
