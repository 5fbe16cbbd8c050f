"""Reproducible training runs: ``train_net.py --deterministic``.

With a fixed ``SEED`` Detectron2 seeds Python, NumPy and torch in every process (``SEED + rank``)
and its TrainingSampler draws the same image order. What can still differ between two runs is
the choice of kernels: cuDNN's autotuner (``CUDNN_BENCHMARK``) and non-deterministic CUDA kernels
(atomic adds in ``index_add``, ``scatter_add``, the backward of ROIAlign and interpolation, ...).
:func:`enable_determinism` turns those off. On the CPU, runs with the same seed, the same number
of threads and ``DATALOADER.NUM_WORKERS 0`` give identical losses (tests/test_determinism.py).
"""

import logging
import os

import torch

__all__ = ["enable_determinism"]

logger = logging.getLogger(__name__)


def enable_determinism(cfg):
    """Ask PyTorch for deterministic kernels; call after ``default_setup``, before building.

    - ``torch.use_deterministic_algorithms(True, warn_only=True)``: deterministic kernels where
      PyTorch has them; ops that have none (some CUDA backward passes) warn instead of failing.
    - cuDNN: ``benchmark = False``, ``deterministic = True``.
    - ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless set), which cuBLAS needs for reproducible
      results; it must be set before the first CUDA matrix multiply, i.e. here.

    Args:
        cfg (CfgNode): must have ``SEED >= 0`` and ``CUDNN_BENCHMARK False``.

    Raises:
        ValueError: if the config asks for a random seed or for cuDNN autotuning.
    """
    if cfg.SEED < 0:
        raise ValueError(
            f"Deterministic training needs a fixed seed but SEED is {cfg.SEED} (random): "
            "add e.g. 'SEED 0' to the command line."
        )
    if cfg.CUDNN_BENCHMARK:
        raise ValueError(
            "Deterministic training needs CUDNN_BENCHMARK False (cuDNN's autotuner may pick "
            "different kernels in each run)."
        )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if cfg.DATALOADER.NUM_WORKERS > 0:
        logger.info(
            "Deterministic mode with DATALOADER.NUM_WORKERS=%d: data workers are seeded from "
            "SEED, but NUM_WORKERS 0 is the set-up tested to give identical runs.",
            cfg.DATALOADER.NUM_WORKERS,
        )
    logger.info("Deterministic algorithms enabled (SEED %d).", cfg.SEED)
