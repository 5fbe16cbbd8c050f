"""The random number generators of training: saved in checkpoints and restored on resume.

:class:`RNGStateHook` snapshots the RNG states (torch, CUDA, numpy, python ``random``) right after
every training step, restores them before the next step (so evaluation, writers or other hooks
running in between do not shift the training streams), and saves them in the trainer's
checkpoint state; on resume the saved states are restored before the first step. Together with
the resumable data stream (:mod:`cmrcnn_ext.engine.resume`) a killed and resumed run ends with
the weights of an uninterrupted one (tests/test_resume.py).
"""

import logging
import random
from typing import Optional

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["RNGStateHook", "get_rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)


def get_rng_state() -> dict:
    """The states of torch (CPU and, if initialized, CUDA), numpy and python ``random``, as
    tensors / numbers only (so checkpoints holding it load with ``weights_only=True``).
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states returned by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class RNGStateHook(HookBase):
    """Makes the RNG streams of training steps checkpointed and independent of what runs
    between steps.

    After each step it takes a snapshot of the RNG states (:func:`get_rng_state`); before the
    next step it restores it, so hooks running in between (evaluation, PreciseBN, writers)
    do not shift the streams. The snapshot is part of the trainer's checkpoint state
    (``trainer.hooks.RNGStateHook``); when a checkpoint is loaded, the states are restored just
    before the first step. Put it first in the hook list, so that its ``after_step`` runs before
    the checkpointer's. Single-process training only: with several processes it does nothing.
    """

    def __init__(self):
        self._snapshot: Optional[dict] = None
        self._pending: Optional[dict] = None

    @staticmethod
    def _enabled() -> bool:
        return comm.get_world_size() == 1

    def before_step(self):
        state = self._pending if self._pending is not None else self._snapshot
        if state is not None:
            set_rng_state(state)
        self._pending = None

    def after_step(self):
        if self._enabled():
            self._snapshot = get_rng_state()

    def state_dict(self):
        if not self._enabled() or self._snapshot is None:
            return {}
        return {"world_size": 1, "rng": self._snapshot}

    def load_state_dict(self, state_dict):
        if not state_dict:
            return
        if not self._enabled() or state_dict.get("world_size") != 1:
            logger.info("RNG states of the checkpoint not restored (multi-process training).")
            return
        logger.info("Restoring the RNG states of the checkpoint before the next step.")
        self._pending = state_dict["rng"]
