"""Checkpoints of cmrcnn_ext: initial weights in every common layout, and atomic saving.

:class:`CMRCNNCheckpointer` is Detectron2's :class:`DetectionCheckpointer` (used the same way:
``MODEL.WEIGHTS``, ``resume_or_load``, ``PeriodicCheckpointer``) that also

- loads, as ``MODEL.WEIGHTS``:

  * PyTorch ``.pth`` files: a plain state_dict or a Detectron2 checkpoint (``{"model": ...,
    "optimizer": ..., "iteration": ...}``), read with ``torch.load(weights_only=True)`` (numpy
    arrays allowed); see "Unpickling" below;
  * Detectron2 / model-zoo ``.pkl`` files (a pickled dict with ``"model"`` of numpy arrays or
    tensors, ``"__author__"``, maybe ``"matching_heuristics"``), and Caffe2 / Detectron1 ``.pkl``
    files (name-matching heuristics, as Detectron2), read with an unpickler that only builds
    numpy arrays;
  * torchvision ResNet ImageNet state_dicts (``conv1.weight``, ``layer1.0.bn1.weight``...):
    detected and converted to Detectron2's names (:func:`convert_torchvision_resnet`, logged);
  * checkpoints of Detectron2's built-in cascade (one mask head) into ``MODEL.CMRCNN.MASK_STAGES
    all`` (one head per stage) and back: done by the ROI heads themselves
    (``CascadeMaskROIHeads._load_from_state_dict``), so every loader gets it, Detectron2's
    ``DetectionCheckpointer`` and ``DefaultPredictor`` included;
  * ``path?matching_heuristics=True`` (Detectron2's syntax, also on Detectron2 v0.6): load by
    name-matching heuristics;
  * checkpoints trained on another number of classes: the class-dependent tensors (box
    predictors' ``cls_score``, the mask ``predictor``, class-specific ``bbox_pred``) are skipped
    with one warning naming them; everything else loads. Counts of loaded / skipped / missing
    tensors are logged for every load.

  A missing, unreadable, truncated or foreign file (JSON, random bytes...) raises
  :class:`CheckpointError` naming the file and the accepted formats.

- saves atomically: a checkpoint is written to a temporary file in the same folder, flushed,
  fsync'ed and renamed (``os.replace``) to its name; ``last_checkpoint`` is then written the
  same way. A process killed at any moment leaves either the previous state or the new one,
  never a truncated checkpoint or a ``last_checkpoint`` naming one.

Unpickling: ``torch.load(weights_only=True)`` (the default of torch >= 2.6) cannot load files
that contain other Python objects (e.g. whole optimizer or scheduler objects, ``argparse``
namespaces, or other classes saved by older training scripts). For such a file that the user
named as a local path (``MODEL.WEIGHTS`` or the ``last_checkpoint`` of ``OUTPUT_DIR``) the
checkpointer retries with ``weights_only=False`` and logs a warning: **this runs the pickle code
in the file, so only load checkpoints you trust**. Files fetched from a URL
(``detectron2://``, ``https://``...) are never fully unpickled; ``allow_pickle=False`` refuses
it for local files too. ``.pkl`` files get the same treatment (numpy-only unpickler first).

Command line::

    python -m cmrcnn_ext.engine.checkpoint convert-torchvision resnet50-0676ba61.pth R-50-tv.pkl
"""
import argparse
import logging
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Mapping
from typing import Any, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer

from cmrcnn_ext.compat import reset_checkpointer_after_load
from cmrcnn_ext.errors import UserError

try:  # helpers of fvcore's Checkpointer (the base class of DetectionCheckpointer)
    from fvcore.common.checkpoint import (
        get_missing_parameters_message,
        get_unexpected_parameters_message,
    )
except ImportError:  # pragma: no cover
    get_missing_parameters_message = get_unexpected_parameters_message = None

__all__ = [
    "ACCEPTED_FORMATS",
    "atomic_write",
    "CheckpointError",
    "CMRCNNCheckpointer",
    "convert_torchvision_resnet",
    "is_torchvision_resnet",
    "main",
]

logger = logging.getLogger(__name__)

#: Human-readable list of what :class:`CMRCNNCheckpointer` loads (used in error messages).
ACCEPTED_FORMATS = (
    "PyTorch .pth files (a state_dict, or a Detectron2 checkpoint dict with a 'model' entry), "
    "Detectron2 / model-zoo .pkl files (a pickled dict with 'model' of numpy arrays), "
    "Caffe2 / Detectron1 .pkl files, torchvision ResNet ImageNet state_dicts "
    "(converted automatically), and pycls .pyth files"
)

