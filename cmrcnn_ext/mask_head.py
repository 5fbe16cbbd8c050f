"""Mask head of cmrcnn_ext: Detectron2's conv-upsample head plus probability output."""
from typing import List

import torch

from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
)
from detectron2.structures import Instances


@ROI_MASK_HEAD_REGISTRY.register()
class CMRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """Mask R-CNN's ``num_conv`` convs + deconv head, with the same layers and parameter names as
    Detectron2's :class:`MaskRCNNConvUpsampleHead` (checkpoints load either way).

    It adds :meth:`mask_probs`, which :class:`~cmrcnn_ext.roi_heads.CascadeMaskROIHeads` uses to
    average the mask probabilities of several heads at test time.
    """

    def mask_probs(self, x: torch.Tensor, instances: List[Instances]) -> torch.Tensor:
        """Sigmoid mask probabilities of each instance's predicted class.

        Args:
            x (Tensor): pooled region features, (R, C, H, W), for the boxes of ``instances``
                concatenated in image order.
            instances (list[Instances]): with field ``pred_classes`` (one per region).

        Returns:
            Tensor: (R, 1, M, M) probabilities in [0, 1].
        """
        logits = self.layers(x)
        if logits.shape[1] == 1:  # class-agnostic mask
            return logits.sigmoid()
        classes = torch.cat([i.pred_classes for i in instances])
        index = torch.arange(logits.shape[0], device=logits.device)
        return logits[index, classes][:, None].sigmoid()
