"""Interrupted training loses nothing: kill train_net.py after a checkpoint, resume it, and end
with the weights of an uninterrupted run (cmrcnn_ext/engine/resume.py, rng.py, checkpoint.py)."""

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
    "torch.set_num_threads(1); "
    "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s'); "
    "sys.argv = ['train_net.py'] + sys.argv[1:]; "
    "runpy.run_path('train_net.py', run_name='__main__')"
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
            merged["images"].append(
                {**img, "id": img["id"] + offset_img, "file_name": f"{split}/{img['file_name']}"}
            )
        for ann in data["annotations"]:
            merged["annotations"].append(
                {**ann, "id": ann["id"] + offset_ann, "image_id": ann["image_id"] + offset_img}
            )
        merged["categories"] = data["categories"]
    json_file = os.path.join(root, "train.json")
    with open(json_file, "w") as f:
        json.dump(merged, f)
    return json_file


def _command(data_root, json_file, out_dir, resume=False):
    opts = [
        "OUTPUT_DIR",
        out_dir,
        "SEED",
        0,
        "SOLVER.MAX_ITER",
        8,
        "SOLVER.CHECKPOINT_PERIOD",
        3,
        "SOLVER.IMS_PER_BATCH",
        2,
        "SOLVER.BASE_LR",
        0.01,
        "SOLVER.WARMUP_ITERS",
        10,  # the LR changes at every iteration
        "DATALOADER.NUM_WORKERS",
        0,
        "DATASETS.TEST",
        "()",
        "TEST.EVAL_PERIOD",
        0,
        "INPUT.MASK_FORMAT",
        "bitmask",
        "INPUT.MIN_SIZE_TRAIN",
        "(56, 64, 72, 80)",  # random resize + flip: augmentation RNG
        "INPUT.MAX_SIZE_TRAIN",
        96,
        # a small model: fast enough for a test
        "MODEL.FPN.OUT_CHANNELS",
        32,
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        64,
        "MODEL.ROI_MASK_HEAD.CONV_DIM",
        32,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
        200,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        32,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        16,
    ]
    cmd = [
        sys.executable,
        "-c",
        RUNNER,
        "--config-file",
        DEMO_CONFIG,
        "--train-json",
        json_file,
        "--train-images",
        data_root,
    ]
    return cmd + (["--resume"] if resume else []) + [str(x) for x in opts]


def _env(tmp_path):
    env = dict(
        os.environ,
        CMRCNN_EXT_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(cmd, tmp_path, name):
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT
        )


