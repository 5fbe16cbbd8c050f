"""Training infrastructure around Detectron2's DefaultTrainer: the trainer, checkpoints, exact
resume, non-finite guard, run reports, launching and the command-line conventions."""

from cmrcnn_ext.engine.trainer import CPUAutocastTrainer, Trainer

__all__ = ["CPUAutocastTrainer", "Trainer"]
