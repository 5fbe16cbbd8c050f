"""The model: cascade ROI heads with per-stage mask heads, the mask head, ROIAlign, NMS and the
recorder of every stage's test-time outputs.

Importing it registers ``CascadeMaskROIHeads`` (``ROI_HEADS_REGISTRY``) and
``CMRCNNConvUpsampleHead`` (``ROI_MASK_HEAD_REGISTRY``).
"""

from cmrcnn_ext.modeling.mask_head import CMRCNNConvUpsampleHead
from cmrcnn_ext.modeling.roi_heads import CascadeMaskROIHeads
from cmrcnn_ext.modeling.stage_outputs import ImageStages, StageRecorder, record_stage_outputs

__all__ = [
    "CascadeMaskROIHeads",
    "CMRCNNConvUpsampleHead",
    "ImageStages",
    "StageRecorder",
    "record_stage_outputs",
]
