"""MASK_STAGES first / last / all, STAGE_LOSS_WEIGHTS and TEST_MASK_MERGE do what they say."""

import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from torch import nn

from conftest import make_batch, tiny_cfg

IOUS = (0.5, 0.6, 0.7)


def build(stages, merge="last", weights=(1.0, 1.0, 1.0), seed=0):
    cfg = tiny_cfg(
        "MODEL.CMRCNN.MASK_STAGES",
        stages,
        "MODEL.CMRCNN.TEST_MASK_MERGE",
        merge,
        "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS",
        list(weights),
    )
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.mark.parametrize("stages,count", [("first", 1), ("last", 1), ("all", 3)])
def test_number_of_mask_heads(stages, count):
    model = build(stages)
    heads = model.roi_heads.mask_head
    if count == 1:
        assert not isinstance(heads, nn.ModuleList)
        assert not any(k.startswith("roi_heads.mask_head.1.") for k in model.state_dict())
    else:
        assert isinstance(heads, nn.ModuleList) and len(heads) == 3
        # independent parameters, one set per stage
        assert len({id(h.predictor.weight) for h in heads}) == 3
        for i in range(3):
            assert f"roi_heads.mask_head.{i}.predictor.weight" in model.state_dict()


def record_training(model, batch):
    """Train forward; returns losses, each stage's input boxes, and each mask-head call."""
    stage_inputs, mask_calls = {}, []
    roi = model.roi_heads
    orig_run_stage = roi._run_stage

    def run_stage(features, proposals, stage):
        stage_inputs[stage] = [p.proposal_boxes.tensor.clone() for p in proposals]
        return orig_run_stage(features, proposals, stage)

    heads = roi.mask_head if isinstance(roi.mask_head, nn.ModuleList) else [roi.mask_head]
    handles = [
        h.register_forward_pre_hook(
            lambda mod, args, i=i: mask_calls.append((i, [copy.copy(x) for x in args[1]]))
        )
        for i, h in enumerate(heads)
    ]
    roi._run_stage = run_stage
    model.train()
    torch.manual_seed(0)
    with EventStorage():
        losses = model(copy.deepcopy(batch))
    for h in handles:
        h.remove()
    del roi._run_stage
    return losses, stage_inputs, mask_calls


def box_rows_subset(sub, full):
    """Every row of ``sub`` is a row of ``full``."""
    if len(sub) == 0:
        return True
    return bool((sub[:, None, :] == full[None, :, :]).all(-1).any(1).all())


@pytest.mark.parametrize("stages,trained", [("first", [0]), ("last", [2]), ("all", [0, 1, 2])])
def test_mask_heads_train_on_their_stage_positives(stages, trained):
    batch = make_batch(num_images=2, seed=1)
    # Make the later stages receive good boxes: a freshly initialised cascade regresses little,
    # so stage k's input is close to the sampled proposals; we check labels, not quality.
    model = build(stages)
    losses, stage_inputs, mask_calls = record_training(model, batch)
    assert [i for i, _ in mask_calls] == list(range(len(trained)))
    for (_, instances), stage in zip(mask_calls, trained):
        for img, inst in enumerate(instances):
            boxes = inst.proposal_boxes.tensor
            # boxes come from this stage's input ...
            assert box_rows_subset(boxes, stage_inputs[stage][img])
            gts = batch[img]["instances"]
            if len(inst) == 0:
                continue
            # ... and are its positives at this stage's IoU threshold
            iou = pairwise_iou(inst.proposal_boxes, gts.gt_boxes)
            best, best_idx = iou.max(1)
            assert (best >= IOUS[stage] - 1e-6).all(), (stage, best.min())
            # with the matched ground truth's class and mask
            assert torch.equal(inst.gt_classes, gts.gt_classes[best_idx])
            assert torch.equal(inst.gt_masks.tensor, gts.gt_masks.tensor[best_idx])
        # and no positive of that stage is left out
        n_pos = 0
        for img, boxes in enumerate(stage_inputs[stage]):
            iou = pairwise_iou(batch[img]["instances"].gt_boxes, Boxes(boxes))
            n_pos += int((iou.max(0).values >= IOUS[stage]).sum())
        assert sum(len(i) for i in instances) == n_pos
    mask_keys = sorted(k for k in losses if k.startswith("loss_mask"))
    if stages == "all":
        assert mask_keys == ["loss_mask_stage0", "loss_mask_stage1", "loss_mask_stage2"]
    else:
        assert mask_keys == ["loss_mask"]


