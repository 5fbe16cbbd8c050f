"""cmrcnn-tune sweep: test-time settings of one trained model against --eval-only runs, the
report command, multi-objective sweeps, a study with other settings refused."""

import json
import os

import pytest

pytest.importorskip("optuna")
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from conftest import DEMO_CONFIG, ROOT  # noqa: E402
from reliability_helpers import SMALL_OPTS, load_train_net  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

from tune_helpers import (  # noqa: E402
    FAST,
    _argv,
    _cli,
    _space,
    tiny_data,
)

data = pytest.fixture(scope="module", name="data")(tiny_data)  # the tiny data set


# ---------------------------------------------------------------- test-time sweeps


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A checkpoint of 60 iterations on the tiny data (AP above 0: comparisons mean
    something)."""
    out = tmp_path_factory.mktemp("tune_trained")
    tn = load_train_net()
    d = str(data)
    argv = ["--config-file", DEMO_CONFIG]
    argv += [
        "--train-json",
        os.path.join(d, "train.json"),
        "--train-images",
        os.path.join(d, "train"),
    ]
    # evaluated on its training images: a model that has learnt something there
    argv += ["--val-json", os.path.join(d, "train.json"), "--val-images", os.path.join(d, "train")]
    argv += [str(x) for x in SMALL_OPTS] + ["SOLVER.MAX_ITER", "60", "SOLVER.STEPS", "()"]
    argv += FAST + ["SOLVER.BASE_LR", "0.003"]
    tn.main(tn.get_parser().parse_args(argv + ["OUTPUT_DIR", str(out)]))
    return str(out / "model_final.pth"), argv


def _eval_only(argv, weights, overrides, out):
    tn = load_train_net()
    args = tn.get_parser().parse_args(
        ["--eval-only"] + argv + overrides + ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out)]
    )
    return tn.main(args)


def _same(a, b):
    import math

    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_sweep_equals_eval_only_runs(tmp_path, data, trained):
    weights, train_argv = trained
    space = _space(
        tmp_path,
        {
            "MODEL.RPN.POST_NMS_TOPK_TEST": {"choices": [4, 32]},
            "TEST.DETECTIONS_PER_IMAGE": {"choices": [2, 50]},
        },
    )
    study_dir = tmp_path / "sweep"
    argv = ["sweep", "--config-file", DEMO_CONFIG, "--space", space, "--study-dir", str(study_dir)]
    argv += ["--weights", weights, "--one-at-a-time"] + train_argv[2:]
    out = _cli(argv)
    trials = out["study"].trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # baseline + 2 variations
    seen = []
    for t in trials:
        overrides = []
        for k, v in t.user_attrs["overrides"].items():
            overrides += [k, str(v)]
        ref = _eval_only(train_argv, weights, overrides, tmp_path / f"eval_{t.number}")
        with open(study_dir / t.user_attrs["dir"] / "results.json") as f:
            mine = json.load(f)["results"]
        for task in ("bbox", "segm"):
            _same(mine[task], ref[task])
        seen.append((mine["bbox"]["AP"], mine["segm"]["AP"]))
    # the settings change the results (the comparison is not between equal numbers only)
    assert len(set(seen)) > 1, seen
    report = (study_dir / "report.md").read_text()
    assert "Each variation's effect" in report and "TEST.DETECTIONS_PER_IMAGE=2" in report


def test_report_command_rewrites_the_report(tmp_path, data, trained):
    weights, train_argv = trained
    space = _space(tmp_path, {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": {"choices": [0.0, 0.5]}})
    study_dir = tmp_path / "sweep"
    argv = ["sweep", "--config-file", DEMO_CONFIG, "--space", space, "--study-dir", str(study_dir)]
    _cli(argv + ["--weights", weights, "--trials", "1"] + train_argv[2:])
    os.remove(study_dir / "report.md")
    _cli(["report", "--study-dir", str(study_dir)])
    assert "| 0 | complete |" in (study_dir / "report.md").read_text()


@pytest.mark.one_leg
def test_multi_objective_sweep_in_a_journal_storage(tmp_path, data, trained):
    weights, train_argv = trained
    space = _space(tmp_path, {"MODEL.RPN.POST_NMS_TOPK_TEST": {"choices": [2, 8, 32]}})
    study_dir = tmp_path / "sweep"
    journal = f"journal:{tmp_path / 'shared' / 'study.log'}"
    argv = ["sweep", "--config-file", DEMO_CONFIG, "--space", space, "--study-dir", str(study_dir)]
    argv += ["--weights", weights, "--storage", journal, "--multi-objective", "--sampler", "grid"]
    out = _cli(argv + ["--trials", "2"] + train_argv[2:])
    assert len(out["study"].trials) == 2
    # the same command with a larger --trials continues the study in the journal file
    out = _cli(argv + ["--trials", "3"] + train_argv[2:])
    study = out["study"]
    assert out["ran"] == 1 and [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.trials:  # (mask AP, inference ms/image), as the trial recorded them
        assert t.values == [t.user_attrs["mask_ap"], t.user_attrs["ms_per_image"]]
    # the Pareto front is Optuna's: no trial on it is beaten on both objectives
    from cmrcnn_ext.tune.plots import pareto_front

    points = [(t.values[1], t.values[0]) for t in study.trials]
    front = {study.trials[i].number for i in pareto_front(points)}
    assert front == {t.number for t in study.best_trials}
    assert os.path.getsize(study_dir / "pareto.png") > 1000
    assert not os.path.exists(study_dir / "study.db")  # the journal holds the study
    _cli(["report", "--study-dir", str(study_dir), "--storage", journal])


def test_a_study_with_other_settings_is_refused(tmp_path, data):
    from cmrcnn_ext.errors import UserError

    space = _space(tmp_path, {"MODEL.ROI_BOX_HEAD.NUM_FC": {"choices": [1, 2]}})
    other = _space(tmp_path, {"MODEL.ROI_BOX_HEAD.NUM_FC": {"choices": [1, 3]}}, "other.yaml")
    study_dir = tmp_path / "study"
    _cli(_argv("run", data, space, study_dir, "--trials", 0))
    with pytest.raises(UserError, match="the search space"):
        _cli(_argv("run", data, other, study_dir, "--trials", 1))


@pytest.mark.slow
def test_three_trial_demo_study(tmp_path):
    """A 3-trial study of the demo config on its own data (shortened schedule)."""
    space = os.path.join(ROOT, "cmrcnn_ext/tune/spaces/demo_claims_space.yaml")
    argv = ["run", "--config-file", DEMO_CONFIG, "--space", space, "--study-dir"]
    argv += [str(tmp_path / "demo"), "--trials", "3", "--pruner", "none"]
    argv += ["SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)", "SOLVER.WARMUP_ITERS", "20"]
    argv += FAST  # float32: hosts without AVX512-BF16 run the CPU's bfloat16 autocast slowly
    out = _cli(argv)
    done = [t for t in out["study"].trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3
    report = (tmp_path / "demo" / "report.md").read_text()
    for t in done:
        assert f"{t.user_attrs['mask_ap']:.2f}" in report
