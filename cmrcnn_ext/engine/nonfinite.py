"""Stop training at the first non-finite loss, with a clear message, before anything is saved.

Detectron2's ``SimpleTrainer`` notices a NaN/inf loss only in ``_write_metrics``, after the
backward pass, on the main process only, with the message ``Loss became infinite or NaN at
iteration=N!`` followed by the dict of all (averaged) loss values. In multi-process training the
other processes do not stop: they wait in the next collective until the launcher kills them.

:class:`NonFiniteLossGuard` (registered first by ``cmrcnn_ext.engine.Trainer``) checks the loss
dict right after the model's forward pass, on every process, and agrees on the outcome across
processes (one small all-reduce per iteration). If any term is NaN or infinite on any process,
every process raises :class:`NonFiniteLossError` naming the iteration, the terms, their values
and the ranks they came from. The error is raised inside ``run_step`` before ``backward()`` and
``optimizer.step()``: the weights in memory stay those of the last good iteration, and
the hooks' ``after_step`` (the ``PeriodicCheckpointer``) does not run, so no checkpoint is
written for the failed iteration and ``last_checkpoint`` keeps pointing to the last good one.

A step can also make weights NaN/inf while every loss was finite (a NaN or overflowing
gradient, a huge learning rate). The guard, the first hook, then raises
:class:`NonFiniteWeightsError` in ``after_step``, before the ``PeriodicCheckpointer`` hook
could save them. Weights that are finite but useless (say 1e30) are not detected: the next
iteration's loss usually overflows and stops training, but a checkpoint written in between
holds them.
"""

