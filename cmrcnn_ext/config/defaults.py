"""Config keys added by cmrcnn_ext.

Call :func:`add_cmrcnn_config` on a fresh ``get_cfg()`` before ``merge_from_file``. It never
changes Detectron2's global default config.
"""
from detectron2.config import CfgNode as CN

#: Allowed values of ``MODEL.CMRCNN.MASK_STAGES``.
MASK_STAGES_CHOICES = ("first", "last", "all")
#: Allowed values of ``MODEL.CMRCNN.TEST_MASK_MERGE``.
TEST_MASK_MERGE_CHOICES = ("last", "mean")


def add_cmrcnn_config(cfg):
    """Add the ``MODEL.CMRCNN`` keys to ``cfg`` (in place) and return it.

    Calling it twice is harmless: keys that already exist keep their values.

    Args:
        cfg (CfgNode): typically ``detectron2.config.get_cfg()``.

    Returns:
        CfgNode: ``cfg``.
    """
    if "CMRCNN" in cfg.MODEL:
        return cfg
    cfg.MODEL.CMRCNN = CN()
    # Which cascade stages carry a mask head in training (Cascade R-CNN, TPAMI, Sec. 6):
    #   "first": one mask head, trained on stage 1's positives (the sampled RPN proposals with
    #            IoU >= ROI_BOX_CASCADE_HEAD.IOUS[0]). Detectron2's built-in cascade does this.
    #   "last":  one mask head, trained on the last stage's positives (the boxes that stage
    #            receives from the previous stage's regression, labelled at the last stage's
    #            IoU threshold). The Cascade R-CNN authors' Detectron setting.
    #   "all":   one mask head per stage, each trained on that stage's positives: the paper's
    #            best strategy, and MMDetection's.
    # At test time masks are always predicted on the final (last-stage) boxes.
    cfg.MODEL.CMRCNN.MASK_STAGES = "first"
    # Per-stage weights on the box losses (classification + regression) and on the mask loss of
    # the mask head attached to that stage; one float per cascade stage, each >= 0.
    # [1.0, 0.5, 0.25] is the paper's and MMDetection's choice; [1.0, 1.0, 1.0] is Detectron2's
    # behaviour (Detectron2 instead scales the features' gradient by 1 / num_stages).
    cfg.MODEL.CMRCNN.STAGE_LOSS_WEIGHTS = [1.0, 1.0, 1.0]
    # How masks are predicted at test time when MASK_STAGES is "all":
    #   "last": use the last stage's mask head only;
    #   "mean": run every stage's mask head on the final boxes and average their sigmoid mask
    #           probabilities before thresholding at 0.5 (MMDetection's test-time merge).
    # With MASK_STAGES "first" or "last" there is one mask head and this must be "last".
    cfg.MODEL.CMRCNN.TEST_MASK_MERGE = "last"
    # ROIAlign of the box and mask poolers computed as a weighted gather (cmrcnn_ext/layers.py)
    # instead of torchvision's kernel, on the CPU only (training and inference): the same
    # numbers up to float rounding (~1e-6), vectorised over channels and multi-threaded where
    # torchvision's CPU kernels are serial.
    # False = exactly Detectron2's poolers. With POOLER_SAMPLING_RATIO 0 (adaptive) in inference
    # only; on CUDA torchvision's kernel is used either way.
    cfg.MODEL.CMRCNN.FAST_ROI_ALIGN = False
    # CPU inference (float32): run the mask head(s)' convolutions in channels-last memory format
    # (oneDNN's fast layout) and the 2x2 deconv + ReLU + 1x1 predictor as two matrix products
    # (cmrcnn_ext/mask_head.py): the same numbers up to float rounding (~1e-7), mask heads ~1.6x
    # faster. False = Detectron2's NCHW layers, bit for bit. Training and CUDA are not affected.
    cfg.MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD = False
    # Test-time class-wise NMS run on the highest-scoring (box, class) candidates first, grown
    # until DETECTIONS_PER_IMAGE survive (cmrcnn_ext/box_inference.py): the same detections as
    # Detectron2's NMS over every candidate (which greedy NMS guarantees; equal up to float
    # rounding of IoUs at the threshold), found in one NMS call instead of one per class. It
    # matters when many candidates pass SCORE_THRESH_TEST (low threshold, many classes, GPU).
    # False = Detectron2's fast_rcnn_inference.
    cfg.MODEL.CMRCNN.PREFIX_NMS = True
    # Names of the model's classes, in output order ([] = unknown). Set from the training data
    # (train_net.py writes them into OUTPUT_DIR/config.yaml), checked against the data when it
    # is registered, and used by prediction and export to name the classes without loading any
    # data set. When set, its length must equal MODEL.ROI_HEADS.NUM_CLASSES.
    cfg.MODEL.CMRCNN.CLASS_NAMES = []

    # Your own COCO-format instance data, without writing code (train_net.py --train-json ...
    # sets the same keys). When TRAIN_JSON is set the data set is registered as "user_train"
    # and used as DATASETS.TRAIN; VAL_JSON likewise as "user_val" / DATASETS.TEST. Class names
    # come from the JSON's categories (sorted by id); MODEL.ROI_HEADS.NUM_CLASSES 0 takes their
    # count from it, any other value must match it.
    cfg.DATASETS.CMRCNN = CN()
    # Path of the training COCO instances JSON ("" = use DATASETS.TRAIN as registered).
    cfg.DATASETS.CMRCNN.TRAIN_JSON = ""
    # Folder that the training JSON's file_name entries are relative to.
    cfg.DATASETS.CMRCNN.TRAIN_IMAGE_ROOT = ""
    # Path of the evaluation COCO instances JSON ("" = use DATASETS.TEST as registered).
    cfg.DATASETS.CMRCNN.VAL_JSON = ""
    # Folder that the evaluation JSON's file_name entries are relative to.
    cfg.DATASETS.CMRCNN.VAL_IMAGE_ROOT = ""
    # Which COCO evaluator Trainer.build_evaluator uses (cmrcnn_ext/evaluation.py):
    #   "faster":      FastCOCOEvaluator, Detectron2's COCOEvaluator computing box / mask AP
    #                  with the faster-coco-eval package (C++); it gives the same AP as
    #                  pycocotools to 4 decimals (all 12 stats and per-category AP, tested) and
    #                  is several times faster (benchmarks/bench_eval.py);
    #   "pycocotools": Detectron2's COCOEvaluator with the official pycocotools COCOeval.
    cfg.TEST.CMRCNN_EVALUATOR = "faster"
    # Optimizer built by cmrcnn_ext's Trainer (cmrcnn_ext/engine.py), with Detectron2's
    # parameter groups (SOLVER.WEIGHT_DECAY_NORM, BIAS_LR_FACTOR, WEIGHT_DECAY_BIAS), LR schedule
    # and gradient clipping (SOLVER.CLIP_GRADIENTS) either way:
    #   "SGD":   Detectron2's optimizer (SOLVER.MOMENTUM, SOLVER.NESTEROV); use it with pretrained
    #            backbones and the paper's schedules;
    #   "AdamW": torch.optim.AdamW (decoupled SOLVER.WEIGHT_DECAY, betas from
    #            SOLVER.CMRCNN_BETAS); learns much faster from scratch at small batch sizes, so
    #            the CPU demo uses it (BASE_LR around 1e-3, not SGD's 0.02).
    cfg.SOLVER.CMRCNN_OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2); ignored by SGD.
    cfg.SOLVER.CMRCNN_BETAS = [0.9, 0.999]
    return cfg
