"""Timing and memory measurement of the benchmarked models: round-robin inference with a
per-part breakdown (PartTimer), training iterations, and peak memory (CUDA allocator or sampled
process RSS)."""

import copy
import ctypes
import threading
import time
from collections import defaultdict

import torch
from bench_models import infer_inputs


class Sync:
    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()


class MemoryMonitor:
    """Peak memory during a block: CUDA max_memory_allocated, or sampled process RSS."""

    def __init__(self, device, interval=0.002):
        self.cuda = device == "cuda"
        self.interval = interval
        self.peak = self.base = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)


def _trim_heap():
    """Give freed heap memory back to the OS (glibc) so RSS increases are comparable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PartTimer:
    """Times the parts of a GeneralizedRCNN inference (see module docstring)."""

    def __init__(self, model, sync):
        self.model, self.sync = model, sync
        self.times = defaultdict(float)
        self._stage = None
        self._undo, self._hooks = [], []
        rh = model.roi_heads
        self._wrap(rh, "_run_stage", lambda f, p, stage: f"box stage {stage + 1}", sets_stage=True)
        self._wrap(rh, "_forward_box", lambda *a: "box all")
        self._wrap(rh, "_forward_mask", lambda *a: "mask all")
        self._hook(rh.box_pooler, lambda: f"{self._stage} ROIAlign")
        if getattr(rh, "mask_pooler", None) is not None:
            self._hook(rh.mask_pooler, lambda: "mask ROIAlign")

    def _wrap(self, obj, name, label, sets_stage=False):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            lab = label(*args, **kwargs)
            if sets_stage:
                self._stage = lab
            self.sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.sync()
            self.times[lab] += time.perf_counter() - start
            return out

        setattr(obj, name, wrapper)  # instance attribute: shadows the method
        self._undo.append((obj, name))

    def _hook(self, module, label):
        state = {}

        def pre(mod, inp):
            self.sync()
            state["t"] = time.perf_counter()

        def post(mod, inp, out):
            self.sync()
            self.times[label()] += time.perf_counter() - state["t"]

        self._hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self):
        for obj, name in self._undo:
            delattr(obj, name)
        for h in self._hooks:
            h.remove()

    def _step(self, label, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        self.times[label] += time.perf_counter() - start
        return out

    @torch.no_grad()
    def run(self, batched_inputs):
        """One inference, exactly as GeneralizedRCNN.inference; returns (outputs, times)."""
        from detectron2.modeling import GeneralizedRCNN

        m = self.model
        self.times = defaultdict(float)
        start = time.perf_counter()
        images = self._step("preprocess", lambda: m.preprocess_image(batched_inputs))
        features = self._step("backbone", lambda: m.backbone(images.tensor))
        proposals, _ = self._step("RPN", lambda: m.proposal_generator(images, features, None))
        results, _ = self._step("roi_heads", lambda: m.roi_heads(images, features, proposals, None))
        out = self._step(
            "postprocess",
            lambda: GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes),
        )
        self.times["total"] = time.perf_counter() - start
        return out, dict(self.times)


def breakdown_rows(t, num_stages):
    """Derived per-run rows (seconds) from PartTimer times."""
    rows = {
        "preprocess (normalise, pad)": t["preprocess"],
        "backbone": t["backbone"],
        "RPN": t["RPN"],
    }
    for k in range(1, num_stages + 1):
        st = t.get(f"box stage {k}", 0.0)
        pool = t.get(f"box stage {k} ROIAlign", 0.0)
        rows[f"box stage {k} (ROIAlign + head + predictor)"] = st
        rows[f"  stage {k} ROIAlign"] = pool
        rows[f"  stage {k} box head + predictor"] = st - pool
    stages = sum(t.get(f"box stage {k}", 0.0) for k in range(1, num_stages + 1))
    rows["box decode, score mean, NMS"] = t["box all"] - stages
    rows["mask ROIAlign"] = t.get("mask ROIAlign", 0.0)
    rows["mask head(s) (+ sigmoid, mean)"] = t["mask all"] - t.get("mask ROIAlign", 0.0)
    rows["roi_heads other"] = t["roi_heads"] - t["box all"] - t["mask all"]
    rows["postprocess (rescale, paste masks)"] = t["postprocess"]
    rows["total"] = t["total"]
    return rows


def run_inference(models, images, warmup, iters, device, checker=None):
    """Round-robin inference: ``warmup`` rounds of plain ``model(inputs)``, then ``iters`` timed
    rounds of the part-by-part path. Outputs of each round are compared by ``checker``.

    Returns:
        {model: {"lat": [s], "rows": [breakdown], "peak": bytes, "delta": bytes, "dets": [n]}}
    """
    sync = Sync(device)
    timers = {k: PartTimer(m, sync) for k, m in models.items()}
    res = {k: {"lat": [], "rows": [], "peak": 0, "delta": 0, "dets": []} for k in models}
    warm0 = None
    try:
        for i in range(warmup):
            with torch.no_grad():
                outs = {k: m(infer_inputs(images[i % len(images)])) for k, m in models.items()}
            if checker is not None:
                checker.add(outs)
            if i == 0:
                warm0 = outs["a"]
            del outs
        for i in range(iters):
            item = images[i % len(images)]
            outs = {}
            for k, m in models.items():
                _trim_heap()
                with MemoryMonitor(device) as mem:
                    outs[k], t = timers[k].run(infer_inputs(item))
                res[k]["dets"].append(len(outs[k][0]["instances"]))
                res[k]["lat"].append(t["total"])
                res[k]["rows"].append(breakdown_rows(t, m.roi_heads.num_cascade_stages))
                res[k]["peak"] = max(res[k]["peak"], mem.peak)
                res[k]["delta"] = max(res[k]["delta"], mem.peak - mem.base)
            if checker is not None:
                checker.add(outs)
                if i == 0 and warm0 is not None:  # same image: model(inputs) == part-by-part
                    checker.same_as_forward(warm0, outs["a"])
            del outs
    finally:
        for tm in timers.values():
            tm.remove()
    return res


def run_training(models, images, batch_size, warmup, iters, device):
    """Median seconds per training iteration (forward + backward + SGD step) per model."""
    from detectron2.utils.events import EventStorage

    sync = Sync(device)
    res = {k: {"it": [], "peak": 0, "delta": 0} for k in models}
    opts = {}
    for k, m in models.items():
        m.train()
        # lr 0: every iteration does the same work on unchanged weights
        opts[k] = torch.optim.SGD(
            [p for p in m.parameters() if p.requires_grad], lr=0.0, momentum=0.9, weight_decay=1e-4
        )
    try:
        with EventStorage(0):
            for i in range(warmup + iters):
                batch = [
                    copy.copy(images[(i * batch_size + j) % len(images)]) for j in range(batch_size)
                ]
                for k, m in models.items():
                    _trim_heap()
                    with MemoryMonitor(device) as mem:
                        sync()
                        start = time.perf_counter()
                        losses = m(batch)
                        loss = sum(losses.values())
                        opts[k].zero_grad(set_to_none=True)
                        loss.backward()
                        opts[k].step()
                        sync()
                        dt = time.perf_counter() - start
                    if i >= warmup:
                        res[k]["it"].append(dt)
                        res[k]["peak"] = max(res[k]["peak"], mem.peak)
                        res[k]["delta"] = max(res[k]["delta"], mem.peak - mem.base)
    finally:
        for k, m in models.items():
            opts[k].zero_grad(set_to_none=True)
            m.eval()
    return res
