# ruff: noqa: B023, E501  (loop closures are called inside the same iteration)
"""The models users choose between, side by side in one process on the same images and machine:
torchvision's Mask R-CNN v2 (no cascade), Detectron2's built-in cascade and ours (mask head on the
first, the last, or every stage with the mean merge).

    python benchmarks/bench_peers.py [--config r50|demo|FILE] [--iters 5] [--train-iters 3]
        [--batch 1] [--threads N] [--device cpu|cuda] [KEY VALUE ...]

Printed per model: inference latency (batch 1, median and IQR over ``--iters`` timed runs after
one warm-up; the models take turns on each image), training step (forward + backward + SGD step
with lr 0, so every step does the same work; median over ``--train-iters`` after one warm-up)
and the peak memory of each (the most the process's RSS rose above its level before the run),
float32 throughout (on a GPU: TF32 as PyTorch's defaults set it, the same for every model;
memory is CUDA ``max_memory_allocated`` above the allocation before the run). Weights are random (seeded; the
Detectron2 models share theirs), ``SCORE_THRESH_TEST`` 0 and the same detections per image for
every model (torchvision: ``box_score_thresh`` 0, ``box_detections_per_img``), so each runs its
mask head on the same number of boxes; torchvision's RPN and ROI sampling take the config's
values (``PRE/POST_NMS_TOPK_*``, ``BATCH_SIZE_PER_IMAGE``, ``POSITIVE_FRACTION``). Its heads
are its own: v2's box head has four 3x3 convolutions before its FC layer (Detectron2's R50
configs: two FC layers), so it costs more per ROI.

``--mmdet`` adds MMDetection 3.x's Cascade Mask R-CNN R50-FPN (``peer_mmdet.py``: its shipped
config with the Detectron2 config's classes, proposal counts, sampling and detections; mask heads
on every stage, merged by the mean at test time). It needs ``mmcv`` with its compiled ops, which
has no wheel for this torch and whose sdist compiles here only with C++20 instead of the C++17 it
asks for (docs/performance.md, "MMDetection on the CPU"); ``scripts/build_mmdet.sh`` builds it that way.
"""

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_inference  # noqa: E402  (its argument parser: load_cfg options)
import peer_mmdet  # noqa: E402
from bench_measure import MemoryMonitor, _trim_heap  # noqa: E402
from bench_models import (  # noqa: E402
    ROOT,
    build_models,
    image_shape,
    infer_inputs,
    load_cfg,
    make_images,
    variant_cfgs,
)
from train_parts import require_device  # noqa: E402

