"""Pre-emption and damaged checkpoints: a signal stops training with a checkpoint and exit code
75, --resume ends with the uninterrupted run's weights; --resume skips damaged checkpoints; a full
disk is a clear error that changes nothing; old checkpoints are rotated
(cmrcnn_ext/engine/preemption.py, checkpoint_rotation.py)."""

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.modeling import build_model
from test_resume import _command, _env, _finish, _make_data

from cmrcnn_ext.engine.checkpoint import CMRCNNCheckpointer
from cmrcnn_ext.engine.checkpoint_files import CheckpointError
from cmrcnn_ext.engine.checkpoint_rotation import CheckpointSaveError, prune_checkpoints
from cmrcnn_ext.engine.preemption import EXIT_PREEMPTED

from conftest import ROOT, tiny_cfg

MAX_ITER = 14


def _cmd(data_root, json_file, out_dir, resume=False, extra=()):
    cmd = _command(data_root, json_file, out_dir, resume)
    cmd[cmd.index("SOLVER.MAX_ITER") + 1] = str(MAX_ITER)
    return cmd + [str(x) for x in extra]


def _signal_during_training(cmd, tmp_path, name, sig, delay, pid_of=None):
    """Start ``cmd``, send ``sig`` ``delay`` s after training starts; returns (rc, log)."""
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if "Starting training from iteration 0" in log_path.read_text():
                break
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, (
            "training ended before the signal: " + log_path.read_text()[-2000:]
        )
        os.kill(proc.pid, sig)
        proc.wait(240)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, log_path.read_text()


