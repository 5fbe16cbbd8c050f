#!/usr/bin/env python
"""COCO evaluation time: Detectron2's COCOEvaluator with pycocotools vs cmrcnn_ext's
FastCOCOEvaluator (faster-coco-eval), same process, same data; checks that both give the same
12 COCO stats and per-category AP (bbox and segm) to 4 decimals.

The data set is synthetic (synthetic_results): >= 500 images with RLE and
polygon masks, iscrowd regions, empty images, duplicates, false positives and score ties.
Predictions go through Detectron2's ``process()`` once (mask RLE encoding; the same code for
both evaluators, timed separately); then ``evaluate()`` of each evaluator is timed on copies of
the same processed predictions, ``--repeats`` times, alternating.

    python benchmarks/bench_eval.py                 # 500 images, ~40 detections per image
    python benchmarks/bench_eval.py --images 1000 --repeats 3

Exit status 1 if any number differs by 5e-5 or more (0-1 scale).
"""

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

# the evaluation set (ground truth + predictions) shared with tests/test_evaluation.py
sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures"),
)
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco_evaluation

from cmrcnn_ext.evaluation import coco as cmrcnn_evaluation
from cmrcnn_ext.evaluation.coco import FastCOCOEvaluator

from synthetic_results import iter_model_outputs, make_coco_eval_set, register_eval_set  # noqa: E402

TASKS = ("bbox", "segm")
STAT_NAMES = [
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=400, help="image side range (px)")
    p.add_argument("--max-size", type=int, default=640)
    p.add_argument(
        "--max-objects", type=int, default=14, help="ground-truth objects per image: 1..N"
    )
    p.add_argument(
        "--max-false-positives", type=int, default=60, help="false positives per image: 0..N"
    )
    p.add_argument("--repeats", type=int, default=1, help="timed evaluate() calls per evaluator")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return p.parse_args(argv)


