"""The checkpoints of a training run's folder: keep the newest K, resume from an intact one, and
say clearly when the disk is full.

- :func:`prune_checkpoints`: after each save, periodic checkpoints (``model_<7 digits>.pth``)
  beyond the newest ``SOLVER.CMRCNN.KEEP_CHECKPOINTS`` are deleted (``model_final.pth`` and
  other names never are). It scans the folder, so checkpoints of earlier, resumed processes
  count too.
- :func:`resume_candidates`: the checkpoint ``last_checkpoint`` names, then every periodic
  checkpoint, newest first; :class:`~cmrcnn_ext.engine.checkpoint.CMRCNNCheckpointer` resumes
  from the first that loads and logs each one it skips (truncated, corrupt, unreadable, missing).
- :func:`disk_full_error`: the message of a save that ran out of space (``ENOSPC``), with the
  path, the space needed and the space free; the atomic save has left the previous checkpoint
  and ``last_checkpoint`` as they were.
"""

import errno
import os
import re
import shutil
from collections.abc import Mapping
from typing import List, Optional

import torch

from cmrcnn_ext.engine.checkpoint_files import CheckpointError, first_line
from cmrcnn_ext.errors import UserError

__all__ = [
    "CheckpointSaveError",
    "disk_full_error",
    "periodic_checkpoints",
    "prune_checkpoints",
    "resume_candidates",
    "resume_from_intact",
    "tensor_bytes",
]

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); nothing was changed."""


def periodic_checkpoints(save_dir: str) -> List[str]:
    """Paths of ``model_<iteration>.pth`` in ``save_dir``, newest (highest iteration) first."""
    if not os.path.isdir(save_dir):
        return []
    found = [
        (int(m.group(1)), name) for name in os.listdir(save_dir) if (m := _PERIODIC.match(name))
    ]
    return [os.path.join(save_dir, name) for _, name in sorted(found, reverse=True)]


def prune_checkpoints(save_dir: str, keep: int, logger) -> List[str]:
    """Delete periodic checkpoints beyond the newest ``keep`` (0: keep all); returns them."""
    if keep <= 0:
        return []
    removed = []
    for path in periodic_checkpoints(save_dir)[keep:]:
        try:
            os.remove(path)
            removed.append(path)
        except OSError as e:
            logger.warning("Could not delete old checkpoint %s: %s", path, e)
    if removed:
        logger.info(
            "Kept the newest %d checkpoints (SOLVER.CMRCNN.KEEP_CHECKPOINTS); deleted %s",
            keep,
            ", ".join(os.path.basename(p) for p in removed),
        )
    return removed


def resume_candidates(save_dir: str, tagged: Optional[str]) -> List[str]:
    """Checkpoints to resume from, in order: ``tagged`` (what ``last_checkpoint`` names), then
    the periodic checkpoints newest first (without repeating ``tagged``)."""
    out = [tagged] if tagged else []
    for path in periodic_checkpoints(save_dir):
        if not tagged or os.path.abspath(path) != os.path.abspath(tagged):
            out.append(path)
    return out


def disk_full_error(path: str, needed_bytes: int, exc: OSError) -> Optional[CheckpointSaveError]:
    """The error to raise when saving ``path`` failed with ``exc``: a clear one for a full disk
    (``ENOSPC``, ``EDQUOT``), None for other errors (re-raise them as they are)."""
    if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
        free_text = f"{free / 2**20:.0f} MiB free"
    except OSError:
        free_text = "free space unknown"
    return CheckpointSaveError(
        f"No space left to save checkpoint {path}: it needs about {needed_bytes / 2**20:.0f} MiB, "
        f"{folder} has {free_text}. The previous checkpoint and last_checkpoint are unchanged. "
        "Free some space (or lower SOLVER.CMRCNN.KEEP_CHECKPOINTS, or set OUTPUT_DIR on another "
        "disk), then continue with --resume.",
    )


def resume_from_intact(checkpointer):
    """Load the newest intact checkpoint of ``checkpointer.save_dir`` for ``--resume``.

    The checkpoint ``last_checkpoint`` names is tried first, then the periodic checkpoints
    newest first; a truncated, corrupt, unreadable or missing one is logged and skipped, and
    ``last_checkpoint`` is re-tagged to the one loaded (Detectron2 reads the iteration to
    continue from through it).

    Returns:
        What ``checkpointer.load`` returned, or None when the folder has no checkpoint.

    Raises:
        CheckpointError: there are checkpoints, but none of them loads.
    """
    log = checkpointer.logger
    tagged = None
    try:
        if checkpointer.has_checkpoint():
            tagged = checkpointer.get_checkpoint_file()
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("--resume: cannot read %s/last_checkpoint: %s", checkpointer.save_dir, e)
    skipped = []
    for candidate in resume_candidates(checkpointer.save_dir, tagged):
        try:
            loaded = checkpointer.load(candidate)
        except CheckpointError as e:
            log.warning("--resume: skipping %s: %s", candidate, first_line(e))
            skipped.append(os.path.basename(candidate))
            continue
        if skipped:
            log.warning(
                "--resume: continuing from %s, the newest intact checkpoint (skipped: %s)",
                candidate,
                ", ".join(skipped),
            )
            if checkpointer.save_to_disk:
                checkpointer.tag_last_checkpoint(os.path.basename(candidate))
        return loaded
    if skipped:
        raise CheckpointError(
            f"--resume: no checkpoint in {checkpointer.save_dir} can be loaded (tried "
            f"{', '.join(skipped)}). Start without --resume, or set MODEL.WEIGHTS to a good "
            "checkpoint."
        )
    return None


def tensor_bytes(data) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about its size on disk."""
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    if isinstance(data, Mapping):
        return sum(tensor_bytes(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return sum(tensor_bytes(v) for v in data)
    return 0
