"""cmrcnn-tune: search spaces, studies of real (tiny) training runs, pruning, failures, kill +
resume, two workers on one storage, the report."""

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

pytest.importorskip("optuna")
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from conftest import DEMO_CONFIG, ROOT  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

from tune_helpers import (  # noqa: E402
    _argv,
    _cli,
    _load,
    _proc,
    _space,
    _states,
    _wait_for,
    tiny_data,
)

data = pytest.fixture(scope="module", name="data")(tiny_data)  # the tiny data set


# ---------------------------------------------------------------- search spaces (no training)


def test_search_space_file_problems_are_listed(tmp_path):
    from cmrcnn_ext.config.setup import load_config
    from cmrcnn_ext.tune.space import SearchSpaceError, load_space

    cfg = load_config(DEMO_CONFIG, [])
    bad = {
        "MODEL.NOT_A_KEY": {"choices": [1]},
        "MODEL.ROI_BOX_HEAD.NUM_FC": {"int": [3, 1]},
        "SOLVER.BASE_LR": {"float": [0.0, 0.1], "log": True},
        "MODEL.RPN.IOU_THRESHOLDS": {"choices": [[0.3, 0.7]], "when": {"MODEL.NOPE": 1}},
    }
    with pytest.raises(SearchSpaceError) as e:
        load_space(_space(tmp_path, bad), cfg)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    for part in ("MODEL.NOT_A_KEY", "low < high", "log scale needs low > 0", "MODEL.NOPE"):
        assert part in msg