class _Recorder:
    """Wraps a module's evaluation function (called once per task by the evaluator): records
    wall and CPU time (all threads of the process) and the 12 COCO stats per task."""

    def __init__(self, module, name):
        self.module, self.name = module, name
        self.original = getattr(module, name)
        self.stats, self.wall, self.cpu = {}, {}, {}

    def __call__(self, coco_gt, coco_results, iou_type, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        coco_eval = self.original(coco_gt, coco_results, iou_type, **kwargs)
        self.wall[iou_type] = time.perf_counter() - wall
        self.cpu[iou_type] = time.process_time() - cpu
        self.stats[iou_type] = [float(s) for s in coco_eval.stats]
        return coco_eval

    def __enter__(self):
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def timed_evaluate(evaluator, predictions, recorder):
    """(results, recorder, wall s, cpu s) of one evaluate() on a copy of ``predictions``."""
    evaluator.reset()
    evaluator._predictions = copy.deepcopy(predictions)  # Detectron2 maps category ids in place
    wall, cpu = time.perf_counter(), time.process_time()
    with recorder, contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints summaries
        results = evaluator.evaluate()
    return results, recorder, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench_eval_")
    t0 = time.perf_counter()
    gt, dets = make_coco_eval_set(
        args.images,
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        max_objects=args.max_objects,
        max_false_positives=args.max_false_positives,
    )
    json_file = os.path.join(tmp, "gt.json")
    with open(json_file, "w") as f:
        json.dump(gt, f)
    register_eval_set("bench_eval_set", json_file)
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = COCOEvaluator(
        "bench_eval_set",
        tasks=TASKS,
        distributed=False,
        output_dir=os.path.join(tmp, "pycocotools"),
        use_fast_impl=False,
    )
    t_init_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = FastCOCOEvaluator(
        "bench_eval_set", tasks=TASKS, distributed=False, output_dir=os.path.join(tmp, "faster")
    )
    t_init_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref.reset()
    for inputs, outputs in iter_model_outputs(dets):
        ref.process(inputs, outputs)
    predictions = ref._predictions
    t_process = time.perf_counter() - t0

    anns = gt["annotations"]
    n_dets = sum(len(p["instances"]) for p in predictions)
    scores = [r["score"] for p in predictions for r in p["instances"]]
    print(
        f"data: {len(gt['images'])} images {args.min_size}-{args.max_size} px, "
        f"{len(anns)} ground-truth objects ({sum(a['iscrowd'] for a in anns)} iscrowd, "
        f"{sum(isinstance(a['segmentation'], list) for a in anns)} polygons, rest RLE), "
        f"{len(gt['images']) - len({a['image_id'] for a in anns})} images without annotations, "
        f"{len(gt['categories'])} categories; {n_dets} detections "
        f"({n_dets / len(gt['images']):.1f}/image, {len(scores) - len(set(scores))} tied scores)"
    )
    print(
        f"generate {t_gen:.2f} s; process() (mask RLE encoding, shared by both) {t_process:.2f} s"
    )

    # rows: (label, {backend: [seconds per repeat]}) for wall and CPU time
    rows = {
        kind: {
            label: {"pycocotools": [], "faster": []}
            for label in [f"AP computation {t}" for t in TASKS]
            + ["AP computation bbox+segm", "evaluate() end to end"]
        }
        for kind in ("wall", "cpu")
    }
    for _ in range(args.repeats):
        runs = {
            "pycocotools": timed_evaluate(
                ref, predictions, _Recorder(d2_coco_evaluation, "_evaluate_predictions_on_coco")
            ),
            "faster": timed_evaluate(
                ours,
                predictions,
                _Recorder(cmrcnn_evaluation, "evaluate_predictions_on_coco_faster"),
            ),
        }
        for backend, (_, rec, wall, cpu) in runs.items():
            for kind, per_task, total in (("wall", rec.wall, wall), ("cpu", rec.cpu, cpu)):
                for t in TASKS:
                    rows[kind][f"AP computation {t}"][backend].append(per_task[t])
                rows[kind]["AP computation bbox+segm"][backend].append(sum(per_task.values()))
                rows[kind]["evaluate() end to end"][backend].append(total)
    ref_results, ref_rec = runs["pycocotools"][:2]
    our_results = runs["faster"][0]

    print(
        f"\nevaluator construction (loads the GT JSON): pycocotools {t_init_ref:.2f} s, "
        f"faster {t_init_ours:.2f} s (faster-coco-eval's own GT copy is loaded in evaluate())"
    )
    print(f"\nmedian of {args.repeats} run(s), seconds; CPU = process CPU time (all threads)")
    print(
        f"{'':<28}{'wall: pycoco':>13}{'faster':>8}{'ratio':>7}   "
        f"{'CPU: pycoco':>12}{'faster':>8}{'ratio':>7}"
    )
    ratio = {}
    for label in rows["wall"]:
        line = f"{label:<28}"
        for kind in ("wall", "cpu"):
            a = statistics.median(rows[kind][label]["pycocotools"])
            b = statistics.median(rows[kind][label]["faster"])
            ratio[kind, label] = a / b
            line += f"{a:>13.2f}{b:>8.2f}{a / b:>6.1f}x" + ("   " if kind == "wall" else "")
        print(line)
    print(
        "  (AP computation: COCO loadRes + COCOeval evaluate/accumulate/summarize per task;\n"
        "   evaluate() also writes instances_predictions.pth and coco_instances_results.json,\n"
        "   the same work for both; process() is not included)"
    )

    worst, ok = 0.0, True
    print(f"\n{'stat':<8}" + "".join(f"{t + ' pycoco':>14}{t + ' faster':>14}" for t in TASKS))
    for i, name in enumerate(STAT_NAMES):
        row = f"{name:<8}"
        for t in TASKS:
            a, b = ref_rec.stats[t][i], ours.coco_stats[t][i]
            worst = max(worst, abs(a - b))
            row += f"{a:>14.4f}{b:>14.4f}"
        print(row)
    for t in TASKS:
        for key, a in ref_results[t].items():
            b = our_results[t][key]
            if not (np.isnan(a) and np.isnan(b)):
                worst = max(worst, abs(a - b) / 100.0)
    per_cat = [k for k in ref_results["segm"] if k.startswith("AP-")]
    print("per-category AP (percent), bbox / segm, pycocotools | faster:")
    for k in per_cat:
        print(
            f"  {k:<12} {ref_results['bbox'][k]:8.4f} / {ref_results['segm'][k]:8.4f}  |  "
            f"{our_results['bbox'][k]:8.4f} / {our_results['segm'][k]:8.4f}"
        )
    ok = worst < 5e-5 and set(ref_results["segm"]) == set(our_results["segm"])
    print(
        "\nmax |difference| over 2x12 stats and all result-dict entries (0-1 scale): "
        f"{worst:.2e} -> "
        f"{'EQUAL to 4 decimals' if ok else 'DIFFERENT'}"
    )
    key = "AP computation bbox+segm"
    print(
        f"speed-up of the AP computation (bbox+segm): {ratio['wall', key]:.1f}x wall, "
        f"{ratio['cpu', key]:.1f}x CPU (target >= 3x); evaluate() end to end "
        f"{ratio['wall', 'evaluate() end to end']:.1f}x wall"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
