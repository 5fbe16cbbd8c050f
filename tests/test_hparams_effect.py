"""Every documented hyperparameter takes effect in the built model or its forward pass.

Each test sets a non-default value and checks the model for it, so it fails if the key stopped
reaching the model. Tiny R18-GN models (``tiny_cfg``) at 64-128 px keep this fast on a CPU.
"""

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torch import nn

from conftest import make_batch, tiny_cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads run up to 40x slower when
    another process holds a core (the threads spin-wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(overrides):
    """The tiny model with ``overrides`` ({config key: value}) applied, seeded."""
    torch.manual_seed(0)
    return build_model(tiny_cfg(*[x for item in overrides.items() for x in item]))


def record_inputs(module, store):
    """Forward pre-hook that appends the positional arguments of each call to ``store``."""
    return module.register_forward_pre_hook(lambda _m, args: store.append(args))


def record_outputs(module, store):
    return module.register_forward_hook(lambda _m, _args, out: store.append(out))


@pytest.mark.parametrize("num_conv,num_fc", [(3, 2), (0, 1), (2, 0), (1, 3)])
def test_box_head_conv_and_fc_counts_in_every_stage(num_conv, num_fc):
    model = build({"MODEL.ROI_BOX_HEAD.NUM_CONV": num_conv, "MODEL.ROI_BOX_HEAD.NUM_FC": num_fc})
    heads = model.roi_heads.box_head
    assert len(heads) == 3
    channels = model.backbone.output_shape()["p2"].channels  # MODEL.FPN.OUT_CHANNELS
    dims = tiny_cfg().MODEL.ROI_BOX_HEAD  # FC_DIM after fully connected layers, else CONV_DIM
    for head in heads:
        assert sum(isinstance(m, nn.Conv2d) for m in head.modules()) == num_conv
        assert sum(isinstance(m, nn.Linear) for m in head.modules()) == num_fc
        assert (len(head.conv_norm_relus), len(head.fcs)) == (num_conv, num_fc)
        out = head(torch.zeros(2, channels, 7, 7))
        assert out.shape == ((2, dims.FC_DIM) if num_fc else (2, dims.CONV_DIM, 7, 7))


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 4, 5])
def test_freeze_at_freezes_stem_and_first_stages(freeze_at):
    model = build({"MODEL.RESNETS.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": freeze_at})
    resnet = model.backbone.bottom_up
    names = ["stem", "res2", "res3", "res4", "res5"]
    frozen = set(names[:freeze_at])
    for name in names:
        stage = getattr(resnet, name)
        grads = {p.requires_grad for p in stage.parameters()}
        assert grads == ({False} if name in frozen else {True}), name
        has_frozen_bn = any(isinstance(m, FrozenBatchNorm2d) for m in stage.modules())
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in stage.modules())
        assert (has_frozen_bn, has_bn) == ((True, False) if name in frozen else (False, True))
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sum(f.square().mean() for f in model.backbone(images).values()).backward()
    opt.step()
    after = resnet.state_dict()
    for name in names:
        params = [k for k, _ in getattr(resnet, name).named_parameters(prefix=name)]
        if name in frozen:  # weights and (frozen) BN statistics unchanged
            keys = [k for k in before if k.startswith(name + ".")]
            assert keys and all(torch.equal(before[k], after[k]) for k in keys), name
        else:
            assert params and all(not torch.equal(before[k], after[k]) for k in params), name


def _proposal_counts(model, training):
    seen = []
    hook = record_inputs(model.roi_heads, seen)
    model.train(training)
    with EventStorage(), torch.set_grad_enabled(training):
        model(make_batch(2, size=64))
    hook.remove()
    (args,) = seen
    return [len(p) for p in args[2]]  # roi_heads(images, features, proposals, targets)


def test_pre_nms_topk_train_and_test_bound_proposals():
    # NMS_THRESH 1.0 suppresses nothing: what reaches the ROI heads is pre-NMS top-k x 5 levels.
    model = build(
        {
            "MODEL.RPN.NMS_THRESH": 1.0,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 3,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,
            "MODEL.RPN.PRE_NMS_TOPK_TEST": 50,
            "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
        }
    )
    levels = len(model.proposal_generator.in_features)
    assert levels == 5
    assert all(0 < n <= 3 * levels for n in _proposal_counts(model, training=True))
    assert all(3 * levels < n <= 50 * levels for n in _proposal_counts(model, training=False))


