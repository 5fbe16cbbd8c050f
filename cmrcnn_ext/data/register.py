"""Registers the data sets a config names, before the trainer is built.

One explicit call, :func:`register_project_datasets`: the synthetic shapes set (names starting
with ``cmrcnn_shapes``) and the user's COCO files (``DATASETS.CMRCNN.TRAIN_JSON`` / ``VAL_JSON``).
It checks the splits against each other and against the config (classes, masks) and stops with
the project's own error before any model is built; what it kept, dropped and repaired is
logged per split (:func:`data_summary`, logged again when training starts).
"""

import logging

logger = logging.getLogger(__name__)

#: Prefix of the built-in synthetic data set's names (``cmrcnn_shapes_train`` / ``_val``).
SYNTHETIC_PREFIX = "cmrcnn_shapes"
#: Names under which the user's files are registered.
USER_TRAIN, USER_VAL = "user_train", "user_val"


def _class_order_for(val, classes, source, short):
    """How the evaluation file's categories map to the model's ``classes`` (names, in class
    order; from ``source``): ``None`` if they are the file's own order, ``classes`` if only the
    order (ids) differs (matched by name, logged); other names raise. ``short`` names the
    source once more in the message."""
    from cmrcnn_ext.data.coco import CocoDataError

    names = val.thing_classes
    if list(names) == list(classes):
        return None
    if sorted(names) == sorted(classes):
        logger.warning(
            "The evaluation file '%s' orders its categories (by id) as %s, %s as %s: its classes "
            "are matched to the model's by name.",
            val.json_file,
            names,
            source,
            list(classes),
        )
        return list(classes)
    only_model = [n for n in classes if n not in names]
    only_val = [n for n in names if n not in classes]
    raise CocoDataError(
        val.json_file,
        [
            f"its categories differ from those of {source}: only in {short}: "
            f"{only_model or 'none'}; only in the evaluation file: {only_val or 'none'}. A model "
            "predicts the classes it was trained on; export both splits with the same category "
            "list (names; ids may differ)."
        ],
    )


def _check_masks(cfg, report, split):
    from cmrcnn_ext.data.coco import CocoDataError

    if cfg.MODEL.MASK_ON and not report.has_masks:
        raise CocoDataError(
            report.json_file,
            [
                f"no annotation of the {split} file has a segmentation mask (box-only data), but "
                "MODEL.MASK_ON is True; add masks, or set MODEL.MASK_ON False to train a "
                "box-only detector"
            ],
        )


def _check_trainable(report):
    from cmrcnn_ext.data.coco import CocoDataError

    if sum(report.instances.values()) == 0:
        raise CocoDataError(
            report.json_file,
            [
                "no usable non-crowd annotation is left to train on (crowd regions are not "
                "learned from); fix the file:"
            ]
            + report.problem_lines(),
        )


def _class_coverage(train, val):
    """Warning lines for classes with instances in one split and none in the other."""
    lines = []
    for name in train.thing_classes:
        t, v = train.instances[name], val.instances[name]
        if t == 0 and v > 0:
            lines.append(f"class '{name}' has {v} validation instances but none to train on")
        elif v == 0 and t > 0:
            lines.append(
                f"class '{name}' has {t} training instances but none in the validation "
                "split: its AP is undefined"
            )
    return lines


def _set_class_names(cfg, names, source):
    """MODEL.CMRCNN.CLASS_NAMES and NUM_CLASSES from the data (or check them against it)."""
    from cmrcnn_ext.data.coco import CocoDataError

    given = list(cfg.MODEL.CMRCNN.CLASS_NAMES)
    if given and given != list(names):
        raise CocoDataError(
            source,
            [
                f"the config's MODEL.CMRCNN.CLASS_NAMES {given} differ from the data's classes "
                f"{list(names)}; set MODEL.CMRCNN.CLASS_NAMES [] to take them from the data"
            ],
        )
    n = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if n and n != len(names):
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise CocoDataError(
            source,
            [
                f"MODEL.ROI_HEADS.NUM_CLASSES is {n} but {source} defines {len(names)} "
                f"categories ({shown}); set MODEL.ROI_HEADS.NUM_CLASSES {len(names)} or leave "
                "it at 0 to take it from the JSON"
            ],
        )
    if n != len(names):
        logger.info("MODEL.ROI_HEADS.NUM_CLASSES set to %d from %s", len(names), source)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(names)
    cfg.MODEL.CMRCNN.CLASS_NAMES = list(names)


