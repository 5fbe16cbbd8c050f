"""The project's checkpointer: Detectron2's ``DetectionCheckpointer`` plus what it lacks.

:class:`CMRCNNCheckpointer` is used like Detectron2's (``MODEL.WEIGHTS``, ``resume_or_load``,
``PeriodicCheckpointer``) and adds:

- safe reading of every common format, with clear errors
  (:mod:`cmrcnn_ext.engine.checkpoint_files`): ``.pth`` with ``torch.load(weights_only=True)``
  first, model-zoo ``.pkl`` with a numpy-only unpickler first, Caffe2 ``.pkl``, pycls ``.pyth``;
  a missing, truncated or foreign file raises :class:`CheckpointError` naming the file;
- torchvision ResNet ImageNet ``state_dict``s converted while loading
  (:mod:`cmrcnn_ext.engine.torchvision_weights`, logged);
- Detectron2's ``path?matching_heuristics=True`` on Detectron2 v0.6 too;
- checkpoints trained on another number of classes: the class-dependent tensors are skipped with
  one warning (fine-tuning); with ``for_inference=True`` (prediction, evaluation, export) a
  checkpoint that does not fit the model is an error instead;
- one log line with the counts of loaded / skipped / missing tensors;
- atomic saving (:func:`cmrcnn_ext.fileio.atomic_write`) of checkpoints and ``last_checkpoint``:
  a process killed at any moment leaves the previous state or the new one, never a truncated
  file.

Checkpoints with one mask head (Detectron2's built-in cascade) load into one head per stage and
back in ``CascadeMaskROIHeads._load_from_state_dict``, so every loader gets that, Detectron2's
own included.
"""

import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qs

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from cmrcnn_ext.compat import reset_checkpointer_after_load
from cmrcnn_ext.engine.checkpoint_files import (
    ACCEPTED_FORMATS,
    CheckpointError,
    CheckpointReader,
    accepted,
    first_line,
)
from cmrcnn_ext.engine.checkpoint_rotation import (
    disk_full_error,
    prune_checkpoints,
    resume_from_intact,
    tensor_bytes,
)
from cmrcnn_ext.engine.torchvision_weights import (
    convert_torchvision_resnet,
    is_torchvision_resnet,
    strip_module_prefix,
)
from cmrcnn_ext.fileio import atomic_write

try:  # helpers of fvcore's Checkpointer (the base class of DetectionCheckpointer)
    from fvcore.common.checkpoint import (
        get_missing_parameters_message,
        get_unexpected_parameters_message,
    )
except ImportError:  # pragma: no cover
    get_missing_parameters_message = get_unexpected_parameters_message = None

__all__ = ["ACCEPTED_FORMATS", "CheckpointError", "CMRCNNCheckpointer"]

logger = logging.getLogger(__name__)

# Tensors whose first dimension depends on the number of classes.
_CLASS_DEPENDENT = re.compile(
    r"(^|\.)(cls_score|bbox_pred)\.(weight|bias)$"
    r"|(^|\.)mask_head\.(\d+\.)?predictor\.(weight|bias)$"
)
_CLS_SCORE = re.compile(r"(^|\.)cls_score\.weight$")
# Temporary files of atomic_write() for checkpoints and last_checkpoint.
_TEMP_FILE = re.compile(r"^\.(.+\.pth|last_checkpoint)\.[A-Za-z0-9_]+\.tmp$")


def _split_query(path: str) -> Tuple[str, bool]:
    """``(file, matching_heuristics)`` of Detectron2's ``file?matching_heuristics=True`` syntax.

    Raises:
        CheckpointError: a query other than ``matching_heuristics=True|False``.
    """
    if "?" not in path or os.path.isfile(path):  # a local file may have "?" in its name
        return path, False
    base, _, query = path.partition("?")
    queries = parse_qs(query, keep_blank_values=True)
    value = queries.pop("matching_heuristics", ["False"])
    if queries or value not in (["True"], ["False"]):
        raise CheckpointError(
            f"Unsupported query in checkpoint path '{path}': only '?matching_heuristics=True' "
            "(load by name-matching heuristics) or '?matching_heuristics=False' is understood."
        )
    return base, value == ["True"]


