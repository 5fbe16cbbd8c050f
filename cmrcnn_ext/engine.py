"""Trainer and set-up shared by train_net.py and the demo."""
import logging
import os

import torch

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator

from . import compat
from .config import add_cmrcnn_config
from .data import register_project_datasets

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with COCO box + mask evaluation."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # Detectron2's C++ COCOeval exists only where detectron2._C is compiled.
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox", "segm"),
            distributed=True,
            output_dir=output_folder,
            use_fast_impl=compat.has_compiled_ops(),
        )


def setup_cfg(config_file, opts=(), args=None, freeze=True):
    """get_cfg -> add_cmrcnn_config -> file -> overrides -> device -> data sets -> freeze.

    Args:
        config_file (str): YAML config.
        opts (list): trailing ``KEY VALUE`` overrides.
        args (argparse.Namespace or None): command-line data options (``--train-json`` ...).
        freeze (bool): freeze the config.

    Returns:
        CfgNode
    """
    cfg = add_cmrcnn_config(get_cfg())
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"Config file '{config_file}' does not exist; the configs shipped with cmrcnn_ext "
            "are in its configs/ folder."
        )
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: running on the CPU.", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    register_project_datasets(cfg, args)
    if freeze:
        cfg.freeze()
    return cfg


def setup(args):
    """``setup(args)`` of train_net.py: :func:`setup_cfg` + Detectron2's ``default_setup``."""
    cfg = setup_cfg(args.config_file, args.opts, args)
    default_setup(cfg, args)
    return cfg
