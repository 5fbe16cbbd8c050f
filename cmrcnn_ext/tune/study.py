"""A study: Optuna samples config values from a search space, each trial trains (or, for a
test-time sweep, evaluates) with them, and the study folder gets a report after every trial.

:func:`run_study` is what ``cmrcnn-tune run`` and ``cmrcnn-tune sweep`` call. The same command
started again (after Ctrl-C, SIGKILL, a lost machine), or on other machines against the same
storage, continues the same study: see :mod:`cmrcnn_ext.tune.workers` for how trials are
counted, interrupted ones re-run and none run twice.
"""

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from cmrcnn_ext.errors import UserError
from cmrcnn_ext.tune import workers
from cmrcnn_ext.tune.identity import check_identity
from cmrcnn_ext.tune.trial import TrialFailed, metric_value

__all__ = ["StudyOptions", "open_study", "run_study", "trial_dir"]

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "threshold", "none")


@dataclass
class StudyOptions:
    """What ``cmrcnn-tune run`` / ``sweep`` was asked (see ``cmrcnn-tune run --help``)."""

    kind: str  # "train" (a training run per trial) or "test-time" (evaluate a checkpoint)
    config_file: str
    opts: List[str]
    space_path: str
    study_dir: str
    storage: Optional[str] = None
    study_name: Optional[str] = None
    trials: Optional[int] = None
    timeout: Optional[float] = None
    seed: int = 0
    sampler: str = "tpe"
    pruner: str = "median"
    prune_below: Optional[float] = None
    metric: str = "segm/AP"
    multi_objective: bool = False
    one_at_a_time: bool = False
    num_gpus: int = 1
    weights: Optional[str] = None  # test-time sweeps: the trained checkpoint
    stale_after: float = 600.0
    extra: Dict[str, Any] = field(default_factory=dict)


class _Surplus(Exception):
    """A trial that must not run (cmrcnn_ext.tune.workers)."""


def trial_dir(study_dir: str, number: int) -> str:
    return os.path.join(study_dir, "trials", f"trial_{number:04d}")


def _sampler(name: str, seed: int, grid: Optional[Dict[str, list]] = None):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GridSampler(grid, seed=seed)


def _pruner(o: StudyOptions):
    import optuna

    if o.pruner == "median":  # after 2 complete trials, prune below their median at that step
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if o.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if o.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=o.prune_below)
    return optuna.pruners.NopPruner()


def open_study(o: StudyOptions):
    """Create or join the study; returns ``(study, space, base_values)``.

    Raises:
        UserError: invalid options, config or search space, or a study of that name in the
            storage that was started with another config / space / metric.
    """
    import optuna

    from cmrcnn_ext.config.setup import load_config
    from cmrcnn_ext.config.validate import config_problems
    from cmrcnn_ext.config.values import cfg_value, plain_value
    from cmrcnn_ext.tune.space import load_space
    from cmrcnn_ext.tune.storage import default_storage_url, open_storage

    if o.sampler not in SAMPLERS:
        raise UserError(f"--sampler {o.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if o.pruner not in PRUNERS:
        raise UserError(f"--pruner {o.pruner!r}: use one of {', '.join(PRUNERS)}")
    if o.pruner == "threshold" and o.prune_below is None:
        raise UserError("--pruner threshold needs --prune-below AP (prune trials below it)")
    if "/" not in o.metric:
        raise UserError(f"--metric {o.metric!r}: use TASK/NAME, e.g. segm/AP or bbox/AP50")
    cfg = load_config(o.config_file, list(o.opts))
    problems = config_problems(cfg)
    if problems:
        raise UserError("the study's config is invalid:\n  - " + "\n  - ".join(problems))
    space = load_space(o.space_path, cfg)
    base = {}
    for key in set(space.keys()) | set(space.condition_keys()):
        base[key] = plain_value(cfg_value(cfg, key))
    if o.one_at_a_time:
        from cmrcnn_ext.tune.one_at_a_time import include_base_values

        include_base_values(space, base)
    os.makedirs(o.study_dir, exist_ok=True)
    storage = open_storage(o.storage or default_storage_url(o.study_dir))
    name = o.study_name or os.path.basename(os.path.abspath(o.study_dir))
    directions = ["maximize", "minimize"] if o.multi_objective else ["maximize"]
    grid = space.grid(base) if o.sampler == "grid" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=directions,
            sampler=_sampler(o.sampler, o.seed, grid),
            pruner=_pruner(o),
            load_if_exists=True,
        )
    check_identity(study, o, cfg, space)
    return study, space, base


def _result_attrs(report: Dict, metric: str) -> Dict[str, Any]:
    res = report.get("results", {})
    task, name = metric.split("/", 1)
    attrs = {
        "box_ap": res.get("bbox", {}).get("AP"),
        "mask_ap": res.get("segm", {}).get("AP"),
        "metric": res.get(task, {}).get(name),
        "ms_per_image": res.get("timing", {}).get("inference_ms_per_image"),
        "wall_seconds": report.get("wall_seconds"),
        "train_s_per_iter": report.get("train_s_per_iter"),
    }
    return {k: (None if v is None else float(v)) for k, v in attrs.items()}


