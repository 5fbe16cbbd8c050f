#!/usr/bin/env python
"""Inference and training cost of cmrcnn_ext's cascade heads against Detectron2's built-in one.

In one process, with one config, the same weights and the same images, it measures

  (a) Detectron2's CascadeROIHeads + MaskRCNNConvUpsampleHead,
  (b) cmrcnn_ext's CascadeMaskROIHeads with MASK_STAGES=first (should cost the same as (a)),
  (c) cmrcnn_ext's CascadeMaskROIHeads with MASK_STAGES=all + TEST_MASK_MERGE=mean (three mask
      heads: the first is (a)'s, the other two are copies of it plus small noise):

- inference latency per image (batch 1, median and IQR over the timed runs after warm-up,
  models run round-robin so that machine load affects them alike) and images/s;
- a per-component breakdown of inference, timed by calling the model's parts as
  ``GeneralizedRCNN.inference`` does (preprocess, backbone, RPN, roi_heads, postprocess) with
  timers wrapped around the ROI heads' internals (each cascade stage's ``_run_stage`` and box
  pooler, ``_forward_box``, mask pooler, ``_forward_mask``);
- training time per iteration (forward + backward + SGD step, median);
- peak memory: CUDA ``max_memory_allocated``; on the CPU the process RSS sampled every 2 ms
  during the timed runs (peak, and increase over the RSS just before the run);
- that (a) and (b) give the same outputs: the same number of detections and classes, boxes
  within 1e-4 relative to the coordinate, scores within 1e-4, at most 1e-4 of the mask pixels
  different (a probability at exactly the 0.5 threshold may round either way).

Weights are random (seeded): no checkpoint is needed. ``SCORE_THRESH_TEST`` is 0 and
``TEST.DETECTIONS_PER_IMAGE`` is ``--detections``, so every image has exactly that many
detections (masks predicted and pasted). Images are cmrcnn_ext's synthetic shapes (seeded),
rendered at the requested size, with their ground truth used for training.

    python benchmarks/bench_inference.py --quick              # ~1-2 min smoke run, R50-FPN
    python benchmarks/bench_inference.py                      # R50-FPN, 800 x 1067, 100 dets
    python benchmarks/bench_inference.py --config demo        # the CPU demo config, 256 px
    python benchmarks/bench_inference.py --config demo --scaling
"""