def _finish(proc, tmp_path, name, timeout=300):
    try:
        proc.wait(timeout)
    finally:
        proc.kill()
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

    # 1. uninterrupted: 8 iterations; 2. the same run (in parallel, one thread each), SIGKILLed
    # as soon as the checkpoint of iteration 6 is tagged
    reference = _start(_command(data_root, json_file, full), tmp_path, "full")
    proc = _start(_command(data_root, json_file, killed), tmp_path, "killed")
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
    _finish(reference, tmp_path, "full")
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
    log = _finish(
        _start(_command(data_root, json_file, killed, True), tmp_path, "resumed"),
        tmp_path,
        "resumed",
    )
    assert "Starting training from iteration 6" in log
    assert "Training data resumes at iteration 6" in log
    assert "Restoring the RNG states" in log

    a = torch.load(os.path.join(full, "model_final.pth"), weights_only=True)
    b = torch.load(os.path.join(killed, "model_final.pth"), weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 7
    assert a["model"].keys() == b["model"].keys()
    worst = max(
        (a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"]
    )
    assert worst <= 1e-6, f"final weights differ by up to {worst}"
    # same LR schedule position and optimizer state (momentum buffers)
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]
    opt_a, opt_b = a["trainer"]["_trainer"]["optimizer"], b["trainer"]["_trainer"]["optimizer"]
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    for k, state in opt_a["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                assert torch.allclose(value, opt_b["state"][k][name], rtol=0, atol=1e-6), (k, name)
    # the LR logged at the last iteration agrees (losses are logged as medians of the process's
    # history, which differ)
    ma, mb = _last_metrics(full), _last_metrics(killed)
    assert ma["iteration"] == mb["iteration"] == 7
    assert ma["lr"] == mb["lr"]


# ------------------------------------------------------------------------------ units


def _ids(batches):
    return [[d["idx"] for d in batch] for batch in batches]


def _mapper(d):
    return dict(d)


@pytest.mark.parametrize("grouping,workers", [(True, 0), (False, 0), (True, 2), (False, 2)])
def test_resumable_loader_continues_detectron2s_data_stream(grouping, workers):
    """Batch by batch, the image ids of Detectron2's own build_detection_train_loader(cfg), from
    the start and after resuming at iteration k. With 2 workers Detectron2 shards the sampler
    among them (per index in v0.6, per batch since PR #5035) and torch takes their outputs
    round-robin: with grouping, the output order is not the sampler's."""
    import itertools

    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    import cmrcnn_ext
    from cmrcnn_ext.engine.resume import build_resumable_train_loader

    # 11 images, wide and tall: aspect-ratio groups fill unevenly, some images wait in them
    dicts = [{"idx": i, "width": 100 if i % 3 else 50, "height": 60} for i in range(11)]
    for batch_size in (2, 3):
        cfg = cmrcnn_ext.get_cfg()
        cfg.SEED = 7  # Detectron2 main seeds the TrainingSampler from SEED
        cfg.SOLVER.IMS_PER_BATCH = batch_size
        cfg.DATALOADER.ASPECT_RATIO_GROUPING = grouping
        cfg.DATALOADER.NUM_WORKERS = workers

        def build(builder):
            np.random.seed(7)  # v0.6 seeds it from numpy's global RNG
            return builder(cfg, mapper=_mapper, dataset=dicts)

        stock = _ids(itertools.islice(build(build_detection_train_loader), 16))
        assert _ids(itertools.islice(build(build_resumable_train_loader), 16)) == stock, batch_size
        for start in (1, 3, 5, 10):
            loader = build(build_resumable_train_loader)
            loader.start_iter = start
            got = _ids(itertools.islice(loader, 6))
            assert got == stock[start : start + 6], (batch_size, start)
        with EventStorage(start_iter=4):  # by default: the trainer's iteration at the first batch
            assert _ids(itertools.islice(build(build_resumable_train_loader), 6)) == stock[4:10]


def test_images_waiting_in_a_group_are_mapped_again_without_shifting_the_rng_stream():
    """NUM_WORKERS 0: after resuming, the images mapped after those that waited in a half-full
    aspect-ratio group get the augmentation draws of the uninterrupted run."""
    import itertools

    import cmrcnn_ext
    from cmrcnn_ext.engine.resume import build_resumable_train_loader

    def noisy(d):  # an "augmentation" drawing from numpy's global RNG
        return dict(d, r=float(np.random.rand()))

    dicts = [{"idx": i, "width": 100 if i % 3 else 50, "height": 60} for i in range(13)]
    cfg = cmrcnn_ext.get_cfg()
    cfg.SEED, cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 2, 3, 0

    def build():
        np.random.seed(1)
        return build_resumable_train_loader(cfg, mapper=noisy, dataset=dicts)

    waited = 0
    for start in (1, 2, 4):
        full = iter(build())
        for _ in range(start):
            next(full)
        np.random.seed(3)  # as RNGStateHook restores the states before the step
        expected = [[(d["idx"], d["r"]) for d in batch] for batch in itertools.islice(full, 3)]
        resumed = build()
        resumed.start_iter = start
        waiting = resumed.resume_position(start)[1]
        np.random.seed(3)
        got = [[(d["idx"], d["r"]) for d in batch] for batch in itertools.islice(resumed, 3)]
        assert [[i for i, _ in b] for b in got] == [[i for i, _ in b] for b in expected]
        # only the waiting images (mapped again) differ; the others are mapped as before
        differ = [x[0] for x, y in zip(itertools.chain(*got), itertools.chain(*expected)) if x != y]
        assert len(differ) <= len(waiting) and set(differ) <= set(waiting), (start, differ)
        waited += len(waiting)
    assert waited  # some resume points have images waiting


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    from cmrcnn_ext.engine.rng import get_rng_state, set_rng_state

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    torch.save({"rng": get_rng_state()}, tmp_path / "rng.pth")
    first = (torch.rand(4), np.random.rand(4), np.random.normal(), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    again = (torch.rand(4), np.random.rand(4), np.random.normal(), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_rng_hook_hides_what_runs_between_steps_and_restores_on_resume():
    import random

    from cmrcnn_ext.engine.rng import RNGStateHook

    def draw():
        return torch.rand(2).tolist() + [float(np.random.rand()), random.random()]

    hook = RNGStateHook()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    hook.before_step(), draw(), hook.after_step()  # a training step
    state = hook.state_dict()  # what the checkpointer saves after this step
    draw()  # e.g. evaluation between steps
    hook.before_step()
    expected = draw()  # the next step sees the same numbers as without the evaluation

    resumed = RNGStateHook()  # a new process, seeded differently
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    resumed.load_state_dict(state)
    resumed.before_step()
    assert draw() == expected
