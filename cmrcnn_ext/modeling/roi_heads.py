"""Cascade Mask R-CNN ROI heads with a choice of which stages carry a mask head.

Cai & Vasconcelos, "Cascade R-CNN: High Quality Object Detection and Instance Segmentation"
(TPAMI 2019), Sec. 6, study where to put the mask branch of a cascade: on the first stage,
on the last, or on every stage. Detectron2's built-in :class:`CascadeROIHeads` only does the
first; this subclass adds the others, per-stage loss weights and a test-time mask merge.
"""

import logging
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from cmrcnn_ext.compat import cascade_final_nms
from cmrcnn_ext.config.validate import check_values
from cmrcnn_ext.modeling.box_inference import fast_rcnn_inference_prefix
from cmrcnn_ext.modeling.mask_head import class_mask_probs, mask_heads
from cmrcnn_ext.modeling.mask_head_layout import adapt_mask_head_keys
from cmrcnn_ext.modeling.roi_align import use_fast_roi_align

logger = logging.getLogger(__name__)


@ROI_HEADS_REGISTRY.register()
class CascadeMaskROIHeads(CascadeROIHeads):
    """Detectron2's cascade ROI heads with configurable mask stages.

    With ``mask_stages="first"`` and unit ``stage_loss_weights`` it is numerically identical to
    Detectron2's :class:`CascadeROIHeads` (same parameters, same losses, same outputs).

    Training: the box stages run exactly as in Detectron2 (stage 1 on sampled proposals; stage
    ``k > 1`` on all boxes regressed by stage ``k - 1``, relabelled at its own IoU threshold).
    The mask head of stage ``k`` is trained on the foreground boxes of stage ``k``'s input.
    Each stage's box losses, and the mask loss of its mask head, are multiplied by
    ``stage_loss_weights[k]``.

    Inference: boxes and scores as in Detectron2; masks are predicted on the final boxes by
    the (last) mask head, or, with ``test_mask_merge="mean"``, by every stage's mask head with
    their sigmoid probabilities averaged.
    """

    @configurable
    def __init__(
        self,
        *,
        mask_stages: str = "first",
        stage_loss_weights: Optional[Sequence[float]] = None,
        test_mask_merge: str = "last",
        fast_roi_align: bool = False,
        prefix_nms: bool = False,
        **kwargs,
    ):
        """
        Args:
            mask_stages: "first", "last" or "all" (see ``MODEL.CMRCNN.MASK_STAGES``). With
                "all", ``mask_head`` must be an ``nn.ModuleList`` with one head per stage.
            stage_loss_weights: one weight >= 0 per stage; default all 1.
            test_mask_merge: "last" or "mean" ("mean" needs ``mask_stages="all"``).
            fast_roi_align: use :class:`~cmrcnn_ext.modeling.roi_align.FastROIAlign` in the box
                and mask poolers (torchvision's ROIAlign numbers to ~1e-6, faster on the CPU).
            prefix_nms: test-time class-wise NMS on the highest-scoring candidates first
                (:mod:`cmrcnn_ext.modeling.box_inference`): Detectron2's detections, found faster
                when many (box, class) candidates pass the score threshold.
            kwargs: arguments of :class:`CascadeROIHeads`.
        """
        super().__init__(**kwargs)
        num_stages = self.num_cascade_stages
        if stage_loss_weights is None:
            stage_loss_weights = [1.0] * num_stages
        check_values(  # the config's rules (ConfigError naming each key), for direct callers too
            {
                "MODEL.CMRCNN.MASK_STAGES": mask_stages,
                "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS": list(stage_loss_weights),
                "MODEL.CMRCNN.TEST_MASK_MERGE": test_mask_merge,
            },
            num_stages=num_stages,
        )
        self.mask_stages = mask_stages
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.test_mask_merge = test_mask_merge
        if self.mask_on:
            heads = self._mask_heads()
            expected = num_stages if mask_stages == "all" else 1
            if len(heads) != expected:
                raise ValueError(
                    f"MODEL.CMRCNN.MASK_STAGES={mask_stages!r} needs {expected} mask head(s), "
                    f"got {len(heads)}."
                )
            if test_mask_merge == "mean" and not all(hasattr(h, "mask_probs") for h in heads):
                raise ValueError(
                    "MODEL.CMRCNN.TEST_MASK_MERGE='mean' needs mask heads with mask_probs(); "
                    "set MODEL.ROI_MASK_HEAD.NAME to 'CMRCNNConvUpsampleHead'."
                )
        # Stage k's box losses are weighted by its box predictor (Detectron2's per-loss
        # ``loss_weight``), so the weights apply by stage index.
        for predictor, weight in zip(self.box_predictor, self.stage_loss_weights):
            predictor.loss_weight = _scaled_loss_weight(predictor.loss_weight, weight)
        self.fast_roi_align = fast_roi_align
        self.prefix_nms = prefix_nms
        if fast_roi_align:
            for pooler in (self.box_pooler, getattr(self, "mask_pooler", None)):
                if pooler is not None:
                    use_fast_roi_align(pooler)
        # The mask heads' training inputs: stage index -> that stage's labelled input boxes (with
        # gt_masks), filled by _forward_box (stage 0) and _match_and_label_boxes (later stages)
        # during a training forward and read by _mask_losses; None outside of it.
        self._stage_inputs: Optional[Dict[int, List[Instances]]] = None
        # Set only inside cmrcnn_ext.modeling.stage_outputs.record_stage_outputs: receives every
        # stage's test-time outputs; None otherwise (then nothing extra runs).
        self._stage_recorder = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(
            mask_stages=cfg.MODEL.CMRCNN.MASK_STAGES,
            stage_loss_weights=list(cfg.MODEL.CMRCNN.STAGE_LOSS_WEIGHTS),
            test_mask_merge=cfg.MODEL.CMRCNN.TEST_MASK_MERGE,
            fast_roi_align=cfg.MODEL.CMRCNN.FAST_ROI_ALIGN,
            prefix_nms=cfg.MODEL.CMRCNN.PREFIX_NMS,
        )
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if ret and cfg.MODEL.CMRCNN.MASK_STAGES == "all":
            heads = [ret["mask_head"]]
            for _ in range(len(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS) - 1):
                heads.append(super()._init_mask_head(cfg, input_shape)["mask_head"])
            ret["mask_head"] = nn.ModuleList(heads)
        return ret

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Load checkpoints with one mask head into per-stage heads and back (logged).

        Every loader calls this (``DetectionCheckpointer``, ``DefaultPredictor``, export, the
        project's checkpointer), as Detectron2's PointRend heads convert old weights here. It
        renames keys of ``state_dict`` under ``prefix + "mask_head."`` before the heads load them
        (:func:`adapt_mask_head_keys`); the rest is ``nn.Module``'s loading.
        """
        heads = self._mask_heads() if self.mask_on else []
        if heads:
            staged = isinstance(self.mask_head, nn.ModuleList)
            adapt_mask_head_keys(
                state_dict, prefix + "mask_head.", [h.state_dict() for h in heads], staged
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _mask_heads(self) -> List[nn.Module]:
        return mask_heads(self.mask_head)

    def mask_train_stages(self) -> List[int]:
        """Indices (0-based) of the stages whose mask head is trained, one per mask head."""
        last = self.num_cascade_stages - 1
        return {"first": [0], "last": [last], "all": list(range(last + 1))}[self.mask_stages]

    def forward(self, images, features, proposals, targets=None):
        self._stage_inputs = {} if self.training and self.mask_on else None
        try:
            return super().forward(images, features, proposals, targets)
        finally:
            self._stage_inputs = None

    def _forward_box(self, features, proposals, targets=None):
        if self._stage_inputs is not None:
            self._stage_inputs[0] = proposals  # stage 1's sampled proposals carry gt_masks
        if self.training or not self.prefix_nms or torch.jit.is_tracing():
            # Tracing (Detectron2's TracingAdapter) takes Detectron2's own final NMS: the prefix
            # search decides in Python how many candidates to keep, which a trace would freeze.
            return super()._forward_box(features, proposals, targets)
        with cascade_final_nms(fast_rcnn_inference_prefix):
            return super()._forward_box(features, proposals, targets)

    def _run_stage(self, features, proposals, stage):
        predictions = super()._run_stage(features, proposals, stage)
        if self._stage_recorder is not None and not self.training:
            self._stage_recorder.add_stage(self.box_predictor[stage], stage, proposals, predictions)
        return predictions

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        """Detectron2's labelling of stage ``stage``'s input boxes; for a stage whose mask head
        trains, each box also gets its matched ground truth's mask, from the same matching
        (the stage's matcher records the matched indices while Detectron2 labels)."""
        if self._stage_inputs is None or stage not in self.mask_train_stages():
            return super()._match_and_label_boxes(proposals, stage, targets)
        matcher = self.proposal_matchers[stage]
        recorder = _RecordingMatcher(matcher)
        self.proposal_matchers[stage] = recorder
        try:
            proposals = super()._match_and_label_boxes(proposals, stage, targets)
        finally:
            self.proposal_matchers[stage] = matcher
        assert len(recorder.matches) == len(proposals) == len(targets)
        for props, gts, matched_idxs in zip(proposals, targets, recorder.matches):
            if len(gts) and gts.has("gt_masks"):
                props.gt_masks = gts.gt_masks[matched_idxs]
        self._stage_inputs[stage] = proposals
        return proposals

    def _pool_mask_features(self, features, boxes):
        if self.mask_pooler is None:
            return {f: features[f] for f in self.mask_in_features}
        return self.mask_pooler([features[f] for f in self.mask_in_features], boxes)

    def _forward_mask(self, features, instances):
        if not self.mask_on:
            return {} if self.training else instances
        heads = self._mask_heads()
        if self.training:
            return self._mask_losses(features, instances, heads)
        if self._stage_recorder is not None:
            self._stage_recorder.add_masks(self, features, instances)
        used = heads[-1:] if len(heads) == 1 or self.test_mask_merge == "last" else heads
        if _shares_mask_rows(used, instances):
            return self._forward_mask_unique_boxes(features, instances, used)
        x = self._pool_mask_features(features, [i.pred_boxes for i in instances])
        if len(used) == 1:
            return used[0](x, instances)
        probs = sum(head.mask_probs(x, instances) for head in used) / len(used)
        _set_pred_masks(instances, probs)
        return instances

    def _forward_mask_unique_boxes(self, features, instances, heads):
        """Test-time masks with each distinct box of an image pooled and run through the mask
        head(s) once.

        The cascade's box regression is class-agnostic, so one proposal that passes the score
        threshold in several classes gives several detections with the same box; Detectron2 pools
        and runs the mask head for each of them. A mask head's logits depend only on the box, the
        class only picks the channel, so the logits of a distinct box serve every detection that
        has it: the same probabilities as Detectron2's ``mask_rcnn_inference`` (same rows of the
        same layers), with fewer rows.
        """
        unique_boxes, rows = [], []
        offset = 0
        for inst in instances:
            boxes = inst.pred_boxes.tensor
            uniq, inverse = torch.unique(boxes, dim=0, return_inverse=True)
            unique_boxes.append(Boxes(uniq))
            rows.append(inverse + offset)
            offset += len(uniq)
        x = self._pool_mask_features(features, unique_boxes)
        rows = torch.cat(rows)
        classes = torch.cat([i.pred_classes for i in instances])
        probs = None
        for head in heads:
            p = class_mask_probs(head.layers(x), classes, rows)
            probs = p if probs is None else probs + p
        if len(heads) > 1:
            probs = probs / len(heads)
        _set_pred_masks(instances, probs)
        return instances

    def _mask_losses(self, features, stage0_proposals, heads):
        losses = {}
        storage = get_event_storage()
        for head, stage in zip(heads, self.mask_train_stages()):
            proposals = stage0_proposals if stage == 0 else self._stage_inputs[stage]
            fg, _ = select_foreground_proposals(proposals, self.num_classes)
            x = self._pool_mask_features(features, [p.proposal_boxes for p in fg])
            weight = self.stage_loss_weights[stage]
            if len(heads) == 1:
                losses["loss_mask"] = head(x, fg)["loss_mask"] * weight
            else:
                with storage.name_scope(f"stage{stage}"):
                    losses[f"loss_mask_stage{stage}"] = head(x, fg)["loss_mask"] * weight
        return losses


class _RecordingMatcher:
    """A stage's ``Matcher`` that also keeps the matched ground-truth index of every box of each
    call (one call per image, in order)."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.matches: List[torch.Tensor] = []

    def __call__(self, match_quality_matrix):
        matched_idxs, labels = self.matcher(match_quality_matrix)
        self.matches.append(matched_idxs)
        return matched_idxs, labels

    def __getattr__(self, name):
        return getattr(self.matcher, name)


def _scaled_loss_weight(loss_weight, weight: float) -> Dict[str, float]:
    """A box predictor's ``loss_weight`` (a float or a per-loss dict) times ``weight``."""
    if not isinstance(loss_weight, dict):
        loss_weight = {"loss_cls": loss_weight, "loss_box_reg": loss_weight}
    names = set(loss_weight) | {"loss_cls", "loss_box_reg"}
    return {k: float(loss_weight.get(k, 1.0)) * weight for k in names}


def _set_pred_masks(instances: List[Instances], probs: torch.Tensor) -> None:
    """Give each image's instances its rows of ``probs`` (concatenated in image order).

    One image takes all rows without a split: a split by Python-side counts would be frozen
    into a trace (Detectron2's ``TracingAdapter`` traces one image), while the rows of one image
    are simply all of them.
    """
    if len(instances) == 1:
        instances[0].pred_masks = probs
        return
    for inst, p in zip(instances, probs.split([len(i) for i in instances])):
        inst.pred_masks = p


def _shares_mask_rows(heads, instances) -> bool:
    """Whether :meth:`CascadeMaskROIHeads._forward_mask_unique_boxes` gives what the heads' own
    inference gives: Detectron2 mask heads whose inference is ``layers`` + ``mask_rcnn_inference``
    (a subclass that overrides ``forward`` keeps its own path), eager mode (``torch.unique``
    is not traced), and detections to predict."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if not all(
        isinstance(h, BaseMaskRCNNHead) and type(h).forward is BaseMaskRCNNHead.forward
        for h in heads
    ):
        return False
    return sum(len(i) for i in instances) > 0