import argparse
import contextlib
import copy
import ctypes
import functools
import os
import resource
import statistics
import sys
import threading
import time
from collections import defaultdict

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default="r50",
        help="config file, or 'r50' (cascade_mask_rcnn_R_50_FPN_1x.yaml, default) "
        "or 'demo' (cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed inference runs per model (default 3 for R50-size configs, 10 for smaller)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up runs per model (default 1, 2 for small configs)",
    )
    p.add_argument(
        "--train-iters",
        type=int,
        default=None,
        help="timed training iterations per model and batch size, after 1 warm-up "
        "(default 1 for R50-size configs, 4 for smaller)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="short side in px (default: the config's INPUT.MIN_SIZE_TEST, 800 for R50); the "
        "long side is 4/3 of it, capped at INPUT.MAX_SIZE_TEST scaled alike",
    )
    p.add_argument(
        "--detections",
        type=int,
        default=None,
        help="detections per image (TEST.DETECTIONS_PER_IMAGE with SCORE_THRESH_TEST 0; "
        "default: the config's value)",
    )
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated training batch sizes (default 1; 'none' skips training)",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also print scaling tables: inference vs short side 512/800/1333 and vs "
        "detections 10/100/300; training vs batch 1/2/4",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 warm-up + 2 timed inference runs, 1 training iteration; for "
        "R50-size configs also short side 320, 20 detections, RPN top-k 300",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-export",
        action="store_true",
        help="skip the row of the TorchScript-exported model (b)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--weights",
        default="",
        help="checkpoint (.pth, e.g. the demo's model_final.pth) loaded into every model "
        "instead of random weights; (c)'s extra mask heads are its mask head plus "
        "small noise, as with random weights",
    )
    p.add_argument(
        "--score-thresh",
        type=float,
        default=0.0,
        help="SCORE_THRESH_TEST (default 0: every image has --detections detections; with "
        "trained --weights, the config's 0.05 gives the detections a user gets)",
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides KEY VALUE ... for all three models, after the config "
        "(e.g. MODEL.CMRCNN.FAST_ROI_ALIGN False)",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- set-up
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


def variant_cfgs(cfg):
    cfgs = {}
    a = cfg.clone()
    a.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    a.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfgs["a"] = a
    b = cfg.clone()
    b.MODEL.ROI_HEADS.NAME = "CascadeMaskROIHeads"
    b.MODEL.ROI_MASK_HEAD.NAME = "CMRCNNConvUpsampleHead"
    b.MODEL.CMRCNN.MASK_STAGES = "first"
    b.MODEL.CMRCNN.TEST_MASK_MERGE = "last"
    cfgs["b"] = b
    c = b.clone()
    c.MODEL.CMRCNN.MASK_STAGES = "all"
    c.MODEL.CMRCNN.TEST_MASK_MERGE = "mean"
    cfgs["c"] = c
    return cfgs


@torch.no_grad()
def calibrate_frozen_bn(model, item):
    """Set every FrozenBatchNorm2d's statistics to those of its input on one image (in forward
    order), so that a randomly initialised FrozenBN backbone (R50 configs) gives unit-scale
    features as a trained one does. Without it the residual sums grow to ~1e3-1e4, the class
    scores saturate at background and no box survives. Returns the number of layers set."""
    from detectron2.layers import FrozenBatchNorm2d

    handles = []

    def pre(mod, inputs):
        x = inputs[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-5)

    for mod in model.modules():
        if isinstance(mod, FrozenBatchNorm2d):
            handles.append(mod.register_forward_pre_hook(pre))
    if handles:
        model.eval()
        model.backbone(model.preprocess_image(infer_inputs(item)).tensor)
    for h in handles:
        h.remove()
    return len(handles)


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


# ----------------------------------------------------------------------------- measuring
class Sync:
    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()


class MemoryMonitor:
    """Peak memory during a block: CUDA max_memory_allocated, or sampled process RSS."""

    def __init__(self, device, interval=0.002):
        self.cuda = device == "cuda"
        self.interval = interval
        self.peak = self.base = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)


