"""Stage report: what each cascade stage does on your data (the Cascade R-CNN paper's analysis).

    python -m cmrcnn_ext.analyze --config-file CONFIG --weights model_final.pth \\
        [--val-json val.json --val-images images/] [--output output/stage_report] [KEY VALUE ...]
    python -m cmrcnn_ext.analyze --run output/demo        # a training run's config and weights

Runs the model once over the evaluation data set (``DATASETS.TEST``, or ``--val-json``) and
writes into ``--output``:

- ``stage_report.json``: box AP (AP, AP50, AP75, APs/m/l and AP at each IoU threshold
  0.50:0.05:0.95) of each stage on its own, of the mean classifier of stages 1..k and of the
  final output; mask AP of each mask head on the final boxes (and their mean); the IoU of each
  stage's input boxes with their best ground truth (histogram, share above each stage's
  threshold); the RPN's proposal recall at IoU 0.5 / 0.7 and AR at the proposal counts used;
- ``ap_vs_iou.png`` and ``iou_shift.png`` (the paper's two figures), ``summary.md``;
- ``stage_results/*.json``: each row's COCO results file (re-evaluate any row with pycocotools);
- Detectron2's ``inference/`` files of the final output, as ``train_net.py --eval-only``.

The ``final`` rows are the COCO evaluator's numbers of ``train_net.py --eval-only`` for the same
weights (same evaluator, same outputs; checked in the run and in the tests). ``--num-gpus N``
runs N processes (gloo on the CPU) and gathers their images as the COCO evaluator does.
Per-stage outputs in your own code: :func:`cmrcnn_ext.modeling.record_stage_outputs`.
"""

import argparse
import json
import os

from cmrcnn_ext.engine import Trainer
from cmrcnn_ext.engine.cli import add_debug_argument, run
from cmrcnn_ext.engine.launch import launch_with_args
from cmrcnn_ext.errors import UserError

DEFAULT_OUTPUT = "output/stage_report"


def get_parser():
    from cmrcnn_ext.apps.train import add_data_arguments

    parser = argparse.ArgumentParser(
        prog="python -m cmrcnn_ext.analyze", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config-file", default="", help="config (path or packaged name)")
    parser.add_argument("--weights", help="trained checkpoint (MODEL.WEIGHTS)")
    parser.add_argument("--run", help="a training run's OUTPUT_DIR: its config.yaml and weights")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="report folder (OUTPUT_DIR)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto")
    add_data_arguments(parser)
    add_debug_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def resolve_args(args):
    """Fill ``config_file`` / ``opts`` from ``--run`` / ``--weights`` / ``--output``."""
    if args.run:
        from cmrcnn_ext.engine.runs import run_files

        config, weights = run_files(args.run)
        args.config_file = args.config_file or config
        args.weights = args.weights or weights
    if not args.config_file:
        raise UserError("give --config-file (with --weights) or --run <a training run's folder>")
    opts = list(args.opts)
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    args.opts = opts + ["OUTPUT_DIR", args.output]
    args.eval_only = True  # Detectron2's default_setup: an evaluation, not a training
    return args


def main(args):
    from detectron2.utils import comm

    from cmrcnn_ext.engine.checkpoint import CMRCNNCheckpointer
    from cmrcnn_ext.engine.runs import check_eval_weights
    from cmrcnn_ext.engine.setup import command_line_opts, setup
    from cmrcnn_ext.evaluation.stage_analysis import analyze, write_report

    check_eval_weights(args.config_file, command_line_opts(args))
    cfg = setup(args)
    model = Trainer.build_model(cfg)
    CMRCNNCheckpointer(model, save_dir=cfg.OUTPUT_DIR, for_inference=True).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False
    )
    reports = analyze(cfg, model)
    if comm.is_main_process():
        for name, report in reports.items():
            folder = cfg.OUTPUT_DIR if len(reports) == 1 else os.path.join(cfg.OUTPUT_DIR, name)
            header = f"Data set `{name}`; weights `{cfg.MODEL.WEIGHTS}`."
            paths = write_report(report, folder, header)
            print(f"[analyze] {name}: " + ", ".join(paths), flush=True)
            print(json.dumps({k: report["box"][k]["AP"] for k in report["box"]}), flush=True)
    return reports


def cli(argv=None):
    """Console script ``cmrcnn-analyze`` (and ``python -m cmrcnn_ext.analyze``)."""
    args = get_parser().parse_args(argv)
    run(lambda a: launch_with_args(main, resolve_args(a)), args, argv=argv)


if __name__ == "__main__":
    cli()