# Tensors whose first dimension depends on the number of classes.
_CLASS_DEPENDENT = re.compile(
    r"(^|\.)(cls_score|bbox_pred)\.(weight|bias)$"
    r"|(^|\.)mask_head\.(\d+\.)?predictor\.(weight|bias)$"
)
_CLS_SCORE = re.compile(r"(^|\.)cls_score\.weight$")
_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_TV_BLOCK_PART = re.compile(r"^(conv|bn)([1-3])\.(.+)$")
_TV_DOWNSAMPLE = re.compile(r"^downsample\.([01])\.(.+)$")
_ZIP_MAGIC = b"PK\x03\x04"
# Temporary files of atomic_write() for checkpoints and last_checkpoint.
_TEMP_FILE = re.compile(r"^\.(.+\.pth|last_checkpoint)\.[A-Za-z0-9_]+\.tmp$")
# The first bytes of a legacy (pre-1.6, non-zip) torch.save file: the pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable or in a format that cannot be loaded."""


# --------------------------------------------------------------------------------------------
# torchvision ResNet -> Detectron2 names
# --------------------------------------------------------------------------------------------


def _strip_module(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith("module.") for k in keys)


def is_torchvision_resnet(state_dict: Mapping) -> bool:
    """Whether ``state_dict`` has the layout of a torchvision ``ResNet`` (``conv1.weight``,
    ``bn1.*``, ``layer1.0.conv1.weight``..., maybe ``fc.*``), possibly with a ``module.`` prefix.
    """
    keys = list(state_dict.keys())
    if _strip_module(keys):
        keys = [k[len("module."):] for k in keys]
    keys = set(keys)
    return (
        "conv1.weight" in keys
        and "bn1.weight" in keys
        and any(k.startswith("layer1.0.conv1.") for k in keys)
        and all(
            k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
            for k in keys
        )
    )


