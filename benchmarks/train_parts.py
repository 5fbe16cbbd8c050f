"""Measuring tools for ``bench_train.py``: where a training step's time goes, its FLOPs, and the
machine's matrix-multiply peak.

* :class:`StepBreakdown` runs training steps of a Detectron2 ``SimpleTrainer`` under
  ``torch.profiler`` with a named range around each part of the forward pass (backbone, RPN,
  each cascade stage, mask head, and the target building and losses inside them), the data
  loading and the optimizer step. Each backward node is charged to the part whose forward op
  created it, matched by the autograd sequence number that the profiler records for both (the
  link PyTorch's own trace viewer draws between forward and backward ops). Times are exclusive:
  a nested part's time is not counted again in its parent.
* :func:`step_flops` counts the floating-point operations of one training step (forward +
  backward) and of one inference with ``torch.utils.flop_counter.FlopCounterMode`` (two per
  multiply-add, the convention of :func:`matmul_peak`).
* :func:`matmul_peak` measures the machine's GFLOP/s on large float32 / bfloat16 matrix products;
  :func:`cuda_matmul_peak` the same on the current CUDA GPU.
"""

import bisect
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.autograd.profiler import record_function

PREFIX = "part:"  # names of the profiler ranges this module opens


def matmul_peak(dtype, size=2048, seconds=2.0):
    """Best GFLOP/s of square matrix products in ``dtype`` on the CPU over about ``seconds``.

    The products are ``size`` x ``size`` unless one would take more than a quarter of
    ``seconds``: sizes double from 128 while the next product, estimated at 8x the time of the
    last one, fits. A CPU that emulates bfloat16 (no AVX512-BF16 / AMX) multiplies it ~100x
    slower than float32, and a 2048^2 product would take a minute; there the figure is the
    emulated rate at the size returned. 2 * n**3 FLOPs per n x n product.

    Returns:
        (GFLOP/s, n): the best rate and the matrix size it was measured at.
    """
    n = 128
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        start = time.perf_counter()
        torch.mm(a, b)
        if n >= size or 8 * (time.perf_counter() - start) > seconds / 4:
            break
        n *= 2
    for _ in range(2):
        torch.mm(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9, n


def cuda_matmul_peak(dtype, n=8192, repeats=10, rounds=3):
    """Best GFLOP/s of ``n`` x ``n`` matrix products in ``dtype`` on the current CUDA GPU.

    Each round times ``repeats`` back-to-back products between CUDA events (after two untimed
    warm-up products); the best round counts. float32 products follow PyTorch's TF32 setting
    (``torch.backends.cuda.matmul.allow_tf32``), as the models' float32 products do.

    Returns:
        (GFLOP/s, n)
    """
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / repeats)
    return 2.0 * n**3 / best / 1e9, n


def require_device(device):
    """Exits with the reason when ``--device cuda`` is asked for and torch has no CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")


def device_matmul_peak(dtype, device):
    """:func:`cuda_matmul_peak` on ``device`` "cuda", else :func:`matmul_peak`: (GFLOP/s, n)."""
    if device == "cuda":
        return cuda_matmul_peak(dtype)
    return matmul_peak(dtype)


def count_flops(fn):
    """FLOPs of ``fn()`` (forward and, if ``fn`` runs it, backward) by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(trainer, autocast):
    """(training-step FLOPs, inference FLOPs per image) of ``trainer.model`` on the trainer's next
    batch. The training count covers forward + backward (not the optimizer's elementwise update);
    weights are not updated.

    Args:
        trainer: a Detectron2 ``SimpleTrainer`` (or subclass).
        autocast: ``(device_type, dtype)`` to count the step under ``torch.autocast`` (the
            training precision), or None for plain float32. FLOPs do not depend on the dtype;
            autocast only keeps the step's memory that of training.
    """
    model = trainer.model
    batch = next(trainer._data_loader_iter)
    ctx = torch.autocast(autocast[0], dtype=autocast[1]) if autocast else _nothing()

    def train():
        with ctx:
            losses = model(batch)
        sum(losses.values()).backward()

    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        train_flops = count_flops(train)
    model.zero_grad(set_to_none=True)
    model.eval()
    try:
        with torch.no_grad():
            inputs = [
                {"image": d["image"], "height": d["height"], "width": d["width"]} for d in batch
            ]
            infer_flops = count_flops(lambda: model(inputs)) / len(inputs)
    finally:
        model.train()
    return train_flops, infer_flops


@contextmanager
def _nothing():
    yield