def test_signal_stops_with_checkpoint_and_resume_is_bitwise_uninterrupted(tmp_path):
    data_root = str(tmp_path / "data")
    json_file = _make_data(data_root)
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    delay = random.uniform(0.0, 1.5)  # a random iteration: printed on failure
    rc, log = _signal_during_training(
        _cmd(data_root, json_file, stopped), tmp_path, "stopped", signal.SIGTERM, delay
    )
    assert rc == EXIT_PREEMPTED, f"delay {delay:.2f}s\n" + log[-3000:]
    found = re.search(r"SIGTERM received: stopped after iteration (\d+), checkpoint (\S+) ", log)
    assert found, log[-3000:]
    k = int(found.group(1))
    assert "Exception during training" not in log  # a planned stop, not a crash
    assert "Continue with the same command plus --resume" in log
    assert open(os.path.join(stopped, "last_checkpoint")).read() == f"model_{k:07d}.pth"
    ckpt = torch.load(os.path.join(stopped, f"model_{k:07d}.pth"), weights_only=True)
    assert ckpt["iteration"] == k and "RNGStateHook" in ckpt["trainer"]["hooks"]
    assert not os.path.exists(os.path.join(stopped, "model_final.pth"))

    reference = subprocess.Popen(
        _cmd(data_root, json_file, full), cwd=ROOT, env=_env(tmp_path),
        stdout=open(tmp_path / "full.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    resumed = _finish(
        subprocess.Popen(
            _cmd(data_root, json_file, stopped, resume=True), cwd=ROOT, env=_env(tmp_path),
            stdout=open(tmp_path / "resumed.log", "w"), stderr=subprocess.STDOUT,
        ),
        tmp_path,
        "resumed",
    )  # fmt: skip
    _finish(reference, tmp_path, "full")
    assert f"Starting training from iteration {k + 1}" in resumed
    a = torch.load(os.path.join(full, "model_final.pth"), weights_only=True)
    b = torch.load(os.path.join(stopped, "model_final.pth"), weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    different = [n for n in a["model"] if not torch.equal(a["model"][n], b["model"][n])]
    assert not different, f"stopped after iteration {k}: {len(different)} tensors differ"


@pytest.mark.one_leg
def test_ddp_ranks_stop_at_the_same_iteration_on_a_signal_to_the_launcher(tmp_path):
    data_root = str(tmp_path / "data")
    json_file = _make_data(data_root)
    out = str(tmp_path / "ddp")
    cmd = _two_processes(_cmd(data_root, json_file, out))
    rc, log = _signal_during_training(cmd, tmp_path, "ddp", signal.SIGUSR1, 0.5)
    assert rc == EXIT_PREEMPTED, log[-3000:]
    stops = []
    for name in ("log.txt", "log.txt.rank1"):
        text = open(os.path.join(out, name)).read()
        stops += re.findall(r"SIGUSR1 received: stopped after iteration (\d+)", text)
    assert len(stops) == 2 and stops[0] == stops[1], stops  # both ranks, the same iteration
    k = int(stops[0])
    assert open(os.path.join(out, "last_checkpoint")).read() == f"model_{k:07d}.pth"
    _resume_two_processes(data_root, json_file, out, tmp_path)


@pytest.mark.one_leg
def test_a_dead_rank_stops_the_others_with_its_name_and_resume_continues(tmp_path):
    data_root = str(tmp_path / "data")
    json_file = _make_data(data_root)
    out = str(tmp_path / "dead")
    cmd = _two_processes(_cmd(data_root, json_file, out, extra=["SOLVER.CHECKPOINT_PERIOD", 2]))
    log_path = tmp_path / "dead.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        tag = os.path.join(out, "last_checkpoint")
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not os.path.isfile(tag):
            time.sleep(0.05)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        workers = _spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        killed_at = time.time()
        os.kill(workers[1], signal.SIGKILL)  # rank 1
        proc.wait(120)
        stopped_after = time.time() - killed_at
    finally:
        proc.kill()
        proc.wait()
    text = log_path.read_text()
    assert proc.returncode == 1, text[-3000:]
    assert "training process of rank 1" in text and "SIGKILL" in text, text[-3000:]
    assert "--resume" in text
    assert stopped_after < 60, stopped_after  # bounded: no wait for the collective timeout
    assert not any(_alive(pid) for pid in workers)
    _resume_two_processes(data_root, json_file, out, tmp_path, ["SOLVER.CHECKPOINT_PERIOD", 2])


def _two_processes(cmd):
    """``cmd`` (python train_net.py --config-file FILE ...) with ``--num-gpus 2``."""
    return cmd[:3] + ["--num-gpus", "2"] + cmd[3:]


def _resume_two_processes(data_root, json_file, out, tmp_path, opts=()):
    """``--resume`` with 2 CPU processes runs to the end (model_final.pth)."""
    cmd = _two_processes(_cmd(data_root, json_file, out, resume=True, extra=opts))
    done = subprocess.run(
        cmd, cwd=ROOT, env=_env(tmp_path),
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


def _spawned_workers(parent):
    """PIDs of the worker processes torch.multiprocessing spawned under ``parent``."""
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
    pids = []
    for pid in map(int, children.stdout.split()):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                pids.append(pid)
    return sorted(pids)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


# ------------------------------------------------------------------------------ units


def _checkpointer(tmp_path, keep=0):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.ROI_HEADS.NAME", "CascadeMaskROIHeads"))
    return model, CMRCNNCheckpointer(model, str(tmp_path), keep_checkpoints=keep)


def _perturb(model, value):
    with torch.no_grad():
        next(model.parameters()).fill_(value)


def test_resume_skips_damaged_checkpoints_and_says_so(tmp_path, caplog):
    model, ckpt = _checkpointer(tmp_path)
    for it in (1, 3, 5):
        _perturb(model, float(it))
        ckpt.save(f"model_{it:07d}", iteration=it)
    # the newest is truncated (a cut-off copy); the one before is not a checkpoint at all
    path5 = tmp_path / "model_0000005.pth"
    path5.write_bytes(path5.read_bytes()[:1000])
    (tmp_path / "model_0000003.pth").write_bytes(b"\x00garbage" * 10)
    _perturb(model, -1.0)
    with caplog.at_level("WARNING"):
        loaded = ckpt.resume_or_load("", resume=True)
    assert loaded["iteration"] == 1
    assert next(model.parameters()).flatten()[0].item() == 1.0
    text = caplog.text
    assert "skipping" in text and "model_0000005.pth" in text and "model_0000003.pth" in text
    assert "newest intact checkpoint" in text
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"  # re-tagged


def test_resume_survives_a_broken_last_checkpoint_tag_and_fails_clearly_without_any(tmp_path):
    model, ckpt = _checkpointer(tmp_path)
    _perturb(model, 2.0)
    ckpt.save("model_0000002", iteration=2)
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")  # names a missing file
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 2
    (tmp_path / "model_0000002.pth").write_bytes(b"")  # 0 bytes
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be loaded"):
        ckpt.resume_or_load("", resume=True)


def test_disk_full_while_saving_changes_nothing_and_names_the_path(tmp_path, monkeypatch):
    model, ckpt = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def full_disk(data, f):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    import cmrcnn_ext.engine.checkpoint as module

    monkeypatch.setattr(module.torch, "save", full_disk)
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save("model_0000002", iteration=2)
    message = str(info.value)
    assert str(tmp_path / "model_0000002.pth") in message and "MiB" in message
    assert "last_checkpoint are unchanged" in message
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no temp


def test_old_periodic_checkpoints_are_rotated(tmp_path):
    model, ckpt = _checkpointer(tmp_path, keep=2)
    (tmp_path / "model_final.pth").write_bytes(b"final")
    (tmp_path / "model_0000000.pth").write_bytes(b"from an earlier process")
    for it in (1, 3, 5):
        ckpt.save(f"model_{it:07d}", iteration=it)
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint", "model_0000003.pth", "model_0000005.pth", "model_final.pth"
    ]  # fmt: skip
    assert prune_checkpoints(str(tmp_path), 0, None) == []  # 0 keeps everything


def test_stop_signals_key_is_validated():
    from cmrcnn_ext.config.validate import ConfigError, check_values

    check_values({"SOLVER.CMRCNN.STOP_SIGNALS": []})
    with pytest.raises(ConfigError, match="SOLVER.CMRCNN.STOP_SIGNALS"):
        check_values({"SOLVER.CMRCNN.STOP_SIGNALS": ["SIGKILL"]})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
