"""Helpers of test_ddp.py, test_determinism.py and test_nonfinite.py: tiny data, small runs."""

import importlib.util
import json
import os

from conftest import DEMO_CONFIG, ROOT

# a smaller model than the demo's (same architecture): these tests are about the training loop
MODEL_OPTS = [
    "MODEL.FPN.OUT_CHANNELS",
    32,
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM",
    32,
    "MODEL.ROI_MASK_HEAD.NUM_CONV",
    1,
]

SMALL_OPTS = MODEL_OPTS + [
    "SOLVER.IMS_PER_BATCH",
    2,
    "SOLVER.WARMUP_ITERS",
    1,
    "SOLVER.CHECKPOINT_PERIOD",
    100000,
    "DATALOADER.NUM_WORKERS",
    0,
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    64,
    "INPUT.MIN_SIZE_TEST",
    64,
    "INPUT.MAX_SIZE_TEST",
    64,
    "INPUT.MASK_FORMAT",
    "bitmask",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    32,
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    32,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    0.0,
    "MODEL.ROI_HEADS.NUM_CLASSES",
    0,
    "SEED",
    0,
]


def load_train_net():
    """A fresh module object of train_net.py (so that tests may patch its globals)."""
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(ROOT, "train_net.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_data(root, num_train=8, num_val=3):
    """Synthetic shapes, 64 px: ``root/train.json``, ``root/train/``, ``root/val.json``, ..."""
    from cmrcnn_ext.data.synthetic import generate_dataset

    generate_dataset(str(root), num_train, seed=0, image_size=64, split_name="train")
    if num_val:
        generate_dataset(str(root), num_val, seed=1, image_size=64, split_name="val")
    return root


def train_argv(data, out, opts=(), val=True, extra_args=()):
    """train_net.py arguments for the demo config on ``data`` with SMALL_OPTS + ``opts``."""
    data = str(data)
    argv = [
        "--config-file",
        DEMO_CONFIG,
        "--train-json",
        os.path.join(data, "train.json"),
        "--train-images",
        os.path.join(data, "train"),
    ]
    if val:
        argv += [
            "--val-json",
            os.path.join(data, "val.json"),
            "--val-images",
            os.path.join(data, "val"),
        ]
    return (
        argv
        + list(extra_args)
        + [str(x) for x in list(SMALL_OPTS) + list(opts)]
        + ["OUTPUT_DIR", str(out)]
    )


def read_metrics(out):
    """``(losses by iteration, last evaluation row or None)`` from OUTPUT_DIR/metrics.json."""
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = {r["iteration"]: r for r in rows if "total_loss" in r}
    evals = [r for r in rows if "bbox/AP" in r]
    return losses, (evals[-1] if evals else None)
