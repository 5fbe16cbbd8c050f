"""Cascade Mask R-CNN, R50-FPN, 3x schedule, with cmrcnn_ext's heads: a LazyConfig.

The Python-config twin of ``cascade_mask_rcnn_R_50_FPN_3x.yaml``: the 1x LazyConfig
(``cascade_mask_rcnn_R_50_FPN_1x.py``, same folder) trained three times as long, 270k iterations
with the LR divided by 10 at 210k and 250k (Detectron2's ``lr_multiplier_3x``).
"""

# A relative import of a config file next to this one: LazyConfig.load resolves it.
from detectron2.model_zoo import get_config

from .cascade_mask_rcnn_R_50_FPN_1x import dataloader, model, optimizer, train  # noqa: F401

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x
train.max_iter = 270000
