#!/usr/bin/env python
"""Ablation on the CPU demo setup: where the mask head sits, vs Detectron2's built-ins.

    python benchmarks/ablation.py [--iters 300] [--output output/ablation] [KEY VALUE ...]

Trains the demo config (same seed, data and iterations) with:

- ours, ``MASK_STAGES`` first / last / all (the latter evaluated with ``TEST_MASK_MERGE`` last
  and mean: one training, two test-time modes);
- Detectron2's built-in ``CascadeROIHeads``;
- plain Mask R-CNN (Detectron2's ``StandardROIHeads``, class-agnostic boxes as in the cascade);

and prints one Markdown table: box AP, mask AP, train s/iter, inference s/image.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from cmrcnn_ext.demo import DEMO_CONFIG  # noqa: E402
from cmrcnn_ext.engine import Trainer, setup_cfg  # noqa: E402

VARIANTS = [
    # name, config overrides, extra test-time modes {label: TEST_MASK_MERGE}
    ("ours first", ["MODEL.CMRCNN.MASK_STAGES", "first"], None),
    (
        "Detectron2 CascadeROIHeads",
        ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_MASK_HEAD.NAME",
         "MaskRCNNConvUpsampleHead"],
        None,
    ),  # fmt: skip
    ("ours all", ["MODEL.CMRCNN.MASK_STAGES", "all"], {"last": "last", "mean": "mean"}),
    (
        "Mask R-CNN (StandardROIHeads)",
        ["MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_MASK_HEAD.NAME",
         "MaskRCNNConvUpsampleHead"],
        None,
    ),  # fmt: skip
    ("ours last", ["MODEL.CMRCNN.MASK_STAGES", "last"], None),
    (
        "ours all, weights 1/0.5/0.25",
        ["MODEL.CMRCNN.MASK_STAGES", "all", "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", "[1.0,0.5,0.25]"],
        {"mean": "mean"},
    ),
]


def run_variant(name, overrides, merges, args):
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    out = os.path.join(args.output, slug)
    opts = list(args.opts) + overrides + ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", args.iters]
    if args.iters != 300:  # keep the demo's LR schedule shape
        opts += ["SOLVER.STEPS", f"({int(args.iters * 0.73)}, {int(args.iters * 0.9)})"]
    cfg = setup_cfg(args.config_file, [str(o) for o in opts])
    torch.manual_seed(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.perf_counter()
    trainer.train()
    s_iter = (time.perf_counter() - t0) / cfg.SOLVER.MAX_ITER
    rows = []
    for label, merge in (merges or {"": None}).items():
        if merge is not None:
            trainer.model.roi_heads.test_mask_merge = merge
        t0 = time.perf_counter()
        res = Trainer.test(cfg, trainer.model)
        n_images = len(DatasetCatalog.get(cfg.DATASETS.TEST[0]))
        s_img = (time.perf_counter() - t0) / n_images
        full = f"{name}, test merge {label}" if label else name
        rows.append((full, res["bbox"]["AP"], res["segm"]["AP"], s_iter, s_img))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--output", default="output/ablation")
    parser.add_argument("--only", nargs="*", help="substrings of variant names to run")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    setup_logger(name="cmrcnn_ext")
    rows = []
    for name, overrides, merges in VARIANTS:
        if args.only and not any(s in name for s in args.only):
            continue
        print(f"[ablation] {name}", flush=True)
        rows.extend(run_variant(name, overrides, merges, args))
        with open(os.path.join(args.output, "ablation.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\nDemo config, {args.iters} iterations, seed 0, held-out split (COCO AP@[.5:.95])\n")
    print("| variant | box AP | mask AP | train s/iter | inference s/image |")
    print("|---|---:|---:|---:|---:|")
    for name, box, mask, s_iter, s_img in rows:
        print(f"| {name} | {box:.1f} | {mask:.1f} | {s_iter:.2f} | {s_img:.3f} |")


if __name__ == "__main__":
    main()