def test_post_nms_topk_train_and_test_bound_proposals():
    model = build(
        {
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 1000,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN": 7,
            "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
            "MODEL.RPN.POST_NMS_TOPK_TEST": 11,
        }
    )
    assert _proposal_counts(model, training=True) == [7, 7]
    assert _proposal_counts(model, training=False) == [11, 11]


def test_pooler_resolutions_set_pooled_shapes():
    model = build(
        {"MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 5, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 9}
    )
    box, mask = [], []
    record_outputs(model.roi_heads.box_pooler, box)
    record_outputs(model.roi_heads.mask_pooler, mask)
    model.eval()
    with torch.no_grad():
        (out,) = model(make_batch(1, size=128, with_gt=False))
    assert len(out["instances"]) > 0
    channels = model.backbone.output_shape()["p2"].channels  # MODEL.FPN.OUT_CHANNELS
    assert len(box) == 3 and all(t.shape[1:] == (channels, 5, 5) for t in box)  # one per stage
    assert len(mask) == 1 and mask[0].shape[1:] == (channels, 9, 9)


def test_sampling_ratio_reaches_roialign_and_changes_output():
    def poolers(box_ratio, mask_ratio):
        model = build(
            {
                "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": box_ratio,
                "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": mask_ratio,
            }
        )
        return model.roi_heads.box_pooler, model.roi_heads.mask_pooler

    box1, mask3 = poolers(1, 3)
    box2, mask2 = poolers(2, 2)
    assert {p.sampling_ratio for p in box1.level_poolers} == {1}
    assert {p.sampling_ratio for p in mask3.level_poolers} == {3}
    assert {p.sampling_ratio for p in box2.level_poolers} == {2}
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 128, 128 // s, 128 // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = [Boxes(torch.tensor([[10.0, 12.0, 70.0, 60.0], [30.0, 5.0, 120.0, 100.0]]))]
    assert not torch.allclose(box1(feats, boxes), box2(feats, boxes))
    assert not torch.allclose(mask3(feats, boxes), mask2(feats, boxes))


@pytest.mark.parametrize("lower,upper", [(0.2, 0.5), (0.4, 0.8)])
def test_rpn_iou_thresholds_label_anchors(lower, upper):
    model = build({"MODEL.RPN.IOU_THRESHOLDS": [lower, upper]})
    matcher = model.proposal_generator.anchor_matcher
    ious = [0.9, 0.75, 0.6, 0.45, 0.35, 0.25, 0.1]  # one ground truth (row) x 7 anchors
    _, labels = matcher(torch.tensor([ious]))
    expected = [1 if v >= upper else 0 if v < lower else -1 for v in ious]
    assert labels.tolist() == expected
    assert set(expected) == {1, 0, -1}


def _tiny_forward_ok(model):
    model.eval()
    with torch.no_grad():
        (out,) = model(make_batch(1, size=64, with_gt=False))
    inst = out["instances"]
    assert inst.image_size == (64, 64) and inst.has("pred_masks")


BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
BLOCKS[152] = [3, 8, 36, 3]


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_resnet_depth_builds_and_runs(depth):
    model = build(
        {
            "MODEL.RESNETS.DEPTH": depth,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256,
            "MODEL.RPN.POST_NMS_TOPK_TEST": 16,
            "TEST.DETECTIONS_PER_IMAGE": 4,
        }
    )
    resnet = model.backbone.bottom_up
    stages = [getattr(resnet, f"res{i}") for i in range(2, 6)]
    assert [len(s) for s in stages] == BLOCKS[depth]
    block_type = BasicBlock if depth < 50 else BottleneckBlock
    assert all(isinstance(b, block_type) for s in stages for b in s)
    _tiny_forward_ok(model)


def test_resnext_groups_and_width_build_and_run():
    model = build(
        {
            "MODEL.RESNETS.DEPTH": 50,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
            "MODEL.RESNETS.NUM_GROUPS": 32,
            "MODEL.RESNETS.WIDTH_PER_GROUP": 4,
            "MODEL.RPN.POST_NMS_TOPK_TEST": 16,
            "TEST.DETECTIONS_PER_IMAGE": 4,
        }
    )
    res = model.backbone.bottom_up
    for i, stage in enumerate([res.res2, res.res3, res.res4, res.res5]):
        conv2 = stage[0].conv2  # 3x3 grouped conv; width doubles per stage
        assert (conv2.groups, conv2.out_channels) == (32, 32 * 4 * 2**i)
    _tiny_forward_ok(model)


def test_cascade_ious_reach_stage_matchers():
    ious = (0.4, 0.55, 0.8)
    model = build(
        {"MODEL.ROI_BOX_CASCADE_HEAD.IOUS": ious, "MODEL.ROI_HEADS.IOU_THRESHOLDS": [0.4]}
    )
    matchers = model.roi_heads.proposal_matchers
    assert len(matchers) == model.roi_heads.num_cascade_stages == 3
    quality = torch.tensor([[0.85, 0.7, 0.5, 0.3]])
    for matcher, iou in zip(matchers, ious):
        assert matcher.thresholds[1:-1] == [iou]
        _, labels = matcher(quality)
        assert labels.tolist() == [int(v >= iou) for v in quality[0].tolist()]


def test_bbox_reg_weights_reach_each_stage():
    weights = ((1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0), (9.0, 10.0, 11.0, 12.0))
    model = build({"MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS": weights})
    src = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    dst = torch.tensor([[14.0, 8.0, 60.0, 50.0]])
    unit = None
    for predictor, w in zip(model.roi_heads.box_predictor, weights):
        transform = predictor.box2box_transform
        assert tuple(transform.weights) == w
        deltas = transform.get_deltas(src, dst)
        unit = deltas / torch.tensor(w) if unit is None else unit
        assert torch.allclose(deltas, unit * torch.tensor(w))


def _one_step(cfg, model, batch):
    from cmrcnn_ext.engine.trainer import Trainer

    opt = Trainer.build_optimizer(cfg, model)
    with EventStorage(0):
        loss = sum(model(batch).values())
    opt.zero_grad()
    loss.backward()
    return opt


def test_optimizer_adamw_update_equals_hand_computed_first_step():
    """SOLVER.CMRCNN.OPTIMIZER AdamW: Detectron2's parameter groups, torch's AdamW, and the
    first update is exactly AdamW's closed form: p - lr * (wd * p + sign(g)) for g != 0
    (bias-corrected m / sqrt(v) = g / |g| at step 1, eps aside)."""
    lr, wd = 0.01, 0.05
    cfg = tiny_cfg(
        "SOLVER.CMRCNN.OPTIMIZER",
        "AdamW",
        "SOLVER.BASE_LR",
        lr,
        "SOLVER.WEIGHT_DECAY",
        wd,
        "SOLVER.WEIGHT_DECAY_NORM",
        0.0,
        "SOLVER.CMRCNN.BETAS",
        [0.8, 0.99],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    opt = _one_step(cfg, model, make_batch(2, 128))
    assert type(opt).__name__ == "AdamW" and isinstance(opt, torch.optim.AdamW)
    # torch's fused kernel (one pass per tensor, ~4x faster step on the CPU) where torch has it
    assert all(g["fused"] for g in opt.param_groups)
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()
    }
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert norm_params and all(decays[i] == 0.0 for i in norm_params)  # WEIGHT_DECAY_NORM
    fc = model.roi_heads.box_predictor[0].cls_score.weight
    assert decays[id(fc)] == wd
    before, grad = fc.detach().clone(), fc.grad.detach().clone()
    opt.step()
    expected = before * (1 - lr * wd) - lr * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(fc.detach(), expected, rtol=0, atol=1e-6)


def test_optimizer_sgd_is_detectron2s():
    from detectron2.solver import build_optimizer

    import cmrcnn_ext

    assert cmrcnn_ext.get_cfg().SOLVER.CMRCNN.OPTIMIZER == "SGD"  # the default
    cfg = tiny_cfg("SOLVER.CMRCNN.OPTIMIZER", "SGD")  # the demo config uses AdamW
    torch.manual_seed(0)
    model = build_model(cfg)
    ours = _one_step(cfg, model, make_batch(2, 128))
    theirs = build_optimizer(cfg, model)
    assert type(ours) is type(theirs) and isinstance(ours, torch.optim.SGD)
    assert [
        (len(g["params"]), g["lr"], g["weight_decay"], g["momentum"]) for g in ours.param_groups
    ] == [
        (len(g["params"]), g["lr"], g["weight_decay"], g["momentum"]) for g in theirs.param_groups
    ]
