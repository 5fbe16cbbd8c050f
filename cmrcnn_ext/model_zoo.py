"""The configs shipped with cmrcnn_ext, found by name wherever the package is installed.

Like Detectron2's ``detectron2.model_zoo``: the YAML (and LazyConfig ``.py``) files live inside
the package (``cmrcnn_ext/configs/``, installed as package data), so a ``pip install`` works from
any folder::

    from cmrcnn_ext import model_zoo

    path = model_zoo.get_config_file("cascade_mask_rcnn_R_50_FPN_3x.yaml")
    cfg = model_zoo.get_config("cascade_mask_rcnn_R_50_FPN_3x.yaml")  # a CfgNode

Every command's ``--config-file`` accepts such a name as well as a path
(:func:`resolve_config_file`).
"""

import os
from typing import List

from cmrcnn_ext.errors import UserError

__all__ = [
    "CONFIG_DIR",
    "ConfigFileNotFoundError",
    "get_config",
    "get_config_file",
    "list_configs",
    "resolve_config_file",
]

#: Folder of the packaged configs.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CONFIG_SUFFIXES = (".yaml", ".py")


class ConfigFileNotFoundError(UserError, FileNotFoundError):
    """A config file that is neither a file nor a packaged config's name."""


def list_configs() -> List[str]:
    """Names (relative to :data:`CONFIG_DIR`) of every packaged config, ``Base-`` files included."""
    names = []
    for root, _, files in os.walk(CONFIG_DIR):
        for f in files:
            if f.endswith(_CONFIG_SUFFIXES) and not f.startswith("__"):
                names.append(os.path.relpath(os.path.join(root, f), CONFIG_DIR))
    return sorted(n.replace(os.sep, "/") for n in names)


def get_config_file(name: str) -> str:
    """Absolute path of the packaged config ``name``.

    Args:
        name (str): e.g. ``"cascade_mask_rcnn_R_50_FPN_3x.yaml"`` or
            ``"lazy/cascade_mask_rcnn_R_50_FPN_1x.py"``; ``.yaml`` may be left out.

    Raises:
        ConfigFileNotFoundError: no packaged config of that name (the message lists them).
    """
    rel = name.replace("\\", "/").lstrip("/")
    if rel.startswith("configs/"):  # a repository-relative path used from another folder
        rel = rel[len("configs/") :]
    for candidate in (rel, rel + ".yaml"):
        path = os.path.join(CONFIG_DIR, *candidate.split("/"))
        if candidate.endswith(_CONFIG_SUFFIXES) and os.path.isfile(path):
            return path
    raise ConfigFileNotFoundError(
        f"{name!r} is not a config shipped with cmrcnn_ext. Packaged configs: "
        + ", ".join(n for n in list_configs() if not n.split("/")[-1].startswith("Base-"))
    )


def resolve_config_file(name_or_path: str) -> str:
    """``name_or_path`` if it is an existing file, else the packaged config of that name.

    Raises:
        ConfigFileNotFoundError: neither a file nor a packaged config (the message says both).
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    try:
        return get_config_file(name_or_path)
    except ConfigFileNotFoundError as e:
        raise ConfigFileNotFoundError(
            f"Config file {name_or_path!r} does not exist, and it is not the name of a config "
            f"shipped with cmrcnn_ext. {str(e).split('. ', 1)[1]}"
        ) from None


def get_config(name: str):
    """The packaged config ``name`` loaded: a ``CfgNode`` with cmrcnn_ext's keys for ``.yaml``
    (not validated, not frozen), a LazyConfig ``omegaconf.DictConfig`` for ``.py``."""
    path = get_config_file(name)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from detectron2.config import get_cfg

    from cmrcnn_ext.config.defaults import add_cmrcnn_config

    cfg = add_cmrcnn_config(get_cfg())
    cfg.merge_from_file(path)
    return cfg
