"""torchvision ResNet ImageNet weights in Detectron2's ResNet names.

:class:`~cmrcnn_ext.engine.checkpoint.CMRCNNCheckpointer` recognises a torchvision ResNet
``state_dict`` given as ``MODEL.WEIGHTS`` and converts it while loading (logged), so no separate
conversion step is needed (Detectron2's ``tools/convert-torchvision-to-d2.py`` does the same
offline).
"""

import re
from collections.abc import Mapping
from typing import Dict, Iterable

__all__ = ["convert_torchvision_resnet", "is_torchvision_resnet", "strip_module_prefix"]

_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_TV_BLOCK_PART = re.compile(r"^(conv|bn)([1-3])\.(.+)$")
_TV_DOWNSAMPLE = re.compile(r"^downsample\.([01])\.(.+)$")


def strip_module_prefix(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith("module.") for k in keys)


def is_torchvision_resnet(state_dict: Mapping) -> bool:
    """Whether ``state_dict`` has the layout of a torchvision ``ResNet`` (``conv1.weight``,
    ``bn1.*``, ``layer1.0.conv1.weight``..., maybe ``fc.*``), possibly with a ``module.`` prefix.
    """
    keys = list(state_dict.keys())
    if strip_module_prefix(keys):
        keys = [k[len("module.") :] for k in keys]
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
    strip = strip_module_prefix(state_dict.keys())
    out = {}
    for key, value in state_dict.items():
        k = key[len("module.") :] if strip else key
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if k.startswith("conv1."):
            name = "stem.conv1." + k[len("conv1.") :]
        elif k.startswith("bn1."):
            name = "stem.conv1.norm." + k[len("bn1.") :]
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
