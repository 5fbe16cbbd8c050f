"""Timing a model one image at a time: eager, TorchScript or ONNX Runtime (bench_inference.py)."""

import os
import statistics
import time
from typing import Sequence

import torch


def benchmark_exported(path, images: Sequence[torch.Tensor], warmup: int = 3, iters: int = 10):
    """Median latency in seconds of one image through an exported model.

    Args:
        path: a ``.ts`` / ``.pt`` TorchScript file (``torch.jit.load``, on the device it was
            exported for), a ``.onnx`` file (onnxruntime on the CPU, with
            ``torch.get_num_threads()`` threads) or any callable taking one image.
        images: (3, H, W) tensors following the model's input contract.
        warmup: passes over ``images`` before timing.
        iters: timed passes over ``images``; each image is timed on its own.

    Returns:
        float: the median over the ``iters * len(images)`` timed calls, in seconds.
    """
    if isinstance(path, (str, os.PathLike)) and str(path).endswith(".onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(img):
            return session.run(None, {"image": img.float().numpy()})

    else:
        model = (
            torch.jit.load(str(path))  # on the device it was exported for
            if isinstance(path, (str, os.PathLike))
            else path
        )
        model = model.eval() if hasattr(model, "eval") else model

        def run(img):
            out = model(img)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            return out

    images = list(images)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            for img in images:
                run(img)
        for _ in range(iters):
            for img in images:
                t0 = time.perf_counter()
                run(img)
                times.append(time.perf_counter() - t0)
    return statistics.median(times)
