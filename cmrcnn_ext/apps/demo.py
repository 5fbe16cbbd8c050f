"""The CPU demo: generate data, train from scratch, evaluate, plot, draw predictions.

    python -m cmrcnn_ext.apps.demo [--output output/demo] [KEY VALUE ...]

Writes into the output folder: ``results.json`` (COCO box / mask metrics and timings),
``training_curves.png`` (total and per-stage losses, learning rate), ``predictions/*.png``
(ground truth beside predictions on held-out images), plus Detectron2's own ``metrics.json``,
``log.txt`` and TensorBoard events.
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from cmrcnn_ext.config import setup_cfg
from cmrcnn_ext.engine import Trainer
from cmrcnn_ext.engine.cli import add_debug_argument, run
from cmrcnn_ext.engine.cpu_bf16 import native_bf16
from cmrcnn_ext.engine.report import write_results

DEMO_CONFIG = "cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml"  # packaged (cmrcnn_ext.model_zoo)
#: What the default demo reaches, by the precision it trains in (docs/demo.md: commit, date,
#: machine, command of each run). float32 is what a CPU without native bfloat16 gets.
REFERENCE_RUNS = {
    "bfloat16": (
        "box / mask AP 56.7 / 55.2 with SEED 0 (SEED 1: 56.4 / 55.0, SEED 2: 56.7 / 54.2), "
        "in 377-386 s (0.27 s per iteration) on a 2-core CPU with AVX512-BF16; hosts of that "
        "kind have run the step up to 1.3x slower (docs/demo.md)"
    ),
    "float32": (
        "box / mask AP 55.1 / 54.4 with SEED 0 in float32 on 2 threads, in 536 s on a 2-core "
        "CPU with AVX512 (float32 forced); a CPU without AVX512 sums in another order, so its "
        "run lands elsewhere within the seed spread, and takes about twice as long (the "
        "128-channel demo before 2026-12-04: 1232 s there; docs/demo.md)"
    ),
    # MODEL.DEVICE cuda: Detectron2's float16 AMP, arithmetic neither CPU run shares
    "gpu": (
        "no recorded AP on a GPU: there it trains in float16 (Detectron2's AMP), other "
        "arithmetic than the CPU reference runs (bfloat16, SEED 0: box / mask AP 56.7 / 55.2), "
        "so its AP differs from theirs; an NVIDIA H200 trains it at about 0.12 s per iteration "
        "(docs/performance.md, GPU)"
    ),
}

logger = logging.getLogger("cmrcnn_ext.apps.demo")


def draw_predictions(cfg, model, dataset_name, out_dir, num_images=6, score_thresh=0.3):
    """Save ``num_images`` PNGs: ground truth (left) beside predictions with score >=
    ``score_thresh`` (right). 0.3: the 10-minute demo model's class scores (the mean of three
    stages' softmax) are moderate; at 0.5 many correct detections would not be drawn."""
    os.makedirs(out_dir, exist_ok=True)
    meta = MetadataCatalog.get(dataset_name)
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    model.eval()
    paths = []
    for d in dicts:
        img = read_image(d["file_name"], format="RGB")
        tensor = torch.as_tensor(img.astype("float32").transpose(2, 0, 1))
        if cfg.INPUT.FORMAT == "BGR":
            tensor = tensor.flip(0)
        with torch.no_grad():
            inst = model([{"image": tensor, "height": img.shape[0], "width": img.shape[1]}])[0]
        inst = inst["instances"].to("cpu")
        inst = inst[inst.scores >= score_thresh]
        gt = Visualizer(img, meta, scale=2.0).draw_dataset_dict(d).get_image()
        pred = (
            Visualizer(img, meta, scale=2.0, instance_mode=ColorMode.IMAGE)
            .draw_instance_predictions(inst)
            .get_image()
        )
        sep = np.full((gt.shape[0], 8, 3), 255, dtype=np.uint8)
        canvas = np.concatenate([gt, sep, pred], axis=1)
        path = os.path.join(out_dir, os.path.splitext(os.path.basename(d["file_name"]))[0] + ".png")
        from PIL import Image

        Image.fromarray(canvas).save(path)
        paths.append(path)
    return paths


