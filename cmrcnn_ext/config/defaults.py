"""Adding cmrcnn_ext's keys to a Detectron2 config.

Call :func:`add_cmrcnn_config` on a fresh ``get_cfg()`` before ``merge_from_file``. It never
changes Detectron2's global default config. The keys, their defaults and allowed values are
declared in :mod:`cmrcnn_ext.config.schema`.
"""

import copy

from detectron2.config import CfgNode as CN

from cmrcnn_ext.config.schema import KEYS, RENAMED, RENAMED_NOTE

__all__ = ["add_cmrcnn_config"]


def add_cmrcnn_config(cfg):
    """Add cmrcnn_ext's keys (:data:`cmrcnn_ext.config.schema.KEYS`) to ``cfg`` in place.

    Each key gets its default; nodes (``MODEL.CMRCNN``...) are created as needed. Former key
    names (:data:`cmrcnn_ext.config.schema.RENAMED`) are registered with yacs, so merging a
    file or command line that uses one raises a ``KeyError`` naming the current key. Calling it
    twice is harmless: keys that already exist keep their values.

    Args:
        cfg (CfgNode): typically ``detectron2.config.get_cfg()``; not frozen.

    Returns:
        CfgNode: ``cfg``.
    """
    for entry in KEYS:
        *parents, name = entry.key.split(".")
        node = cfg
        for part in parents:
            if part not in node:
                setattr(node, part, CN())
            node = node[part]
        if name not in node:
            # a copy: configs must not share (and mutate) the schema's lists
            setattr(node, name, copy.deepcopy(entry.default))
    for old, new in RENAMED.items():
        if not cfg.key_is_renamed(old):
            cfg.register_renamed_key(old, new, RENAMED_NOTE)
    return cfg
