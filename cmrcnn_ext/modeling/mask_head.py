"""Mask head of cmrcnn_ext: Detectron2's conv-upsample head plus probability output."""

from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
)
from detectron2.structures import Instances
from torch import nn


@ROI_MASK_HEAD_REGISTRY.register()
class CMRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """Mask R-CNN's ``num_conv`` convs + deconv head, with the same layers and parameter names as
    Detectron2's :class:`MaskRCNNConvUpsampleHead` (checkpoints load either way).

    It adds :meth:`mask_probs`, which :class:`~cmrcnn_ext.modeling.roi_heads.CascadeMaskROIHeads`
    uses to average the mask probabilities of several heads at test time, and, with
    ``channels_last_cpu`` (``MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD``), has a float32 CPU inference
    path: the convolutions run in channels-last memory format, and the 2x2 stride-2 deconv, its ReLU
    and the 1x1 predictor run as two matrix products on the channels-last rows
    (:meth:`_upsample_predict`). Same numbers up to float rounding (~1e-7 on the logits, tested),
    faster than the NCHW layers (docs/performance.md). In training, under autocast and on CUDA the
    layers run as Detectron2 runs them (channels-last was slower for the bfloat16 backward on the
    CPU).
    """

    @configurable
    def __init__(self, input_shape, *, channels_last_cpu: bool = False, **kwargs):
        super().__init__(input_shape, **kwargs)
        self.channels_last_cpu = bool(channels_last_cpu)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["channels_last_cpu"] = cfg.MODEL.get("CMRCNN", {}).get("CHANNELS_LAST_MASK_HEAD", False)
        return ret

    def layers(self, x):
        if not self._cpu_fast_path(x):
            return super().layers(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.conv_norm_relus:
            x = layer(x)
        if self._fused_upsample_ok():
            return self._upsample_predict(x)
        for layer in (self.deconv, self.deconv_relu, self.predictor):
            x = layer(x)
        return x

    def _cpu_fast_path(self, x: torch.Tensor) -> bool:
        return (
            self.channels_last_cpu
            and not self.training
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_scripting()
            and not torch.jit.is_tracing()
        )

    def _fused_upsample_ok(self) -> bool:
        d, p = self.deconv, self.predictor
        return (
            isinstance(d, torch.nn.ConvTranspose2d)
            and tuple(d.kernel_size) == (2, 2)
            and tuple(d.stride) == (2, 2)
            and tuple(d.padding) == (0, 0)
            and tuple(d.output_padding) == (0, 0)
            and tuple(d.dilation) == (1, 1)
            and d.groups == 1
            and type(self.deconv_relu) is torch.nn.ReLU
            and isinstance(p, torch.nn.Conv2d)
            and tuple(p.kernel_size) == (1, 1)
            and tuple(p.stride) == (1, 1)
            and tuple(p.padding) == (0, 0)
            and p.groups == 1
            and getattr(d, "norm", None) is None
            and getattr(d, "activation", None) is None
            and getattr(p, "norm", None) is None
            and getattr(p, "activation", None) is None
        )

    def _upsample_predict(self, x: torch.Tensor) -> torch.Tensor:
        """``predictor(relu(deconv(x)))`` for the 2x2 stride-2 deconv, as two matrix products.

        Each input pixel of a 2x2 stride-2 transposed convolution writes its own 2x2 output block:
        ``out[2i+a, 2j+b] = W[:, :, a, b]^T x[i, j] + bias``, one (C_in, 4 C_out) product per
        pixel. The 1x1 predictor acts pixel by pixel, so it is applied to these blocks before
        they are laid out as a 2x upsampled image; only the (R, classes, 2H, 2W) logits are
        rearranged, not the C_out-channel upsampled features. Same sums as the layers (float
        rounding ~1e-7), and the channels-last rows need no copies.
        """
        n, c, h, w = x.shape
        d, p = self.deconv, self.predictor
        c_out, k = d.out_channels, p.out_channels
        # (C_in, C_out, 2, 2) -> (C_in, [a, b, C_out])
        w_up = d.weight.permute(0, 2, 3, 1).reshape(c, 4 * c_out)
        b_up = d.bias.repeat(4) if d.bias is not None else None
        w_pred = p.weight.reshape(k, c_out).t()
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view for channels-last x
        up = rows @ w_up if b_up is None else torch.addmm(b_up, rows, w_up)
        up = up.relu_().view(n * h * w * 4, c_out)
        logits = up @ w_pred if p.bias is None else torch.addmm(p.bias, up, w_pred)
        # (n, i, j, a, b, k) -> (n, k, 2i + a, 2j + b)
        return logits.view(n, h, w, 2, 2, k).permute(0, 5, 1, 3, 2, 4).reshape(n, k, 2 * h, 2 * w)

    def mask_probs(self, x: torch.Tensor, instances: List[Instances]) -> torch.Tensor:
        """Sigmoid mask probabilities of each instance's predicted class.

        Args:
            x (Tensor): pooled region features, (R, C, H, W), for the boxes of ``instances``
                concatenated in image order.
            instances (list[Instances]): with field ``pred_classes`` (one per region).

        Returns:
            Tensor: (R, 1, M, M) probabilities in [0, 1].
        """
        return class_mask_probs(self.layers(x), torch.cat([i.pred_classes for i in instances]))


def class_mask_probs(
    logits: torch.Tensor, classes: torch.Tensor, rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Sigmoid probabilities of each detection's class channel, as Detectron2's
    ``mask_rcnn_inference`` selects them (the one channel of class-agnostic logits).

    Args:
        logits (Tensor): (R, K or 1, M, M) mask logits.
        classes (Tensor): (N,) class of each detection.
        rows (Tensor or None): (N,) row of ``logits`` for each detection; default row i.

    Returns:
        Tensor: (N, 1, M, M) probabilities.
    """
    if rows is None:
        rows = torch.arange(logits.shape[0], device=logits.device)
    if logits.shape[1] == 1:  # class-agnostic masks
        return logits[rows].sigmoid()
    return logits[rows, classes][:, None].sigmoid()


def mask_heads(mask_head: nn.Module) -> List[nn.Module]:
    """The mask heads held by ROI heads' ``mask_head``: one, or one per cascade stage (an
    ``nn.ModuleList``, ``MODEL.CMRCNN.MASK_STAGES`` "all")."""
    return list(mask_head) if isinstance(mask_head, nn.ModuleList) else [mask_head]
