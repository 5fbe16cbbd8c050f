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

- :func:`build_resumable_train_loader` builds Detectron2's ``build_detection_train_loader(cfg)``
  loader (its ``from_config`` chooses data set, mapper, sampler, batch size, grouping and
  workers): the same batches in the same order, for the installed Detectron2. The loader is
  lazy: its index stream and workers start at the first batch request; it then continues
  after what iterations ``0 .. k-1`` consumed, ``k`` being the trainer's iteration at that
  moment (``get_event_storage().iter``, or :attr:`ResumableTrainLoader.start_iter` if set).
  Detectron2 gives each DataLoader worker a share of the sampler's stream
  (:func:`_shard_chunk_size`) and torch takes the workers' outputs round-robin; each resumed
  worker continues the share of the original worker whose turn it is. With aspect-ratio
  grouping, the grouping is replayed on the images' width / height in the DataLoader's
  output order, to find how many images the first ``k`` batches consumed and which ones wait
  in a half-full group (these come first after resuming).
- :class:`RNGStateHook` snapshots the RNG states right after every training step, restores
  them before the next step (so evaluation, writers or other hooks running between steps do
  not shift the training streams), and saves them in the trainer's checkpoint state; on
  resume the saved states are restored before the first step.

Together, with ``SEED >= 0`` (each process seeds the same way), ``DATALOADER.NUM_WORKERS 0``
and deterministic kernels, a run killed and resumed from a checkpoint ends with the same
weights as an uninterrupted run (tested in tests/test_resume.py). The data order is always
exact (the grouping replay assumes the mapper keeps ``width`` / ``height``, as
``DatasetMapper`` does, and never returns ``None``); not restored are the augmentation draws
made in worker processes (re-seeded on resume) and those of images waiting in a half-full
aspect-ratio group at the resume point (mapped again, the RNG states being put back after
them so that later draws are unchanged). RNG states are restored in single-process training
only; with several processes each rank restarts its generators from its seed.
"""

import inspect
import itertools
import logging
import operator
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data import build_detection_train_loader
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import (
    AspectRatioGroupedDataset,
    DatasetFromList,
    MapDataset,
    ToIterableDataset,
)
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from cmrcnn_ext.engine.rng import get_rng_state, set_rng_state

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


def _shard_chunk_size(batch_size: int) -> int:
    """The chunk size with which the installed Detectron2 shards a sampler among workers.

    ``build_batch_data_loader`` wraps the map-style data set in ``ToIterableDataset``, which
    runs the sampler in each of the ``N`` DataLoader workers; worker ``w`` keeps the stream
    positions ``p`` with ``(p // chunk) % N == w``, in order. Detectron2 v0.6 shards one index
    at a time (``chunk = 1``); since PR #5035 ``ToIterableDataset`` takes ``shard_chunk_size``
    and ``build_batch_data_loader`` passes the batch size. Detected by that argument.

    Args:
        batch_size: images per batch in this process.

    Returns:
        int: ``chunk``.
    """
    parameters = inspect.signature(ToIterableDataset.__init__).parameters
    return int(batch_size) if "shard_chunk_size" in parameters else 1


def _worker_share(sampler, worker: int, num_workers: int, chunk: int) -> Iterator[int]:
    """The indices of a new pass over ``sampler`` that Detectron2 gives to worker ``worker``."""
    stream = iter(sampler)
    if num_workers <= 1:  # no sharding without workers or with one
        return stream
    return (i for p, i in enumerate(stream) if (p // chunk) % num_workers == worker)


def _output_order(sampler, num_workers: int, chunk: int) -> Iterator[int]:
    """The indices in the order of a DataLoader with batch size 1 over the sharded sampler:
    output ``j`` is the ``(j // N)``-th of worker ``j % N`` (torch takes outputs round-robin).
    """
    shares = [_worker_share(sampler, w, num_workers, chunk) for w in range(max(num_workers, 1))]
    for outputs in zip(*shares):  # the samplers are infinite
        yield from outputs


class _ResumedStream(torchdata.IterableDataset):
    """Detectron2's ``ToIterableDataset`` (same sharding) after its first ``offset`` outputs.

    ``offset`` counts DataLoader outputs, each made of ``items_per_output`` items of one
    worker's share (a batch; one image with aspect-ratio grouping). New worker ``r`` of ``N``
    plays original worker ``(r + offset) % N``: the new output ``j`` comes from worker
    ``j % N``, which thus makes what the original worker of output ``offset + j`` made. It skips
    the items of its share that the original worker's outputs before ``offset`` consumed.
    """

    def __init__(self, dataset, sampler, chunk: int, offset: int, items_per_output: int):
        self.dataset, self.sampler, self.chunk = dataset, sampler, chunk
        self.offset, self.items_per_output = offset, items_per_output

    def __iter__(self):
        info = torchdata.get_worker_info()
        num_workers = 1 if info is None else info.num_workers
        worker = 0 if info is None else (info.id + self.offset) % num_workers
        done = len(range(worker, self.offset, num_workers)) * self.items_per_output
        share = _worker_share(self.sampler, worker, num_workers, self.chunk)
        for idx in itertools.islice(share, done, None):
            yield self.dataset[idx]


def _map_keeping_rng(dataset, indices: Sequence[int]) -> Iterator[dict]:
    """``dataset[i]`` for ``indices``, with this process's RNG states restored afterwards."""
    if not indices:
        return
    state = get_rng_state()
    try:
        mapped = [dataset[i] for i in indices]
    finally:
        set_rng_state(state)
    yield from mapped


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
        sampler: torchdata.Sampler,
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
            sampler: this process's infinite index stream; each pass must repeat it.
            batch_size: images per batch in this process.
            aspect_ratio_grouping, num_workers: as Detectron2's ``build_batch_data_loader``.
            buckets: per data set index, the aspect-ratio group (0 if width > height, else 1)
                of Detectron2's ``AspectRatioGroupedDataset``; ``None`` if unknown (the skip on
                resume is then approximate: ``start_iter * batch_size`` images).
            seed: seed of the workers' seeds.
        """
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = int(num_workers)
        self.buckets = None if buckets is None else list(buckets)
        self.seed = int(seed)
        # how the installed Detectron2 shares the sampler's stream among workers
        self.shard_chunk_size = _shard_chunk_size(self.batch_size)
        #: Iteration whose batch the loader yields first; None: the trainer's current
        #: iteration (``get_event_storage().iter``) when the first batch is requested.
        self.start_iter: Optional[int] = None

    def resume_position(self, start_iter: int) -> Tuple[int, List[int]]:
        """What iterations ``0 .. start_iter - 1`` consumed.

        Returns:
            tuple: ``(outputs, waiting)``: the number of DataLoader outputs consumed (batches;
            single images with aspect-ratio grouping), and the indices among them that still
            wait in a half-full aspect-ratio group (group 0's, then group 1's, in order).
        """
        if start_iter <= 0 or not self.aspect_ratio_grouping:
            return max(int(start_iter), 0), []
        if self.buckets is None:
            logger.warning(
                "The training dicts have no width/height: the data stream resumes approximately "
                "(skipping %d images).",
                start_iter * self.batch_size,
            )
            return start_iter * self.batch_size, []
        # AspectRatioGroupedDataset on the DataLoader's output order
        groups: List[List[int]] = [[], []]
        outputs = batches = 0
        order = _output_order(self.sampler, self.num_workers, self.shard_chunk_size)
        while batches < start_iter:
            idx = next(order)
            outputs += 1
            group = groups[self.buckets[idx]]
            group.append(idx)
            if len(group) == self.batch_size:
                batches += 1
                del group[:]
        return outputs, groups[0] + groups[1]

    def _loader(self, generator: torch.Generator, outputs: int, waiting: List[int]):
        grouping = self.aspect_ratio_grouping
        chunk, per_output = self.shard_chunk_size, 1 if grouping else self.batch_size
        stream = _ResumedStream(self.dataset, self.sampler, chunk, outputs, per_output)
        if not grouping:
            return torchdata.DataLoader(
                stream,
                batch_size=self.batch_size,
                drop_last=True,
                num_workers=self.num_workers,
                collate_fn=trivial_batch_collator,
                worker_init_fn=worker_init_reset_seed,
                generator=generator,
            )
        loader = torchdata.DataLoader(
            stream,
            num_workers=self.num_workers,
            collate_fn=operator.itemgetter(0),  # no batching: single mapped dicts
            worker_init_fn=worker_init_reset_seed,
            generator=generator,
        )
        # Fewer than batch_size images wait per group: feeding them first refills the groups
        # as they were at the resume point, before any new image arrives.
        return AspectRatioGroupedDataset(
            itertools.chain(_map_keeping_rng(self.dataset, waiting), loader), self.batch_size
        )

    def __iter__(self):
        # A generator: nothing runs (no index stream, no worker process) until the first
        # batch is requested, i.e. after the trainer has loaded its checkpoint.
        start = self.start_iter if self.start_iter is not None else _current_iteration()
        outputs, waiting = self.resume_position(start)
        if start:
            consumed = outputs * (1 if self.aspect_ratio_grouping else self.batch_size)
            logger.info(
                "Training data resumes at iteration %d: skipping the %d sampled images that "
                "iterations 0-%d consumed%s.",
                start,
                consumed - len(waiting),
                start - 1,
                f" ({len(waiting)} more wait in a half-full aspect-ratio group)" if waiting else "",
            )
        # The DataLoader draws its workers' base seed from this generator, not from the global
        # torch RNG, so starting the loader does not shift the training RNG stream.
        generator = torch.Generator()
        generator.manual_seed((self.seed * 1_000_003 + start) % (2**63))
        yield from self._loader(generator, outputs, waiting)


def build_resumable_train_loader(
    cfg, mapper=None, dataset=None, sampler=None
) -> ResumableTrainLoader:
    """Detectron2's ``build_detection_train_loader(cfg)`` that resumes its data stream.

    Its ``from_config`` chooses the data set (``DATASETS.TRAIN``, filtered), mapper
    (``DatasetMapper(cfg, True)``), sampler (``DATALOADER.SAMPLER_TRAIN``), batch size
    (``SOLVER.IMS_PER_BATCH`` / world size), aspect-ratio grouping and workers, unless given.

    Args:
        cfg (CfgNode): the config.
        mapper (callable or None): maps a dataset dict to the model's input dict.
        dataset (list[dict] or None): dataset dicts instead of ``DATASETS.TRAIN``.
        sampler (Sampler or None): an infinite per-process index sampler.

    Returns:
        ResumableTrainLoader
    """
    args = build_detection_train_loader.from_config(
        cfg, mapper=mapper, dataset=dataset, sampler=sampler
    )
    dataset, sampler = args["dataset"], args["sampler"]
    if sampler is None or isinstance(dataset, torchdata.IterableDataset):
        raise ValueError("A resumable train loader needs a map-style data set and a sampler.")
    world_size = comm.get_world_size()
    total = args["total_batch_size"]
    if total <= 0 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the number of "
            f"processes ({world_size})."
        )
    grouping = args["aspect_ratio_grouping"]
    buckets = None  # the groups of AspectRatioGroupedDataset, if the dicts have the sizes
    sized = isinstance(dataset, list) and all("width" in d and "height" in d for d in dataset)
    if grouping and sized:
        buckets = [0 if d["width"] > d["height"] else 1 for d in dataset]
    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=False)
    if args["mapper"] is not None:
        dataset = MapDataset(dataset, args["mapper"])
    return ResumableTrainLoader(
        dataset,
        sampler,
        total // world_size,
        aspect_ratio_grouping=grouping,
        num_workers=args["num_workers"],
        buckets=buckets,
        seed=int(np.random.randint(2**31)),
    )
