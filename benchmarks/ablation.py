#!/usr/bin/env python
"""Ablation on the CPU demo setup: where the mask head sits, vs Detectron2's built-ins.

    python benchmarks/ablation.py [--only NAME ...] [--seeds N ...] [--iters N] \\
        [--output output/ablation] [KEY VALUE ...]
    python benchmarks/ablation.py --seeds 0 1 2 --report   # table from the runs already trained
    python benchmarks/ablation.py --seeds 0 1 2 --eval-on cmrcnn_shapes_holdout  # re-evaluate

Trains the demo config (same seed, data and iterations) with:

- ours, ``MASK_STAGES`` first / last / all (the latter evaluated with ``TEST_MASK_MERGE`` last
  and mean: one training, two test-time modes);
- Detectron2's built-in ``CascadeROIHeads``;
- plain Mask R-CNN (Detectron2's ``StandardROIHeads``, class-agnostic boxes as in the cascade);

and prints one Markdown table: box AP, mask AP, train s/iter, inference s/image. With
``--seeds``, every variant is trained once per seed (``SEED`` set, as the demo does) and the
table gives the mean over the seeds, the spread (max - min) and each seed's value. Each
variant's rows are saved in ``<output>/seed<N>/<variant>/ablation_rows.json`` as soon as it
finishes, so variants and seeds can be trained in separate processes (``--only``, ``--seeds``)
and collected with ``--report``. ``--eval-on DATASET`` evaluates the trained variants' final
weights on another data set (no training; rows in ``ablation_rows_<DATASET>.json``, reported
with ``--report --eval-on DATASET``). By default
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

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from cmrcnn_ext.apps.demo import DEMO_CONFIG, precision_opts  # noqa: E402
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


def _variant_dir(output, seed, name):
    return os.path.join(output, f"seed{seed}", _slug(name))


def run_variant(name, overrides, merges, seed, args):
    out = _variant_dir(args.output, seed, name)
    opts = _variant_opts(overrides, seed, out, args)
    if args.iters:  # keep the demo's LR schedule shape
        opts += [
            "SOLVER.MAX_ITER",
            args.iters,
            "SOLVER.STEPS",
            f"({int(args.iters * 0.8)}, {int(args.iters * 0.925)})",
        ]
    cfg = setup_cfg(args.config_file, [str(o) for o in opts])
    seed_all_rng(cfg.SEED)  # initial weights and image order (before 78ab4c2: torch only)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.perf_counter()
    trainer.train()  # ends with Detectron2's evaluation of DATASETS.TEST (not timed below)
    s_iter = (time.perf_counter() - t0) / cfg.SOLVER.MAX_ITER
    rows = _evaluate(cfg, trainer.model, name, merges, lambda full: s_iter)
    with open(os.path.join(out, _rows_file(None)), "w") as f:
        json.dump({"iters": cfg.SOLVER.MAX_ITER, "rows": rows}, f, indent=1)
    return rows


def _variant_opts(overrides, seed, out, args):
    """The command line's keys, the variant's, its seed and folder, and the demo's precision
    choice for them (float32 where bfloat16 would be emulated)."""
    opts = list(args.opts) + overrides + ["SEED", seed, "OUTPUT_DIR", out]
    return opts + precision_opts(args.config_file, [str(o) for o in opts])


def _evaluate(cfg, model, name, merges, s_iter_of):
    """One row per test-time merge mode: (name, box AP, mask AP, s/iter, s/image) of ``model``
    on ``cfg.DATASETS.TEST[0]``; ``s_iter_of(row name)`` gives the training's s/iter."""
    n_images = len(DatasetCatalog.get(cfg.DATASETS.TEST[0]))
    rows = []
    for label, merge in (merges or {"": None}).items():
        if merge is not None:
            model.roi_heads.test_mask_merge = merge
        t0 = time.perf_counter()
        res = Trainer.test(cfg, model)
        s_img = (time.perf_counter() - t0) / n_images
        full = f"{name}, test merge {label}" if label else name
        rows.append((full, res["bbox"]["AP"], res["segm"]["AP"], s_iter_of(full), s_img))
    return rows


def _rows_file(dataset):
    """Where a variant's rows are saved: the config's own test split, or ``--eval-on``'s."""
    return f"ablation_rows_{dataset}.json" if dataset else "ablation_rows.json"


