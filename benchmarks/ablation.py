#!/usr/bin/env python
"""Ablation on the CPU demo setup: where the mask head sits, vs Detectron2's built-ins.

    python benchmarks/ablation.py [--only NAME ...] [--iters N] [--output output/ablation] \\
        [KEY VALUE ...]
    python benchmarks/ablation.py --report          # table from the variants already trained

Trains the demo config (same seed, data and iterations) with:

- ours, ``MASK_STAGES`` first / last / all (the latter evaluated with ``TEST_MASK_MERGE`` last
  and mean: one training, two test-time modes);
- Detectron2's built-in ``CascadeROIHeads``;
- plain Mask R-CNN (Detectron2's ``StandardROIHeads``, class-agnostic boxes as in the cascade);

and prints one Markdown table: box AP, mask AP, train s/iter, inference s/image. Each variant's
rows are saved in ``<output>/<variant>/ablation_rows.json`` as soon as it finishes, so variants
can be trained in separate processes (``--only``) and collected with ``--report``. By default
the demo's own iterations and LR steps are used; ``--iters N`` scales the steps with N.
Inference s/image is the time of ``Trainer.test`` (inference + COCO evaluation) over the
held-out images, divided by their number.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from cmrcnn_ext.apps.demo import DEMO_CONFIG  # noqa: E402
from cmrcnn_ext.config import setup_cfg
from cmrcnn_ext.engine import Trainer  # noqa: E402

VARIANTS = [
    # name, config overrides, extra test-time modes {label: TEST_MASK_MERGE}
    ("ours first", ["MODEL.CMRCNN.MASK_STAGES", "first"], None),
    (
        "Detectron2 CascadeROIHeads",
        [
            "MODEL.ROI_HEADS.NAME",
            "CascadeROIHeads",
            "MODEL.ROI_MASK_HEAD.NAME",
            "MaskRCNNConvUpsampleHead",
        ],
        None,
    ),
    ("ours all", ["MODEL.CMRCNN.MASK_STAGES", "all"], {"last": "last", "mean": "mean"}),
    (
        "Mask R-CNN (StandardROIHeads)",
        [
            "MODEL.ROI_HEADS.NAME",
            "StandardROIHeads",
            "MODEL.ROI_MASK_HEAD.NAME",
            "MaskRCNNConvUpsampleHead",
        ],
        None,
    ),
    ("ours last", ["MODEL.CMRCNN.MASK_STAGES", "last"], None),
    (
        "ours all, weights 1/0.5/0.25",
        ["MODEL.CMRCNN.MASK_STAGES", "all", "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS", "[1.0,0.5,0.25]"],
        {"mean": "mean"},
    ),
]


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_variant(name, overrides, merges, args):
    out = os.path.join(args.output, _slug(name))
    opts = list(args.opts) + overrides + ["OUTPUT_DIR", out]
    if args.iters:  # keep the demo's LR schedule shape
        opts += [
            "SOLVER.MAX_ITER",
            args.iters,
            "SOLVER.STEPS",
            f"({int(args.iters * 0.8)}, {int(args.iters * 0.925)})",
        ]
    cfg = setup_cfg(args.config_file, [str(o) for o in opts])
    seed_all_rng(cfg.SEED)  # weights and image order (runs before this round seeded torch only)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.perf_counter()
    trainer.train()  # ends with Detectron2's evaluation of DATASETS.TEST (not timed below)
    s_iter = (time.perf_counter() - t0) / cfg.SOLVER.MAX_ITER
    rows = []
    n_images = len(DatasetCatalog.get(cfg.DATASETS.TEST[0]))
    for label, merge in (merges or {"": None}).items():
        if merge is not None:
            trainer.model.roi_heads.test_mask_merge = merge
        t0 = time.perf_counter()
        res = Trainer.test(cfg, trainer.model)
        s_img = (time.perf_counter() - t0) / n_images
        full = f"{name}, test merge {label}" if label else name
        rows.append((full, res["bbox"]["AP"], res["segm"]["AP"], s_iter, s_img))
    with open(os.path.join(out, "ablation_rows.json"), "w") as f:
        json.dump({"iters": cfg.SOLVER.MAX_ITER, "rows": rows}, f, indent=1)
    return rows


def collect(output):
    """Rows saved by finished variants, in VARIANTS order, and their iteration counts."""
    rows, iters = [], set()
    for name, _, _ in VARIANTS:
        path = os.path.join(output, _slug(name), "ablation_rows.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            rows.extend(saved["rows"])
            iters.add(saved["iters"])
    return rows, iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--iters", type=int, default=0, help="0: the config's MAX_ITER and STEPS")
    parser.add_argument("--output", default="output/ablation")
    parser.add_argument("--only", nargs="*", help="substrings of variant names to run")
    parser.add_argument("--report", action="store_true", help="only print the saved results")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    setup_logger(name="cmrcnn_ext")
    if not args.report:
        for name, overrides, merges in VARIANTS:
            if args.only and not any(s in name for s in args.only):
                continue
            print(f"[ablation] {name}", flush=True)
            run_variant(name, overrides, merges, args)
    rows, iters = collect(args.output)
    if not rows:
        raise SystemExit(f"no finished variant under {args.output}: run without --report first")
    its = ", ".join(str(i) for i in sorted(iters))
    print(f"\nDemo config, {its} iterations, seed 0, held-out split (COCO AP@[.5:.95])\n")
    print("| variant | box AP | mask AP | train s/iter | inference s/image |")
    print("|---|---:|---:|---:|---:|")
    for name, box, mask, s_iter, s_img in rows:
        print(f"| {name} | {box:.1f} | {mask:.1f} | {s_iter:.2f} | {s_img:.3f} |")


if __name__ == "__main__":
    main()
