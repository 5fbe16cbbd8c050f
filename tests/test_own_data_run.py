"""A trained own-data run and its files (results, curves, --eval-only, prediction with the run
folder, class names), and command-line mistakes as one message without a traceback."""

import json
import os

import pytest
import torch
from own_data_helpers import (
    _cache_dir,  # noqa: F401  (autouse fixture: a clean cache folder per test)
    _stops_before_any_model,
    make_polygons,
    run_cli,
    train_args,
    write,
)

from conftest import DEMO_CONFIG
from reliability_helpers import SMALL_OPTS, load_train_net

# ------------------------------------------------------- a trained own-data run and its files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-iteration train_net.py run on own data (2 classes) with evaluation."""
    tmp = tmp_path_factory.mktemp("own_run")
    old = os.environ.get("CMRCNN_EXT_CACHE_DIR")
    os.environ["CMRCNN_EXT_CACHE_DIR"] = str(tmp / "clean_cache")
    try:
        train = write(tmp / "train.json", make_polygons(tmp, n=4))
        val = write(tmp / "val.json", make_polygons(tmp, n=2, seed=1, folder="val"))
        train_net = load_train_net()
        args = train_net.get_parser().parse_args(
            train_args(train, tmp / "images", tmp / "out", val, tmp / "val")
        )
        train_net.main(args)
    finally:
        if old is None:
            os.environ.pop("CMRCNN_EXT_CACHE_DIR")
        else:
            os.environ["CMRCNN_EXT_CACHE_DIR"] = old
    with open(tmp / "out" / "results.json") as f:
        results = json.load(f)["results"]
    return {"tmp": tmp, "out": tmp / "out", "train": train, "val": val, "results": results}