NAMES = {
    "tv": "torchvision maskrcnn_resnet50_fpn_v2",
    "a": "Detectron2 cascade (mask on stage 1)",
    "b": "ours MASK_STAGES first",
    "l": "ours MASK_STAGES last",
    "c": "ours MASK_STAGES all + mean",
    "mm": "MMDetection cascade (mask all, mean)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="r50", help="r50, demo or a config file")
    p.add_argument("--iters", type=int, default=5, help="timed inference runs per model")
    p.add_argument("--train-iters", type=int, default=3, help="timed training steps per model")
    p.add_argument("--batch", type=int, default=1, help="training batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mmdet", action="store_true", help="add MMDetection's Cascade Mask R-CNN")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides (our models)")
    return p.parse_args(argv)


def torchvision_model(cfg, h, w):
    """torchvision's Mask R-CNN v2 with the config's classes, image size, detections and the
    RPN / ROI sampling settings that both libraries have (proposals kept before and after NMS,
    sampled anchors and ROIs, positive fraction)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    rpn, roi = cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS
    return maskrcnn_resnet50_fpn_v2(
        rpn_pre_nms_top_n_train=rpn.PRE_NMS_TOPK_TRAIN,
        rpn_pre_nms_top_n_test=rpn.PRE_NMS_TOPK_TEST,
        rpn_post_nms_top_n_train=rpn.POST_NMS_TOPK_TRAIN,
        rpn_post_nms_top_n_test=rpn.POST_NMS_TOPK_TEST,
        rpn_batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE,
        box_batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE,
        box_positive_fraction=roi.POSITIVE_FRACTION,
        weights=None,
        weights_backbone=None,
        num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1,  # + background
        min_size=min(h, w),
        max_size=max(h, w),
        box_score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        box_detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


def tv_inputs(item, bgr, device="cpu"):
    """torchvision's image (RGB, [0, 1]) and target from a Detectron2 dataset dict, on ``device``
    (Detectron2's models move their inputs themselves; torchvision's do not)."""
    img = item["image"].flip(0) if bgr else item["image"]
    inst = item["instances"]
    target = {
        "boxes": inst.gt_boxes.tensor.to(device),
        "labels": (inst.gt_classes + 1).to(device),
        "masks": inst.gt_masks.tensor.to(device, torch.uint8),
    }
    return img.to(device) / 255.0, target


def timed(fn, device="cpu"):
    """(fn(), seconds, peak memory above the start); on CUDA synchronised at both ends."""
    _trim_heap()
    with MemoryMonitor(device) as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, mem.peak - mem.base


def build(cfg, images, seed, mmdet=False, bgr=True):
    models = build_models(cfg, seed, images[0])
    last_cfg = variant_cfgs(cfg)["b"].clone()
    last_cfg.MODEL.CMRCNN.MASK_STAGES = "last"
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    last = build_model(last_cfg)
    last.load_state_dict(models["b"].state_dict())  # strict: same layers
    last.eval()
    h, w = images[0]["image"].shape[-2:]
    torch.manual_seed(seed)
    tv = torchvision_model(cfg, h, w).to(cfg.MODEL.DEVICE).eval()
    out = {"tv": tv, "a": models["a"], "b": models["b"], "l": last, "c": models["c"]}
    if mmdet:
        torch.manual_seed(seed)
        out["mm"] = peer_mmdet.mmdet_model(cfg, cfg.MODEL.DEVICE).eval()
        n_bn = peer_mmdet.calibrate_bn(out["mm"], images[0], bgr)
        print(f"MMDetection: BatchNorm statistics of {n_bn} backbone layers set from one image")
    return out


def run(models, images, iters, train_iters, batch, bgr, lr_opts, device="cpu"):
    res = {k: {"lat": [], "ipeak": 0, "train": [], "tpeak": 0, "dets": []} for k in models}
    with torch.no_grad():
        for i in range(1 + iters):
            item = images[i % len(images)]
            for k, m in models.items():
                if k == "tv":
                    out, s, peak = timed(lambda: m([tv_inputs(item, bgr, device)[0]]), device)
                elif k == "mm":
                    out, s, peak = timed(lambda: peer_mmdet.mm_infer(m, item, bgr, device), device)
                else:
                    out, s, peak = timed(lambda: m(infer_inputs(item)), device)
                if i:
                    res[k]["lat"].append(s)
                    res[k]["ipeak"] = max(res[k]["ipeak"], peak)
                    res[k]["dets"].append(num_detections(k, out))
    from detectron2.utils.events import EventStorage

    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], **lr_opts)
            for k, m in models.items()}  # fmt: skip
    for m in models.values():
        m.train()
    try:
        with EventStorage(0):
            for i in range(1 + train_iters):
                items = [images[(i * batch + j) % len(images)] for j in range(batch)]
                for k, m in models.items():

                    def step(k=k, m=m):
                        if k == "tv":
                            imgs, targets = zip(*(tv_inputs(it, bgr, device) for it in items))
                            loss = sum(m(list(imgs), list(targets)).values())
                        elif k == "mm":
                            loss = peer_mmdet.mm_loss(m, items, bgr, device)
                        else:
                            loss = sum(m([dict(it) for it in items]).values())
                        opts[k].zero_grad(set_to_none=True)
                        loss.backward()
                        opts[k].step()

                    _, s, peak = timed(step, device)
                    if i:
                        res[k]["train"].append(s)
                        res[k]["tpeak"] = max(res[k]["tpeak"], peak)
    finally:
        for m in models.values():
            m.eval()
    return res


def num_detections(k, out):
    """Detections in one image's output (each library's own output format)."""
    if k == "tv":
        return len(out[0]["boxes"])
    if k == "mm":
        return len(out[0].pred_instances)
    return len(out[0]["instances"])


def iqr(xs):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def main(argv=None):
    args = parse_args(argv)
    require_device(args.device)
    missing = peer_mmdet.available() if args.mmdet else None
    if missing:
        sys.exit(f"--mmdet: MMDetection cannot be imported here ({missing}); it "
                 "needs mmengine, mmdet 3.x and mmcv 2.x < 2.2.0 built with its ops: "
                 "'bash scripts/build_mmdet.sh' builds them into .mmdet/site, then run with "
                 "PYTHONPATH=.mmdet/site (docs/performance.md, 'MMDetection on the CPU')")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = bench_inference.parse_args(
        ["--config", args.config, "--seed", str(args.seed), "--device", args.device]
        + list(args.opts)
    )
    ns.score_thresh = 0.0
    cfg, path = load_cfg(ns)
    cfg.SOLVER.AMP.ENABLED = False
    h, w = image_shape(cfg, cfg.INPUT.MIN_SIZE_TEST)
    images = make_images(max(2, args.batch), h, w, args.seed, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    models = build(cfg, images, args.seed, args.mmdet, cfg.INPUT.FORMAT == "BGR")
    import detectron2
    import torchvision

    print(f"config {os.path.relpath(path, ROOT)} {' '.join(args.opts)}; images {h} x {w}; "
          f"{cfg.TEST.DETECTIONS_PER_IMAGE} detections per image (score threshold 0); float32")  # fmt: skip
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, detectron2 "
          f"{detectron2.__version__}; {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          "load average %.1f" % os.getloadavg()[0]
          + (f"; {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))  # fmt: skip
    lr = {"lr": 0.0, "momentum": 0.9, "weight_decay": 1e-4}
    res = run(models, images, args.iters, args.train_iters, args.batch,
              cfg.INPUT.FORMAT == "BGR", lr, args.device)  # fmt: skip
    base_i = statistics.median(res["a"]["lat"])
    base_t = statistics.median(res["a"]["train"])
    print(f"\n{'model':40}{'params M':>9}{'infer ms':>10}{'IQR':>17}{'vs D2':>7}{'+MiB':>7}"
          f"{'dets':>6}{'train s':>9}{'IQR':>15}{'vs D2':>7}{'+MiB':>7}")  # fmt: skip
    for k, m in models.items():
        r = res[k]
        lat, tr = statistics.median(r["lat"]), statistics.median(r["train"])
        (l1, l3), (t1, t3) = iqr(r["lat"]), iqr(r["train"])
        n = sum(p.numel() for p in m.parameters()) / 1e6
        print(f"{NAMES[k]:40}{n:9.1f}{1000 * lat:10.0f}  {1000 * l1:6.0f} - {1000 * l3:6.0f}"
              f"{lat / base_i:6.2f}x{r['ipeak'] / 2**20:7.0f}{statistics.median(r['dets']):6.0f}{tr:9.2f}  {t1:5.2f} - {t3:5.2f}"
              f"{tr / base_t:6.2f}x{r['tpeak'] / 2**20:7.0f}")  # fmt: skip
    print(f"(inference: batch 1, {args.iters} timed runs; training: batch {args.batch}, "
          f"{args.train_iters} timed steps; dets: median detections per image; 'vs D2': median / "
          "Detectron2's median; +MiB: the "
          + ("most CUDA memory allocated above the allocation before a run of the model)"
             if args.device == "cuda" else
             "most the process's RSS rose above its level before a run of the model)"))  # fmt: skip


if __name__ == "__main__":
    main()
