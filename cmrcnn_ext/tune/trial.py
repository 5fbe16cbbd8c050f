"""One trial of a study: a real training run of ``cmrcnn-train`` in its own process and folder.

The trial's config (the study's config file and overrides, plus the sampled values) is checked
with the project's validation first: an invalid combination fails the trial with the validation
message before anything trains. The training then runs exactly as ``train_net.py`` runs it (data
checks, checkpoints, evaluation, ``results.json``), in a child process that dies with the study
process, with its output folder ``<study>/trials/trial_NNNN``. While it runs, each evaluation
that Detectron2 writes to ``metrics.json`` (every ``TEST.EVAL_PERIOD`` iterations) is reported to
Optuna, whose pruner may stop the run.
"""

import ctypes
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from cmrcnn_ext.config.setup import load_config
from cmrcnn_ext.config.validate import config_problems
from cmrcnn_ext.errors import UserError

__all__ = [
    "TrialFailed",
    "TrialRunner",
    "checked_config",
    "config_opts",
    "metric_value",
    "train_seconds_per_iter",
]


class TrialFailed(Exception):
    """A trial without a result: invalid config, or the training run failed (the message says
    why: the command's error line, or the last line of its traceback)."""


def config_opts(overrides: Dict[str, Any]) -> List[str]:
    """``{key: value}`` as ``KEY VALUE`` strings for ``merge_from_list`` (lists as literals)."""
    out = []
    for key, value in overrides.items():
        out += [key, repr(tuple(value)) if isinstance(value, list) else str(value)]
    return out


def checked_config(config_file: str, opts: List[str]):
    """The config of a trial, validated with the project's checks.

    Raises:
        TrialFailed: ``invalid config: <every problem>`` (the trial fails before it runs).
    """
    try:
        cfg = load_config(config_file, opts)
    except UserError as e:
        raise TrialFailed(f"invalid config: {e}") from None
    problems = config_problems(cfg)
    if problems:
        raise TrialFailed("invalid config: " + " | ".join(problems))
    return cfg


def _die_with_parent():  # pragma: no cover - runs in the child before exec
    """Linux: the training process gets SIGKILL when the study process dies (even by SIGKILL),
    so a killed study leaves no training running."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _error_line(log_path: str, returncode: int) -> str:
    """Why a training run failed: its ``error: ...`` line, else its traceback's last line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
    except OSError:
        lines = []
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:  # the command's message: its "error: " line and the indented lines after it
        message = [lines[starts[-1]][len("error: ") :]]
        for line in lines[starts[-1] + 1 :]:
            if not line.startswith((" ", "\t")):
                break
            message.append(line.strip())
        return " | ".join(message)
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return f"the training process exited with code {returncode} (log: {log_path})"


@dataclass
class TrialRunner:
    """Runs trials of one study (see the module docstring).

    Attributes:
        config_file: the study's config (path or packaged name).
        opts: the study's ``KEY VALUE`` overrides (data flags included as config keys).
        metric: the evaluation metric reported for pruning and optimised, e.g. ``"segm/AP"``.
        num_gpus: processes per trial (``--num-gpus`` of ``cmrcnn-train``).
        poll_seconds: how often a running trial's ``metrics.json`` is read.
    """

    config_file: str
    opts: List[str] = field(default_factory=list)
    metric: str = "segm/AP"
    num_gpus: int = 1
    poll_seconds: float = 2.0

    def run(self, trial, overrides: Dict[str, Any], trial_dir: str, prune: bool) -> Dict:
        """Train and evaluate one trial; returns its ``results.json`` (plus ``"wall_seconds"``).

        Raises:
            TrialFailed: invalid config or failed training (the study records the message).
            optuna.TrialPruned: the pruner stopped the trial at an intermediate evaluation.
        """
        os.makedirs(trial_dir, exist_ok=True)
        opts = list(self.opts) + config_opts(overrides) + ["OUTPUT_DIR", trial_dir]
        max_iter = int(checked_config(self.config_file, opts).SOLVER.MAX_ITER)
        cmd = [sys.executable, "-m", "cmrcnn_ext.apps.train", "--config-file", self.config_file]
        cmd += ["--num-gpus", str(self.num_gpus)] + [str(x) for x in opts]
        log_path = os.path.join(trial_dir, "train_stdout.log")
        start = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            try:
                self._watch(proc, trial, trial_dir, prune, max_iter)
            finally:
                if proc.poll() is None:
                    _stop(proc)
        if proc.returncode != 0:
            raise TrialFailed(_error_line(log_path, proc.returncode))
        results_path = os.path.join(trial_dir, "results.json")
        try:
            with open(results_path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            raise TrialFailed(f"the training run wrote no readable {results_path}") from None
        report["wall_seconds"] = time.perf_counter() - start
        # the training step alone (median of Detectron2's per-step times), else the run's mean
        step = train_seconds_per_iter(os.path.join(trial_dir, "metrics.json"))
        report["train_s_per_iter"] = step or report.get("seconds", {}).get("seconds_per_iter")
        return report

    def _watch(self, proc, trial, trial_dir: str, prune: bool, max_iter: int) -> None:
        import optuna

        from cmrcnn_ext.tune.workers import HEARTBEAT_SECONDS

        metrics = os.path.join(trial_dir, "metrics.json")
        seen: set = set()
        beat = time.time()
        while proc.poll() is None:
            time.sleep(self.poll_seconds)
            if time.time() - beat > HEARTBEAT_SECONDS:
                beat = time.time()
                trial.set_user_attr("heartbeat", beat)
            if not prune:
                continue
            for iteration, value in _evaluations(metrics, self.metric, seen):
                if iteration >= max_iter - 1:  # the final evaluation: the result, not pruned
                    continue
                trial.report(value, iteration)
                if trial.should_prune():
                    _stop(proc)
                    raise optuna.TrialPruned(
                        f"pruned at iteration {iteration}: {self.metric} = {value:.2f}"
                    )


def _stop(proc) -> None:
    """Stop a training process group: SIGTERM, then SIGKILL after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _evaluations(metrics_json: str, metric: str, seen: set) -> List[Tuple[int, float]]:
    """New ``(iteration, value)`` rows of ``metric`` in Detectron2's ``metrics.json``."""
    out = []
    try:
        with open(metrics_json, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if metric in row and row.get("iteration") not in seen:
            seen.add(row["iteration"])
            out.append((int(row["iteration"]), metric_value(row[metric])))
    return out


def train_seconds_per_iter(metrics_json: str) -> Optional[float]:
    """The median training step time of a run: Detectron2's ``time`` in ``metrics.json``
    (the step alone: evaluations and checkpoints excluded), or None without any."""
    times = []
    try:
        with open(metrics_json, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row.get("time"), (int, float)):
                    times.append(float(row["time"]))
    except OSError:
        return None
    if not times:
        return None
    return statistics.median(times)


def metric_value(value: Optional[float]) -> float:
    """A COCO metric as an objective value: NaN (no detections at all) counts as 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    return float(value)