def test_run_writes_results_curves_and_the_data_summary(run):
    out = run["out"]
    with open(out / "results.json") as f:
        report = json.load(f)
    assert set(report["results"]) == {"bbox", "segm", "timing"}
    assert report["results"]["timing"]["inference_ms_per_image"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert report["results"]["segm"]["AP"] == pytest.approx(metrics[-1]["segm/AP"])
    assert {"AP-square", "AP-triangle"} <= set(report["results"]["bbox"])
    assert report["classes"] == ["square", "triangle"] and report["seconds"]["train"] > 0
    assert (out / "training_curves.png").stat().st_size > 1000
    log = (out / "log.txt").read_text()
    # the data check's summary is in log.txt: at registration and again when training starts
    assert log.count("kept 4/4 images, 8/8 annotations, 2 categories") == 2
    assert "instances per class: square: 4, triangle: 4" in log
    assert log.index("Data used by this run") > log.index("Model:")
    with open(out / "config.yaml") as f:
        assert "CLASS_NAMES:\n    - square\n    - triangle" in f.read()


def test_eval_only_needs_trained_weights(run, monkeypatch):
    from cmrcnn_ext.engine.runs import UntrainedEvaluationError

    base = train_args(
        run["train"], run["tmp"] / "images", run["tmp"] / "eval", run["val"], run["tmp"] / "val"
    )
    for weights, match in (
        ("", "MODEL.WEIGHTS is empty"),
        ("detectron2://ImageNetPretrained/MSRA/R-50.pkl", "ImageNet weights"),
    ):
        argv = ["--eval-only"] + base + ["MODEL.WEIGHTS", weights]
        assert match in _stops_before_any_model(monkeypatch, argv, UntrainedEvaluationError)


def test_eval_only_of_the_run_and_untrained_on_request(run):
    from cmrcnn_ext.engine.checkpoint import CheckpointError

    train_net = load_train_net()
    base = train_args(
        run["train"], run["tmp"] / "images", run["tmp"] / "eval", run["val"], run["tmp"] / "val"
    )
    args = train_net.get_parser().parse_args(
        ["--eval-only"] + base + ["MODEL.WEIGHTS", str(run["out"] / "model_final.pth")]
    )
    res = train_net.main(args)
    assert res["segm"]["AP"] == pytest.approx(run["results"]["segm"]["AP"])
    assert os.path.isfile(run["tmp"] / "eval" / "results.json")
    # a checkpoint of another model (the synthetic shapes' 5 classes) does not fit: an error
    torch.manual_seed(0)
    from detectron2.modeling import build_model

    from cmrcnn_ext.config import setup_cfg

    five = str(run["tmp"] / "five_classes.pth")
    torch.save(
        {
            "model": build_model(
                setup_cfg(
                    DEMO_CONFIG,
                    [str(x) for x in SMALL_OPTS[:8]] + ["MODEL.ROI_HEADS.NUM_CLASSES", 5],
                )
            ).state_dict()
        },
        five,
    )
    args = train_net.get_parser().parse_args(["--eval-only"] + base + ["MODEL.WEIGHTS", five])
    with pytest.raises(
        CheckpointError, match="class layers are for 5 classes, the config's model has 2"
    ):
        train_net.main(args)
    args = train_net.get_parser().parse_args(
        ["--eval-only", "--eval-untrained"] + base + ["MODEL.WEIGHTS", ""]
    )
    assert set(train_net.main(args)) == {"bbox", "segm", "timing"}


def test_predict_with_the_run_folder(run, tmp_path):
    """The README's prediction command on an own-data model: the run folder gives the config
    and classes; the packaged demo config (5 classes) is refused; no data set is generated."""
    image = sorted((run["tmp"] / "val").glob("*.png"))[0]
    env = {"CMRCNN_DATA": str(tmp_path / "no_data_here")}
    proc = run_cli(
        [
            "-m",
            "cmrcnn_ext.apps.predict",
            "--run",
            str(run["out"]),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "pred"),
            "--score-thresh",
            "0",
        ],
        cwd=str(tmp_path),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "pred" / "coco_results.json") as f:
        results = json.load(f)
    assert results and {r["category_id"] for r in results} <= {1, 2}
    assert not os.path.exists(tmp_path / "no_data_here") and not os.path.exists(
        tmp_path / "datasets"
    )
    # the demo config with this checkpoint: one clear error, no traceback
    proc = run_cli(
        [
            "-m",
            "cmrcnn_ext.apps.predict",
            "--config-file",
            os.path.basename(DEMO_CONFIG),
            "--weights",
            str(run["out"] / "model_final.pth"),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "pred2"),
        ],
        cwd=str(tmp_path),
        env=env,
    )
    assert proc.returncode == 2
    assert (
        "error: Checkpoint" in proc.stderr
        and "for 2 classes, the config's model has 5" in proc.stderr
    )
    assert "--run OUTPUT_DIR" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "no_data_here") and not os.path.exists(
        tmp_path / "datasets"
    )


def test_class_names_come_with_the_model(run):
    from cmrcnn_ext.engine.runs import class_names, inference_config

    cfg = inference_config(run=str(run["out"]))
    assert class_names(cfg) == ["square", "triangle"]
    assert cfg.MODEL.WEIGHTS.endswith("model_final.pth")


# ------------------------------------------------------------------ command-line errors


@pytest.mark.parametrize("case", ["config", "data", "weights"])
def test_cli_errors_are_one_message(tmp_path, case):
    data = make_polygons(tmp_path, n=2)
    path = write(tmp_path / "train.json", data)
    args = train_args(path, tmp_path / "images", tmp_path / "out")
    if case == "config":
        args[args.index("--config-file") + 1] = "nope.yaml"
        expected = "is not the name of a config shipped with cmrcnn_ext"
    elif case == "data":
        data["annotations"][0]["category_id"] = 9
        write(tmp_path / "train.json", data)
        expected = "has category_id=9, which is not in 'categories'"
    else:
        args = ["--eval-only"] + args + ["MODEL.WEIGHTS", str(tmp_path / "missing.pth")]
        expected = "does not exist"
    proc = run_cli(["train_net.py"] + args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("error: ") == 1
    if case == "data":  # --debug is one switch of the shared error wrapper: checked once
        debug = run_cli(["train_net.py", "--debug"] + args)
        assert debug.returncode != 0 and "Traceback" in debug.stderr and expected in debug.stderr
