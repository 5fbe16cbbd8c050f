"""FastROIAlign equals torchvision's ROIAlign (values and gradients)."""

import pytest
import torch
from torchvision.ops import roi_align

from cmrcnn_ext.modeling.roi_align import FastROIAlign, roi_align_gather


def make_rois(n_images, h, w, scale, count, seed):
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = h / scale, w / scale
    b = torch.randint(0, n_images, (count,), generator=g).float()
    xy = torch.rand(count, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.1 - 5
    wh = torch.rand(count, 2, generator=g) * torch.tensor([img_w, img_h]) * 0.6
    rois = torch.cat([b[:, None], xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([10.0, 10.0, 10.0, 10.0])  # zero size
    rois[1, 1:] = torch.tensor([-20.0, -20.0, img_w + 20, img_h + 20])  # beyond the borders
    rois[2, 1:] = torch.tensor([img_w - 3, img_h - 3, img_w + 1, img_h + 1])  # at the edge
    return rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("output_size", [(7, 7), (14, 14), (5, 3)])
def test_matches_torchvision(aligned, sampling_ratio, output_size):
    torch.manual_seed(0)
    n, c, h, w, scale = 2, 8, 23, 31, 0.25
    feat = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    rois = make_rois(n, h, w, scale, 40, seed=sampling_ratio).double()
    ref = roi_align(feat, rois, output_size, scale, sampling_ratio, aligned)
    got = roi_align_gather(feat, rois, output_size, scale, sampling_ratio, aligned)
    assert torch.allclose(got, ref, atol=1e-10), (got - ref).abs().max()
    grad_out = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, feat, grad_out)
    (g_got,) = torch.autograd.grad(got, feat, grad_out)
    assert torch.allclose(g_got, g_ref, atol=1e-10)


def test_float32_and_module():
    torch.manual_seed(1)
    feat = torch.randn(3, 16, 40, 40)
    rois = make_rois(3, 40, 40, 0.125, 100, seed=7)
    mod = FastROIAlign((7, 7), 0.125, 2, True)
    ref = roi_align(feat, rois, (7, 7), 0.125, 2, True)
    assert torch.allclose(mod(feat, rois), ref, atol=1e-5, rtol=1e-5)
    assert mod(feat, rois[:0]).shape == (0, 16, 7, 7)


def test_single_image_inference_path():
    """Batch of one image without gradients (CPU inference): the gather path is used and
    equals torchvision."""
    torch.manual_seed(2)
    feat = torch.randn(1, 32, 64, 64)
    rois = make_rois(1, 64, 64, 0.25, 60, seed=3)
    mod = FastROIAlign((14, 14), 0.25, 2, True)
    with torch.no_grad():
        got = mod(feat, rois)
        ref = roi_align(feat, rois, (14, 14), 0.25, 2, True)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_features_sample_in_float32():
    """Under CPU autocast the features are bfloat16. Sample positions must still be computed in
    float32 (as torchvision's autocast ROIAlign does): in bfloat16 a box at x = 201.3 px would
    be read ~0.1 feature pixel off. The result is float32 ROIAlign of the same features, rounded
    once to bfloat16."""
    torch.manual_seed(3)
    feat = torch.randn(2, 16, 64, 64).bfloat16()
    rois = torch.tensor(
        [[0, 201.3, 150.7, 240.9, 190.2], [1, 120.6, 33.3, 171.9, 99.1], [0, 3.3, 5.9, 19.4, 17.7]]
    )
    ref = roi_align(feat.float(), rois, (7, 7), 0.25, 2, True)
    for grad in (False, True):
        f = feat.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            got = FastROIAlign((7, 7), 0.25, 2, True)(f, rois)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, atol=0.0, rtol=2**-7)


def test_feature_table_shared_without_autograd_and_refreshed():
    """The (pixel, channel) table of a feature map is built once per feature map in inference
    (box stages and mask pooler share it), rebuilt after an in-place change, dropped with the
    feature map, and never cached when autograd records."""
    import gc

    from cmrcnn_ext.modeling import roi_align as layers

    feat = torch.randn(1, 6, 9, 11)
    rois = torch.tensor([[0.0, 2.0, 3.0, 30.0, 25.0], [0.0, 0.0, 0.0, 40.0, 35.0]])
    with torch.no_grad():
        t1 = layers._feature_table(feat)
        assert layers._feature_table(feat) is t1
        assert torch.equal(t1, feat.permute(0, 2, 3, 1).reshape(-1, 6))
        first = roi_align_gather(feat, rois, (5, 5), 0.25, 2, True)
        feat.mul_(2)  # in place: the cached table is stale
        t2 = layers._feature_table(feat)
        assert t2 is not t1 and torch.equal(t2, 2 * t1)
        second = roi_align_gather(feat, rois, (5, 5), 0.25, 2, True)
        torch.testing.assert_close(second, 2 * first)
        torch.testing.assert_close(second, roi_align(feat, rois, (5, 5), 0.25, 2, True))
    key = id(feat)
    assert key in layers._TABLES
    del feat
    gc.collect()
    assert key not in layers._TABLES
    g = torch.randn(1, 6, 9, 11, requires_grad=True)
    assert layers._feature_table(g) is not layers._feature_table(g)
    assert id(g) not in layers._TABLES


def test_adaptive_grid_uses_the_gather_in_training_and_inference(monkeypatch):
    """The adaptive grid (sampling_ratio 0) takes the gather with autograd too; its transposed-
    gather backward equals torchvision's gradient (float64: to 1e-10) over ROIs of many sizes,
    i.e. many run-length groups in one backward."""
    from cmrcnn_ext.modeling import roi_align as layers

    calls = []
    original = layers.roi_align_gather
    monkeypatch.setattr(layers, "roi_align_gather", lambda *a: calls.append(1) or original(*a))
    mod = FastROIAlign((7, 7), 0.25, 0, True)
    feat = torch.randn(2, 4, 40, 48, dtype=torch.float64)
    rois = make_rois(2, 40, 48, 0.25, 60, seed=5).double()
    with torch.no_grad():
        torch.testing.assert_close(mod(feat, rois), roi_align(feat, rois, (7, 7), 0.25, 0, True))
    assert calls == [1]
    feat.requires_grad_()
    out = mod(feat, rois)
    assert calls == [1, 1] and out.requires_grad
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, feat, grad_out)
    ref = roi_align(feat, rois, (7, 7), 0.25, 0, True)
    (want,) = torch.autograd.grad(ref, feat, grad_out)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
