"""Cascade Mask R-CNN, R50-FPN, 1x schedule, with cmrcnn_ext's heads: a LazyConfig.

The Python-config twin of ``cascade_mask_rcnn_R_50_FPN_1x.yaml`` (same model, data, solver and
schedule), in the style of Detectron2's ``configs/COCO-InstanceSegmentation/*.py``. Train it with
Detectron2's lazy-config loop (the path is ``cmrcnn_ext.model_zoo.get_config_file(
"lazy/cascade_mask_rcnn_R_50_FPN_1x.py")``)::

    python detectron2/tools/lazyconfig_train_net.py --num-gpus 8 \\
        --config-file <path> train.output_dir=output/cmrcnn_1x

or load it with ``cmrcnn_ext.model_zoo.get_config("lazy/cascade_mask_rcnn_R_50_FPN_1x.py")``.

The cascade settings are keyword arguments of
:class:`~cmrcnn_ext.modeling.roi_heads.CascadeMaskROIHeads` (``MODEL.CMRCNN.*`` of the YAML
configs): ``mask_stages``, ``stage_loss_weights``, ``test_mask_merge``, ``fast_roi_align``,
``prefix_nms``. For ``mask_stages="all"`` give one mask head per stage in a
``torch.nn.ModuleList``::

    import torch
    from detectron2.config import LazyCall as L

    head = model.roi_heads.mask_head
    head.num_classes = "${....num_classes}"  # roi_heads.num_classes, from inside the list
    model.roi_heads.mask_stages = "all"
    model.roi_heads.mask_head = L(torch.nn.ModuleList)(modules=[head, head, head])
"""

# This file lives outside Detectron2's config tree, so Detectron2's common pieces cannot be
# imported relatively (``from ..common.models... import model``); detectron2.model_zoo loads them.
from detectron2.model_zoo import get_config

# Absolute imports: lazyconfig_train_net.py imports only detectron2. Importing cmrcnn_ext also
# registers its heads in Detectron2's registries.
from cmrcnn_ext.evaluation.coco import FastCOCOEvaluator
from cmrcnn_ext.modeling.mask_head import CMRCNNConvUpsampleHead
from cmrcnn_ext.modeling.roi_heads import CascadeMaskROIHeads

# Detectron2's lazy Cascade R-CNN: its mask_rcnn_fpn R50-FPN model (BGR, FrozenBN, ROIAlignV2
# poolers, 4-conv mask head) with three cascade stages (IoU 0.5 / 0.6 / 0.7, box regression
# weights (10, 10, 5, 5) x 1 / 2 / 3, class-agnostic boxes).
model = get_config("common/models/cascade_rcnn.py").model
dataloader = get_config("common/data/coco.py").dataloader  # COCO 2017, 640-800 px, flip
optimizer = get_config("common/optim.py").SGD  # lr 0.02, momentum 0.9, weight decay 1e-4
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x  # 90k it., /10 at 60k, 80k
train = get_config("common/train.py").train

# MODEL.BACKBONE.FREEZE_AT 2 (Detectron2's default): stem and res2 frozen.
model.backbone.bottom_up.freeze_at = 2
# MODEL.RPN.POST_NMS_TOPK_TRAIN 2000 (Detectron2's cascade YAML configs; its common RPN: 1000).
model.proposal_generator.post_nms_topk = (2000, 1000)

# cmrcnn_ext's ROI heads (ROI_HEADS.NAME "CascadeMaskROIHeads"), with the YAML's MODEL.CMRCNN.*
# values. Detectron2's CascadeROIHeads arguments (box heads, predictors, matchers, poolers) stay.
model.roi_heads._target_ = CascadeMaskROIHeads
model.roi_heads.update(
    mask_stages="first",  # Detectron2's cascade: one mask head, trained on stage 1's positives
    stage_loss_weights=[1.0, 1.0, 1.0],
    test_mask_merge="last",
    fast_roi_align=False,  # torchvision's ROIAlign (True: cmrcnn_ext's gather-based, CPU only)
    prefix_nms=True,  # MODEL.CMRCNN.PREFIX_NMS default: Detectron2's detections, found faster
)
# ROI_MASK_HEAD.NAME "CMRCNNConvUpsampleHead": Detectron2's head (same parameters) + mask_probs.
model.roi_heads.mask_head._target_ = CMRCNNConvUpsampleHead
model.roi_heads.mask_head.channels_last_cpu = False  # MODEL.CMRCNN.CHANNELS_LAST_MASK_HEAD

# TEST.CMRCNN.EVALUATOR "faster": COCO AP computed with faster-coco-eval.
dataloader.evaluator._target_ = FastCOCOEvaluator

# MODEL.WEIGHTS: ImageNet R-50 (Detectron2's MSRA weights, BGR, caffe-style stride in 1x1).
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
# TEST.EVAL_PERIOD 0 of the YAML configs: evaluate once, after the last iteration.
train.eval_period = 0