def register_project_datasets(cfg):
    """Register the data sets ``cfg`` uses; set ``NUM_CLASSES`` and ``CLASS_NAMES`` from them.

    - Names starting with ``cmrcnn_shapes`` register the synthetic data set (generated and
      cached on first use): ``_train``, ``_val`` and, when named, the 200-image ``_holdout``.
    - ``DATASETS.CMRCNN.TRAIN_JSON`` / ``VAL_JSON`` (``train_net.py``'s ``--train-json`` /
      ``--val-json``) register the user's COCO files as ``user_train`` / ``user_val`` and make them
      ``DATASETS.TRAIN`` / ``DATASETS.TEST``. Both files are checked (``cmrcnn_ext.data.coco``),
      and against each other: the same categories (a validation file whose ids differ is
      matched by name, logged; other names are an error), masks present when
      ``MODEL.MASK_ON``, something left to train on.

    Args:
        cfg (CfgNode): not frozen; modified in place.

    Returns:
        CfgNode: ``cfg``.

    Raises:
        CocoDataError: unusable files, or splits / config that do not fit together.
    """
    data = cfg.DATASETS.CMRCNN
    from detectron2.data import MetadataCatalog

    from cmrcnn_ext.data.coco import register_coco_dataset

    reports = {}
    for split, json_key, root_key, name, cfg_key in [
        ("train", "TRAIN_JSON", "TRAIN_IMAGE_ROOT", USER_TRAIN, "TRAIN"),
        ("val", "VAL_JSON", "VAL_IMAGE_ROOT", USER_VAL, "TEST"),
    ]:
        if not data[json_key]:
            continue
        if not data[root_key]:
            from cmrcnn_ext.config.validate import ConfigError

            raise ConfigError(
                [
                    f"DATASETS.CMRCNN.{json_key} is set but DATASETS.CMRCNN.{root_key} is empty: "
                    f"give the folder the JSON's file_name entries are relative to "
                    f"(--{split}-images DIR)"
                ]
            )
        class_names = None
        if split == "val" and ("train" in reports or cfg.MODEL.CMRCNN.CLASS_NAMES):
            from cmrcnn_ext.data.coco import prepare_coco

            if "train" in reports:
                classes, short = reports["train"].thing_classes, "the training file"
                source = f"{short} '{data.TRAIN_JSON}'"
            else:
                classes = cfg.MODEL.CMRCNN.CLASS_NAMES
                short = source = "the config's MODEL.CMRCNN.CLASS_NAMES"
            val_report, _ = prepare_coco(data.VAL_JSON, data.VAL_IMAGE_ROOT)
            class_names = _class_order_for(val_report, classes, source, short)
        reports[split] = register_coco_dataset(
            name, data[json_key], data[root_key], class_names=class_names
        )
        cfg.DATASETS[cfg_key] = (name,)
        _check_masks(cfg, reports[split], {"train": "training", "val": "validation"}[split])
        if reports[split].has_rle and cfg.INPUT.MASK_FORMAT != "bitmask":
            logger.info("%s has RLE masks: INPUT.MASK_FORMAT set to 'bitmask'", data[json_key])
            cfg.INPUT.MASK_FORMAT = "bitmask"
    if "train" in reports:
        _check_trainable(reports["train"])
        _set_class_names(cfg, reports["train"].thing_classes, data.TRAIN_JSON)
        if "val" in reports:
            coverage = _class_coverage(reports["train"], reports["val"])
            for line in coverage:
                logger.warning("%s", line)
            MetadataCatalog.get(USER_VAL).set(cmrcnn_data_warnings=coverage)
    elif "val" in reports:
        val_classes = MetadataCatalog.get(USER_VAL).thing_classes
        _set_class_names(cfg, val_classes, data.VAL_JSON)

    if data.TRAIN_JSON and not data.VAL_JSON:
        logger.warning(
            "DATASETS.CMRCNN.TRAIN_JSON is set without VAL_JSON: no evaluation data set "
            "(DATASETS.TEST was %s). Give --val-json/--val-images to evaluate.",
            tuple(cfg.DATASETS.TEST),
        )
        cfg.DATASETS.TEST = ()
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n.startswith(SYNTHETIC_PREFIX) for n in names):
        from cmrcnn_ext.data.synthetic import (
            CLASS_NAMES,
            register_holdout_split,
            register_synthetic_dataset,
        )

        register_synthetic_dataset(prefix=SYNTHETIC_PREFIX)
        if f"{SYNTHETIC_PREFIX}_holdout" in names:  # generated only when asked for
            register_holdout_split(prefix=SYNTHETIC_PREFIX)
        _set_class_names(cfg, CLASS_NAMES, "the synthetic shapes data set")
    return cfg


def data_summary(cfg):
    """The data check's summary of every split ``cfg`` trains and evaluates on (text)."""
    from detectron2.data import MetadataCatalog

    lines = []
    for kind, names in (("training", cfg.DATASETS.TRAIN), ("evaluation", cfg.DATASETS.TEST)):
        for name in names:
            meta = MetadataCatalog.get(name)
            if meta.get("cmrcnn_data_summary"):
                lines.append(f"{kind} data '{name}': " + meta.cmrcnn_data_summary)
            lines += [f"  warning: {w}" for w in meta.get("cmrcnn_data_warnings", [])]
    return "\n".join(lines)