def _is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class CMRCNNCheckpointer(DetectionCheckpointer):
    """Detectron2's :class:`DetectionCheckpointer` with more input layouts, clearer errors and
    atomic saving (see the module docstring for the details).

    Args:
        model, save_dir, save_to_disk, checkpointables: as :class:`DetectionCheckpointer`.
        allow_pickle (bool): allow ``weights_only=False`` / full unpickling, with a logged
            warning, for local files that need it. Files fetched from URLs never are.
        for_inference (bool): every tensor of the model must come from the checkpoint, with
            its shape: a checkpoint that does not fit the config (other classes, another
            architecture, an ImageNet backbone) raises :class:`CheckpointError` instead of
            leaving layers at their random initialisation, as fine-tuning may.
        keep_checkpoints (int): after each save, keep only the newest this many periodic
            checkpoints in ``save_dir`` (0: all; ``SOLVER.CMRCNN.KEEP_CHECKPOINTS``).
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        save_to_disk=None,
        allow_pickle=True,
        for_inference=False,
        keep_checkpoints=0,
        **checkpointables,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_pickle = allow_pickle
        self.for_inference = for_inference
        self.keep_checkpoints = int(keep_checkpoints)
        self._source = ""  # what the user asked for (path or URL) during a load
        self._from_url = False
        self._heuristics = False  # "?matching_heuristics=True" given with the path
        self._load_info: Dict[str, Any] = {}

    # ---------------------------------------------------------------- loading
    def load(self, path, *args, **kwargs):
        """Load ``path`` (see :meth:`DetectionCheckpointer.load`).

        Raises:
            CheckpointError: the file does not exist, cannot be fetched or read, or is not a
                checkpoint in one of :data:`ACCEPTED_FORMATS`.
        """
        if not path:
            return super().load(path, *args, **kwargs)
        path = path if isinstance(path, str) else os.fspath(path)
        self._source = path
        try:
            path, self._heuristics = _split_query(path)
            self._from_url = _is_url(path)
            if self._from_url:
                try:
                    path = self.path_manager.get_local_path(path)
                except Exception as e:
                    raise CheckpointError(
                        f"Cannot fetch checkpoint '{self._source}' ({first_line(e)}). Without "
                        "network access, download it elsewhere and set MODEL.WEIGHTS to the local "
                        "file."
                    ) from None
            if os.path.isdir(path):
                raise CheckpointError(f"Checkpoint '{path}' is a folder, not a file. {accepted()}")
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"Checkpoint file '{path}' does not exist (MODEL.WEIGHTS, or the "
                    f"'last_checkpoint' of OUTPUT_DIR when resuming). {accepted()}"
                )
            return super().load(path, *args, **kwargs)
        finally:
            # A failed load leaves the checkpointer ready for the next one.
            self._source, self._from_url, self._heuristics = "", False, False
            reset_checkpointer_after_load(self)

    def resume_or_load(self, path, *, resume=True):
        """fvcore's ``resume_or_load``; when resuming, from the newest *intact* checkpoint of
        ``save_dir`` (:func:`~cmrcnn_ext.engine.checkpoint_rotation.resume_from_intact`)."""
        if resume:
            loaded = resume_from_intact(self)
            if loaded is not None:
                return loaded
        return super().resume_or_load(path, resume=False)

    def _load_file(self, filename):
        reader = CheckpointReader(self.allow_pickle, self._from_url)
        data = reader.read(filename, pycls_loader=super()._load_file)
        if self._heuristics:
            data["matching_heuristics"] = True
        return data

    def _error(self, filename: str, reason: str) -> CheckpointError:
        return CheckpointError(f"Cannot load checkpoint '{filename}': {reason}. {accepted()}")

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        bad = [k for k, v in state.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
        if bad:
            raise self._error(
                self._source or "checkpoint",
                f"its 'model' entry holds non-tensor values (e.g. '{bad[0]}': "
                f"{type(state[bad[0]]).__name__})",
            )
        # numpy arrays -> owned, contiguous, writable tensors (0-d stays 0-d)
        state = {
            k: torch.from_numpy(np.array(v, copy=True, order="C"))
            if isinstance(v, np.ndarray)
            else v
            for k, v in state.items()
        }
        if strip_module_prefix(state.keys()):
            state = {k[len("module.") :]: v for k, v in state.items()}
        model_state = self.model.state_dict()
        if not checkpoint.get("matching_heuristics") and is_torchvision_resnet(state):
            prefix = self._backbone_prefix(model_state)
            n = len(state)
            state = convert_torchvision_resnet(state, prefix)
            logger.info(
                "'%s' is a torchvision ResNet state_dict: converted %d of its %d tensors to "
                "Detectron2 names under '%s' (conv1/bn1 -> stem.conv1[.norm], layerN -> "
                "res(N+1), bnK -> convK.norm, downsample -> shortcut; fc and num_batches_tracked "
                "dropped). It expects MODEL.RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT RGB and "
                "torchvision's PIXEL_MEAN/PIXEL_STD (see convert_torchvision_resnet).",
                self._source,
                len(state),
                n,
                prefix,
            )
        checkpoint["model"] = state
        self._load_info = {
            "num_model": len(model_state),
            "num_checkpoint": len(state),
            "num_classes": self._num_classes_of(state, model_state),
        }
        return super()._load_model(checkpoint)

    @staticmethod
    def _backbone_prefix(model_state: Mapping) -> str:
        for k in model_state:
            if k.endswith("stem.conv1.weight"):
                return k[: -len("stem.conv1.weight")]
        return "backbone.bottom_up."

    @staticmethod
    def _num_classes_of(state: Mapping, model_state: Mapping) -> Tuple[Optional[int], ...]:
        def find(sd):
            for k, v in sd.items():
                if _CLS_SCORE.search(k):
                    return int(v.shape[0]) - 1
            return None

        return find(state), find(model_state)

    def _log_incompatible_keys(self, incompatible) -> None:
        info, source = self._load_info, self._source or "the checkpoint"
        shapes = list(incompatible.incorrect_shapes)
        class_dep = [s for s in shapes if _CLASS_DEPENDENT.search(s[0])]
        other = [s for s in shapes if not _CLASS_DEPENDENT.search(s[0])]
        shape_keys = {s[0] for s in shapes}
        if class_dep:
            ck, mk = info.get("num_classes", (None, None))
            known = ck is not None and mk is not None
            classes = f" (checkpoint: {ck} classes, model: {mk})" if known else ""
            logger.warning(
                "Not loading %d class-dependent tensor(s) whose shape depends on the number of "
                "classes%s; they keep their initialization (expected when fine-tuning on other "
                "classes): %s",
                len(class_dep),
                classes,
                ", ".join(f"{k} {tuple(c)} -> {tuple(m)}" for k, c, m in class_dep),
            )
        if other:
            logger.warning(
                "Not loading %d tensor(s) with another shape in the checkpoint than in the "
                "model: %s",
                len(other),
                ", ".join(f"{k} {tuple(c)} -> {tuple(m)}" for k, c, m in other),
            )
        missing = [k for k in incompatible.missing_keys if k not in shape_keys]
        if missing:
            msg = get_missing_parameters_message(missing) if get_missing_parameters_message else ""
            logger.warning(msg or f"Missing from the checkpoint: {missing}")
        if incompatible.unexpected_keys:
            keys = list(incompatible.unexpected_keys)
            msg = ""
            if get_unexpected_parameters_message:
                msg = get_unexpected_parameters_message(keys)
            logger.warning(msg or f"Not in the model: {keys}")
        num_model = info.get("num_model", 0)
        logger.info(
            "Loaded %d of the model's %d tensors from %s; skipped %d of the checkpoint's tensors "
            "(%d with another shape, %d not in the model); %d of the model's tensors missing from "
            "the checkpoint (kept their initialization).",
            num_model - len(missing) - len(shape_keys),
            num_model,
            source,
            len(shapes) + len(incompatible.unexpected_keys),
            len(shapes),
            len(incompatible.unexpected_keys),
            len(missing),
        )
        if self.for_inference and (shapes or missing):
            raise self._unfit_for_inference(source, class_dep, other, missing)

    def _unfit_for_inference(self, source, class_dep, other, missing) -> CheckpointError:
        parts = []
        if class_dep:
            ck, mk = self._load_info.get("num_classes", (None, None))
            parts.append(
                f"its class layers are for {ck} classes, the config's model has {mk} "
                "(MODEL.ROI_HEADS.NUM_CLASSES)"
            )
        if other:
            parts.append(f"{len(other)} tensor(s) have another shape (e.g. {other[0][0]})")
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            parts.append(f"{len(missing)} of the model's tensors are not in it ({shown})")
        return CheckpointError(
            f"Checkpoint '{source}' does not fit the model built from the config: "
            + "; ".join(parts)
            + ". For prediction, evaluation and export every layer must come from the "
            "checkpoint: use the config the model was trained with (the training run's "
            "OUTPUT_DIR/config.yaml, e.g. --run OUTPUT_DIR)."
        )

    # ---------------------------------------------------------------- saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Save model + checkpointables to ``save_dir/name.pth`` atomically, then tag it in
        ``last_checkpoint`` (atomically too). Same arguments as fvcore's ``Checkpointer.save``.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        if _is_url(self.save_dir):  # remote storage: no atomic rename there
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        self.logger.info("Saving checkpoint to {}".format(save_file))
        os.makedirs(self.save_dir, exist_ok=True)
        self._remove_stale_temp_files()
        try:
            atomic_write(save_file, lambda f: torch.save(data, f))
            self.tag_last_checkpoint(basename)
        except OSError as e:
            error = disk_full_error(save_file, tensor_bytes(data), e)
            if error is None:
                raise
            raise error from None
        prune_checkpoints(self.save_dir, self.keep_checkpoints, self.logger)

    def _remove_stale_temp_files(self) -> None:
        """Remove temporary files left in save_dir by a process killed while saving."""
        for name in os.listdir(self.save_dir):
            if _TEMP_FILE.match(name):
                try:
                    os.remove(os.path.join(self.save_dir, name))
                    self.logger.info("Removed %s, left by an interrupted save", name)
                except OSError:
                    pass

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Write ``last_checkpoint`` atomically (temporary file + fsync + ``os.replace``)."""
        if _is_url(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode("utf-8")),
        )


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
