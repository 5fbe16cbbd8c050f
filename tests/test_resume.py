"""Interrupted training loses nothing: kill train_net.py after a checkpoint, resume it, and end
with the weights of an uninterrupted run (cmrcnn_ext/resume.py, cmrcnn_ext/checkpoint.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import DEMO_CONFIG, ROOT

# train_net.py with deterministic kernels, in a fresh process (root logger at INFO: cmrcnn_ext's
# log lines are shown too).
RUNNER = (
    "import logging, runpy, sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s'); "
    "sys.argv = ['train_net.py'] + sys.argv[1:]; runpy.run_path('train_net.py', run_name='__main__')"
)


def _make_data(root):
    """16 synthetic images, 8 of 64 px and 8 of 96 px, in one COCO JSON."""
    from cmrcnn_ext.data.synthetic import generate_dataset

    merged = {"images": [], "annotations": [], "categories": None}
    for size, seed in ((64, 0), (96, 1)):
        split = f"s{size}"
        with open(generate_dataset(str(root), 8, seed, image_size=size, split_name=split)) as f:
            data = json.load(f)
        offset_img, offset_ann = len(merged["images"]), len(merged["annotations"])
        for img in data["images"]:
            merged["images"].append({**img, "id": img["id"] + offset_img,
                                     "file_name": f"{split}/{img['file_name']}"})  # fmt: skip
        for ann in data["annotations"]:
            merged["annotations"].append({**ann, "id": ann["id"] + offset_ann,
                                          "image_id": ann["image_id"] + offset_img})  # fmt: skip
        merged["categories"] = data["categories"]
    json_file = os.path.join(root, "train.json")
    with open(json_file, "w") as f:
        json.dump(merged, f)
    return json_file


def _command(data_root, json_file, out_dir, resume=False):
    opts = [
        "OUTPUT_DIR", out_dir,
        "SEED", 0,
        "SOLVER.MAX_ITER", 8,
        "SOLVER.CHECKPOINT_PERIOD", 3,
        "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.BASE_LR", 0.01,
        "SOLVER.WARMUP_ITERS", 10,  # the LR changes at every iteration
        "DATALOADER.NUM_WORKERS", 0,
        "DATASETS.TEST", "()",
        "TEST.EVAL_PERIOD", 0,
        "INPUT.MASK_FORMAT", "bitmask",
        "INPUT.MIN_SIZE_TRAIN", "(56, 64, 72, 80)",  # random resize + flip: augmentation RNG
        "INPUT.MAX_SIZE_TRAIN", 96,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
    ]  # fmt: skip
    cmd = [sys.executable, "-c", RUNNER, "--config-file", DEMO_CONFIG,
           "--train-json", json_file, "--train-images", data_root]  # fmt: skip
    return cmd + (["--resume"] if resume else []) + [str(x) for x in opts]


def _env(tmp_path):
    env = dict(os.environ, CMRCNN_EXT_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd, tmp_path, name):
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / f"{name}.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def _last_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()][-1]


def test_killed_and_resumed_training_matches_uninterrupted(tmp_path):
    data_root = str(tmp_path / "data")
    json_file = _make_data(data_root)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")

    # 1. uninterrupted: 8 iterations
    _run(_command(data_root, json_file, full), tmp_path, "full")

    # 2. the same run, SIGKILLed as soon as the checkpoint of iteration 6 is tagged
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_command(data_root, json_file, killed), cwd=ROOT, env=_env(tmp_path),
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    tag = os.path.join(killed, "last_checkpoint")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isfile(tag) and open(tag).read() == "model_0000005.pth":
                break
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not os.path.exists(os.path.join(killed, "model_final.pth"))
    ckpt5 = torch.load(os.path.join(killed, "model_0000005.pth"), weights_only=True)  # no pickle
    assert ckpt5["trainer"]["iteration"] == 5
    # Detectron2 v0.6 checkpoints its LRMultiplier (an _LRScheduler); Trainer adds the optimizer
    # (with the LR of iteration 6) and RNGStateHook the RNG states
    assert ckpt5["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 6
    assert "RNGStateHook" in ckpt5["trainer"]["hooks"]
    ref5 = torch.load(os.path.join(full, "model_0000005.pth"), weights_only=True)
    assert [g["lr"] for g in ckpt5["trainer"]["_trainer"]["optimizer"]["param_groups"]] == [
        g["lr"] for g in ref5["trainer"]["_trainer"]["optimizer"]["param_groups"]
    ]

    # 3. resume: iterations 6 and 7
    log = _run(_command(data_root, json_file, killed, resume=True), tmp_path, "resumed")
    assert "Starting training from iteration 6" in log
    assert "Training data resumes at iteration 6" in log
    assert "Restoring the RNG states" in log

    a = torch.load(os.path.join(full, "model_final.pth"), weights_only=True)
    b = torch.load(os.path.join(killed, "model_final.pth"), weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 7
    assert a["model"].keys() == b["model"].keys()
    worst = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    assert worst <= 1e-6, f"final weights differ by up to {worst}"
    # same LR schedule position and optimizer state (momentum buffers)
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]
    opt_a, opt_b = a["trainer"]["_trainer"]["optimizer"], b["trainer"]["_trainer"]["optimizer"]
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    for k, state in opt_a["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                assert torch.allclose(value, opt_b["state"][k][name], rtol=0, atol=1e-6), (k, name)
    # the LR and losses logged at the last iteration agree
    ma, mb = _last_metrics(full), _last_metrics(killed)
    assert ma["iteration"] == mb["iteration"] == 7
    assert ma["lr"] == mb["lr"]
    assert np.isclose(ma["total_loss"], mb["total_loss"], rtol=0, atol=1e-5)
