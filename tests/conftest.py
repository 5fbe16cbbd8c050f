"""Shared fixtures: tiny configs and synthetic batches, all on the CPU and seeded."""

import logging
import os
import sys

import numpy as np
import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances

import cmrcnn_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fixtures shared with the benchmarks (e.g. synthetic_results: an evaluation set with predictions)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
CONFIGS = cmrcnn_ext.model_zoo.CONFIG_DIR
DEMO_CONFIG = os.path.join(CONFIGS, "cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml")

torch.set_num_threads(int(os.environ.get("CMRCNN_TEST_THREADS", min(2, os.cpu_count() or 1))))


def tiny_cfg(*opts, config=DEMO_CONFIG):
    """The demo config at 128 px with few proposals: fast enough for unit tests."""
    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "INPUT.MIN_SIZE_TEST",
            128,
            "INPUT.MAX_SIZE_TEST",
            128,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            64,
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            64,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            32,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            0.0,
        ]
        + list(opts)
    )
    return cfg


def make_batch(num_images=2, size=128, seed=0, num_classes=5, with_gt=True):
    """Random images with 1-3 rectangular ground-truth objects each (boxes, classes, masks)."""
    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(num_images):
        img = torch.from_numpy(rng.uniform(0, 255, (3, size, size)).astype("float32"))
        item = {"image": img, "height": size, "width": size}
        if with_gt:
            n = int(rng.integers(1, 4))
            x0 = rng.integers(0, size // 2, n)
            y0 = rng.integers(0, size // 2, n)
            w = rng.integers(12, size // 2, n)
            h = rng.integers(12, size // 2, n)
            boxes = np.stack([x0, y0, x0 + w, y0 + h], 1).astype("float32")
            masks = torch.zeros(n, size, size, dtype=torch.bool)
            for i, (a, b, c, d) in enumerate(boxes.astype(int)):
                masks[i, b:d, a:c] = True
            inst = Instances((size, size))
            inst.gt_boxes = Boxes(torch.from_numpy(boxes))
            inst.gt_classes = torch.from_numpy(rng.integers(0, num_classes, n))
            inst.gt_masks = BitMasks(masks)
            item["instances"] = inst
        batch.append(item)
    return batch


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def log_text():
    """Messages of cmrcnn_ext's loggers (own handler: works whatever propagation is set)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("cmrcnn_ext")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lambda: "\n".join(records)
    log.removeHandler(handler)
    log.setLevel(level)
