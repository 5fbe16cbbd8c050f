"""cmrcnn_ext: Cascade Mask R-CNN for Detectron2.

``import cmrcnn_ext`` registers the heads in Detectron2's registries:

- ``CascadeMaskROIHeads`` in ``ROI_HEADS_REGISTRY``
- ``CMRCNNConvUpsampleHead`` in ``ROI_MASK_HEAD_REGISTRY``

and exposes :func:`add_cmrcnn_config`, which adds the ``MODEL.CMRCNN.*`` keys to a config.
"""

from cmrcnn_ext import compat

compat.import_detectron2_quietly()  # before anything else imports Detectron2
from cmrcnn_ext import model_zoo  # noqa: E402, F401  (the packaged configs, by name)
from cmrcnn_ext.config.defaults import add_cmrcnn_config  # noqa: E402
from cmrcnn_ext.config.validate import ConfigError, validate_config  # noqa: E402
from cmrcnn_ext.modeling.mask_head import CMRCNNConvUpsampleHead  # noqa: E402
from cmrcnn_ext.modeling.roi_heads import CascadeMaskROIHeads  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "add_cmrcnn_config",
    "CascadeMaskROIHeads",
    "CMRCNNConvUpsampleHead",
    "ConfigError",
    "get_cfg",
    "validate_config",
]


def get_cfg():
    """Detectron2's default config with cmrcnn_ext's keys added."""
    from detectron2.config import get_cfg as d2_get_cfg

    return add_cmrcnn_config(d2_get_cfg())
