"""The same numbers on a CUDA GPU as on the CPU, and as Detectron2's built-in cascade on the GPU.

These tests need a CUDA device; on a machine without one (CI) they are skipped, and the
CPU versions of each check (test_layers.py, test_equivalence.py, test_export.py) run instead.
Run them on a GPU machine with ``python -m pytest tests/test_cuda.py``. TF32 is switched off so
that GPU convolutions and matrix products are plain float32 and comparable with the CPU.
"""

import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from test_layers import make_rois
from torchvision.ops import roi_align

from cmrcnn_ext.export import ExportableCascadeMaskRCNN, compare_outputs, trace
from cmrcnn_ext.modeling.roi_align import roi_align_gather

from conftest import make_batch, tiny_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODES = {
    "first": ["MODEL.CMRCNN.MASK_STAGES", "first"],
    "last": ["MODEL.CMRCNN.MASK_STAGES", "last"],
    "all+last": ["MODEL.CMRCNN.MASK_STAGES", "all", "MODEL.CMRCNN.TEST_MASK_MERGE", "last"],
    "all+mean": ["MODEL.CMRCNN.MASK_STAGES", "all", "MODEL.CMRCNN.TEST_MASK_MERGE", "mean"],
}


@pytest.fixture(autouse=True, scope="module")
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_cuda(batch):
    out = copy.deepcopy(batch)
    for item in out:
        item["image"] = item["image"].cuda()
        if "instances" in item:
            item["instances"] = item["instances"].to("cuda")
    return out


def build_on(device, *opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg("MODEL.DEVICE", device, *opts))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_fast_roi_align_matches_torchvision_on_cuda(sampling_ratio):
    torch.manual_seed(0)
    n, c, h, w, scale = 2, 8, 23, 31, 0.25
    feat = torch.randn(n, c, h, w, dtype=torch.float64, device="cuda", requires_grad=True)
    rois = make_rois(n, h, w, scale, 40, seed=sampling_ratio).double().cuda()
    ref = roi_align(feat, rois, (7, 7), scale, sampling_ratio, True)
    got = roi_align_gather(feat, rois, (7, 7), scale, sampling_ratio, True)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    grad_out = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, feat, grad_out)
    (g_got,) = torch.autograd.grad(got, feat, grad_out)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-10)
    # and the CPU computes the same
    cpu = roi_align_gather(feat.detach().cpu(), rois.cpu(), (7, 7), scale, sampling_ratio, True)
    torch.testing.assert_close(got.detach().cpu(), cpu, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("fast", [False, True])
def test_ours_equals_builtin_cascade_on_cuda(fast, sampling_ratio):
    """MASK_STAGES=first == Detectron2's CascadeROIHeads on the GPU: losses, gradients, outputs.
    Sampling ratio 0 (the R50 configs' adaptive grid) trains FAST_ROI_ALIGN's run-length path."""
    opts = ["MODEL.CMRCNN.MASK_STAGES", "first", "MODEL.CMRCNN.FAST_ROI_ALIGN", fast,
            "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", sampling_ratio,
            "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", sampling_ratio]  # fmt: skip
    ours = build_on("cuda", *opts)
    d2_cfg = tiny_cfg(
        "MODEL.DEVICE",
        "cuda",
        *opts,
        "MODEL.ROI_HEADS.NAME",
        "CascadeROIHeads",
        "MODEL.ROI_MASK_HEAD.NAME",
        "MaskRCNNConvUpsampleHead",
    )
    d2 = build_model(d2_cfg)
    d2.load_state_dict(ours.state_dict())
    batch = to_cuda(make_batch(seed=0))
    results = []
    for model in (ours, d2):
        model.train()
        torch.manual_seed(0)
        with EventStorage():
            losses = model(copy.deepcopy(batch))
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (l_ours, g_ours), (l_d2, g_d2) = results
    assert set(l_ours) == set(l_d2) and "loss_mask" in l_ours
    for k in l_d2:
        torch.testing.assert_close(l_ours[k], l_d2[k], rtol=0, atol=1e-4)
    for k in g_d2:
        torch.testing.assert_close(g_ours[k], g_d2[k], rtol=1e-3, atol=1e-4)
    images = to_cuda(make_batch(num_images=3, seed=3, with_gt=False))
    with torch.no_grad():
        a = [o["instances"] for o in ours.eval()(copy.deepcopy(images))]
        b = [o["instances"] for o in d2.eval()(copy.deepcopy(images))]
    assert sum(len(x) for x in a) > 0
    for x, y in zip(a, b):
        assert len(x) == len(y)
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, rtol=0, atol=1e-4)
        torch.testing.assert_close(x.scores, y.scores, rtol=0, atol=1e-5)
        assert torch.equal(x.pred_classes, y.pred_classes)
        assert (x.pred_masks != y.pred_masks).float().mean() < 1e-4


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_inference_equals_cpu(mode):
    """Every mask mode predicts on the GPU what it predicts on the CPU (same weights)."""
    cpu = build_on("cpu", *MODES[mode]).eval()
    gpu = build_on("cuda", *MODES[mode]).eval()
    gpu.load_state_dict(cpu.state_dict())
    images = make_batch(num_images=2, seed=5, with_gt=False)
    with torch.no_grad():
        a = [o["instances"] for o in cpu(copy.deepcopy(images))]
        b = [o["instances"].to("cpu") for o in gpu(to_cuda(images))]
    total = 0
    for x, y in zip(a, b):
        res = compare_outputs(
            (x.pred_boxes.tensor, x.scores, x.pred_classes, x.pred_masks),
            (y.pred_boxes.tensor, y.scores, y.pred_classes, y.pred_masks),
            tol=1e-3,
        )
        assert res["ok"], res
        total += len(x)
    assert total > 0


