#!/usr/bin/env python
"""Train and evaluate Cascade Mask R-CNN with Detectron2's DefaultTrainer, the way Detectron2's
projects do (``python train_net.py --config-file ... KEY VALUE``).

The script is ``cmrcnn_ext/apps/train.py``, also installed as the console script
``cmrcnn-train``; its docstring lists the options (``python train_net.py --help``).
"""

from cmrcnn_ext.apps.train import Trainer, cli, get_parser, main, setup  # noqa: F401

if __name__ == "__main__":
    cli()