def test_last_stage_mask_sees_positives():
    """Sanity of the fixture above: the last stage does get IoU >= 0.7 positives to train on."""
    model = build("last")
    _, _, mask_calls = record_training(model, make_batch(num_images=2, seed=1))
    assert sum(len(i) for i in mask_calls[0][1]) > 0


@pytest.mark.parametrize("stages", ["first", "last", "all"])
def test_stage_loss_weights_scale_each_stage(stages):
    batch = make_batch(seed=2)
    weights = (1.0, 0.5, 0.25)
    plain, _, _ = record_training(build(stages), batch)
    weighted, _, _ = record_training(build(stages, weights=weights), batch)
    assert set(plain) == set(weighted)
    mask_stage = {"first": 0, "last": 2}.get(stages)
    for k, v in plain.items():
        if k.startswith("loss_rpn"):
            w = 1.0
        elif k == "loss_mask":
            w = weights[mask_stage]
        else:
            w = weights[int(k.rsplit("_stage", 1)[1])]
        assert torch.allclose(weighted[k], v * w, atol=1e-6), (k, weighted[k], v * w)


def infer_pair(merge):
    model = build("all", merge=merge, seed=4)
    # give the three heads clearly different predictors
    for i, head in enumerate(model.roi_heads.mask_head):
        nn.init.normal_(head.predictor.weight, std=0.05 * (i + 1))
        nn.init.constant_(head.predictor.bias, 0.3 * (i - 1))
    model.eval()
    batch = make_batch(num_images=2, seed=5, with_gt=False)
    images = model.preprocess_image(batch)
    with torch.no_grad():
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        instances, _ = model.roi_heads(images, features, proposals, None)
        roi = model.roi_heads
        x = roi.mask_pooler(
            [features[f] for f in roi.mask_in_features], [i.pred_boxes for i in instances]
        )
        per_head = []
        for head in roi.mask_head:
            ref = [Instances(i.image_size, pred_classes=i.pred_classes) for i in instances]
            mask_rcnn_inference(head.layers(x), ref)  # Detectron2's own inference
            per_head.append(torch.cat([r.pred_masks for r in ref]))
    got = torch.cat([i.pred_masks for i in instances])
    assert got.shape[0] > 0
    return got, per_head


def test_test_mask_merge_mean_averages_probabilities():
    got, per_head = infer_pair("mean")
    expected = sum(per_head) / 3
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(per_head[0], per_head[2], atol=1e-3)  # the average matters


def test_test_mask_merge_last_uses_last_head():
    got, per_head = infer_pair("last")
    assert torch.allclose(got, per_head[2], atol=1e-7)
    assert not torch.allclose(got, per_head[0], atol=1e-3)


@pytest.mark.parametrize(
    "opts,msg",
    [
        (["MODEL.CMRCNN.MASK_STAGES", "middle"], "MASK_STAGES"),
        (["MODEL.CMRCNN.TEST_MASK_MERGE", "max"], "TEST_MASK_MERGE"),
        (["MODEL.CMRCNN.TEST_MASK_MERGE", "mean"], 'MASK_STAGES "all"'),
        (["MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, 0.5]], "one weight per stage"),
        (["MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", [1.0, -0.5, 1.0]], ">= 0"),
    ],
)
def test_invalid_mode_arguments_fail_clearly(opts, msg):
    with pytest.raises(ValueError, match=msg):
        build_model(tiny_cfg(*opts))
