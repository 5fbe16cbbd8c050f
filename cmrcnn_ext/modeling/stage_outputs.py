"""Every cascade stage's outputs at inference: input boxes, regressed boxes, class probabilities
and each mask head's probabilities, per image.

The cascade's test-time output mixes its stages (boxes of the last stage, class scores averaged
over all stages, masks of one head or the mean of several). :func:`record_stage_outputs` keeps
what each stage computed on the way, for analysis (``python -m cmrcnn_ext.analyze``) or your
own code::

    from cmrcnn_ext.modeling import record_stage_outputs

    with record_stage_outputs(model) as recorder:
        outputs = model(inputs)               # the usual outputs, unchanged
    for image in recorder.images:             # one ImageStages per input image, same order
        image.stage_boxes[k]                  # (R, 4) boxes regressed by stage k (0-based)
        image.stage_probs[k]                  # (R, K + 1) stage k's class probabilities
        image.mask_probs[k]                   # (N, 1, M, M) stage k's mask head on the N final
                                              # detections (stages with a mask head)

Boxes are in the coordinates of the network input (``image.image_size``), as Detectron2's
``Instances`` before ``detector_postprocess``. The recorder keeps the last forward call's
images; each call replaces them.

How: :class:`~cmrcnn_ext.modeling.roi_heads.CascadeMaskROIHeads` hands each stage's inputs and
predictions (from Detectron2's own stage loop, ``_run_stage``) and the final detections (from
``_forward_mask``) to the recorder set on it; outside the block no recorder is set and the
heads do nothing extra (one ``is None`` check per stage; outputs equal with and without a
recorder: ``tests/test_stage_report.py``).
"""

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from cmrcnn_ext.errors import UserError
from cmrcnn_ext.modeling.mask_head import class_mask_probs

__all__ = ["ImageStages", "StageRecorder", "cascade_heads_of", "record_stage_outputs"]


@dataclass
class ImageStages:
    """What every stage of the cascade computed for one image (network-input coordinates).

    Attributes:
        image_size: (height, width) of the network input.
        proposals: (P, 4) the RPN's proposals, stage 1's input, in the RPN's order (by
            decreasing objectness).
        objectness_logits: (P,) their objectness logits (empty when proposals come without).
        stage_inputs: per stage, (R, 4) its input boxes (stage 0: the proposals; stage k: the
            boxes regressed by stage k - 1, clipped to the image).
        stage_boxes: per stage, its regressed boxes, (R, 4) (class-agnostic) or (R, 4K).
        stage_probs: per stage, (R, K + 1) softmax class probabilities (last column:
            background).
        final_boxes: (N, 4) the N final detections' boxes (None until the mask step ran).
        final_classes: (N,) their classes.
        mask_probs: stage index -> (N, 1, M, M) that stage's mask head's probabilities of each
            final detection's class; empty without masks.
    """

    image_size: Tuple[int, int]
    proposals: torch.Tensor
    objectness_logits: torch.Tensor
    stage_inputs: List[torch.Tensor] = field(default_factory=list)
    stage_boxes: List[torch.Tensor] = field(default_factory=list)
    stage_probs: List[torch.Tensor] = field(default_factory=list)
    final_boxes: Optional[torch.Tensor] = None
    final_classes: Optional[torch.Tensor] = None
    mask_probs: Dict[int, torch.Tensor] = field(default_factory=dict)


class StageRecorder:
    """Receives the stages' outputs from :class:`CascadeMaskROIHeads` during inference.

    Attributes:
        images (list[ImageStages]): the last forward call's images, in input order.
    """

    def __init__(self):
        self.images: List[ImageStages] = []

    @torch.no_grad()
    def add_stage(self, predictor, stage: int, proposals, predictions) -> None:
        """Record stage ``stage``: its input boxes and what its predictor makes of them.

        Args:
            predictor: the stage's ``FastRCNNOutputLayers``.
            stage: 0-based stage index; stage 0 starts a new forward call.
            proposals (list[Instances]): the stage's input boxes per image.
            predictions: the predictor's raw output for them (class logits, box deltas).
        """
        if stage == 0:
            self.images = [
                ImageStages(
                    image_size=tuple(p.image_size),
                    proposals=p.proposal_boxes.tensor.detach(),
                    objectness_logits=(
                        p.objectness_logits.detach()
                        if p.has("objectness_logits")
                        else p.proposal_boxes.tensor.new_zeros(0)
                    ),
                )
                for p in proposals
            ]
        boxes = predictor.predict_boxes(predictions, proposals)
        probs = predictor.predict_probs(predictions, proposals)
        for image, p, b, s in zip(self.images, proposals, boxes, probs):
            image.stage_inputs.append(p.proposal_boxes.tensor.detach())
            image.stage_boxes.append(b.detach())
            image.stage_probs.append(s.detach())

    @torch.no_grad()
    def add_masks(self, roi_heads, features, instances) -> None:
        """Record every mask head's probabilities on the final detections ``instances``."""
        heads = roi_heads._mask_heads()
        stages = roi_heads.mask_train_stages()
        counts = [len(i) for i in instances]
        for image, inst in zip(self.images, instances):
            image.final_boxes = inst.pred_boxes.tensor.detach()
            image.final_classes = inst.pred_classes.detach()
        if sum(counts) == 0:
            return
        x = roi_heads._pool_mask_features(features, [i.pred_boxes for i in instances])
        classes = torch.cat([i.pred_classes for i in instances])
        for head, stage in zip(heads, stages):
            probs = class_mask_probs(head.layers(x), classes)
            for image, p in zip(self.images, probs.split(counts)):
                image.mask_probs[stage] = p


def cascade_heads_of(model: nn.Module):
    """The :class:`CascadeMaskROIHeads` of ``model`` (a ``GeneralizedRCNN``, possibly wrapped
    by ``DistributedDataParallel`` or another module with a ``module`` / ``model`` attribute).

    Raises:
        UserError: the model has no cmrcnn_ext cascade heads.
    """
    from cmrcnn_ext.modeling.roi_heads import CascadeMaskROIHeads

    inner = model
    for _ in range(4):
        heads = getattr(inner, "roi_heads", None)
        if isinstance(heads, CascadeMaskROIHeads):
            return heads
        inner = getattr(inner, "module", None) or getattr(inner, "model", None)
        if inner is None:
            break
    raise UserError(
        "per-stage outputs need cmrcnn_ext's cascade heads: set MODEL.ROI_HEADS.NAME "
        f"CascadeMaskROIHeads (the model's ROI heads are {type(heads).__name__ if heads else None})"
    )


@contextlib.contextmanager
def record_stage_outputs(model: nn.Module):
    """Inside the block, ``model``'s inference records every stage's outputs.

    Args:
        model: a ``GeneralizedRCNN`` with :class:`CascadeMaskROIHeads` (or a wrapper of one).

    Yields:
        StageRecorder: its ``images`` hold the last forward call's stages, per image.
    """
    heads = cascade_heads_of(model)
    if heads._stage_recorder is not None:
        raise RuntimeError("record_stage_outputs is already active on this model")
    recorder = StageRecorder()
    heads._stage_recorder = recorder
    try:
        yield recorder
    finally:
        heads._stage_recorder = None
