"""``setup(args)`` of ``train_net.py``: command-line flags as config overrides, the config, the
log file, the data sets and Detectron2's ``default_setup``, in that order."""

import logging

from cmrcnn_ext.config.setup import load_config
from cmrcnn_ext.config.validate import validate_config
from cmrcnn_ext.data import register_project_datasets
from cmrcnn_ext.model_zoo import resolve_config_file

__all__ = ["DATA_FLAGS", "command_line_opts", "setup"]

#: train_net.py's data flags and the config keys they set.
DATA_FLAGS = {
    "train_json": "DATASETS.CMRCNN.TRAIN_JSON",
    "train_images": "DATASETS.CMRCNN.TRAIN_IMAGE_ROOT",
    "val_json": "DATASETS.CMRCNN.VAL_JSON",
    "val_images": "DATASETS.CMRCNN.VAL_IMAGE_ROOT",
}


def command_line_opts(args):
    """``args.opts`` with the data flags (``--train-json`` ...) appended as ``KEY VALUE``."""
    opts = list(args.opts)
    for attr, key in DATA_FLAGS.items():
        if getattr(args, attr, None):
            opts += [key, getattr(args, attr)]
    return opts


def setup(args):
    """The frozen config of a ``train_net.py`` run.

    The config (file + overrides), then cmrcnn_ext's log lines into ``OUTPUT_DIR/log.txt``
    (so the data check's summary is there), then the data sets (registered and checked), the
    config's validation, and Detectron2's ``default_setup`` (seeds, Detectron2's logging,
    ``OUTPUT_DIR/config.yaml``).
    """
    from detectron2.engine import default_setup
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    # default_setup logs the file's text: give it the path of a packaged config's name
    args.config_file = resolve_config_file(args.config_file)
    cfg = load_config(args.config_file, command_line_opts(args))
    # cmrcnn_ext's own log lines (data checks, weights loading) go to OUTPUT_DIR/log.txt from
    # the start; they keep propagating so that callers' handlers still see them.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="cmrcnn_ext")
    logging.getLogger("cmrcnn_ext").propagate = True
    register_project_datasets(cfg)
    validate_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
