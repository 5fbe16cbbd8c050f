"""Pre-emption: on SIGTERM / SIGUSR1, finish the step, save a checkpoint and exit with code 75.

Clusters stop jobs with a signal and kill them shortly after (SLURM: SIGTERM, or the signal of
``--signal``, e.g. ``--signal=B:USR1@120``; Kubernetes and torchrun's agent: SIGTERM).
:class:`PreemptionHook` turns the signals of ``SOLVER.CMRCNN.STOP_SIGNALS`` into a clean stop:

1. the handler only notes the signal (nothing is written from inside a signal handler);
2. after the current training step, every process learns whether any of them got a signal
   (one small all-gather per step when there are several processes), so all stop after the
   same iteration and none waits in a collective for the others;
3. the checkpoint of that iteration is written atomically (``model_<iter>.pth`` and
   ``last_checkpoint``: the project's checkpointer), one log line says where training stopped;
4. :class:`Preempted` ends training; ``train_net.py`` prints its message and exits with
   :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again").

``train_net.py --resume`` then continues from that checkpoint; on the CPU the final weights
equal an uninterrupted run's bit for bit (``tests/test_preemption.py``), as after any
checkpoint (model, optimizer, scheduler, RNG states and data position are all restored).
``docs/training.md`` shows the SLURM and torchrun set-ups.
"""

import logging
import signal
import threading
from typing import Dict, Optional, Sequence

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionHook"]

logger = logging.getLogger(__name__)

#: Exit code of a pre-empted training run (``EX_TEMPFAIL`` of sysexits.h).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; resume with ``--resume``.

    Attributes:
        signal_name: e.g. ``"SIGTERM"`` (None where a launcher reports its workers' stop).
        iteration: the last finished iteration (saved in the checkpoint), or None.
        checkpoint: the checkpoint file written, or None.
    """

    def __init__(self, signal_name=None, iteration=None, checkpoint=None):
        self.signal_name, self.iteration, self.checkpoint = signal_name, iteration, checkpoint
        if signal_name is None:
            what = "training processes stopped on a signal after saving a checkpoint (log.txt)"
        else:
            what = (
                f"training stopped by {signal_name} after iteration {iteration}; checkpoint "
                f"{checkpoint} written"
            )
        super().__init__(
            f"{what}. Continue with the same command plus --resume (exit code {EXIT_PREEMPTED})."
        )


class _HideStopTraceback(logging.Filter):
    """Detectron2's train loop logs every exception that ends training with its traceback
    ("Exception during training:"); a pre-emption is a planned stop, logged by the hook."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, Preempted)


class PreemptionHook(HookBase):
    """Stop training cleanly on the given signals (see the module docstring).

    Args:
        signals: signal names, e.g. ``("SIGTERM", "SIGUSR1")``; empty: the hook does nothing.
    """

    def __init__(self, signals: Sequence[str]):
        self._signals = [getattr(signal, name) for name in signals]
        self._previous: Dict[int, object] = {}
        self._received: Optional[int] = None
        self._filter = _HideStopTraceback()

    def _handler(self, signum, frame):
        self._received = signum

    def before_train(self):
        self._received = None
        if not self._signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "Training runs outside the main thread: SOLVER.CMRCNN.STOP_SIGNALS cannot be "
                "handled (Python installs signal handlers in the main thread only)."
            )
            return
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        logging.getLogger("detectron2.engine.train_loop").addFilter(self._filter)

    def after_train(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        logging.getLogger("detectron2.engine.train_loop").removeFilter(self._filter)

    def after_step(self):
        if not self._previous:
            return
        received = self._received or 0
        if comm.get_world_size() > 1:  # every process stops after the same iteration
            received = max(comm.all_gather(received))
        if not received:
            return
        iteration = self.trainer.iter
        name = f"model_{iteration:07d}"
        self.trainer.checkpointer.save(name, iteration=iteration)
        comm.synchronize()
        path = f"{self.trainer.checkpointer.save_dir}/{name}.pth"
        signal_name = signal.Signals(received).name
        logger.warning(
            "%s received: stopped after iteration %d, checkpoint %s written; resume with --resume.",
            signal_name,
            iteration,
            path,
        )
        raise Preempted(signal_name, iteration, path)
