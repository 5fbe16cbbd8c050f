"""The model: cascade ROI heads with per-stage mask heads, the mask head, ROIAlign and NMS.

Importing it registers ``CascadeMaskROIHeads`` (``ROI_HEADS_REGISTRY``) and
``CMRCNNConvUpsampleHead`` (``ROI_MASK_HEAD_REGISTRY``).
"""

from cmrcnn_ext.modeling.mask_head import CMRCNNConvUpsampleHead
from cmrcnn_ext.modeling.roi_heads import CascadeMaskROIHeads

__all__ = ["CascadeMaskROIHeads", "CMRCNNConvUpsampleHead"]
