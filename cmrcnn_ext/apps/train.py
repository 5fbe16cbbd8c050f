"""Train and evaluate Cascade Mask R-CNN (cmrcnn_ext) with Detectron2's DefaultTrainer.

Examples::

    python train_net.py --config-file cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml
    python train_net.py --config-file cascade_mask_rcnn_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --train-json a.json --train-images imgs/ \\
        --val-json b.json --val-images imgs/ MODEL.ROI_HEADS.NUM_CLASSES 0

Test-time augmentation (Detectron2's ``TEST.AUG.*`` keys): with ``TEST.AUG.ENABLED True`` the
model is evaluated a second time with ``GeneralizedRCNNWithTTA`` (scales ``TEST.AUG.MIN_SIZES``,
``TEST.AUG.FLIP``), after ``--eval-only`` evaluation or after the last training iteration; those
results carry a ``_TTA`` suffix (``bbox_TTA``, ``segm_TTA``) and their files go to
``OUTPUT_DIR/inference_TTA/``::

    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth \\
        TEST.AUG.ENABLED True

``--eval-only`` needs trained weights (``MODEL.WEIGHTS`` or ``--resume``) that fit the config;
``--eval-untrained`` evaluates a model without them. Errors in your input (config, data files,
checkpoints) print one message and exit with code 2; ``--debug`` shows the traceback.
Each run writes ``results.json`` (and, when training, ``training_curves.png``) to OUTPUT_DIR.

Trailing ``KEY VALUE`` pairs override the config. On a machine without CUDA the model runs on
the CPU (logged), whatever ``MODEL.DEVICE`` says.

Several processes (see docs/distributed.md): ``--num-gpus N`` starts N processes per machine,
one per GPU (NCCL) or, on a machine without CUDA, N CPU processes (gloo);
``torchrun --nproc_per_node N train_net.py ...`` works too (then torchrun's options decide and
``--num-gpus`` is ignored). ``SOLVER.IMS_PER_BATCH`` is the total batch over all processes.
"""

import os
import time

# Only cmrcnn_ext at the top: it imports Detectron2 first, without torch's torch.jit.script
# deprecation warnings (cmrcnn_ext.compat.import_detectron2_quietly).
from cmrcnn_ext.engine import Trainer
from cmrcnn_ext.engine.cli import add_debug_argument, run
from cmrcnn_ext.engine.determinism import enable_determinism
from cmrcnn_ext.engine.launch import launch_with_args
from cmrcnn_ext.engine.report import write_results
from cmrcnn_ext.engine.runs import check_eval_weights
from cmrcnn_ext.engine.setup import setup


def add_data_arguments(parser):
    group = parser.add_argument_group(
        "your own COCO-format data (registered as user_train / user_val; same as the "
        "DATASETS.CMRCNN.* config keys)"
    )
    group.add_argument("--train-json", help="COCO instances JSON for training")
    group.add_argument("--train-images", help="image folder of --train-json")
    group.add_argument("--val-json", help="COCO instances JSON for evaluation")
    group.add_argument("--val-images", help="image folder of --val-json")
    return parser


def main(args):
    from detectron2.evaluation import verify_results
    from detectron2.utils import comm

    if args.eval_only:  # before anything is built: a random model's AP would mean nothing
        check_eval_weights(args.config_file, args.opts, args.resume, args.eval_untrained)
    cfg = setup(args)
    if getattr(args, "deterministic", False):
        enable_determinism(cfg)
    if args.eval_only:
        start = time.perf_counter()
        model, res, weights = Trainer.evaluate_checkpoint(
            cfg, resume=args.resume, for_inference=not args.eval_untrained
        )
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
            write_results(
                cfg.OUTPUT_DIR,
                dict(res),
                {"eval": time.perf_counter() - start},
                cfg,
                {"weights": os.path.abspath(weights) if weights else ""},
            )
        return res
    trainer = Trainer(cfg)  # TEST.AUG.ENABLED: Trainer.build_hooks adds the TTA evaluation
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    from detectron2.engine import default_argument_parser

    parser = add_data_arguments(default_argument_parser())
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels (torch.use_deterministic_algorithms, no cuDNN autotuning); "
        "needs a fixed SEED. Same SEED + NUM_WORKERS 0 -> identical losses on the CPU.",
    )
    parser.add_argument(
        "--eval-untrained",
        action="store_true",
        help="with --eval-only: evaluate even without trained weights (MODEL.WEIGHTS empty or "
        "not a detector), layers missing from the checkpoint keeping their random init",
    )
    return add_debug_argument(parser)


def cli():
    """Console script ``cmrcnn-train`` (and ``python train_net.py``)."""
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    run(launch_with_args, main, args)


if __name__ == "__main__":
    cli()