def test_conditional_keys_and_also_overrides(tmp_path):
    from cmrcnn_ext.config.setup import load_config
    from cmrcnn_ext.tune.space import load_space

    cfg = load_config(DEMO_CONFIG, [])
    space = load_space(os.path.join(ROOT, "cmrcnn_ext/tune/spaces/reference_space.yaml"), cfg)
    base = {"MODEL.CMRCNN.MASK_STAGES": "last"}
    fixed = {
        "MODEL.RESNETS.DEPTH": 50,
        "MODEL.BACKBONE.FREEZE_AT": 2,
        "MODEL.RPN.IOU_THRESHOLDS": "[0.4, 0.6]",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 1000,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 500,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 500,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 250,
        "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
        "MODEL.ROI_BOX_HEAD.NUM_FC": 1,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
        "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
        "MODEL.ROI_BOX_CASCADE_HEAD.IOUS": "[0.4, 0.5, 0.6]",
        "MODEL.CMRCNN.MASK_STAGES": "first",
        "MODEL.CMRCNN.STAGE_LOSS_WEIGHTS": "[1.0, 0.5, 0.25]",
    }
    out = space.sample(optuna.trial.FixedTrial(fixed), base)
    assert "MODEL.CMRCNN.TEST_MASK_MERGE" not in out  # MASK_STAGES first: not sampled
    assert out["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 256  # DEPTH 50's `also`
    assert out["MODEL.ROI_HEADS.IOU_THRESHOLDS"] == [0.4]  # the cascade's first IoU
    assert out["MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO"] == 0
    assert out["MODEL.RPN.IOU_THRESHOLDS"] == [0.4, 0.6]
    fixed.update({"MODEL.CMRCNN.MASK_STAGES": "all", "MODEL.CMRCNN.TEST_MASK_MERGE": "mean"})
    out = space.sample(optuna.trial.FixedTrial(fixed), base)
    assert out["MODEL.CMRCNN.TEST_MASK_MERGE"] == "mean"
    # every sampled config passes the project's validation (the space is consistent)
    from cmrcnn_ext.config.validate import config_problems
    from cmrcnn_ext.tune.trial import config_opts

    assert config_problems(load_config(DEMO_CONFIG, config_opts(out))) == []


def test_one_at_a_time_variations(tmp_path):
    from cmrcnn_ext.config.setup import load_config
    from cmrcnn_ext.tune.one_at_a_time import include_base_values, variations
    from cmrcnn_ext.tune.space import load_space

    cfg = load_config(DEMO_CONFIG, [])
    space = load_space(os.path.join(ROOT, "cmrcnn_ext/tune/spaces/demo_claims_space.yaml"), cfg)
    from cmrcnn_ext.config.values import cfg_value, plain_value

    base = {k: plain_value(cfg_value(cfg, k)) for k in space.keys()}
    include_base_values(space, base)
    names = [n for n, _ in variations(space, base)]
    assert names[0] == "baseline"
    assert "MODEL.CMRCNN.MASK_STAGES=first" in names
    # a conditional key is varied with its condition: against MASK_STAGES all (last by default)
    assert "MODEL.CMRCNN.MASK_STAGES=all, MODEL.CMRCNN.TEST_MASK_MERGE=mean" in names
    # one trial per alternative value: baseline + 15 (MASK_STAGES has two alternatives)
    assert len(names) == 1 + 15 and len(set(names)) == len(names)


# ---------------------------------------------------------------- studies of tiny training runs


def test_tiny_study_end_to_end_report_and_hparams(tmp_path, data):
    space = _space(tmp_path, {"MODEL.ROI_BOX_HEAD.NUM_FC": {"choices": [1, 2]}})
    study_dir = tmp_path / "study"
    out = _cli(_argv("run", data, space, study_dir, "--trials", 2, "--seed", 3))
    study = out["study"]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    report = (study_dir / "report.md").read_text()
    csv_text = (study_dir / "trials.csv").read_text()
    for t in done:
        folder = study_dir / t.user_attrs["dir"]
        with open(folder / "results.json") as f:
            res = json.load(f)["results"]
        # the trial's numbers are those of its own run (results.json of the training run)
        assert t.user_attrs["mask_ap"] == pytest.approx(res["segm"]["AP"], nan_ok=True)
        assert t.user_attrs["ms_per_image"] == pytest.approx(
            res["timing"]["inference_ms_per_image"]
        )
        assert t.user_attrs["train_s_per_iter"] > 0
        assert f"| {t.number} | complete |" in report
        assert f"{t.user_attrs['ms_per_image']:.2f}" in report
        assert os.path.isfile(folder / "config.yaml") and os.path.isfile(folder / "log.txt")
        # TensorBoard HParams: an event file with the trial's hparams in its folder
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder))
        cfg_text = (folder / "config.yaml").read_text()
        assert f"NUM_FC: {t.params['MODEL.ROI_BOX_HEAD.NUM_FC']}" in cfg_text
    assert csv_text.count("complete") == 2
    best = yaml.safe_load((study_dir / "best_config.yaml").read_text())
    assert best["MODEL"]["ROI_BOX_HEAD"]["NUM_FC"] in (1, 2)
    assert "## Best trial" in report and "pareto.png" in report
    for png in ("pareto.png", "slice_MODEL.ROI_BOX_HEAD.NUM_FC.png"):
        assert os.path.getsize(study_dir / png) > 1000
    # the study's own overhead is recorded per trial
    rows = [json.loads(x) for x in (study_dir / "timings.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["overhead_seconds"] >= 0 for r in rows)
    # the same command again: the study has its 2 trials, nothing more runs
    again = _cli(_argv("run", data, space, study_dir, "--trials", 2, "--seed", 3))
    assert again["ran"] == 0 and len(again["study"].trials) == 2


@pytest.mark.one_leg
def test_invalid_combination_is_a_failed_trial_and_the_study_goes_on(tmp_path, data):
    # TEST_MASK_MERGE mean needs MASK_STAGES all: half of this space is invalid
    space = _space(
        tmp_path,
        {
            "MODEL.CMRCNN.MASK_STAGES": {"choices": ["last", "all"]},
            "MODEL.CMRCNN.TEST_MASK_MERGE": {"choices": ["mean"]},
        },
    )
    study_dir = tmp_path / "study"
    out = _cli(_argv("run", data, space, study_dir, "--trials", 2, "--sampler", "grid"))
    trials = out["study"].trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [t.params["MODEL.CMRCNN.MASK_STAGES"] for t in failed] == ["last"]
    assert [t.params["MODEL.CMRCNN.MASK_STAGES"] for t in complete] == ["all"]
    err = failed[0].user_attrs["error"]
    assert err.startswith("invalid config") and "MASK_STAGES" in err
    # rejected before anything trained: no training log in its folder
    assert not os.path.exists(study_dir / failed[0].user_attrs["dir"] / "train_stdout.log")
    assert "| failed |" in (study_dir / "report.md").read_text()


@pytest.mark.one_leg
def test_a_failing_run_is_recorded_with_its_error(tmp_path, data):
    from cmrcnn_ext.tune.trial import TrialFailed, TrialRunner

    missing = ["DATASETS.CMRCNN.TRAIN_JSON", str(tmp_path / "no.json")]
    runner = TrialRunner(DEMO_CONFIG, missing + ["DATASETS.CMRCNN.TRAIN_IMAGE_ROOT", str(data)])
    trial = optuna.create_study().ask()
    with pytest.raises(TrialFailed) as e:
        runner.run(trial, {}, str(tmp_path / "t"), prune=False)
    assert "no.json" in str(e.value)  # the training command's own error line


@pytest.mark.one_leg
def test_pruned_trial(tmp_path, data):
    space = _space(tmp_path, {"MODEL.ROI_BOX_HEAD.NUM_FC": {"choices": [1, 2]}})
    study_dir = tmp_path / "study"
    # AP cannot exceed 100: the threshold pruner stops the trial at its first evaluation
    argv = _argv(
        "run",
        data,
        space,
        study_dir,
        "--trials",
        1,
        "--pruner",
        "threshold",
        "--prune-below",
        101,
        iters=300,  # long enough to be stopped well before its end
        # Detectron2 writes metrics.json every 20 iterations: the evaluations it shows
        opts=["TEST.EVAL_PERIOD", 20],
    )
    out = _cli(argv)
    (t,) = out["study"].trials
    assert t.state == TrialState.PRUNED
    # at the first evaluation (iteration 20 of 300), with its value
    (step,) = list(t.intermediate_values)
    assert step < 100 and t.user_attrs["pruned"].startswith(f"pruned at iteration {step}: segm/AP")
    folder = study_dir / t.user_attrs["dir"]
    assert not os.path.exists(folder / "model_final.pth")  # stopped before the end
    assert "| pruned |" in (study_dir / "report.md").read_text()


@pytest.mark.one_leg
def test_kill_and_resume_loses_nothing_and_runs_nothing_twice(tmp_path, data):
    space = _space(tmp_path, {"MODEL.ROI_BOX_HEAD.NUM_FC": {"choices": [1, 2, 3]}})
    study_dir = tmp_path / "study"
    argv = _argv("run", data, space, study_dir, "--trials", 2, iters=8)
    proc = _proc(argv)
    # SIGKILL the study as soon as its second trial has started (its folder's log exists)
    log = study_dir / "trials" / "trial_0001" / "train_stdout.log"
    _wait_for(lambda: os.path.exists(log) or proc.poll() is not None, 600, "the second trial")
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    # its training process died with it (PR_SET_PDEATHSIG): nothing trains any more
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(study_dir / "trials" / "trial_0001") not in ps
    first = _load(study_dir).trials[0]
    assert first.state == TrialState.COMPLETE
    resumed = _proc(argv)
    text, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, text
    trials = _load(study_dir).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2  # the requested trials
    assert complete[0].number == 0 and complete[0].datetime_complete == first.datetime_complete
    # the killed trial: marked (FAIL, no error) and re-run once with the same parameters
    killed = trials[1]
    assert killed.state == TrialState.FAIL and "error" not in killed.user_attrs
    (rerun,) = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert rerun.state == TrialState.COMPLETE and rerun.params == killed.params
    assert len(trials) == 3
    assert "interrupted (re-run)" in (study_dir / "report.md").read_text()


@pytest.mark.one_leg
def test_two_workers_share_one_storage(tmp_path, data):
    space = _space(tmp_path, {"MODEL.ROI_BOX_HEAD.NUM_FC": {"choices": [1, 2, 3]}})
    study_dir = tmp_path / "study"
    os.makedirs(study_dir)
    argv = _argv(
        "run", data, space, study_dir, "--trials", 3, "--sampler", "random", "--pruner", "none"
    )
    # the storage first (two processes creating one SQLite schema at once is not a use case)
    first = _proc(argv)
    _wait_for(lambda: len(_states(study_dir)) > 0, 120, "the first worker's storage")
    second = _proc(argv)
    outs = [p.communicate(timeout=900)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    trials = _load(study_dir).trials
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    assert [t.state for t in ran] == [TrialState.COMPLETE] * 3
    workers = {t.user_attrs["worker"] for t in ran}
    assert len(workers) == 2  # both worked
    # no trial ran twice: one training folder with results per counted trial
    dirs = sorted(os.listdir(study_dir / "trials"))
    with_results = [d for d in dirs if os.path.exists(study_dir / "trials" / d / "results.json")]
    assert len(with_results) == 3
    assert sorted(t.user_attrs["dir"] for t in ran) == [f"trials/{d}" for d in with_results]