class StepBreakdown:
    """Per-part times of a trainer's training steps (see the module docstring).

    Args:
        trainer: a Detectron2 ``SimpleTrainer`` (or subclass) whose model is a GeneralizedRCNN
            with cascade ROI heads (Detectron2's ``CascadeROIHeads`` or ours).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._undo, self._hooks = [], []
        model = trainer.model
        rh = model.roi_heads
        self._hook(model, "model (preprocessing, glue between parts)")
        self._hook(model.backbone, "backbone")
        self._hook(model.proposal_generator, "RPN")
        pg = model.proposal_generator
        self._wrap(pg, "label_and_sample_anchors", lambda *a: "RPN targets")
        self._wrap(pg, "losses", lambda *a: "RPN loss")
        self._wrap(rh, "label_and_sample_proposals", lambda *a: "ROI sampling (stage 1 targets)")
        self._wrap(rh, "_match_and_label_boxes", lambda p, stage, t: "box targets (stages 2+)")
        self._wrap(rh, "_run_stage", lambda f, p, stage: f"box stage {stage + 1}")
        for predictor in rh.box_predictor:
            self._wrap(predictor, "losses", lambda *a: "box losses")
        self._wrap(rh, "_forward_mask", lambda *a: "mask head")
        self._patch_mask_loss()

    # -- instrumentation ---------------------------------------------------------------------
    def _hook(self, module, label):
        ranges = []

        def pre(mod, inputs):
            ranges.append(record_function(PREFIX + label))
            ranges[-1].__enter__()

        def post(mod, inputs, output):
            ranges.pop().__exit__(None, None, None)

        self._hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _wrap(self, obj, name, label):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            with record_function(PREFIX + label(*args, **kwargs)):
                return original(*args, **kwargs)

        setattr(obj, name, wrapper)  # instance attribute: shadows the method
        self._undo.append((obj, name, None))

    def _patch_mask_loss(self):
        """Detectron2's mask heads call the module-level ``mask_rcnn_loss`` (ground-truth mask
        crops + binary cross-entropy) in training: time it as the mask's target building."""
        from detectron2.modeling.roi_heads import mask_head

        original = mask_head.mask_rcnn_loss

        def loss(*args, **kwargs):
            with record_function(PREFIX + "mask targets + loss"):
                return original(*args, **kwargs)

        mask_head.mask_rcnn_loss = loss
        self._undo.append((mask_head, "mask_rcnn_loss", original))

    def remove(self):
        """Undo every patch and hook."""
        for obj, name, original in self._undo:
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)
        for h in self._hooks:
            h.remove()

    # -- measurement -------------------------------------------------------------------------
    def run(self, steps):
        """Run ``steps`` training steps under the profiler; returns ``{part: ms per step}`` with
        ``"forward: X"`` / ``"backward: X"`` parts, ``data``, ``optimizer`` and ``other`` (the
        step's remaining time: Python, metrics, autograd's bookkeeping), plus ``total``."""
        from torch.profiler import ProfilerActivity, profile

        tr = self.trainer
        loader, optimizer = tr._data_loader_iter, tr.optimizer

        def timed_next():
            with record_function(PREFIX + "data"):
                return next(loader)

        class _Loader:  # SimpleTrainer calls next(self._data_loader_iter)
            def __next__(self):
                return timed_next()

        step = optimizer.step
        zero = optimizer.zero_grad

        def timed_step(*a, **k):
            with record_function(PREFIX + "optimizer"):
                return step(*a, **k)

        def timed_zero(*a, **k):
            with record_function(PREFIX + "optimizer"):
                return zero(*a, **k)

        # Detectron2 v0.6 keeps the iterator in ``_data_loader_iter``; main makes that a
        # read-only property over ``_data_loader_iter_obj``.
        slot = "_data_loader_iter"
        if "_data_loader_iter_obj" in vars(tr):
            slot = "_data_loader_iter_obj"
        setattr(tr, slot, _Loader())
        optimizer.step, optimizer.zero_grad = timed_step, timed_zero
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(steps):
                    with record_function(PREFIX + "step"):
                        tr.run_step()
                total = time.perf_counter() - start
        finally:
            setattr(tr, slot, loader)
            del optimizer.step, optimizer.zero_grad
        parts = _attribute(prof.events())
        out = {k: 1000.0 * v / 1e6 / steps for k, v in parts.items()}  # us -> ms per step
        out["total"] = 1000.0 * total / steps
        return out


def _attribute(events):
    """Exclusive microseconds per part from the profiler's events (see the module docstring)."""
    steps = [e for e in events if e.name == PREFIX + "step"]
    events = [e for e in events if steps and e.thread == steps[0].thread]
    # by start, and of ranges that start together the outer (longer) one first
    ranges = sorted(
        ((e.time_range.start, e.time_range.end, e.name[len(PREFIX) :])
         for e in events if e.name.startswith(PREFIX)),
        key=lambda r: (r[0], -r[1]),
    )  # fmt: skip
    starts = [r[0] for r in ranges]

    def innermost(t):
        """The latest-starting named range that contains time ``t`` (None: outside all)."""
        i = bisect.bisect_right(starts, t) - 1
        while i >= 0:
            s, e, name = ranges[i]
            if s <= t <= e:
                return name
            i -= 1
        return None

    # Forward op -> part, by sequence number; then each backward node to that part.
    seq_part = {}
    backward = []
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            backward.append(e)
        elif e.sequence_nr >= 0 and e.sequence_nr not in seq_part:
            seq_part[e.sequence_nr] = innermost(e.time_range.start)
    excl = _exclusive(ranges)
    out = defaultdict(float)
    for name, us in excl.items():
        out["forward: " + name if name not in ("data", "optimizer", "step") else name] += us
    for e in backward:
        us = e.time_range.end - e.time_range.start
        part = seq_part.get(e.sequence_nr)
        if part in (None, "step", "data", "optimizer"):
            part = "autograd (weights' gradient accumulation, unattributed)"
        out["backward: " + part] += us
        # the backward node ran inside the "step" range, whose exclusive time counted it
        out["step"] -= us
    out["other (Python, metrics, per-step bookkeeping)"] = out.pop("step", 0.0)
    return dict(out)


def _exclusive(ranges):
    """Exclusive time per name of possibly nested (start, end, name) ranges: each instant is
    charged to the innermost (latest-starting) range open at that instant."""
    points = sorted({t for s, e, _ in ranges for t in (s, e)})
    out = defaultdict(float)
    active = []  # (start, end, name), by start
    events = sorted(ranges, key=lambda r: (r[0], -r[1]))
    j = 0
    for a, b in zip(points, points[1:]):
        while j < len(events) and events[j][0] <= a:
            active.append(events[j])
            j += 1
        active = [r for r in active if r[1] > a]
        if active:
            out[max(active, key=lambda r: (r[0], -r[1]))[2]] += b - a
    return out
