"""Test-time mask prediction: one mask-head pass per distinct box, and the fused CPU upsampling.

Both are pure speed-ups; the oracle is Detectron2's own inference (``mask_rcnn_inference`` on
the logits of every detection's row, from the NCHW layers of ``MaskRCNNConvUpsampleHead``).
"""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference
from detectron2.structures import Boxes, Instances
from torch import nn

from conftest import make_batch, tiny_cfg


def _detections(image_size, boxes, classes, scores=None):
    inst = Instances(image_size)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    inst.scores = torch.linspace(0.9, 0.1, len(classes)) if scores is None else scores
    return inst


def _reference_probs(roi, features, instances, heads):
    """Detectron2's test-time masks: every detection pooled and run through the NCHW layers,
    ``mask_rcnn_inference`` per head, mean over heads."""
    x = roi.mask_pooler(
        [features[f] for f in roi.mask_in_features], [i.pred_boxes for i in instances]
    )
    per_head = []
    for head in heads:
        fast, head.channels_last_cpu = head.channels_last_cpu, False
        try:
            ref = [Instances(i.image_size, pred_classes=i.pred_classes) for i in instances]
            mask_rcnn_inference(head.layers(x), ref)
        finally:
            head.channels_last_cpu = fast
        per_head.append(torch.cat([r.pred_masks for r in ref]))
    return sum(per_head) / len(per_head)


@pytest.mark.parametrize("stages,merge", [("first", "last"), ("all", "mean"), ("all", "last")])
def test_duplicate_boxes_run_the_mask_head_once(stages, merge):
    cfg = tiny_cfg("MODEL.CMRCNN.MASK_STAGES", stages, "MODEL.CMRCNN.TEST_MASK_MERGE", merge)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    roi = model.roi_heads
    heads = roi._mask_heads()
    for i, head in enumerate(heads):  # class channels that clearly differ
        nn.init.normal_(head.predictor.weight, std=0.1 * (i + 1))
        nn.init.normal_(head.predictor.bias, std=0.5)
    rows_seen = []
    hooks = [
        h.conv_norm_relus[0].register_forward_pre_hook(
            lambda m, inp: rows_seen.append(inp[0].shape[0])
        )
        for h in heads
    ]
    batch = make_batch(num_images=2, seed=7, with_gt=False)
    images = model.preprocess_image(batch)
    a, b, c = [4.0, 6.0, 60.0, 50.0], [30.5, 10.25, 90.0, 120.0], [70.0, 70.0, 127.0, 100.0]
    # image 0: box a in classes 0, 1, 2; box b once; box c in classes 4 and 0 (scores unordered)
    # image 1: box b in classes 3 and 1; box a once
    instances = [
        _detections(images.image_sizes[0], [a, a, b, c, a, c], [0, 1, 3, 4, 2, 0]),
        _detections(images.image_sizes[1], [b, a, b], [3, 2, 1]),
    ]
    with torch.no_grad():
        features = model.backbone(images.tensor)
        expected = _reference_probs(
            roi, features, instances, heads if merge == "mean" else heads[-1:]
        )
        rows_seen.clear()
        out = roi._forward_mask(features, [i[torch.arange(len(i))] for i in instances])
    for h in hooks:
        h.remove()
    used = len(heads) if merge == "mean" else 1
    assert rows_seen == [3 + 2] * used  # distinct boxes: 3 in image 0, 2 in image 1
    got = torch.cat([i.pred_masks for i in out])
    assert got.shape == expected.shape == (9, 1, 28, 28)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the same box in different classes gets different masks (the channel matters)
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_whole_model_same_masks_as_without_sharing():
    """End to end, with the score threshold at 0 many detections repeat a box in another class;
    masks equal those of the per-detection path."""
    cfg = tiny_cfg()
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    batch = make_batch(num_images=2, seed=3, with_gt=False)
    import cmrcnn_ext.modeling.roi_heads as rh

    with torch.no_grad():
        fast = model(batch)
        original = rh._shares_mask_rows
        rh._shares_mask_rows = lambda heads, instances: False
        try:
            slow = model(batch)
        finally:
            rh._shares_mask_rows = original
    repeated = 0
    for x, y in zip(fast, slow):
        x, y = x["instances"], y["instances"]
        assert len(x) == len(y) > 0
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        repeated += len(x) - len(torch.unique(x.pred_boxes.tensor, dim=0))
        assert (x.pred_masks != y.pred_masks).float().mean() < 1e-4
    assert repeated > 0, "the test needs detections that repeat a box"


