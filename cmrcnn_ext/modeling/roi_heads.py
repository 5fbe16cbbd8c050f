"""Cascade Mask R-CNN ROI heads with a choice of which stages carry a mask head.

Cai & Vasconcelos, "Cascade R-CNN: High Quality Object Detection and Instance Segmentation"
(TPAMI 2019), Sec. 6, study where to put the mask branch of a cascade: on the first stage,
on the last, or on every stage. Detectron2's built-in :class:`CascadeROIHeads` only does the
first; this subclass adds the others, per-stage loss weights and a test-time mask merge.
"""
import logging
import math
import re
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from cmrcnn_ext.modeling.box_inference import fast_rcnn_inference_prefix
from cmrcnn_ext.config.defaults import MASK_STAGES_CHOICES, TEST_MASK_MERGE_CHOICES
from cmrcnn_ext.modeling.roi_align import use_fast_roi_align

_STAGE_SUFFIX = re.compile(r"_stage(\d+)$")
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
            fast_roi_align: use :class:`~cmrcnn_ext.modeling.roi_align.FastROIAlign` in the box and mask
                poolers (same numbers as torchvision's ROIAlign to ~1e-6, faster on the CPU).
            prefix_nms: test-time class-wise NMS on the highest-scoring candidates first
                (:mod:`cmrcnn_ext.modeling.box_inference`): Detectron2's detections, found faster when
                many (box, class) candidates pass the score threshold.
            kwargs: arguments of :class:`CascadeROIHeads`.
        """
        super().__init__(**kwargs)
        num_stages = self.num_cascade_stages
        if stage_loss_weights is None:
            stage_loss_weights = [1.0] * num_stages
        check_cascade_mask_args(mask_stages, stage_loss_weights, test_mask_merge, num_stages)
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
        self.fast_roi_align = fast_roi_align
        self.prefix_nms = prefix_nms
        if fast_roi_align:
            for pooler in (self.box_pooler, getattr(self, "mask_pooler", None)):
                if pooler is not None:
                    use_fast_roi_align(pooler)
        # Stage index -> that stage's labelled input boxes, kept only during a training forward.
        self._stage_inputs: Optional[Dict[int, List[Instances]]] = None

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
        if isinstance(self.mask_head, nn.ModuleList):
            return list(self.mask_head)
        return [self.mask_head]

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
        if not self.training and self.prefix_nms and not torch.jit.is_tracing():
            # Tracing (Detectron2's TracingAdapter) takes Detectron2's own inference: the prefix
            # search decides in Python how many candidates to keep, which a trace would freeze.
            return self._inference_boxes(features, proposals)
        if self._stage_inputs is not None:
            self._stage_inputs[0] = proposals
        out = super()._forward_box(features, proposals, targets)
        if not self.training:
            return out
        return {name: loss * self._stage_weight(name) for name, loss in out.items()}

    def _inference_boxes(self, features, proposals):
        """Test-time boxes as Detectron2's cascade computes them (each stage refines the previous
        stage's boxes; class scores averaged over the stages; the last stage's boxes), with the
        final NMS of :func:`~cmrcnn_ext.modeling.box_inference.fast_rcnn_inference_prefix`."""
        features = [features[f] for f in self.box_in_features]
        image_sizes = [p.image_size for p in proposals]
        stage_scores, boxes = [], None
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictions = self._run_stage(features, proposals, k)
            predictor = self.box_predictor[k]
            boxes = predictor.predict_boxes(predictions, proposals)
            stage_scores.append(predictor.predict_probs(predictions, proposals))
        scores = [sum(per_image) * (1.0 / self.num_cascade_stages) for per_image in zip(*stage_scores)]
        instances, _ = fast_rcnn_inference_prefix(
            boxes, scores, image_sizes, predictor.test_score_thresh, predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        return instances

    def _stage_weight(self, loss_name: str) -> float:
        match = _STAGE_SUFFIX.search(loss_name)
        return self.stage_loss_weights[int(match.group(1))] if match else 1.0

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        proposals = super()._match_and_label_boxes(proposals, stage, targets)
        if self._stage_inputs is not None and stage in self.mask_train_stages():
            # Detectron2 labels later stages with gt_classes / gt_boxes only; the mask loss
            # also needs each box's matched ground-truth mask.
            for props, gts in zip(proposals, targets):
                if len(gts) and gts.has("gt_masks"):
                    iou = pairwise_iou(gts.gt_boxes, props.proposal_boxes)
                    matched_idxs, _ = self.proposal_matchers[stage](iou)
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
            logits = head.layers(x)
            if logits.shape[1] == 1:  # class-agnostic masks
                p = logits[rows].sigmoid()
            else:
                p = logits[rows, classes][:, None].sigmoid()
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


def adapt_mask_head_keys(state_dict, head_prefix: str, head_states, staged: bool) -> None:
    """Rename mask-head tensors of ``state_dict`` (in place) to the model's layout.

    - One head in the checkpoint (``<head_prefix>mask_fcn1.weight``..., Detectron2's built-in
      cascade or ``MASK_STAGES`` first / last), per-stage heads in the model (``MASK_STAGES``
      all, ``<head_prefix><stage>.mask_fcn1.weight``): the head is copied to every stage.
    - Per-stage heads in the checkpoint, one in the model: the last stage's head is loaded (at
      test time masks come from the final boxes, which the last stage's head was trained on).

    A copied tensor whose shape differs from the model's (another number of classes in the
    predictor) is left out with a warning, so the model keeps its initialisation there, as
    Detectron2's checkpointer does for same-named tensors. Nothing is done when the layouts
    already agree.

    Args:
        state_dict (dict): the state being loaded (modified in place).
        head_prefix (str): e.g. ``"roi_heads.mask_head."``.
        head_states (list[dict]): the model's mask heads' own ``state_dict()``, in stage order.
        staged (bool): whether the model holds one head per stage (an ``nn.ModuleList``).
    """
    single, per_stage = [], {}
    for key in list(state_dict):
        if not key.startswith(head_prefix):
            continue
        first, _, rest = key[len(head_prefix):].partition(".")
        if first.isdigit() and rest:
            per_stage.setdefault(int(first), []).append(key)
        else:
            single.append(key)
    if staged and single and not per_stage:
        wrong = []
        for key in single:
            value, name = state_dict.pop(key), key[len(head_prefix):]
            for stage, target in enumerate(head_states):
                if name in target and target[name].shape != value.shape:
                    wrong.append(f"{head_prefix}{stage}.{name}")
                    continue
                state_dict[f"{head_prefix}{stage}.{name}"] = value
        logger.info(
            "The checkpoint has one mask head (%s*, e.g. Detectron2's built-in cascade) and the "
            "model one per stage (MODEL.CMRCNN.MASK_STAGES all): copied it to the mask heads of "
            "stages %s.",
            head_prefix,
            ", ".join(str(s + 1) for s in range(len(head_states))),
        )
        if wrong:
            logger.warning(
                "Not loading %d mask-head tensor(s) whose shape differs from the model's (another "
                "number of classes?); they keep their initialization: %s",
                len(wrong),
                ", ".join(wrong),
            )
    elif not staged and per_stage and not single:
        last = max(per_stage)
        for stage, keys in per_stage.items():
            for key in keys:
                value = state_dict.pop(key)
                if stage == last:
                    state_dict[head_prefix + key[len(head_prefix):].partition(".")[2]] = value
        logger.info(
            "The checkpoint has one mask head per stage (%s{0..%d}.*) and the model one mask "
            "head: loaded the last stage's (stage %d) head, dropped the others.",
            head_prefix,
            last,
            last + 1,
        )


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
    if not all(isinstance(h, BaseMaskRCNNHead) and type(h).forward is BaseMaskRCNNHead.forward
               for h in heads):
        return False
    return sum(len(i) for i in instances) > 0


def check_cascade_mask_args(mask_stages, stage_loss_weights, test_mask_merge, num_stages):
    """Raise ``ValueError`` naming the config key if the cascade-mask arguments are invalid."""
    if mask_stages not in MASK_STAGES_CHOICES:
        raise ValueError(
            f"MODEL.CMRCNN.MASK_STAGES={mask_stages!r} is not one of {MASK_STAGES_CHOICES}."
        )
    if test_mask_merge not in TEST_MASK_MERGE_CHOICES:
        raise ValueError(
            f"MODEL.CMRCNN.TEST_MASK_MERGE={test_mask_merge!r} is not one of "
            f"{TEST_MASK_MERGE_CHOICES}."
        )
    if test_mask_merge == "mean" and mask_stages != "all":
        raise ValueError(
            f"MODEL.CMRCNN.TEST_MASK_MERGE='mean' averages per-stage mask heads, but "
            f"MODEL.CMRCNN.MASK_STAGES={mask_stages!r} builds only one. Set MASK_STAGES 'all' "
            "or TEST_MASK_MERGE 'last'."
        )
    weights = list(stage_loss_weights)
    if len(weights) != num_stages:
        raise ValueError(
            f"MODEL.CMRCNN.STAGE_LOSS_WEIGHTS has {len(weights)} values {weights} but the cascade "
            f"has {num_stages} stages (MODEL.ROI_BOX_CASCADE_HEAD.IOUS); give one weight per stage."
        )
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(
            f"MODEL.CMRCNN.STAGE_LOSS_WEIGHTS={weights}: every weight must be a finite number >= 0."
        )
