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
- inference FLOPs per image and the GFLOP/s achieved, against the float32 matrix-multiply peak
  measured in the same run;
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
import os
import resource
import statistics
import sys
import time

import torch
from bench_measure import run_inference, run_training
from bench_models import (
    MODEL_NAMES,
    ROOT,
    build_models,
    image_shape,
    load_cfg,
    make_images,
    set_detections,
)
from bench_report import (
    print_breakdown,
    print_exported,
    print_hardware_use,
    print_inference,
    print_training,
)
from output_checker import OutputChecker
from train_parts import require_device


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


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    require_device(args.device)
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
    print_hardware_use(models, images[0], res, args.device)
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
