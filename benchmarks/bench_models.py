"""Set-up shared by the inference, training and peer benchmarks: the config, the three
models compared ((a) Detectron2's cascade, (b) ours with MASK_STAGES=first, (c) ours all + mean)
with identical weights, and seeded synthetic images with ground truth."""

import os

import numpy as np
import torch

from cmrcnn_ext.model_zoo import get_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ALIASES = {
    "r50": get_config_file("cascade_mask_rcnn_R_50_FPN_1x.yaml"),
    "demo": get_config_file("cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml"),
}
MODEL_NAMES = {
    "a": "(a) d2 CascadeROIHeads",
    "b": "(b) ours MASK_STAGES=first",
    "c": "(c) ours all + mean",
}


def load_cfg(args):
    import cmrcnn_ext

    path = CONFIG_ALIASES.get(args.config, args.config)
    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(args.opts))
    cfg.MODEL.WEIGHTS = ""  # random weights (seeded); no download
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.score_thresh
    if args.detections is not None:
        cfg.TEST.DETECTIONS_PER_IMAGE = args.detections
    return cfg, path


#: the keys that make (a), (b) and (c) out of one config
VARIANT_KEYS = {
    "a": ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_MASK_HEAD.NAME",
          "MaskRCNNConvUpsampleHead"],
    "b": ["MODEL.ROI_HEADS.NAME", "CascadeMaskROIHeads", "MODEL.ROI_MASK_HEAD.NAME",
          "CMRCNNConvUpsampleHead", "MODEL.CMRCNN.MASK_STAGES", "first",
          "MODEL.CMRCNN.TEST_MASK_MERGE", "last"],
    "c": ["MODEL.ROI_HEADS.NAME", "CascadeMaskROIHeads", "MODEL.ROI_MASK_HEAD.NAME",
          "CMRCNNConvUpsampleHead", "MODEL.CMRCNN.MASK_STAGES", "all",
          "MODEL.CMRCNN.TEST_MASK_MERGE", "mean"],
}  # fmt: skip


def variant_cfgs(cfg):
    """{"a", "b", "c"}: ``cfg`` with each model's heads (VARIANT_KEYS)."""
    cfgs = {}
    for name, keys in VARIANT_KEYS.items():
        cfgs[name] = cfg.clone()
        cfgs[name].merge_from_list(keys)
    return cfgs


@torch.no_grad()
def norm_stats_from_input(layers, forward):
    """Set each normalisation layer's ``running_mean`` / ``running_var`` to the statistics of its
    input while ``forward()`` runs (in forward order, so each layer sees the already set layers
    before it). Returns the number of layers set."""
    handles = []

    def pre(mod, inputs):
        x = inputs[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-5)

    for mod in layers:
        handles.append(mod.register_forward_pre_hook(pre))
    try:
        if handles:
            forward()
    finally:
        for h in handles:
            h.remove()
    return len(handles)


def calibrate_frozen_bn(model, item):
    """Set every FrozenBatchNorm2d's statistics to those of its input on one image, so that a
    randomly initialised FrozenBN backbone (R50 configs) gives unit-scale features as a trained
    one does. Without it the residual sums grow to ~1e3-1e4, the class scores saturate at
    background and no box survives. Returns the number of layers set."""
    from detectron2.layers import FrozenBatchNorm2d

    model.eval()
    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    return norm_stats_from_input(
        layers, lambda: model.backbone(model.preprocess_image(infer_inputs(item)).tensor)
    )


def build_models(cfg, seed, calib_item, weights=""):
    """(a), (b), (c) with identical weights; (c)'s extra mask heads = head 0 + small noise.
    ``weights``: a checkpoint for (b) (and so for all three) instead of random weights."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfgs = variant_cfgs(cfg)
    torch.manual_seed(seed)
    models = {k: build_model(c) for k, c in cfgs.items()}
    if weights:
        DetectionCheckpointer(models["b"]).load(weights)
        n_bn = 0
    else:
        n_bn = calibrate_frozen_bn(models["b"], calib_item)
    if n_bn:
        print(
            f"FrozenBN: statistics of {n_bn} layers set from one image (random weights otherwise "
            "give ~1e4-scale features and no detections)"
        )
    ref = models["b"].state_dict()
    models["a"].load_state_dict(ref)
    num_heads = len(models["c"].roi_heads.mask_head)
    gen = torch.Generator().manual_seed(seed + 1)
    state_c = {}
    for key, value in ref.items():
        if key.startswith("roi_heads.mask_head."):
            rest = key[len("roi_heads.mask_head.") :]
            for h in range(num_heads):
                v = value.clone()
                if h > 0 and v.is_floating_point() and v.numel() > 1:
                    noise = torch.randn(v.shape, generator=gen).to(v.device)
                    v += 0.01 * v.float().std() * noise
                state_c[f"roi_heads.mask_head.{h}.{rest}"] = v
        else:
            state_c[key] = value.clone()
    models["c"].load_state_dict(state_c)  # strict: every tensor accounted for
    for m in models.values():
        m.eval()
    return models


def set_detections(models, n):
    """TEST.DETECTIONS_PER_IMAGE of built models (the last stage's predictor applies it)."""
    for m in models.values():
        for predictor in m.roi_heads.box_predictor:
            predictor.test_topk_per_image = n


def image_shape(cfg, short):
    long_cap = round(cfg.INPUT.MAX_SIZE_TEST * short / cfg.INPUT.MIN_SIZE_TEST)
    return short, min(round(short * 4 / 3), max(long_cap, short))


def make_images(n, h, w, seed, num_classes):
    """n synthetic shapes images (H, W) with ground truth (boxes, classes, masks)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    from cmrcnn_ext.data.synthetic import _render_image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, objects = _render_image(rng, max(h, w))
        img = np.ascontiguousarray(img[:h, :w])
        boxes, classes, masks = [], [], []
        for cat_id, mask in objects:
            mask = mask[:h, :w]
            if mask.sum() < 4:
                continue
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append((cat_id - 1) % num_classes)
            masks.append(mask)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
        inst.gt_masks = BitMasks(
            torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool)
        )
        image = torch.from_numpy(img.transpose(2, 0, 1).astype("float32"))
        out.append({"image": image, "height": h, "width": w, "instances": inst})
    return out


def infer_inputs(item):
    return [{"image": item["image"], "height": item["height"], "width": item["width"]}]
