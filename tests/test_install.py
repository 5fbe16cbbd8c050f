"""``pip install .`` (a regular wheel, not editable) into an environment that already has torch
and Detectron2: the demo, prediction and export commands run from any folder, finding the
packaged configs by name.

The test builds the wheel, creates a fresh virtualenv that sees the test environment's
packages (torch, Detectron2, pycocotools...) through a ``.pth`` line but not its editable
cmrcnn_ext, installs the wheel there and runs the commands from a temporary folder.
"""

import glob
import os
import site
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT

DEMO = "cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml"
# a tiny, quick demo run: 2 iterations at 64 px, smaller heads
QUICK = [
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.IMS_PER_BATCH",
    "1",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "64",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "64",
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM",
    "32",
    "MODEL.ROI_MASK_HEAD.NUM_CONV",
    "1",
]


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtualenv with the wheel of this checkout installed; returns (python, env, workdir)."""
    tmp = tmp_path_factory.mktemp("install")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            ROOT,
        ],
        cwd=str(tmp),
        env=env,
    )
    (wheel,) = glob.glob(str(tmp / "dist" / "cmrcnn_ext-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=str(tmp), env=env)
    python = str(venv / "bin" / "python")
    target = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    # the test environment's packages, after the new environment's own
    ours = [
        p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)
    ]
    with open(os.path.join(target, "zz_test_environment.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(ours)) + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            wheel,
        ],
        cwd=str(tmp),
        env=env,
    )
    work = tmp / "elsewhere"
    work.mkdir()
    env["CMRCNN_DATA"] = os.path.join(ROOT, "datasets", "cmrcnn_shapes")  # the cached demo data
    return python, env, work


@pytest.mark.one_leg
def test_wheel_installs_the_package_with_its_configs(installed):
    python, env, work = installed
    code = (
        "import cmrcnn_ext, os; from cmrcnn_ext import model_zoo;"
        "print(os.path.dirname(cmrcnn_ext.__file__)); print(model_zoo.get_config_file('%s'))" % DEMO
    )
    package, config = _run([python, "-c", code], cwd=str(work), env=env).split()[:2]
    assert not package.startswith(ROOT), f"imported the checkout, not the wheel: {package}"
    assert config.startswith(package) and os.path.isfile(config)
    # the packaged search spaces, found by name, and the cmrcnn-tune console script
    code = "from cmrcnn_ext.apps.tune import resolve_space; print(resolve_space('reference_space'))"
    space = _run([python, "-c", code], cwd=str(work), env=env).split()[0]
    assert space.startswith(package) and os.path.isfile(space)
    tune = os.path.join(os.path.dirname(python), "cmrcnn-tune")
    assert "reference_space.yaml" in _run([tune, "run", "--help"], cwd=str(work), env=env)


@pytest.mark.one_leg
def test_demo_predict_export_run_from_another_folder(installed):
    python, env, work = installed
    out = work / "demo"
    text = _run(
        [python, "-m", "cmrcnn_ext.apps.demo", "--output", str(out), "--num-vis", "1"] + QUICK,
        cwd=str(work),
        env=env,
    )
    assert "box AP" in text
    for name in ("results.json", "training_curves.png", "model_final.pth", "config.yaml"):
        assert (out / name).is_file(), name
    image = sorted(glob.glob(os.path.join(env["CMRCNN_DATA"], "val", "*.png")))[0]
    _run(
        [
            python,
            "-m",
            "cmrcnn_ext.apps.predict",
            "--config-file",
            DEMO,
            "--weights",
            str(out / "model_final.pth"),
            "--input",
            image,
            "--output",
            str(work / "pred"),
        ]
        + QUICK,
        cwd=str(work),
        env=env,
    )
    assert (work / "pred" / "coco_results.json").is_file()
    export = os.path.join(os.path.dirname(python), "cmrcnn-export")  # the console script
    _run(
        [
            export,
            "--config-file",
            DEMO,
            "--weights",
            str(out / "model_final.pth"),
            "--output",
            str(work / "model.ts"),
        ]
        + QUICK,
        cwd=str(work),
        env=env,
    )
    assert (work / "model.ts").is_file()
    # the demo's output folder is a run folder: its config.yaml and final checkpoint
    predict = os.path.join(os.path.dirname(python), "cmrcnn-predict")
    _run([predict, "--run", str(out), "--input", image, "--output", str(work / "pred_run")],
         cwd=str(work), env=env)  # fmt: skip
    assert (work / "pred_run" / "coco_results.json").is_file()
