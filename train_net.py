#!/usr/bin/env python
"""Train and evaluate Cascade Mask R-CNN (cmrcnn_ext) with Detectron2's DefaultTrainer.

Examples::

    python train_net.py --config-file configs/cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml
    python train_net.py --config-file configs/cascade_mask_rcnn_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --train-json a.json --train-images imgs/ \\
        --val-json b.json --val-images imgs/ MODEL.ROI_HEADS.NUM_CLASSES 0

Trailing ``KEY VALUE`` pairs override the config. On a machine without CUDA the model runs on
the CPU (logged), whatever ``MODEL.DEVICE`` says.
"""
import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results

from cmrcnn_ext.engine import Trainer, setup


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
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    return add_data_arguments(default_argument_parser())


if __name__ == "__main__":
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
