"""Exact resumption of interrupted training: the data stream and the random number streams.

What Detectron2 v0.6 restores with ``--resume``: the model, the optimizer, the iteration and
the LR scheduler (``hooks.LRScheduler`` checkpoints ``_LRScheduler`` subclasses, and the
``LRMultiplier`` that ``build_lr_scheduler`` returns is one). What it does not:

- **the data order**: ``TrainingSampler`` is an infinite, seeded stream of indices; a new
  process restarts it from its beginning, so after resuming at iteration ``k`` the model sees
  again the batches of iterations ``0, 1, ...`` instead of ``k, k+1, ...``;
- **the random number generators** (torch, numpy, python ``random``; CUDA): a new process
  re-seeds them from ``SEED``, so proposal sampling and data augmentation after resuming
  differ from an uninterrupted run.

This module fixes both; ``cmrcnn_ext.engine.Trainer`` uses it:

- :func:`build_resumable_train_loader` builds Detectron2's training loader (same data set,
  mapper, sampler choice, batch size, aspect-ratio grouping, workers) around a
  :class:`ResumableSampler`. The loader is lazy: its index stream and worker processes start
  at the first batch request, and it then skips what iterations ``0 .. k-1`` consumed, where
  ``k`` is the trainer's iteration at that moment (``get_event_storage().iter``, or
  :attr:`ResumableTrainLoader.start_iter` if set). With aspect-ratio grouping the skip is
  computed exactly by replaying the grouping on the images' width / height, including the
  images that were waiting in a half-full group.
- :class:`RNGStateHook` snapshots the RNG states right after every training step, restores
  them before the next step (so evaluation, writers or other hooks running between steps do
  not shift the training streams), and saves them in the trainer's checkpoint state; on
  resume the saved states are restored before the first step.

Together, with ``SEED >= 0`` (each process seeds the same way), ``DATALOADER.NUM_WORKERS 0``
and deterministic kernels, a run killed and resumed from a checkpoint ends with the same
weights as an uninterrupted run (tested in tests/test_resume.py). With ``NUM_WORKERS > 0``
the data order is still exact but the augmentation draws made inside worker processes are not
restored (workers are re-seeded on resume). RNG states are restored in single-process
training only; with several processes each rank restarts its generators from its seed.
"""
import itertools
import logging
import operator
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata

