"""A trained model for inference: its config, weights and class names, without its data.

``train_net.py`` writes ``OUTPUT_DIR/config.yaml`` (with ``MODEL.CMRCNN.CLASS_NAMES``) and the
checkpoints into the training run's folder. :func:`inference_config` builds the config of that
model from the run folder (or a config file and weights) without registering or generating any
data set; :func:`class_names` names its classes.
"""

import os
import re

from cmrcnn_ext.errors import UserError

__all__ = [
    "RunFolderError",
    "UntrainedEvaluationError",
    "check_eval_weights",
    "class_names",
    "inference_config",
    "run_files",
]


class RunFolderError(UserError, FileNotFoundError):
    """A training run folder without the files prediction and export need."""


def run_files(run_dir):
    """``(config.yaml, checkpoint)`` of a training run's ``OUTPUT_DIR``: ``model_final.pth``,
    else the checkpoint ``last_checkpoint`` names.

    Raises:
        RunFolderError: the folder, its config or its checkpoint is missing.
    """
    if not os.path.isdir(run_dir):
        raise RunFolderError(f"--run {run_dir!r} is not a folder; give a training run's OUTPUT_DIR")
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise RunFolderError(
            f"{run_dir!r} has no config.yaml: it is not the OUTPUT_DIR of a train_net.py run"
        )
    weights = os.path.join(run_dir, "model_final.pth")
    if not os.path.isfile(weights):
        tag = os.path.join(run_dir, "last_checkpoint")
        if not os.path.isfile(tag):
            raise RunFolderError(
                f"{run_dir!r} has no model_final.pth and no last_checkpoint: the run saved no "
                "checkpoint yet; give --weights"
            )
        with open(tag, encoding="utf-8") as f:
            weights = os.path.join(run_dir, f.read().strip())
    return config, weights


def inference_config(config_file=None, weights=None, run=None, opts=()):
    """The frozen config of a trained model, for prediction and export.

    Args:
        config_file (str or None): a config path or packaged name; default: the run's.
        weights (str or None): the checkpoint; default: the run's.
        run (str or None): a training run's ``OUTPUT_DIR`` (:func:`run_files`).
        opts (list): ``KEY VALUE`` overrides.

    Returns:
        CfgNode: with ``MODEL.WEIGHTS`` set; no data set is registered.

    Raises:
        UserError: neither a config nor a run, no weights, or a config error.
    """
    from cmrcnn_ext.config import setup_cfg

    if run:
        run_config, run_weights = run_files(run)
        config_file, weights = config_file or run_config, weights or run_weights
    if not config_file or not weights:
        raise RunFolderError(
            "give the training run's folder (--run OUTPUT_DIR), or --config-file and --weights"
        )
    return setup_cfg(config_file, list(opts) + ["MODEL.WEIGHTS", weights], register_data=False)


def class_names(cfg):
    """Names of the model's classes: ``MODEL.CMRCNN.CLASS_NAMES``, else those of the data set
    the config names if they are known without reading it (the synthetic shapes; a registered
    data set such as Detectron2's built-in COCO), else "class 0", ...."""
    from detectron2.data import MetadataCatalog

    from cmrcnn_ext.data.register import SYNTHETIC_PREFIX
    from cmrcnn_ext.data.synthetic import CLASS_NAMES as SHAPES

    num = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if len(cfg.MODEL.CMRCNN.CLASS_NAMES) == num:
        return list(cfg.MODEL.CMRCNN.CLASS_NAMES)
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name.startswith(SYNTHETIC_PREFIX) and len(SHAPES) == num:
            return list(SHAPES)
        if name in MetadataCatalog.list():
            names = MetadataCatalog.get(name).get("thing_classes")
            if names and len(names) == num:
                return list(names)
    return [f"class {i}" for i in range(num)]


# ImageNet-pretrained backbones: Detectron2's model-zoo names and torchvision's file names.
_BACKBONE_WEIGHTS = re.compile(
    r"ImageNetPretrained|(^|/)[RX]-\d+[^/]*\.pkl$|(^|/)resnet\d+-[0-9a-f]{8}\.pth$"
)


class UntrainedEvaluationError(UserError, ValueError):
    """``--eval-only`` without weights of a trained detector."""


def check_eval_weights(config_file, opts=(), resume=False, allow_untrained=False):
    """Stop ``train_net.py --eval-only`` before anything is built when it would evaluate an
    untrained model: ``MODEL.WEIGHTS`` empty (and nothing to ``--resume``), or a backbone's
    ImageNet weights (what the configs start training from). A checkpoint that loads but does
    not fit the model is caught when it is loaded (``CMRCNNCheckpointer(for_inference=True)``).

    Raises:
        UntrainedEvaluationError: unless ``allow_untrained`` (``--eval-untrained``).
    """
    if allow_untrained:
        return
    from cmrcnn_ext.config.setup import load_config

    cfg = load_config(config_file, opts)
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    weights = cfg.MODEL.WEIGHTS
    hint = (
        "Give the trained model: MODEL.WEIGHTS <OUTPUT_DIR>/model_final.pth of the training "
        "run, or --resume with OUTPUT_DIR <that run's folder>; --eval-untrained evaluates "
        "the untrained model anyway"
    )
    if not weights:
        raise UntrainedEvaluationError(
            "--eval-only evaluates trained weights, but MODEL.WEIGHTS is empty"
            + (f" and OUTPUT_DIR '{cfg.OUTPUT_DIR}' has no last_checkpoint" if resume else "")
            + f". {hint}."
        )
    if _BACKBONE_WEIGHTS.search(weights):
        raise UntrainedEvaluationError(
            f"--eval-only: MODEL.WEIGHTS {weights} are a backbone's ImageNet weights (where "
            f"training starts), not a trained detector. {hint}."
        )
