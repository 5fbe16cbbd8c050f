"""cmrcnn-tune in tests: search-space files, the command line, the study
storage (tests/test_tune.py, test_tune_sweep.py)."""

import os
import subprocess
import sys
import time

import pytest
import yaml

pytest.importorskip("optuna")
import optuna  # noqa: E402

from conftest import DEMO_CONFIG, ROOT  # noqa: E402
from reliability_helpers import SMALL_OPTS, make_data  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

# float32: at 64 px the CPU's bfloat16 autocast of the demo config is slower
FAST = ["SOLVER.AMP.ENABLED", "False"]


def tiny_data(tmp_path_factory):
    """The tiny data set the studies train on (6 training, 3 validation images); a module-scoped
    fixture in each test module."""
    return make_data(tmp_path_factory.mktemp("tune_data"), num_train=6, num_val=3)


def _space(tmp_path, spec, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _argv(command, data, space, study, *extra, iters=4, opts=()):
    """A cmrcnn-tune command on the tiny data: small model, ``iters`` training iterations."""
    data = str(data)
    return (
        [command, "--config-file", DEMO_CONFIG, "--space", space, "--study-dir", str(study)]
        + [str(x) for x in extra]
        + ["--train-json", os.path.join(data, "train.json")]
        + ["--train-images", os.path.join(data, "train")]
        + ["--val-json", os.path.join(data, "val.json")]
        + ["--val-images", os.path.join(data, "val")]
        + [str(x) for x in SMALL_OPTS]
        + ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "()"]
        + FAST
        + [str(x) for x in opts]
    )


def _cli(argv):
    from cmrcnn_ext.apps.tune import get_parser, main

    return main(get_parser().parse_args(argv))


def _load(study_dir):
    from cmrcnn_ext.tune.storage import default_storage_url

    name = os.path.basename(os.path.abspath(study_dir))
    return optuna.load_study(study_name=name, storage=default_storage_url(str(study_dir)))


def _proc(argv):
    return subprocess.Popen(
        [sys.executable, "-m", "cmrcnn_ext.tune"] + argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(pred, seconds, what):
    end = time.time() + seconds
    while time.time() < end:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _states(study_dir):
    try:
        return [t.state for t in _load(study_dir).trials]
    except Exception:  # storage not created yet
        return []