from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import (
    AspectRatioGroupedDataset,
    DatasetFromList,
    MapDataset,
    ToIterableDataset,
)
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = [
    "ResumableSampler",
    "ResumableTrainLoader",
    "RNGStateHook",
    "build_resumable_train_loader",
    "get_rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)


class ResumableSampler(torchdata.Sampler):
    """Wraps an infinite training sampler (Detectron2's ``TrainingSampler`` and friends; one
    process's stream) so that its stream can start later: first ``prefix``, then the wrapped
    stream without its first ``skip`` indices. Set both with :meth:`set_start` before
    iterating (the stream is created when iteration starts).
    """

    def __init__(self, sampler: torchdata.Sampler):
        self.sampler = sampler
        self._skip = 0
        self._prefix: List[int] = []

    def set_start(self, skip: int, prefix: Sequence[int] = ()) -> None:
        self._skip, self._prefix = int(skip), [int(i) for i in prefix]

    def __iter__(self):
        # the start is read now, not when the stream is first advanced
        return itertools.chain(
            list(self._prefix), itertools.islice(iter(self.sampler), self._skip, None)
        )


def _current_iteration() -> int:
    try:
        return int(get_event_storage().iter)
    except (AssertionError, IndexError):  # no EventStorage: not inside a training loop
        return 0


class ResumableTrainLoader:
    """Iterable of training batches (lists of mapped dicts, as Detectron2's train loader) that
    starts where iteration :attr:`start_iter` begins (see the module docstring).

    Build it with :func:`build_resumable_train_loader`.
    """

    def __init__(
        self,
        dataset: torchdata.Dataset,
        sampler: ResumableSampler,
        batch_size: int,
        *,
        aspect_ratio_grouping: bool,
        num_workers: int,
        buckets: Optional[Sequence[int]] = None,
        seed: int = 0,
    ):
        """
        Args:
            dataset: map-style data set of mapped dicts.
            sampler: this process's index stream.
            batch_size: images per batch in this process.
            aspect_ratio_grouping, num_workers: as Detectron2's ``build_batch_data_loader``.
            buckets: per data set index, the aspect-ratio group (0 if width > height, else 1)
                of Detectron2's ``AspectRatioGroupedDataset``; ``None`` if unknown (the skip on
                resume is then approximate: ``start_iter * batch_size``).
            seed: seed of the workers' seeds.
        """
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        self.buckets = None if buckets is None else list(buckets)
        self.seed = int(seed)
        #: Iteration whose batch the loader yields first; None: the trainer's current
        #: iteration (``get_event_storage().iter``) when the first batch is requested.
        self.start_iter: Optional[int] = None

    def resume_position(self, start_iter: int) -> Tuple[List[int], int]:
        """What iterations ``0 .. start_iter - 1`` consumed: returns ``(prefix, skip)``, the
        indices read but still waiting in a half-full aspect-ratio group (in stream order),
        and the number of indices of the stream consumed.
        """
        if start_iter <= 0:
            return [], 0
        if not self.aspect_ratio_grouping:
            return [], start_iter * self.batch_size
        if self.buckets is None:
            logger.warning(
                "The training dicts have no width/height: the data stream resumes approximately "
                "(skipping %d images).",
                start_iter * self.batch_size,
            )
            return [], start_iter * self.batch_size
        groups: List[List[Tuple[int, int]]] = [[], []]
        stream = iter(self.sampler.sampler)
        consumed = batches = 0
        while batches < start_iter:
            idx = next(stream)
            group = groups[self.buckets[idx]]
            group.append((consumed, idx))
            consumed += 1
            if len(group) == self.batch_size:
                batches += 1
                del group[:]
        waiting = sorted(groups[0] + groups[1])
        return [idx for _, idx in waiting], consumed

    def _loader(self, generator: torch.Generator):
        dataset = ToIterableDataset(self.dataset, self.sampler)
        if self.aspect_ratio_grouping:
            loader = torchdata.DataLoader(
                dataset,
                num_workers=self.num_workers,
                collate_fn=operator.itemgetter(0),  # no batching: single mapped dicts
                worker_init_fn=worker_init_reset_seed,
                generator=generator,
            )
            return AspectRatioGroupedDataset(loader, self.batch_size)
        return torchdata.DataLoader(
            dataset,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            worker_init_fn=worker_init_reset_seed,
            generator=generator,
        )

    def __iter__(self):
        # A generator: nothing runs (no index stream, no worker process) until the first
        # batch is requested, i.e. after the trainer has loaded its checkpoint.
        start = self.start_iter if self.start_iter is not None else _current_iteration()
        prefix, skip = self.resume_position(start)
        self.sampler.set_start(skip, prefix)
        if start:
            logger.info(
                "Training data resumes at iteration %d: skipping the %d sampled images that "
                "iterations 0-%d consumed%s.",
                start,
                skip - len(prefix),
                start - 1,
                f" ({len(prefix)} more wait in a half-full aspect-ratio group)" if prefix else "",
            )
        # The DataLoader draws its workers' base seed from this generator, not from the global
        # torch RNG, so starting the loader does not shift the training RNG stream.
        generator = torch.Generator()
        generator.manual_seed((self.seed * 1_000_003 + start) % (2**63))
        yield from self._loader(generator)


def _default_sampler(cfg, dataset):
    name = cfg.DATALOADER.SAMPLER_TRAIN
    logger.info("Using training sampler %s (resumable)", name)
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset))
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, cfg.DATALOADER.REPEAT_THRESHOLD
        )
        return RepeatFactorTrainingSampler(factors)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(len(dataset), cfg.DATALOADER.RANDOM_SUBSET_RATIO)
    raise ValueError(f"Unknown training sampler: {name}")


def build_resumable_train_loader(
    cfg, mapper=None, dataset=None, sampler=None
) -> ResumableTrainLoader:
    """Detectron2's ``build_detection_train_loader(cfg)`` that resumes its data stream.

    Same data set (``DATASETS.TRAIN``, filtered as Detectron2 does), mapper (``DatasetMapper(cfg,
    True)`` unless given), sampler (``DATALOADER.SAMPLER_TRAIN``, unless given), batch size
    (``SOLVER.IMS_PER_BATCH`` / world size), aspect-ratio grouping and workers.

    Args:
        cfg (CfgNode): the config.
        mapper (callable or None): maps a dataset dict to the model's input dict.
        dataset (list[dict] or None): dataset dicts instead of ``DATASETS.TRAIN``.
        sampler (Sampler or None): an infinite per-process index sampler.

    Returns:
        ResumableTrainLoader
    """
    if dataset is None:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON
            else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
    if sampler is None:
        sampler = _default_sampler(cfg, dataset)
    world_size = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total <= 0 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the number of "
            f"processes ({world_size})."
        )
    buckets = None
    if all("width" in d and "height" in d for d in dataset):
        buckets = [0 if d["width"] > d["height"] else 1 for d in dataset]
    mapped = MapDataset(DatasetFromList(dataset, copy=False), mapper or DatasetMapper(cfg, True))
    return ResumableTrainLoader(
        mapped,
        ResumableSampler(sampler),
        total // world_size,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        buckets=buckets,
        seed=int(np.random.randint(2**31)),
    )


# --------------------------------------------------------------------------------------------
# random number generators
# --------------------------------------------------------------------------------------------


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