def convert_torchvision_resnet(state_dict: Mapping, prefix: str = "backbone.bottom_up.") -> Dict:
    """Rename a torchvision ResNet ImageNet state_dict to Detectron2's ResNet names.

    ``conv1`` -> ``stem.conv1``, ``bn1`` -> ``stem.conv1.norm``, ``layerN`` -> ``res{N+1}``,
    ``layerN.i.bnK`` -> ``res{N+1}.i.convK.norm``, ``downsample.0`` -> ``shortcut``,
    ``downsample.1`` -> ``shortcut.norm``; ``fc.*`` (the ImageNet classifier) and
    ``num_batches_tracked`` are dropped. Works for BasicBlock (ResNet-18/34) and Bottleneck
    (ResNet-50/101/152) networks. Values are kept as they are (tensors or numpy arrays).

    The converted weights reproduce torchvision's network only with a matching config:
    ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (torchvision strides in the 3x3 conv),
    ``INPUT.FORMAT "RGB"``, ``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]`` and
    ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]``.

    Args:
        state_dict: e.g. ``torchvision.models.resnet50(weights=...).state_dict()``.
        prefix: prepended to every name: ``"backbone.bottom_up."`` for a ResNet-FPN detector
            (all cmrcnn_ext configs), ``"backbone."`` for a C4 one, ``""`` for bare names (as
            Detectron2's ``convert-torchvision-to-d2.py``, loaded by name-matching heuristics).

    Returns:
        dict: Detectron2 name -> value.

    Raises:
        ValueError: a key is not part of a torchvision ResNet.
    """
    strip = _strip_module(state_dict.keys())
    out = {}
    for key, value in state_dict.items():
        k = key[len("module."):] if strip else key
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if k.startswith("conv1."):
            name = "stem.conv1." + k[len("conv1."):]
        elif k.startswith("bn1."):
            name = "stem.conv1.norm." + k[len("bn1."):]
        else:
            m = _TV_BLOCK.match(k)
            if not m:
                raise ValueError(f"'{key}' is not a parameter of a torchvision ResNet")
            stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            part, down = _TV_BLOCK_PART.match(rest), _TV_DOWNSAMPLE.match(rest)
            if part:
                kind, idx, leaf = part.groups()
                sub = f"conv{idx}." + ("norm." if kind == "bn" else "") + leaf
            elif down:
                sub = "shortcut." + ("norm." if down.group(1) == "1" else "") + down.group(2)
            else:
                raise ValueError(f"'{key}' is not a parameter of a torchvision ResNet")
            name = f"res{stage}.{block}.{sub}"
        out[prefix + name] = value
    return out


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> List:
    """numpy's array / scalar / dtype constructors, for ``torch.load(weights_only=True)``."""
    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    out = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    out += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    out += [(multiarray.scalar, "numpy.core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [
            getattr(dtypes, n)
            for n in dir(dtypes)
            if n.endswith("DType") and n not in ("ObjectDType", "VoidDType")
        ]
    return out


class _NeedsFullPickle(Exception):
    pass


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts / lists / numbers / strings / numpy arrays and nothing else."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        ok = (module, name) in self._ALLOWED or (
            module == "numpy.dtypes" and name.endswith("DType") and name != "ObjectDType"
        )
        if not ok:
            raise _NeedsFullPickle(f"{module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 1.x pickle on numpy 2
        return super().find_class(module, name)


def _sniff(filename: str) -> str:
    with open(filename, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch-legacy"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    text = head.lstrip()
    if text[:1] in (b"{", b"[") or text.startswith(b'"'):
        return "json"
    if filename.endswith(".pkl") and head[:1] in (b"(", b"}", b"]", b"c"):
        return "pickle"  # protocol 0/1 pickle (very old files)
    return "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _to_tensor(value):
    if isinstance(value, np.ndarray):  # copy: owned, contiguous, writable (0-d stays 0-d)
        return torch.from_numpy(np.array(value, copy=True, order="C"))
    return value


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
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        save_to_disk=None,
        allow_pickle=True,
        for_inference=False,
        **checkpointables,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_pickle = allow_pickle
        self.for_inference = for_inference
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
                        f"Cannot fetch checkpoint '{self._source}' ({_first_line(e)}). Without "
                        "network access, download it elsewhere and set MODEL.WEIGHTS to the local "
                        "file."
                    ) from None
            if os.path.isdir(path):
                raise CheckpointError(
                    f"Checkpoint '{path}' is a folder, not a file. {self._accepted()}"
                )
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"Checkpoint file '{path}' does not exist (MODEL.WEIGHTS, or the "
                    f"'last_checkpoint' of OUTPUT_DIR when resuming). {self._accepted()}"
                )
            return super().load(path, *args, **kwargs)
        finally:
            # A failed load leaves the checkpointer ready for the next one.
            self._source, self._from_url, self._heuristics = "", False, False
            reset_checkpointer_after_load(self)

    @staticmethod
    def _accepted() -> str:
        return f"Accepted formats: {ACCEPTED_FORMATS}."

    def _error(self, filename: str, reason: str) -> CheckpointError:
        return CheckpointError(f"Cannot load checkpoint '{filename}': {reason}. {self._accepted()}")

    def _may_unpickle(self, filename: str, needs: str) -> None:
        """Raise unless full unpickling of ``filename`` is allowed; else log the warning."""
        if self._from_url or not self.allow_pickle:
            why = "it was fetched from a URL" if self._from_url else "allow_pickle=False"
            raise self._error(
                filename,
                f"it contains Python objects other than tensors and arrays ({needs}) and can only "
                f"be read by running its pickle code, which is not done because {why}; "
                "load it yourself if you trust it and save its state_dict with torch.save",
            )
        logger.warning(
            "Checkpoint '%s' cannot be read with torch.load(weights_only=True): it contains "
            "Python objects other than tensors and arrays (%s). Reading it with full unpickling "
            "(weights_only=False), which RUNS PICKLE CODE FROM THE FILE: only load checkpoints "
            "you trust.",
            filename,
            needs,
        )

    def _torch_load(self, filename: str):
        needs = None
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only load failed" in str(e).lower():
                found = re.search(r"GLOBAL ([\w\.]+)", str(e))
                needs = found.group(1) if found else "unsupported globals"
            else:
                reason = f"corrupt or not a checkpoint ({_first_line(e)})"
        except Exception as e:
            reason = f"corrupt, truncated or not a checkpoint ({_first_line(e)})"
        if needs is None:
            raise self._error(filename, reason)
        self._may_unpickle(filename, needs)
        try:
            return torch.load(filename, map_location=torch.device("cpu"), weights_only=False)
        except Exception as e:
            reason = f"full unpickling failed too ({_first_line(e)})"
        raise self._error(filename, reason)

    def _pickle_load(self, filename: str):
        needs = None
        try:
            with open(filename, "rb") as f:
                return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except _NeedsFullPickle as e:
            needs = str(e)
        except Exception as e:
            reason = f"corrupt or truncated pickle ({_first_line(e)})"
        if needs is None:
            raise self._error(filename, reason)
        self._may_unpickle(filename, needs)
        try:
            with open(filename, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception as e:
            reason = f"full unpickling failed ({_first_line(e)})"
        raise self._error(filename, reason)

    def _load_file(self, filename):
        try:
            kind = _sniff(filename)
        except OSError as e:
            raise self._error(filename, f"cannot read it ({_first_line(e)})") from None
        if filename.endswith(".pyth") and kind in ("zip", "torch-legacy"):
            try:
                return super()._load_file(filename)  # pycls
            except Exception as e:
                raise self._error(filename, f"not a pycls checkpoint ({_first_line(e)})") from None
        if kind in ("zip", "torch-legacy"):
            data, pickled = self._torch_load(filename), False
        elif kind == "pickle":
            data, pickled = self._pickle_load(filename), True
        elif kind == "empty":
            raise self._error(filename, "the file is empty (0 bytes)")
        elif kind == "json":
            raise self._error(filename, "it is a JSON / text file, not a checkpoint")
        else:
            raise self._error(filename, "unknown content (neither a PyTorch file nor a pickle)")
        data = self._normalize(data, filename, pickled)
        if self._heuristics:
            data["matching_heuristics"] = True
        return data

    def _normalize(self, data, filename: str, pickled: bool) -> Dict[str, Any]:
        if not isinstance(data, Mapping):
            raise self._error(filename, f"it contains a {type(data).__name__}, not a dict")
        data = dict(data)
        if "model" in data:
            if not isinstance(data["model"], Mapping):
                what = type(data["model"]).__name__
                raise self._error(filename, f"its 'model' entry is a {what}, not a dict")
            if "__author__" in data:
                logger.info("Reading a file from '%s'", data["__author__"])
            return data
        if pickled and "blobs" in data:  # Caffe2 / Detectron1 detection model
            blobs = {k: v for k, v in data["blobs"].items() if not k.endswith("_momentum")}
            return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
        tensors = all(isinstance(v, (torch.Tensor, np.ndarray)) for v in data.values())
        if not data or not tensors:
            shown = ", ".join(repr(k) for k in list(data)[:8])
            raise self._error(
                filename,
                f"it has no 'model' entry and is not a state_dict (top-level keys: {shown})",
            )
        if pickled and not is_torchvision_resnet(data) and not any("." in k for k in data):
            # Caffe2 ImageNet model (conv1_w, res2_0_branch2a_w, ...): Detectron2's heuristics
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        return {"model": data}

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        bad = [k for k, v in state.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
        if bad:
            raise self._error(
                self._source or "checkpoint",
                f"its 'model' entry holds non-tensor values (e.g. '{bad[0]}': "
                f"{type(state[bad[0]]).__name__})",
            )
        state = {k: _to_tensor(v) for k, v in state.items()}
        if _strip_module(state.keys()):
            state = {k[len("module."):]: v for k, v in state.items()}
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
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str, write, mode: int = 0o666) -> None:
    """Write a file so that ``path`` is either untouched or complete, whatever happens.

    ``write(f)`` writes into a temporary file (binary) in the same folder, which is flushed,
    fsync'ed and renamed to ``path`` with ``os.replace`` (atomic on POSIX and Windows); the
    folder is fsync'ed so the rename survives a power loss. On an exception the temporary file
    is removed; a killed process can leave one (``.NAME.*.tmp``), never a partial ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _convert_torchvision_cli(args) -> int:
    checkpointer = CMRCNNCheckpointer(torch.nn.Module(), allow_pickle=not args.no_pickle)
    checkpointer._source = args.input
    if not os.path.isfile(args.input):
        raise CheckpointError(f"Checkpoint file '{args.input}' does not exist.")
    data = checkpointer._load_file(args.input)
    state = data["model"]
    if not is_torchvision_resnet(state):
        raise CheckpointError(
            f"'{args.input}' is not a torchvision ResNet state_dict (expected keys conv1.weight, "
            f"bn1.*, layer1.0.conv1.weight, ...; found {', '.join(list(state)[:5])}, ...)."
        )
    converted = convert_torchvision_resnet(state, args.prefix)
    model = {
        k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        for k, v in converted.items()
    }
    out = {"model": model, "__author__": "torchvision", "matching_heuristics": not args.prefix}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_write(args.output, lambda f: pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL))
    print(
        f"Wrote {len(model)} tensors (of {len(state)}; fc and num_batches_tracked dropped) "
        f"to {args.output}"
    )
    print(
        "Use it with: MODEL.WEIGHTS {} MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB "
        "MODEL.PIXEL_MEAN [123.675,116.28,103.53] MODEL.PIXEL_STD [58.395,57.12,57.375]".format(
            args.output
        )
    )
    return 0


def main(argv=None) -> int:
    """``python -m cmrcnn_ext.engine.checkpoint convert-torchvision IN.pth OUT.pkl [--prefix P]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cmrcnn_ext.engine.checkpoint", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert-torchvision",
        help="convert a torchvision ResNet ImageNet state_dict to a Detectron2 .pkl",
        description=convert_torchvision_resnet.__doc__.split("\n\n")[0],
    )
    conv.add_argument("input", help="torchvision ResNet .pth (a state_dict)")
    conv.add_argument("output", help="Detectron2 .pkl to write")
    conv.add_argument(
        "--prefix",
        default="backbone.bottom_up.",
        help="name prefix (default: backbone.bottom_up., for ResNet-FPN models; '' for "
        "Detectron2's bare names loaded by name-matching heuristics)",
    )
    conv.add_argument("--no-pickle", action="store_true", help="never fully unpickle the input")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _convert_torchvision_cli(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
