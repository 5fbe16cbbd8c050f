"""Reading checkpoint files safely: PyTorch ``.pth``, Detectron2 / model-zoo and Caffe2 ``.pkl``,
pycls ``.pyth``; a clear :class:`CheckpointError` for anything else.

``torch.load(weights_only=True)`` (the default of torch >= 2.6) cannot load files that contain
other Python objects (whole optimizer or scheduler objects, ``argparse`` namespaces...). For such
a file named as a local path, :class:`CheckpointReader` retries with ``weights_only=False`` and
logs a warning: **this runs the pickle code in the file, so only load checkpoints you trust**.
Files fetched from a URL are never fully unpickled; ``allow_pickle=False`` refuses it for local
files too. ``.pkl`` files get the same treatment (an unpickler that builds only numpy arrays
first).
"""

import logging
import pickle
import re
from collections.abc import Mapping
from typing import Any, Dict, List

import numpy as np
import torch

from cmrcnn_ext.engine.torchvision_weights import is_torchvision_resnet
from cmrcnn_ext.errors import UserError

__all__ = ["ACCEPTED_FORMATS", "CheckpointError", "CheckpointReader", "accepted", "first_line"]

logger = logging.getLogger("cmrcnn_ext.engine.checkpoint")

#: Human-readable list of what the checkpointer loads (used in error messages).
ACCEPTED_FORMATS = (
    "PyTorch .pth files (a state_dict, or a Detectron2 checkpoint dict with a 'model' entry), "
    "Detectron2 / model-zoo .pkl files (a pickled dict with 'model' of numpy arrays), "
    "Caffe2 / Detectron1 .pkl files, torchvision ResNet ImageNet state_dicts "
    "(converted automatically), and pycls .pyth files"
)
_ZIP_MAGIC = b"PK\x03\x04"
# The first bytes of a legacy (pre-1.6, non-zip) torch.save file: the pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable or in a format that cannot be loaded."""


def accepted() -> str:
    """The sentence listing the accepted formats, for error messages."""
    return f"Accepted formats: {ACCEPTED_FORMATS}."


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
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 1.x pickle on numpy 2
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _to_tensor(value):
    if isinstance(value, np.ndarray):  # copy: owned, contiguous, writable (0-d stays 0-d)
        return torch.from_numpy(np.array(value, copy=True, order="C"))
    return value


class CheckpointReader:
    """Reads one checkpoint file into a dict (see the module docstring).

    Args:
        allow_pickle (bool): allow full unpickling (logged) of local files that need it.
        from_url (bool): the file was fetched from a URL: never fully unpickled.
    """

    def __init__(self, allow_pickle: bool = True, from_url: bool = False):
        self.allow_pickle, self.from_url = allow_pickle, from_url

    def _error(self, filename: str, reason: str) -> CheckpointError:
        return CheckpointError(f"Cannot load checkpoint '{filename}': {reason}. {accepted()}")

    def _may_unpickle(self, filename: str, needs: str) -> None:
        """Raise unless full unpickling of ``filename`` is allowed; else log the warning."""
        if self.from_url or not self.allow_pickle:
            why = "it was fetched from a URL" if self.from_url else "allow_pickle=False"
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
        def weights_only():
            try:
                with torch.serialization.safe_globals(_numpy_safe_globals()):
                    return torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
            except pickle.UnpicklingError as e:
                if "weights only load failed" not in str(e).lower():
                    raise
                found = re.search(r"GLOBAL ([\w\.]+)", str(e))
                raise _NeedsFullPickle(found.group(1) if found else "unsupported globals") from None

        def full():
            return torch.load(filename, map_location=torch.device("cpu"), weights_only=False)

        return self._read(filename, weights_only, full, "corrupt, truncated or not a checkpoint")

    def _pickle_load(self, filename: str):
        def unpickle(unpickler):
            with open(filename, "rb") as f:
                return unpickler(f, encoding="latin1").load()

        return self._read(
            filename,
            lambda: unpickle(_NumpyOnlyUnpickler),
            lambda: unpickle(pickle.Unpickler),
            "corrupt or truncated pickle",
        )

    def _read(self, filename: str, restricted, full, broken: str):
        """``restricted()`` (tensors and arrays only); if the file needs more, ``full()`` where
        :meth:`_may_unpickle` allows it. Any failure raises a :class:`CheckpointError`."""
        try:
            return restricted()
        except _NeedsFullPickle as e:
            needs = str(e)
        except Exception as e:
            raise self._error(filename, f"{broken} ({first_line(e)})") from None
        self._may_unpickle(filename, needs)
        try:
            return full()
        except Exception as e:
            raise self._error(filename, f"full unpickling failed ({first_line(e)})") from None

    def read(self, filename, pycls_loader=None):
        """The checkpoint dict (``{"model": ...}`` and whatever else the file holds) of
        ``filename``; ``pycls_loader(filename)`` reads ``.pyth`` files (Detectron2's)."""
        try:
            kind = _sniff(filename)
        except OSError as e:
            raise self._error(filename, f"cannot read it ({first_line(e)})") from None
        if filename.endswith(".pyth") and kind in ("zip", "torch-legacy") and pycls_loader:
            try:
                return pycls_loader(filename)
            except Exception as e:
                raise self._error(filename, f"not a pycls checkpoint ({first_line(e)})") from None
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
        return self._normalize(data, filename, pickled)

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