import logging
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "NonFiniteWeightsError", "nonfinite_terms"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite. A FloatingPointError, like Detectron2's own error.

    Attributes:
        iteration (int): 0-based iteration (as ``iteration`` in metrics.json).
        bad_terms (dict[str, dict[int, float]]): term -> {rank: value}.
        other_terms (dict[str, float]): the finite terms of the lowest failing rank.
        last_checkpoint (str or None): the checkpoint ``last_checkpoint`` points to.
    """

    def __init__(self, iteration, bad_terms, other_terms=None, last_checkpoint=None, world_size=1):
        self.iteration = iteration
        self.world_size = world_size
        self.bad_terms = bad_terms
        self.other_terms = dict(other_terms or {})
        self.last_checkpoint = last_checkpoint
        super().__init__(self._message())

    def _message(self):
        def where(ranks):
            if self.world_size == 1:
                return ""
            return " (rank{} {})".format("s" if len(ranks) > 1 else "", ", ".join(map(str, ranks)))

        bad = ", ".join(
            "{}={}{}".format(name, _fmt(next(iter(ranks.values()))), where(ranks))
            for name, ranks in sorted(self.bad_terms.items())
        )
        lines = [
            f"Non-finite loss at iteration {self.iteration}: {bad}. Training stopped.",
        ]
        if self.other_terms:
            source = "" if self.world_size == 1 else f" (rank {self._other_rank()})"
            lines.append(
                f"Finite terms{source}: "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(self.other_terms.items()))
                + "."
            )
        lines.append(
            f"The model was not updated with iteration {self.iteration}'s losses and no "
            "checkpoint was written for it; "
            + (
                f"the last checkpoint is {self.last_checkpoint}."
                if self.last_checkpoint
                else "no checkpoint had been written yet."
            )
        )
        lines.append(
            "Usual causes: a learning rate too high for the batch (SOLVER.BASE_LR, "
            "SOLVER.WARMUP_ITERS), exploding gradients (SOLVER.CLIP_GRADIENTS.ENABLED True), "
            "or bad annotations (degenerate boxes or masks)."
        )
        return "\n".join(lines)

    def _other_rank(self):
        return min(min(ranks) for ranks in self.bad_terms.values())


class NonFiniteWeightsError(FloatingPointError):
    """The update of an iteration with finite losses made some weights NaN or infinite.

    Attributes:
        iteration (int): 0-based iteration whose optimizer step produced them.
        parameters (list[str]): names of the non-finite parameters.
        losses (dict[str, float]): that iteration's (finite) losses on this process.
        last_checkpoint (str or None): the checkpoint ``last_checkpoint`` points to.
    """

    def __init__(self, iteration, parameters, losses=None, last_checkpoint=None):
        self.iteration = iteration
        self.parameters = list(parameters)
        self.losses = dict(losses or {})
        self.last_checkpoint = last_checkpoint
        shown = ", ".join(self.parameters[:5]) + (
            f" and {len(self.parameters) - 5} more" if len(self.parameters) > 5 else ""
        )
        lines = [
            f"Non-finite weights after the update of iteration {iteration}: {shown}. "
            "Training stopped.",
            "The losses of that iteration were finite"
            + (
                ": " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(self.losses.items()))
                if self.losses
                else ""
            )
            + "; the gradients or the step were not.",
            f"No checkpoint was written for iteration {iteration}; "
            + (
                f"the last checkpoint is {last_checkpoint}."
                if last_checkpoint
                else "no checkpoint had been written yet."
            ),
            "Usual causes: a learning rate too high (SOLVER.BASE_LR, SOLVER.WARMUP_ITERS) or "
            "exploding gradients (SOLVER.CLIP_GRADIENTS.ENABLED True).",
        ]
        super().__init__("\n".join(lines))


def _fmt(value):
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def nonfinite_terms(loss_dict):
    """``(bad, good)``: dicts name -> float of the non-finite and the finite loss terms."""
    names = list(loss_dict)
    values = [torch.as_tensor(loss_dict[k]).detach() for k in names]
    finite = torch.stack([torch.isfinite(v).all() for v in values]).cpu().tolist()
    bad, good = {}, {}
    for name, value, ok in zip(names, values, finite):
        # a non-scalar term is summarised by its sum, which is non-finite if any element is
        (good if ok else bad)[name] = float(value.float().sum())
    return bad, good


class NonFiniteLossGuard(HookBase):
    """Stops training at the first NaN/inf loss term or weight, before it can be checkpointed.

    - :class:`NonFiniteLossError` right after a training forward pass with a NaN/inf loss: a
      forward hook on ``trainer.model`` (the DistributedDataParallel wrapper in multi-process
      training) that looks at the loss dict of training-mode forward passes; other outputs
      (inference) are ignored. Registered in ``before_train``, removed in ``after_train``.
    - :class:`NonFiniteWeightsError` in ``after_step`` if the optimizer step made a weight
      NaN/inf although the losses were finite (e.g. a huge learning rate): this hook is the
      first one, so it runs before the ``PeriodicCheckpointer`` could save those weights. The
      check is one sum per parameter tensor per iteration (a sum is NaN/inf when an element
      is; the same weights on every process, so no communication). A sum that overflows
      although every weight is finite is re-checked element-wise and not reported.
    """

    def __init__(self):
        self._handle = None
        self._losses = None

    def after_step(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        if not params:
            return
        if torch.isfinite(_sum_all(params)):
            return
        model = self.trainer.model
        model = getattr(model, "module", model)  # names without DDP's "module." prefix
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
        if not bad:  # the float32 sum overflowed, every weight is finite
            return
        losses = {}
        if self._losses is not None:
            losses = {k: float(v) for k, v in self._losses.items()}
        err = NonFiniteWeightsError(int(self.trainer.iter), bad, losses, self._last_checkpoint())
        logger.error(str(err))
        raise err

    def before_train(self):
        self._handle = self.trainer.model.register_forward_hook(self._check)

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _check(self, module, inputs, output):
        if not module.training or not isinstance(output, Mapping) or not output:
            return None
        first = next(iter(output.values()))
        if not all(torch.is_tensor(v) for v in output.values()):
            return None
        self._losses = {k: v.detach() for k, v in output.items()}  # for NonFiniteWeightsError
        finite_flags = torch.stack([torch.isfinite(v.detach()).all() for v in output.values()])
        local_bad = ~finite_flags.all()
        if comm.get_world_size() > 1:
            # Every process must stop at the same iteration, or the others hang in the next
            # collective: agree with one all-reduce of a 0/1 flag (on the losses' device, which
            # suits NCCL and gloo alike).
            flag = local_bad.to(device=first.device, dtype=torch.float32).reshape(1)
            dist.all_reduce(flag)
            if flag.item() == 0:
                return None
            bad, good = nonfinite_terms(output)
            gathered = comm.all_gather((comm.get_rank(), bad, good))
        else:
            if not bool(local_bad):
                return None
            bad, good = nonfinite_terms(output)
            gathered = [(0, bad, good)]
        gathered = sorted(gathered, key=lambda x: x[0])
        bad_terms = {}
        for rank, rank_bad, _ in gathered:
            for name, value in rank_bad.items():
                bad_terms.setdefault(name, {})[rank] = value
        # the finite terms of the lowest failing rank, for context
        _, _, good = next(x for x in gathered if x[1])
        other_terms = {k: v for k, v in good.items() if k not in bad_terms}
        err = NonFiniteLossError(
            int(self.trainer.iter),
            bad_terms,
            other_terms,
            self._last_checkpoint(),
            world_size=comm.get_world_size(),
        )
        logger.error(str(err))
        raise err

    def _last_checkpoint(self):
        checkpointer = getattr(self.trainer, "checkpointer", None)
        try:
            if checkpointer is not None and checkpointer.has_checkpoint():
                return checkpointer.get_checkpoint_file()
        except Exception:  # reporting only: never mask the real error
            logger.debug("Could not read the last checkpoint's name", exc_info=True)
        return None


def _sum_all(tensors):
    """Sum of all elements of ``tensors``: finite unless an element is NaN/inf (or the float32
    sum overflows; callers re-check element-wise). One memory pass per tensor: a max-abs
    (``get_total_norm(..., inf)``) took 8x longer on the CPU."""
    return torch.stack([t.detach().sum().float() for t in tensors if t.numel()]).sum()