def reevaluate(name, overrides, merges, seed, args):
    """Evaluates a trained variant's ``model_final.pth`` on ``args.eval_on``, no training.

    The train s/iter is the one saved with the variant's own evaluation. Rows go to
    ``ablation_rows_<data set>.json`` next to the model.
    """
    out = _variant_dir(args.output, seed, name)
    weights = os.path.join(out, "model_final.pth")
    saved = os.path.join(out, _rows_file(None))
    if not (os.path.isfile(weights) and os.path.isfile(saved)):
        print(f"[ablation] {name}, SEED {seed}: not trained under {out}; skipped", flush=True)
        return []
    with open(saved) as f:
        trained = json.load(f)
    opts = _variant_opts(overrides, seed, out, args)
    opts += ["MODEL.WEIGHTS", weights, "DATASETS.TEST", f"('{args.eval_on}',)"]
    cfg = setup_cfg(args.config_file, [str(o) for o in opts])
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    s_iters = {r[0]: r[3] for r in trained["rows"]}
    rows = _evaluate(cfg, model, name, merges, s_iters.__getitem__)
    with open(os.path.join(out, _rows_file(args.eval_on)), "w") as f:
        json.dump({"iters": trained["iters"], "rows": rows}, f, indent=1)
    return rows


def collect(output, seeds, dataset=None):
    """Rows saved by finished runs, in VARIANTS order, and their iteration counts.

    Args:
        output: the ablation's output folder.
        seeds: the SEED values to collect.
        dataset: ``--eval-on``'s data set, or None for the config's own test split.

    Returns:
        ({row name: {seed: (box AP, mask AP, s/iter, s/image)}}, set of iteration counts).
    """
    rows, iters = {}, set()
    for name, _, _ in VARIANTS:
        for seed in seeds:
            path = os.path.join(_variant_dir(output, seed, name), _rows_file(dataset))
            if not os.path.exists(path):
                continue
            with open(path) as f:
                saved = json.load(f)
            iters.add(saved["iters"])
            for full, box, mask, s_iter, s_img in saved["rows"]:
                rows.setdefault(full, {})[seed] = (box, mask, s_iter, s_img)
    return rows, iters


def _selected(name, only):
    """``--only`` entries select a variant by exact name, or else by substring."""
    if not only:
        return True
    return (
        name in only
        or not any(o in {n for n, _, _ in VARIANTS} for o in only)
        and any(o in name for o in only)
    )


def table(rows, seeds):
    """Markdown table: mean, spread (max - min) and per-seed values of each row."""
    out = [
        "| variant | seeds | box AP mean (spread) | mask AP mean (spread) | box AP per seed "
        "| mask AP per seed | train s/iter | inference s/image |",
        "|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for name, by_seed in rows.items():
        got = [s for s in seeds if s in by_seed]
        box = [by_seed[s][0] for s in got]
        mask = [by_seed[s][1] for s in got]
        s_iter = sum(by_seed[s][2] for s in got) / len(got)
        s_img = sum(by_seed[s][3] for s in got) / len(got)
        out.append(
            f"| {name} | {', '.join(map(str, got))} "
            f"| {sum(box) / len(box):.1f} ({max(box) - min(box):.1f}) "
            f"| {sum(mask) / len(mask):.1f} ({max(mask) - min(mask):.1f}) "
            f"| {' / '.join(f'{v:.1f}' for v in box)} | {' / '.join(f'{v:.1f}' for v in mask)} "
            f"| {s_iter:.2f} | {s_img:.3f} |"
        )
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--iters", type=int, default=0, help="0: the config's MAX_ITER and STEPS")
    parser.add_argument("--output", default="output/ablation")
    parser.add_argument(
        "--only", nargs="*", help="variant names (exact), or else substrings of names, to run"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="SEED values")
    parser.add_argument("--report", action="store_true", help="only print the saved results")
    parser.add_argument(
        "--eval-on",
        metavar="DATASET",
        help="evaluate the trained variants on this data set instead of training them "
        "(e.g. cmrcnn_shapes_holdout: 200 more held-out images)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    setup_logger(name="cmrcnn_ext")
    if not args.report:
        step = reevaluate if args.eval_on else run_variant
        for seed in args.seeds:
            for name, overrides, merges in VARIANTS:
                if _selected(name, args.only):
                    print(f"[ablation] {name}, SEED {seed}", flush=True)
                    step(name, overrides, merges, seed, args)
    rows, iters = collect(args.output, args.seeds, args.eval_on)
    if not rows:
        raise SystemExit(f"no finished variant under {args.output}: run without --report first")
    its = ", ".join(str(i) for i in sorted(iters))
    seeds = ", ".join(map(str, args.seeds))
    split = args.eval_on or "held-out split"
    print(f"\nDemo config, {its} iterations, SEED {seeds}, {split} (COCO AP@[.5:.95])\n")
    print(table(rows, args.seeds))


if __name__ == "__main__":
    main()