def precision_opts(config_file, opts):
    """``["SOLVER.AMP.ENABLED", "False"]`` where the demo would train in bfloat16 on a CPU that
    emulates it (no AVX512-BF16 / AMX: many times slower than float32), unless the user set the key
    on the command line; else ``[]``. The demo then trains in float32: other arithmetic, so its
    AP differs from the bfloat16 reference run's (docs/demo.md lists both)."""
    if "SOLVER.AMP.ENABLED" in opts[::2] or native_bf16():
        return []
    cfg = setup_cfg(config_file, opts)
    if not cfg.SOLVER.AMP.ENABLED or cfg.MODEL.DEVICE != "cpu":
        return []
    print(
        "[demo] this CPU has no AVX512-BF16 or AMX: bfloat16 would be emulated (many times "
        "slower), so the demo trains in float32 (SOLVER.AMP.ENABLED False; set it to True to "
        "force bfloat16). Expect a longer run and other AP than the reference run.",
        flush=True,
    )
    return ["SOLVER.AMP.ENABLED", "False"]


def reference_run(cfg):
    """The line of :data:`REFERENCE_RUNS` for the device and precision ``cfg`` trains in."""
    if cfg.MODEL.DEVICE != "cpu":
        return REFERENCE_RUNS["gpu"]
    return REFERENCE_RUNS["bfloat16" if cfg.SOLVER.AMP.ENABLED else "float32"]


class _EvalTimer(HookBase):
    """Notes when training proper ends, so that the final evaluation can be timed apart."""

    def __init__(self):
        self.end = None

    def after_step(self):  # the last one ends before the EvalHook's final evaluation
        self.end = time.perf_counter()

    def eval_seconds(self, now):
        return now - self.end if self.end is not None else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--num-vis", type=int, default=6, help="prediction pictures to draw")
    add_debug_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output)
    setup_logger(name="cmrcnn_ext")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    print("[demo] 1/3 data: synthetic shapes (generated once, then cached)", flush=True)
    opts = list(args.opts) + precision_opts(args.config_file, list(args.opts))
    cfg = setup_cfg(args.config_file, opts + ["OUTPUT_DIR", args.output])
    # train_net.py seeds through Detectron2's default_setup; the demo does not call it, so it
    # seeds here the same way: with SEED >= 0 every run starts from the same weights and draws the
    # same images in the same order (SEED < 0: a new seed per run, as in Detectron2).
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    # the run's config, as train_net.py's default_setup saves it: the output folder is then a
    # run folder for cmrcnn-predict / cmrcnn-export --run and train_net.py --eval-only
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    t_data = time.perf_counter() - start

    print(
        f"[demo] 2/3 training {cfg.SOLVER.MAX_ITER} iterations on {cfg.MODEL.DEVICE}, then COCO "
        f"evaluation on {cfg.DATASETS.TEST[0]}; the default demo reaches {reference_run(cfg)}",
        flush=True,
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    timer = _EvalTimer()
    trainer.register_hooks([timer])
    t0 = time.perf_counter()
    trainer.train()  # Detectron2's EvalHook evaluates DATASETS.TEST once training ends
    t_eval = timer.eval_seconds(time.perf_counter())
    t_train = time.perf_counter() - t0 - t_eval
    # The trainer's RunReportHook wrote the final evaluation and the curves when training ended.
    with open(os.path.join(args.output, "results.json")) as f:
        results = json.load(f)["results"]
    curves = os.path.join(args.output, "training_curves.png")

    print("[demo] 3/3 prediction pictures", flush=True)
    pics = draw_predictions(
        cfg,
        trainer.model,
        cfg.DATASETS.TEST[0],
        os.path.join(args.output, "predictions"),
        args.num_vis,
    )
    total = time.perf_counter() - start
    box_ap, mask_ap = results["bbox"]["AP"], results["segm"]["AP"]
    seconds = {"data": t_data, "train": t_train, "eval": t_eval, "total": total}
    seconds["seconds_per_iter"] = t_train / max(1, cfg.SOLVER.MAX_ITER)
    summary = {"config": args.config_file, "overrides": opts}
    write_results(args.output, results, seconds, cfg, summary)

    print("\n" + "=" * 64)
    print(f"{'box AP / AP50':22}{box_ap:8.1f} / {results['bbox']['AP50']:.1f}")
    print(f"{'mask AP / AP50':22}{mask_ap:8.1f} / {results['segm']['AP50']:.1f}")
    print(f"{'wall time (s)':22}{total:8.0f}   (train {t_train:.0f}, evaluation {t_eval:.0f})")
    print(f"the default demo reaches {reference_run(cfg)}")
    print("=" * 64)
    print(f"metrics:     {os.path.join(args.output, 'results.json')}")
    print(f"curves:      {curves}")
    print(f"predictions: {os.path.dirname(pics[0]) if pics else '-'} ({len(pics)} PNGs)")
    print(f"TensorBoard: tensorboard --logdir {args.output}")
    return summary


def cli():
    """Console script ``cmrcnn-demo``."""
    run(main)


if __name__ == "__main__":
    cli()
