"""MMDetection 3.x's Cascade Mask R-CNN R50-FPN as a peer in ``bench_peers.py``: built from the
config MMDetection ships (``cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py``) with the
Detectron2 config's classes, proposal counts, ROI sampling and detections per image, random
weights (no pretrained backbone download), fed the same images and annotations.

MMDetection's cascade puts a mask head on every stage and averages the stages' masks at test
time, as ours with ``MASK_STAGES all`` + ``TEST_MASK_MERGE mean``; its stage loss weights are the
paper's (1, 0.5, 0.25). Its backbone is a torchvision-style ResNet-50 with the stem and first
stage frozen (Detectron2's ``FREEZE_AT 2``) and BatchNorm statistics frozen (``norm_eval``); it
trains BatchNorm's affine weights where Detectron2's FrozenBN keeps them fixed.

Needs ``mmengine``, ``mmdet`` 3.x and ``mmcv`` 2.x (< 2.2.0, MMDetection 3.3.0's bound) with its
compiled ops; docs/performance.md ("MMDetection on the CPU") says how that was built here and
``scripts/build_mmdet.sh`` does it.
"""

import os

import torch

CONFIG = "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py"


def available():
    """None when MMDetection and mmcv's compiled ops import, else the reason they do not."""
    try:
        import mmcv.ops  # noqa: F401  (loads mmcv._ext)
        import mmdet  # noqa: F401  (checks the mmcv / mmengine versions)
    except Exception as e:  # ImportError, or mmdet's AssertionError on the mmcv version
        return f"{type(e).__name__}: {e}"
    return None


def mmdet_model(cfg, device="cpu"):
    """MMDetection's Cascade Mask R-CNN with the Detectron2 config ``cfg``'s settings that both
    libraries have."""
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", CONFIG)
    model = Config.fromfile(path).model
    model.backbone.init_cfg = None  # random weights: no download
    rpn, roi = cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS
    n = roi.NUM_CLASSES
    for head in model.roi_head.bbox_head:
        head.num_classes = n
    model.roi_head.mask_head.num_classes = n
    train, test = model.train_cfg, model.test_cfg
    train.rpn_proposal.update(nms_pre=rpn.PRE_NMS_TOPK_TRAIN, max_per_img=rpn.POST_NMS_TOPK_TRAIN)
    train.rpn.sampler.num = rpn.BATCH_SIZE_PER_IMAGE
    for stage in train.rcnn:
        stage.sampler.update(num=roi.BATCH_SIZE_PER_IMAGE, pos_fraction=roi.POSITIVE_FRACTION)
    test.rpn.update(nms_pre=rpn.PRE_NMS_TOPK_TEST, max_per_img=rpn.POST_NMS_TOPK_TEST)
    test.rcnn.update(score_thr=roi.SCORE_THRESH_TEST, max_per_img=cfg.TEST.DETECTIONS_PER_IMAGE)
    return MODELS.build(model).to(device)


def calibrate_bn(model, item, bgr):
    """Set the backbone's BatchNorm statistics (eval mode: ``norm_eval``) to those of their
    input on one image, as ``bench_models.calibrate_frozen_bn`` does for Detectron2's FrozenBN:
    random weights with the default statistics otherwise give ~1e4-scale features, saturated
    scores and fewer detections. Returns the number of layers set."""
    from bench_models import norm_stats_from_input

    model.eval()
    device = next(model.parameters()).device
    data = model.data_preprocessor(mm_batch([item], bgr, False, device), False)
    layers = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return norm_stats_from_input(layers, lambda: model.backbone(data["inputs"]))


def mm_batch(items, bgr, with_targets, device="cpu"):
    """MMDetection's input dict (``inputs`` as BGR uint8 CHW tensors, ``data_samples`` with image
    metadata and, for training, ``gt_instances``) from Detectron2 dataset dicts."""
    import numpy as np
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for item in items:
        img = item["image"] if bgr else item["image"].flip(0)
        h, w = img.shape[-2:]
        sample = DetDataSample(metainfo={
            "img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0),
        })  # fmt: skip
        if with_targets:
            inst = item["instances"]
            masks = inst.gt_masks.tensor.numpy().astype(np.uint8)
            sample.gt_instances = InstanceData(
                bboxes=inst.gt_boxes.tensor.to(device),
                labels=inst.gt_classes.to(device),
                masks=BitmapMasks(masks, h, w),
            )
        inputs.append(img.to(device))
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def mm_infer(model, item, bgr, device="cpu"):
    """Detections for one image (MMDetection's ``test_step``: preprocessing, model, masks pasted
    at image size)."""
    return model.test_step(mm_batch([item], bgr, False, device))


def mm_loss(model, items, bgr, device="cpu"):
    """The total training loss of a batch (MMDetection's ``parse_losses``: the sum of the
    entries whose name contains ``loss``)."""
    data = model.data_preprocessor(mm_batch(items, bgr, True, device), True)
    losses = model(**data, mode="loss")
    total, _ = model.parse_losses(losses)
    return total