class _Objective:
    """The function Optuna calls per trial (one process: a worker)."""

    def __init__(self, o: StudyOptions, space, base, runner):
        self.o, self.space, self.base, self.runner = o, space, base, runner
        self.worker = workers.worker_id()
        # trained trials of a single-objective study are pruned; a one-at-a-time study
        # measures every variation
        self.prune = o.kind == "train" and o.pruner != "none"
        self.prune = self.prune and not (o.multi_objective or o.one_at_a_time)

    def __call__(self, trial):
        import optuna

        o = self.o
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("heartbeat", time.time())
        if o.sampler in ("tpe", "random"):  # per-trial seed: reproducible, distinct per worker
            trial.study.sampler = _sampler(o.sampler, o.seed + trial.number)
        reason = workers.is_surplus(
            trial.study,
            trial.number,
            o.trials,
            trial.user_attrs.get("retry_of"),
            trial.user_attrs.get("variation"),
        )
        if reason:
            trial.set_user_attr("surplus", reason)
            raise _Surplus(f"trial {trial.number} not run: {reason}")
        overrides = self.space.sample(trial, self.base)
        folder = trial_dir(o.study_dir, trial.number)
        trial.set_user_attr("dir", os.path.relpath(folder, o.study_dir))
        trial.set_user_attr("overrides", overrides)
        try:
            report = self.runner.run(trial, overrides, folder, self.prune)
        except TrialFailed as e:
            trial.set_user_attr("error", str(e))
            raise
        except optuna.TrialPruned as e:
            trial.set_user_attr("pruned", str(e))
            raise
        attrs = _result_attrs(report, o.metric)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if attrs["metric"] is None:
            msg = f"the run's results have no {o.metric} (results.json: {list(report)})"
            trial.set_user_attr("error", msg)
            raise TrialFailed(msg)
        value = metric_value(attrs["metric"])
        if o.multi_objective:
            if attrs["ms_per_image"] is None:
                trial.set_user_attr("error", "no inference time in the run's results")
                raise TrialFailed("no inference time in the run's results")
            return value, attrs["ms_per_image"]
        return value


def _append_jsonl(path: str, row: Dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def run_study(o: StudyOptions, runner) -> Dict[str, Any]:
    """Run trials until the study has ``o.trials`` (or ``o.timeout`` has passed).

    Args:
        o: the study's options.
        runner: runs one trial: ``runner.run(trial, overrides, folder, prune) -> results``
            (:class:`~cmrcnn_ext.tune.trial.TrialRunner` trains,
            :class:`~cmrcnn_ext.tune.sweep.SweepRunner` evaluates a checkpoint).

    Returns:
        ``{"study": optuna study, "report": path of report.md, "ran": trials this worker ran}``.
    """
    import optuna

    from cmrcnn_ext.tune.one_at_a_time import enqueue_variations
    from cmrcnn_ext.tune.report import write_hparams, write_report

    study, space, base = open_study(o)
    if o.one_at_a_time:
        n = enqueue_variations(study, space, base)
        o.trials = n if o.trials is None else min(o.trials, n)
    elif o.sampler == "grid" and o.trials is None:
        o.trials = space.grid_size(base)
    if o.trials is None and o.timeout is None:
        raise UserError("give --trials N or --timeout SECONDS (or --one-at-a-time)")
    objective = _Objective(o, space, base, runner)
    timings = os.path.join(o.study_dir, "timings.jsonl")
    start, ran = time.monotonic(), 0
    while o.timeout is None or time.monotonic() - start < o.timeout:
        begin = time.perf_counter()
        workers.recover_interrupted(study, o.stale_after)
        trials = study.get_trials(deepcopy=False)
        if o.trials is not None and sum(workers.counted(t) for t in trials) >= o.trials:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1, catch=(TrialFailed, _Surplus))
        trial = _last_trial_of(study, objective.worker)
        if trial is None or trial.user_attrs.get("surplus"):
            continue
        ran += 1
        report_start = time.perf_counter()
        write_hparams(o.study_dir, trial, o.metric)
        path = write_report(study, o.study_dir, o.metric)
        now = time.perf_counter()
        wall = now - begin
        training = trial.user_attrs.get("wall_seconds") or trial.duration.total_seconds()
        _append_jsonl(
            timings,
            {
                "trial": trial.number,
                "worker": objective.worker,
                "seconds": wall,
                "run_seconds": training,
                "report_seconds": now - report_start,
                "overhead_seconds": wall - training,
                "overhead_percent": 100.0 * (wall - training) / wall if wall else 0.0,
            },
        )
    path = write_report(study, o.study_dir, o.metric)
    return {"study": study, "report": path, "ran": ran}


def _last_trial_of(study, worker: str):
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == worker]
    return max(mine, key=lambda t: t.number) if mine else None


def open_existing(study_dir: str, storage: Optional[str] = None, name: Optional[str] = None):
    """``cmrcnn-tune report``: rewrite the report of a study in a storage; returns its path.

    Raises:
        UserError: no study of that name in the storage (the message lists the names there).
    """
    import optuna

    from cmrcnn_ext.tune.report import write_report
    from cmrcnn_ext.tune.storage import default_storage_url, open_storage

    url = storage or default_storage_url(study_dir)
    if url.startswith("sqlite:///") and not os.path.isfile(url[len("sqlite:///") :]):
        raise UserError(f"no study in {study_dir!r}: {url} does not exist (give --storage?)")
    store = open_storage(url)
    name = name or os.path.basename(os.path.abspath(study_dir))
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        raise UserError(f"no study {name!r} in {url}; it holds: {names} (--study-name)") from None
    os.makedirs(study_dir, exist_ok=True)
    return write_report(study, study_dir)