def test_head_with_own_forward_keeps_its_path():
    from cmrcnn_ext.modeling.mask_head import CMRCNNConvUpsampleHead
    from cmrcnn_ext.modeling.roi_heads import _shares_mask_rows

    class Custom(CMRCNNConvUpsampleHead):
        def forward(self, x, instances):
            return super().forward(x, instances)

    cfg = tiny_cfg()
    model = build_model(cfg)
    head = model.roi_heads._mask_heads()[0]
    inst = [_detections((64, 64), [[0.0, 0.0, 10.0, 10.0]], [1])]
    assert _shares_mask_rows([head], inst)
    custom = Custom.__new__(Custom)
    nn.Module.__init__(custom)
    assert not _shares_mask_rows([custom], inst)
    assert not _shares_mask_rows([head], [_detections((64, 64), [], [])])


@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("MODEL.ROI_MASK_HEAD.NUM_CONV", 0),
        ("MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True),
        ("MODEL.ROI_MASK_HEAD.NORM", "", "MODEL.ROI_MASK_HEAD.CONV_DIM", 48),
    ],
)
def test_fused_upsampling_equals_layers(opts):
    """CPU inference path of CMRCNNConvUpsampleHead (channels-last convs; deconv + ReLU + 1x1
    predictor as two matrix products) == Detectron2's layers in NCHW."""
    cfg = tiny_cfg("MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD", True, *opts)
    torch.manual_seed(2)
    head = build_model(cfg).roi_heads._mask_heads()[0].eval()
    nn.init.normal_(head.predictor.weight, std=0.1)
    nn.init.normal_(head.predictor.bias, std=0.5)
    nn.init.normal_(head.deconv.bias, std=0.5)
    assert head._fused_upsample_ok()
    x = torch.randn(
        11,
        head.deconv.in_channels
        if not head.conv_norm_relus
        else head.conv_norm_relus[0].in_channels,
        14,
        14,
    )
    with torch.no_grad():
        fast = head.layers(x)
        head.channels_last_cpu = False
        ref = head.layers(x)
    assert fast.shape == ref.shape == (11, head.predictor.out_channels, 28, 28)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 0.1  # not a comparison of near-zeros


def test_fused_upsampling_only_in_float32_cpu_inference():
    cfg = tiny_cfg("MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD", True)
    head = build_model(cfg).roi_heads._mask_heads()[0].eval()
    x = torch.randn(2, head.conv_norm_relus[0].in_channels, 14, 14)
    assert head._cpu_fast_path(x)
    assert not head._cpu_fast_path(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not head._cpu_fast_path(x)
    head.train()
    assert not head._cpu_fast_path(x)


def test_image_without_detections_next_to_one_with():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    roi = model.roi_heads
    batch = make_batch(num_images=2, seed=7, with_gt=False)
    images = model.preprocess_image(batch)
    box = [4.0, 6.0, 60.0, 50.0]
    instances = [
        _detections(images.image_sizes[0], [], []),
        _detections(images.image_sizes[1], [box, box], [1, 2]),
    ]
    with torch.no_grad():
        features = model.backbone(images.tensor)
        expected = _reference_probs(roi, features, instances, roi._mask_heads()[-1:])
        out = roi._forward_mask(features, [i[torch.arange(len(i))] for i in instances])
    assert out[0].pred_masks.shape == (0, 1, 28, 28)
    torch.testing.assert_close(out[1].pred_masks, expected, rtol=1e-5, atol=1e-6)
