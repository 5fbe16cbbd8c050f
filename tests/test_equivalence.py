"""CascadeMaskROIHeads(MASK_STAGES=first, weights 1) == Detectron2's built-in CascadeROIHeads."""

import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import make_batch, tiny_cfg


def build_pair(*opts, fast=False):
    """(ours, built-in) with identical weights."""
    ours_cfg = tiny_cfg(
        "MODEL.CMRCNN.MASK_STAGES",
        "first",
        "MODEL.CMRCNN.FAST_ROI_ALIGN",
        fast,
        "MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD",
        fast,
        *opts,
    )
    d2_cfg = ours_cfg.clone()
    d2_cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    d2_cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    torch.manual_seed(0)
    ours = build_model(ours_cfg)
    d2 = build_model(d2_cfg)
    d2.load_state_dict(ours.state_dict())
    assert type(d2.roi_heads).__name__ == "CascadeROIHeads"
    assert type(ours.roi_heads).__name__ == "CascadeMaskROIHeads"
    return ours, d2


def test_same_state_dict_keys():
    ours, d2 = build_pair()
    assert list(ours.state_dict().keys()) == list(d2.state_dict().keys())
    for k, v in d2.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("seed,fast,tol", [(0, False, 1e-5), (1, False, 1e-5), (0, True, 1e-4)])
def test_same_training_losses_and_gradients(seed, fast, tol):
    """fast: our gather-based ROIAlign, equal to torchvision's up to float rounding."""
    ours, d2 = build_pair(fast=fast)
    batch = make_batch(seed=seed)
    results = []
    for model in (ours, d2):
        model.train()
        model.zero_grad()
        torch.manual_seed(seed)
        with EventStorage():
            losses = model(copy.deepcopy(batch))
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (l_ours, g_ours), (l_d2, g_d2) = results
    assert set(l_ours) == set(l_d2)
    assert "loss_mask" in l_ours and "loss_cls_stage2" in l_ours
    for k in l_d2:
        assert torch.allclose(l_ours[k], l_d2[k], atol=tol, rtol=0), (k, l_ours[k], l_d2[k])
    assert set(g_ours) == set(g_d2)
    for k in g_d2:
        assert torch.allclose(g_ours[k], g_d2[k], atol=tol, rtol=10 * tol), k


@pytest.mark.parametrize("fast", [False, True])
def test_same_inference_outputs(fast):
    ours, d2 = build_pair(fast=fast)
    # Train both a few identical steps so that the predictions are not all alike.
    batch = make_batch(num_images=3, seed=3, with_gt=False)
    outs = []
    for model in (ours, d2):
        model.eval()
        with torch.no_grad():
            outs.append(model(copy.deepcopy(batch)))
    total = 0
    for a, b in zip(*outs):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b)
        total += len(a)
        assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-5)
        assert torch.allclose(a.scores, b.scores, atol=1e-5)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert a.pred_masks.shape == b.pred_masks.shape
        if fast:  # probabilities equal to ~1e-6: a pixel at exactly 0.5 may flip
            assert (a.pred_masks != b.pred_masks).float().mean() < 1e-4
        else:
            assert torch.equal(a.pred_masks, b.pred_masks)
    assert total > 0, "the comparison needs detections"


def test_channels_last_mask_head_same_outputs_in_cpu_inference():
    """MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD: in CPU inference the mask head's convolutions get
    channels-last inputs and the outputs equal the NCHW model's (boxes and scores exactly,
    mask probabilities to float rounding); training keeps the layout it is given."""
    torch.manual_seed(0)
    models = {}
    for flag in (False, True):
        cfg = tiny_cfg(
            "MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD", flag, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0
        )
        models[flag] = build_model(cfg)
    models[True].load_state_dict(models[False].state_dict())
    head = models[True].roi_heads._mask_heads()[0]
    assert head.channels_last_cpu and not models[False].roi_heads._mask_heads()[0].channels_last_cpu
    layouts = []
    first_conv = next(m for m in head.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(
        lambda m, inp: layouts.append(
            inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous()
        )
    )
    batch = make_batch(seed=3)
    outs = {}
    for flag, model in models.items():
        model.eval()
        with torch.no_grad():
            outs[flag] = [o["instances"] for o in model(copy.deepcopy(batch))]
    assert layouts and all(layouts)
    for a, b in zip(outs[False], outs[True]):
        assert len(a) == len(b) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        assert (a.pred_masks != b.pred_masks).float().mean() < 1e-4
    # the mask logits themselves (before thresholding): equal to float rounding
    x = torch.randn(7, head.mask_fcn1.in_channels, 14, 14)
    with torch.no_grad():
        ref = models[False].roi_heads._mask_heads()[0].layers(x)
        torch.testing.assert_close(head.layers(x), ref, rtol=1e-5, atol=1e-5)
    layouts.clear()
    models[True].train()
    with EventStorage():
        models[True](copy.deepcopy(batch))
    assert layouts and not any(layouts)