def _trim_heap():
    """Give freed heap memory back to the OS (glibc) so RSS increases are comparable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PartTimer:
    """Times the parts of a GeneralizedRCNN inference (see module docstring)."""

    def __init__(self, model, sync):
        self.model, self.sync = model, sync
        self.times = defaultdict(float)
        self._stage = None
        self._undo, self._hooks = [], []
        rh = model.roi_heads
        self._wrap(rh, "_run_stage", lambda f, p, stage: f"box stage {stage + 1}", sets_stage=True)
        self._wrap(rh, "_forward_box", lambda *a: "box all")
        self._wrap(rh, "_forward_mask", lambda *a: "mask all")
        self._hook(rh.box_pooler, lambda: f"{self._stage} ROIAlign")
        if getattr(rh, "mask_pooler", None) is not None:
            self._hook(rh.mask_pooler, lambda: "mask ROIAlign")

    def _wrap(self, obj, name, label, sets_stage=False):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            lab = label(*args, **kwargs)
            if sets_stage:
                self._stage = lab
            self.sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.sync()
            self.times[lab] += time.perf_counter() - start
            return out

        setattr(obj, name, wrapper)  # instance attribute: shadows the method
        self._undo.append((obj, name))

    def _hook(self, module, label):
        state = {}

        def pre(mod, inp):
            self.sync()
            state["t"] = time.perf_counter()

        def post(mod, inp, out):
            self.sync()
            self.times[label()] += time.perf_counter() - state["t"]

        self._hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self):
        for obj, name in self._undo:
            delattr(obj, name)
        for h in self._hooks:
            h.remove()

    def _step(self, label, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        self.times[label] += time.perf_counter() - start
        return out

    @torch.no_grad()
    def run(self, batched_inputs):
        """One inference, exactly as GeneralizedRCNN.inference; returns (outputs, times)."""
        from detectron2.modeling import GeneralizedRCNN

        m = self.model
        self.times = defaultdict(float)
        start = time.perf_counter()
        images = self._step("preprocess", lambda: m.preprocess_image(batched_inputs))
        features = self._step("backbone", lambda: m.backbone(images.tensor))
        proposals, _ = self._step("RPN", lambda: m.proposal_generator(images, features, None))
        results, _ = self._step("roi_heads", lambda: m.roi_heads(images, features, proposals, None))
        out = self._step(
            "postprocess",
            lambda: GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes),
        )
        self.times["total"] = time.perf_counter() - start
        return out, dict(self.times)


def breakdown_rows(t, num_stages):
    """Derived per-run rows (seconds) from PartTimer times."""
    rows = {
        "preprocess (normalise, pad)": t["preprocess"],
        "backbone": t["backbone"],
        "RPN": t["RPN"],
    }
    for k in range(1, num_stages + 1):
        st = t.get(f"box stage {k}", 0.0)
        pool = t.get(f"box stage {k} ROIAlign", 0.0)
        rows[f"box stage {k} (ROIAlign + head + predictor)"] = st
        rows[f"  stage {k} ROIAlign"] = pool
        rows[f"  stage {k} box head + predictor"] = st - pool
    stages = sum(t.get(f"box stage {k}", 0.0) for k in range(1, num_stages + 1))
    rows["box decode, score mean, NMS"] = t["box all"] - stages
    rows["mask ROIAlign"] = t.get("mask ROIAlign", 0.0)
    rows["mask head(s) (+ sigmoid, mean)"] = t["mask all"] - t.get("mask ROIAlign", 0.0)
    rows["roi_heads other"] = t["roi_heads"] - t["box all"] - t["mask all"]
    rows["postprocess (rescale, paste masks)"] = t["postprocess"]
    rows["total"] = t["total"]
    return rows


def run_inference(models, images, warmup, iters, device, checker=None):
    """Round-robin inference: ``warmup`` rounds of plain ``model(inputs)``, then ``iters`` timed
    rounds of the part-by-part path. Outputs of each round are compared by ``checker``.

    Returns:
        {model: {"lat": [s], "rows": [breakdown], "peak": bytes, "delta": bytes, "dets": [n]}}
    """
    sync = Sync(device)
    timers = {k: PartTimer(m, sync) for k, m in models.items()}
    res = {k: {"lat": [], "rows": [], "peak": 0, "delta": 0, "dets": []} for k in models}
    warm0 = None
    try:
        for i in range(warmup):
            with torch.no_grad():
                outs = {k: m(infer_inputs(images[i % len(images)])) for k, m in models.items()}
            if checker is not None:
                checker.add(outs)
            if i == 0:
                warm0 = outs["a"]
            del outs
        for i in range(iters):
            item = images[i % len(images)]
            outs = {}
            for k, m in models.items():
                _trim_heap()
                with MemoryMonitor(device) as mem:
                    outs[k], t = timers[k].run(infer_inputs(item))
                res[k]["dets"].append(len(outs[k][0]["instances"]))
                res[k]["lat"].append(t["total"])
                res[k]["rows"].append(breakdown_rows(t, m.roi_heads.num_cascade_stages))
                res[k]["peak"] = max(res[k]["peak"], mem.peak)
                res[k]["delta"] = max(res[k]["delta"], mem.peak - mem.base)
            if checker is not None:
                checker.add(outs)
                if i == 0 and warm0 is not None:  # same image: model(inputs) == part-by-part
                    checker.same_as_forward(warm0, outs["a"])
            del outs
    finally:
        for tm in timers.values():
            tm.remove()
    return res


def run_training(models, images, batch_size, warmup, iters, device):
    """Median seconds per training iteration (forward + backward + SGD step) per model."""
    from detectron2.utils.events import EventStorage

    sync = Sync(device)
    res = {k: {"it": [], "peak": 0, "delta": 0} for k in models}
    opts = {}
    for k, m in models.items():
        m.train()
        # lr 0: every iteration does the same work on unchanged weights
        opts[k] = torch.optim.SGD(
            [p for p in m.parameters() if p.requires_grad], lr=0.0, momentum=0.9, weight_decay=1e-4
        )
    try:
        with EventStorage(0):
            for i in range(warmup + iters):
                batch = [
                    copy.copy(images[(i * batch_size + j) % len(images)]) for j in range(batch_size)
                ]
                for k, m in models.items():
                    _trim_heap()
                    with MemoryMonitor(device) as mem:
                        sync()
                        start = time.perf_counter()
                        losses = m(batch)
                        loss = sum(losses.values())
                        opts[k].zero_grad(set_to_none=True)
                        loss.backward()
                        opts[k].step()
                        sync()
                        dt = time.perf_counter() - start
                    if i >= warmup:
                        res[k]["it"].append(dt)
                        res[k]["peak"] = max(res[k]["peak"], mem.peak)
                        res[k]["delta"] = max(res[k]["delta"], mem.peak - mem.base)
    finally:
        for k, m in models.items():
            opts[k].zero_grad(set_to_none=True)
            m.eval()
    return res


class OutputChecker:
    """Accumulates the comparison of (a) with (b) (and (c)) over inference rounds."""

    def __init__(self):
        self.n_img = self.n_det = self.classes = self.mask_px = self.total_px = 0
        self.distinct = 0
        self.boxes = self.box_rel = self.scores = self.box_c = 0.0
        self.counts_differ = 0
        self.ious = []
        self.forward_same = None

    @torch.no_grad()
    def add(self, outs):
        a, b, c = (outs[k][0]["instances"].to("cpu") for k in ("a", "b", "c"))
        self.n_img += 1
        if len(a) != len(b) or len(a) != len(c):
            self.counts_differ += 1
            return
        if len(a) == 0:
            return
        self.n_det += len(a)
        self.distinct += len(torch.unique(a.pred_boxes.tensor, dim=0))
        diff = (a.pred_boxes.tensor - b.pred_boxes.tensor).abs()
        self.boxes = max(self.boxes, diff.max().item())
        self.box_rel = max(
            self.box_rel, (diff / a.pred_boxes.tensor.abs().clamp(min=1)).max().item()
        )
        self.scores = max(self.scores, (a.scores - b.scores).abs().max().item())
        self.classes += int((a.pred_classes != b.pred_classes).sum())
        self.mask_px += int((a.pred_masks != b.pred_masks).sum())
        self.total_px += a.pred_masks.numel()
        self.box_c = max(self.box_c, (a.pred_boxes.tensor - c.pred_boxes.tensor).abs().max().item())
        inter = (a.pred_masks & c.pred_masks).flatten(1).sum(1).float()
        union = (a.pred_masks | c.pred_masks).flatten(1).sum(1).float()
        self.ious.append((inter / union.clamp(min=1))[union > 0])

    def same_as_forward(self, forward_out, timed_out):
        x, y = forward_out[0]["instances"], timed_out[0]["instances"]
        self.forward_same = (
            len(x) == len(y)
            and torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
            and torch.equal(x.scores, y.scores)
            and torch.equal(x.pred_masks, y.pred_masks)
        )

    @property
    def ok(self):
        # Boxes: 1e-4 relative to the coordinate (1e-4 px up to 1 px). Absolute 1e-4 px would be
        # below float32's resolution beyond 1024 px (its step there is 1.2e-4 px).
        return (
            self.n_det > 0
            and self.counts_differ == 0
            and self.box_rel <= 1e-4
            and self.scores <= 1e-4
            and self.classes == 0
            and self.mask_px <= 1e-4 * self.total_px
            and self.forward_same is not False
        )

    def lines(self):
        out = [
            f"  (a) vs (b) over {self.n_img} inference runs, {self.n_det} detections: "
            f"max |box diff| {self.boxes:.2e} px (relative to the coordinate {self.box_rel:.1e}), "
            f"max |score diff| {self.scores:.2e}, class mismatches {self.classes}, "
            f"differing mask pixels {self.mask_px} of {self.total_px}, "
            "runs with different detection "
            f"counts {self.counts_differ} -> {'EQUAL (1e-4)' if self.ok else 'DIFFERENT'}"
        ]
        if self.n_det:
            out.append(
                f"  distinct boxes among the detections: {self.distinct} of {self.n_det} "
                f"({100 * (1 - self.distinct / self.n_det):.0f}% of the detections repeat a box of "
                "another class; (b) and (c) run the mask head once per distinct box, (a) once "
                "per detection)"
            )
        if self.ious:
            out.append(
                f"  (c) vs (a): max |box diff| {self.box_c:.2e} (same box path); mean mask IoU "
                f"{torch.cat(self.ious).mean().item():.3f} (masks: mean of 3 heads' probabilities)"
            )
        if self.forward_same is not None:
            out.append(
                f"  timed part-by-part path gives model(inputs)'s outputs: {self.forward_same}"
            )
        return out


# ----------------------------------------------------------------------------- printing
def _ratio(x, base):
    """``x / base`` as "1.23x", or "-" where the baseline time is too small to divide by."""
    return f"{x / base:8.2f}x" if base > 1e-4 else f"{'-':>9}"


def _ms(x):
    return f"{1000 * x:9.1f}"


def _mib(x):
    return f"{x / 2**20:8.0f}"


def print_inference(res, title, device):
    mem_label = "CUDA peak MiB (+run)" if device == "cuda" else "peak RSS MiB (+run)"
    print(f"\n{title}")
    print(
        f"{'model':<28}{'median ms':>10}{'IQR ms':>9}{'img/s':>8}{'vs (a)':>8}{'dets':>6}   "
        f"{mem_label}"
    )
    base = statistics.median(res["a"]["lat"])
    for k, r in res.items():
        lat = np.array(r["lat"])
        q1, q3 = np.percentile(lat, [25, 75])
        med = float(np.median(lat))
        print(
            f"{MODEL_NAMES[k]:<28}{_ms(med):>10}{_ms(q3 - q1):>9}{len(lat) / lat.sum():8.2f}"
            f"{med / base:7.2f}x{statistics.mean(r['dets']):6.0f}   "
            f"{_mib(r['peak'])} ({r['delta'] / 2**20:+.0f})"
        )


def print_exported(models, images, warmup, iters):
    """Latency of model (b) exported with ``cmrcnn-export`` (TorchScript, and ONNX
    run by onnxruntime when it is installed), against eager (a) timed the same way (single-image
    calls, median), and whether each export gives (b)'s eager outputs (1e-4, all images)."""
    import tempfile

    from cmrcnn_ext.export import (
        ExportableCascadeMaskRCNN,
        compare_outputs,
        export_onnx,
        export_torchscript,
    )

    from exported import benchmark_exported

    imgs = [infer_inputs(item)[0]["image"] for item in images]
    wrapper = ExportableCascadeMaskRCNN(models["b"], mask_format="bool").eval()
    rows = []
    with torch.no_grad():
        t_a = benchmark_exported(lambda x: models["a"]([{"image": x}]), imgs, warmup, iters)
        t_w = benchmark_exported(wrapper, imgs, warmup, iters)
        rows.append(("(b) ours, export wrapper, eager", t_w, "-"))
        eager = [wrapper(x) for x in imgs]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.ts")
        export_torchscript(wrapper, imgs[0], path)
        loaded = torch.jit.load(path)
        with torch.no_grad():
            same = all(compare_outputs(e, loaded(x))["ok"] for e, x in zip(eager, imgs))
        rows.append(
            ("(b) ours, TorchScript", benchmark_exported(loaded, imgs, warmup, iters), same)
        )
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        on_cuda = next(models["b"].parameters()).is_cuda
        if on_cuda:  # a CUDA trace run by onnxruntime on the CPU would compare GPU with CPU numbers
            print(
                "\n(ONNX row skipped on --device cuda: this benchmark runs onnxruntime on the CPU "
                "only)"
            )
        if ort is not None and not on_cuda:
            path = os.path.join(tmp, "model.onnx")
            export_onnx(wrapper, imgs[0], path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

            def run_onnx(x):
                return sess.run(None, {"image": x.float().numpy()})

            same = all(
                compare_outputs(e, [torch.from_numpy(o) for o in run_onnx(x)])["ok"]
                for e, x in zip(eager, imgs)
            )
            rows.append(
                (
                    "(b) ours, ONNX (onnxruntime)",
                    benchmark_exported(run_onnx, imgs, warmup, iters),
                    same,
                )
            )
    n = iters * len(imgs)
    print(
        f"\nexported model (trace of (b); single-image calls, median of {n}; 'equal': outputs "
        "= (b)'s eager wrapper to 1e-4 on every image)"
    )
    print(f"{'(a) Detectron2, eager':<36}{_ms(t_a):>10} ms   1.00x")
    for name, t, same in rows:
        eq = same if same == "-" else ("equal" if same else "DIFFERENT")
        print(f"{name:<36}{_ms(t):>10} ms   {t / t_a:.2f}x   {eq}")


def print_breakdown(res):
    print(
        "\nper-component breakdown, median ms per image (ratio: (c) / (a), share: of (c)'s total)"
    )
    labels = list(res["a"]["rows"][0].keys())
    med = {
        k: {lab: statistics.median(row[lab] for row in r["rows"]) for lab in labels}
        for k, r in res.items()
    }
    print(
        f"{'component':<42}{'(a)':>9}{'(b)':>9}{'(c)':>9}{'(b)/(a)':>9}{'(c)/(a)':>9}"
        f"{'share (c)':>10}"
    )
    for lab in labels:
        a, b, c = med["a"][lab], med["b"][lab], med["c"][lab]
        ratio = functools.partial(_ratio, base=a)
        print(
            f"{lab:<42}{_ms(a)}{_ms(b)}{_ms(c)}{ratio(b)}{ratio(c)}"
            f"{100 * c / med['c']['total']:9.1f}%"
        )
    return med


def print_training(res, batch_size, device, warmup):
    mem_label = "CUDA peak MiB (+iter)" if device == "cuda" else "peak RSS MiB (+iter)"
    base = statistics.median(res["a"]["it"])
    print(
        f"\ntraining, batch {batch_size}: forward + backward + SGD step, "
        f"median of {len(res['a']['it'])} iteration(s) after {warmup} warm-up"
    )
    print(f"{'model':<28}{'s/iter':>9}{'vs (a)':>8}   {mem_label}")
    for k, r in res.items():
        med = statistics.median(r["it"])
        print(
            f"{MODEL_NAMES[k]:<28}{med:9.2f}{med / base:7.2f}x   {_mib(r['peak'])} "
            f"({r['delta'] / 2**20:+.0f})"
        )


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    cfg, path = load_cfg(args)
    big = cfg.INPUT.MIN_SIZE_TEST >= 600
    # R50-size configs (short side >= 600) are slow on a CPU: few runs; small configs: more
    warmup = args.warmup if args.warmup is not None else (1 if big or args.quick else 2)
    iters = args.iters if args.iters is not None else (2 if args.quick else 3 if big else 10)
    train_iters = (
        args.train_iters if args.train_iters is not None else (1 if args.quick or big else 4)
    )
    train_warmup = 0 if args.quick else 1
    quick_note = ""
    if args.quick and big:  # smoke run of an R50-size config: a smaller problem
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 300
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 500
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
        if args.detections is None:
            cfg.TEST.DETECTIONS_PER_IMAGE = 20
        quick_note = (
            " [--quick: short side 320, RPN post-NMS top-k 300 test / 500 train, "
            "128 sampled ROIs, 20 detections unless given]"
        )
    elif args.quick:
        quick_note = " [--quick]"
    short = args.image_size or (320 if args.quick and big else cfg.INPUT.MIN_SIZE_TEST)
    if args.batch_sizes is None:
        batch_sizes = [1]
    elif args.batch_sizes.lower() == "none":
        batch_sizes = []
    else:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dets = cfg.TEST.DETECTIONS_PER_IMAGE
    h, w = image_shape(cfg, short)

    import detectron2

    import cmrcnn_ext  # noqa: F401  (registers the heads)

    source = f"weights {args.weights}" if args.weights else f"random weights, seed {args.seed}"
    print(f"config: {os.path.relpath(path, ROOT)} {' '.join(args.opts)}  ({source})")
    print(
        "ours (b), (c): MODEL.CMRCNN "
        + ", ".join(
            f"{k}={v}"
            for k, v in cfg.MODEL.CMRCNN.items()
            if k not in ("MASK_STAGES", "TEST_MASK_MERGE")
        )
    )
    print(
        f"device: {args.device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if args.device == "cuda"
            else f", {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
        )
        + f"; torch {torch.__version__}, detectron2 {detectron2.__version__}"
    )
    print(
        f"images: {h} x {w}, batch 1; {dets} detections per image at most "
        f"(SCORE_THRESH_TEST {cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST:g}); "
        f"RPN post-NMS top-k {cfg.MODEL.RPN.POST_NMS_TOPK_TEST}; warm-up {warmup}, "
        f"timed runs {iters}" + quick_note
    )
    print(
        "load average at start: %.1f %.1f %.1f (timings are wall clock: other processes on the "
        "machine slow every model alike, round-robin, but widen the IQR)" % os.getloadavg()
    )
    if os.getloadavg()[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(
            "WARNING: the machine is busy; with several torch threads OpenMP then slows down a lot "
            "and erratically: --threads 1 gives steadier numbers"
        )
    t_start = time.perf_counter()
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    n_img = max([2] + batch_sizes)
    images = make_images(n_img, h, w, args.seed, num_classes)
    models = build_models(cfg, args.seed, images[0], args.weights)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(
        "parameters: "
        + ", ".join(f"{MODEL_NAMES[k].split()[0]} {v / 1e6:.2f} M" for k, v in n_params.items())
    )

    checker = OutputChecker()
    res = run_inference(models, images, warmup, iters, args.device, checker)
    print("\noutput check (every warm-up and timed inference run)")
    print("\n".join(checker.lines()))
    ok = checker.ok
    print_inference(res, f"inference, {h} x {w}, {dets} detections/image", args.device)
    med = print_breakdown(res)
    if not args.no_export:
        print_exported(models, images, warmup, iters)

    for bs in batch_sizes:
        tr = run_training(models, images, bs, train_warmup, train_iters, args.device)
        print_training(tr, bs, args.device, train_warmup)

    if args.scaling:
        run_scaling(args, cfg, models, warmup, max(2, iters - 1), train_warmup, train_iters)

    print("load average at end: %.1f %.1f %.1f" % os.getloadavg())
    print(
        "\nprocess peak RSS (getrusage): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB;"
        f" wall time {time.perf_counter() - t_start:.0f} s"
    )
    for k in ("b", "c"):
        t = med[k]
        top = sorted(
            ((v, lab) for lab, v in t.items() if lab != "total" and not lab.startswith("  ")),
            reverse=True,
        )[:4]
        print(
            f"largest inference costs in {k} ({MODEL_NAMES[k][4:]}): "
            + ", ".join(f"{lab} {100 * v / t['total']:.0f}%" for v, lab in top)
        )
    if not ok:
        print("OUTPUT CHECK FAILED: (a) and (b) differ")
    return 0 if ok else 1


def run_scaling(args, cfg, models, warmup, iters, train_warmup, train_iters):
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    print(f"\n=== scaling (median ms per image; warm-up {warmup}, {iters} timed runs each) ===")

    def table(title, settings, run):
        print(f"\n{title}")
        print(
            f"{'setting':<22}"
            + "".join(f"{MODEL_NAMES[k].split()[0] + ' ms':>11}" for k in models)
            + f"{'(b)/(a)':>9}{'(c)/(a)':>9}"
        )
        for label, res in ((lab, run(s)) for lab, s in settings):
            med = {k: statistics.median(r) for k, r in res.items()}
            print(
                f"{label:<22}"
                + "".join(f"{1000 * med[k]:11.1f}" for k in models)
                + f"{med['b'] / med['a']:8.2f}x{med['c'] / med['a']:8.2f}x"
            )

    dets = cfg.TEST.DETECTIONS_PER_IMAGE

    def by_size(short):
        h, w = image_shape(cfg, short)
        imgs = make_images(2, h, w, args.seed, num_classes)
        r = run_inference(models, imgs, warmup, iters, args.device)
        return {k: v["lat"] for k, v in r.items()}

    table(
        f"inference vs image size ({dets} detections)",
        [(f"{'x'.join(map(str, image_shape(cfg, s)))}", s) for s in (512, 800, 1333)],
        by_size,
    )

    short = args.image_size or cfg.INPUT.MIN_SIZE_TEST
    h, w = image_shape(cfg, short)
    imgs = make_images(2, h, w, args.seed, num_classes)

    def by_dets(n):
        set_detections(models, n)
        try:
            r = run_inference(models, imgs, warmup, iters, args.device)
        finally:
            set_detections(models, dets)
        print(f"  ({n} requested: {statistics.mean(r['a']['dets']):.0f} detections/image produced)")
        return {k: v["lat"] for k, v in r.items()}

    table(
        f"inference vs detections per image ({h}x{w})",
        [(f"{n} detections", n) for n in (10, 100, 300)],
        by_dets,
    )

    imgs4 = make_images(4, h, w, args.seed, num_classes)

    def by_batch(bs):
        r = run_training(models, imgs4, bs, train_warmup, train_iters, args.device)
        return {k: v["it"] for k, v in r.items()}

    print(
        f"\n(training rows: seconds per iteration x 1000, {h}x{w}, warm-up {train_warmup}, "
        f"{train_iters} timed)"
    )
    table("training vs batch size", [(f"batch {b}", b) for b in (1, 2, 4)], by_batch)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