@pytest.mark.parametrize("mode", ["first", "all+mean"])
def test_amp_training_on_cuda(mode):
    """SOLVER.AMP on the GPU: float16 autocast forward, scaled backward, as Detectron2's
    AMPTrainer does. Every loss of every stage and mask head is finite; the GradScaler skips the
    steps whose float16 gradients overflow (it starts at scale 2**16 and halves it each time), and
    then steps: within 20 iterations the weights change and stay finite."""
    model = build_on("cuda", *MODES[mode]).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    weight = model.roi_heads.box_predictor[2].cls_score.weight
    before = weight.detach().clone()
    batch = to_cuda(make_batch(seed=1))
    for _ in range(20):
        with EventStorage():
            with torch.autocast("cuda", dtype=torch.float16):
                losses = model(copy.deepcopy(batch))
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(opt)
        scaler.update()
        if not torch.equal(before, weight.detach()):
            break
    if mode == "all+mean":
        assert {"loss_mask_stage0", "loss_mask_stage1", "loss_mask_stage2"} <= set(losses), sorted(
            losses
        )
    assert not torch.equal(before, weight.detach()), f"no step taken; scale {scaler.get_scale()}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["first", "all+mean"])
def test_traced_on_cuda_matches_eager(mode):
    torch.manual_seed(0)
    cfg = tiny_cfg(
        "MODEL.DEVICE",
        "cuda",
        *MODES[mode],
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        10,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST",
        0.3,
    )
    model = build_model(cfg).eval()
    wrapper = ExportableCascadeMaskRCNN(model, "bool")
    g = torch.Generator().manual_seed(1)
    imgs = [
        (torch.rand(3, h, w, generator=g) * 255).cuda()
        for h, w in [(128, 128), (96, 128), (160, 112)]
    ]
    traced = trace(wrapper, imgs[0])
    for img in imgs:
        with torch.no_grad():
            inst = model.inference([{"image": img, "height": img.shape[1], "width": img.shape[2]}])[
                0
            ]["instances"]
        ref = (inst.pred_boxes.tensor, inst.scores, inst.pred_classes, inst.pred_masks)
        out = traced(img)
        assert out[0].is_cuda
        res = compare_outputs(tuple(t.cpu() for t in ref), tuple(t.cpu() for t in out))
        assert res["ok"], res


@pytest.mark.parametrize("mode", list(MODES))
def test_stage_outputs_on_cuda_match_the_cpu(mode):
    """The stage recorder on CUDA: every stage's boxes and probabilities, and every mask head's
    probabilities, as on the CPU (the stage report's inputs; tests/test_stage_report.py)."""
    from cmrcnn_ext.modeling import record_stage_outputs

    batch = make_batch(num_images=2, seed=5, with_gt=False)
    recorded = {}
    for device in ("cpu", "cuda"):
        model = build_on(device, *MODES[mode]).eval()
        with torch.no_grad(), record_stage_outputs(model) as rec:
            model(to_cuda(batch) if device == "cuda" else copy.deepcopy(batch))
        recorded[device] = rec.images
    for cpu, gpu in zip(recorded["cpu"], recorded["cuda"]):
        for k in range(3):
            torch.testing.assert_close(
                gpu.stage_boxes[k].cpu(), cpu.stage_boxes[k], atol=1e-3, rtol=1e-4
            )
            torch.testing.assert_close(
                gpu.stage_probs[k].cpu(), cpu.stage_probs[k], atol=1e-4, rtol=1e-4
            )
        assert sorted(gpu.mask_probs) == sorted(cpu.mask_probs)
        for s in cpu.mask_probs:
            torch.testing.assert_close(
                gpu.mask_probs[s].cpu(), cpu.mask_probs[s], atol=1e-4, rtol=1e-4
            )
