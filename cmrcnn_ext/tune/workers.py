"""Workers of one study: who runs which trial, which trials were interrupted, when to stop.

Every trial records its worker (``host:pid:start-time``) and a heartbeat time, refreshed while
it trains. A ``RUNNING`` trial whose worker is gone is *interrupted*: its worker's process is no
longer alive on this host (seen at once), or, on another host, its heartbeat is older than
``stale_after`` seconds. Before each trial a worker marks interrupted trials ``FAIL`` (without
an ``error`` attribute: that is how the report tells them from trials that failed by themselves)
and enqueues one re-run of each, with the same parameters and ``retry_of`` = its number.

A study of N trials is done when N trials are *counted*: complete, pruned, failed with an
error, or running. Interrupted trials and *surplus* trials are not counted: a trial is surplus
when, at its start, N trials with smaller numbers are already counted (two workers asked for
the last trial at once), or when it re-runs a trial that an earlier trial already re-runs. A
surplus trial stops before it trains (so does a one-at-a-time variation that an earlier trial
runs). So N workers together run N trials: none lost (an
interrupted one is re-run), none run twice.
"""

import os
import socket
import time
from typing import List, Optional

__all__ = [
    "HEARTBEAT_SECONDS",
    "counted",
    "is_surplus",
    "recover_interrupted",
    "worker_id",
]

#: How often a running trial refreshes its heartbeat (seconds).
HEARTBEAT_SECONDS = 60.0


def _start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux ``/proc``), to tell it from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_id() -> str:
    """This process as ``host:pid:start-time``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or ''}"


def _alive_here(worker: str) -> Optional[bool]:
    """Whether ``worker`` is alive, if it ran on this host (else None: cannot tell)."""
    try:
        host, pid, start = worker.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    if pid == os.getpid():
        return True
    current = _start_time(pid)
    if current is not None:
        return not start or current == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True  # no /proc (not Linux): the pid exists


def is_interrupted(trial, stale_after: float, now: Optional[float] = None) -> bool:
    """Whether a RUNNING trial's worker is gone (see the module docstring)."""
    alive = _alive_here(trial.user_attrs.get("worker", ""))
    if alive is not None:
        return not alive
    beat = trial.user_attrs.get("heartbeat")
    if beat is None:  # not yet started by its worker: judge by the trial's start
        beat = trial.datetime_start.timestamp() if trial.datetime_start else None
    return beat is not None and (now or time.time()) - float(beat) > stale_after


def recover_interrupted(study, stale_after: float) -> List[int]:
    """Mark interrupted trials FAIL and enqueue one re-run of each not yet re-run.

    Returns:
        The numbers of the trials marked now.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    marked = []
    for t in trials:
        if t.state == TrialState.RUNNING and is_interrupted(t, stale_after):
            try:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                marked.append(t.number)
            except (RuntimeError, ValueError):  # finished meanwhile by its own worker
                continue
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and _was_interrupted(t) and t.number not in retried:
            attrs = {k: v for k, v in t.user_attrs.items() if k in _CARRIED}
            attrs["retry_of"] = t.number
            study.enqueue_trial(t.params, user_attrs=attrs)
    return marked


# user attributes that a re-run keeps (what the trial is), unlike its results
_CARRIED = ("variation",)


def _was_interrupted(trial) -> bool:
    a = trial.user_attrs
    return "error" not in a and not a.get("surplus")


def counted(trial) -> bool:
    """Whether ``trial`` counts toward the study's N trials (module docstring)."""
    from optuna.trial import TrialState

    if trial.user_attrs.get("surplus"):
        return False
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def is_surplus(
    study, number: int, n_trials: Optional[int], retry_of=None, variation=None
) -> Optional[str]:
    """Why trial ``number`` must not run (module docstring), or None.

    Args:
        retry_of: the trial it re-runs, if any.
        variation: its one-at-a-time variation, if any (each is run once: a second worker that
            enqueued the same list at the same moment must not run them again).
    """
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < number]
    if retry_of is not None and any(t.user_attrs.get("retry_of") == retry_of for t in earlier):
        return f"trial {retry_of} is already re-run by an earlier trial"
    if variation is not None and any(
        t.user_attrs.get("variation") == variation and counted(t) for t in earlier
    ):
        return f"variation {variation!r} is run by an earlier trial"
    if n_trials is not None and sum(counted(t) for t in earlier) >= n_trials:
        return f"the study has its {n_trials} trials"
    return None
