"""Building a config from a file and overrides, without side effects.

:func:`load_config` merges a config file (a path or a packaged config's name) and ``KEY VALUE``
overrides into Detectron2's defaults plus cmrcnn_ext's keys. Registering data sets
(:func:`cmrcnn_ext.data.register_project_datasets`) and validation
(:func:`cmrcnn_ext.validate_config`) are separate, explicit steps: prediction and export use the
config without reading any data set.
"""

import difflib
import logging

import torch

from cmrcnn_ext.config.defaults import add_cmrcnn_config
from cmrcnn_ext.config.validate import ConfigError, validate_config
from cmrcnn_ext.config.values import config_keys
from cmrcnn_ext.model_zoo import resolve_config_file

__all__ = ["load_config", "setup_cfg"]

logger = logging.getLogger(__name__)


def load_config(config_file, opts=()):
    """get_cfg -> add_cmrcnn_config -> file -> overrides -> device (not frozen, not validated).

    Args:
        config_file (str): a YAML path, or the name of a packaged config
            (:func:`cmrcnn_ext.model_zoo.get_config_file`).
        opts (list): trailing ``KEY VALUE`` overrides.

    Returns:
        CfgNode

    Raises:
        ConfigError: unknown keys (with close matches), or former key names (naming the
            current one).
        ConfigFileNotFoundError: no such file or packaged config.
    """
    from detectron2.config import get_cfg

    cfg = add_cmrcnn_config(get_cfg())
    config_file = resolve_config_file(config_file)
    # yacs raises KeyError (file) or AssertionError (list) for keys the config does not have,
    # and KeyError for former key names (cmrcnn_ext.config.schema.RENAMED)
    for source, merge, arg in (
        (config_file, cfg.merge_from_file, config_file),
        ("the command line", cfg.merge_from_list, list(opts)),
    ):
        try:
            merge(arg)
        except (KeyError, AssertionError) as e:
            text = str(e.args[0]) if e.args else str(e)
            if "was renamed" in text:
                raise ConfigError([f"In {source}: {text}"]) from None
            if "Non-existent" not in text:
                raise
            raise ConfigError([_unknown_key_message(cfg, text, source)]) from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE=%s but CUDA is not available: running on the CPU.", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def _unknown_key_message(cfg, error, source):
    """Turn yacs' "Non-existent config key: X" into a message that names a fix."""
    key = error.strip("'\"").split(":")[-1].strip()
    known = config_keys(cfg)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"Unknown config key {key!r} in {source}.{hint} Keys are Detectron2's (detectron2/config/"
        "defaults.py) and cmrcnn_ext's (docs/config.md lists them and the tuned ones)"
    )


def setup_cfg(config_file, opts=(), freeze=True, register_data=True):
    """:func:`load_config`, then the data sets, validation and freezing.

    Args:
        config_file (str): a YAML path, or the name of a packaged config.
        opts (list): ``KEY VALUE`` overrides.
        freeze (bool): freeze the config.
        register_data (bool): register the data sets the config names
            (:func:`cmrcnn_ext.data.register_project_datasets`, which sets the number and
            names of classes from them). Prediction and export do not: they take the classes
            from the config (a training run's ``config.yaml``).

    Returns:
        CfgNode
    """
    cfg = load_config(config_file, opts)
    if register_data:
        from cmrcnn_ext.data import register_project_datasets

        register_project_datasets(cfg)
    elif cfg.MODEL.ROI_HEADS.NUM_CLASSES == 0:
        raise ConfigError(
            [
                "MODEL.ROI_HEADS.NUM_CLASSES = 0 takes the number of classes from the training "
                "data, which prediction and export do not read. Use the training run's config "
                "(OUTPUT_DIR/config.yaml, or --run OUTPUT_DIR), or set NUM_CLASSES"
            ]
        )
    validate_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg
