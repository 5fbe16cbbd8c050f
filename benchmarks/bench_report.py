"""Printed tables of the inference benchmark: latency, per-part breakdown, exported models,
training iterations and memory, each with its ratio to Detectron2's cascade (a)."""

import functools
import os
import statistics

import numpy as np
import torch
from bench_models import MODEL_NAMES, infer_inputs


def _ratio(x, base):
    """``x / base`` as "1.23x", or "-" where the baseline time is too small to divide by."""
    return f"{x / base:8.2f}x" if base > 1e-4 else f"{'-':>9}"


def _ms(x):
    return f"{1000 * x:9.1f}"


def _mib(x):
    return f"{x / 2**20:8.0f}"


def print_inference(res, title, device):
    mem_label = "CUDA peak MiB (+run)" if device == "cuda" else "peak RSS MiB (+run)"
    print(f"\n{title}")
    print(
        f"{'model':<28}{'median ms':>10}{'IQR ms':>9}{'img/s':>8}{'vs (a)':>8}{'dets':>6}   "
        f"{mem_label}"
    )
    base = statistics.median(res["a"]["lat"])
    for k, r in res.items():
        lat = np.array(r["lat"])
        q1, q3 = np.percentile(lat, [25, 75])
        med = float(np.median(lat))
        print(
            f"{MODEL_NAMES[k]:<28}{_ms(med):>10}{_ms(q3 - q1):>9}{len(lat) / lat.sum():8.2f}"
            f"{med / base:7.2f}x{statistics.mean(r['dets']):6.0f}   "
            f"{_mib(r['peak'])} ({r['delta'] / 2**20:+.0f})"
        )


def print_exported(models, images, warmup, iters):
    """Latency of model (b) exported with ``cmrcnn-export`` (TorchScript, and ONNX
    run by onnxruntime when it is installed), against eager (a) timed the same way (single-image
    calls, median), and whether each export gives (b)'s eager outputs (1e-4, all images)."""
    import tempfile

    from cmrcnn_ext.export import (
        ExportableCascadeMaskRCNN,
        compare_outputs,
        export_onnx,
        export_torchscript,
    )

    from exported import benchmark_exported

    imgs = [infer_inputs(item)[0]["image"] for item in images]
    wrapper = ExportableCascadeMaskRCNN(models["b"], mask_format="bool").eval()
    rows = []
    with torch.no_grad():
        t_a = benchmark_exported(lambda x: models["a"]([{"image": x}]), imgs, warmup, iters)
        t_w = benchmark_exported(wrapper, imgs, warmup, iters)
        rows.append(("(b) ours, export wrapper, eager", t_w, "-"))
        eager = [wrapper(x) for x in imgs]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.ts")
        export_torchscript(wrapper, imgs[0], path)
        loaded = torch.jit.load(path)
        with torch.no_grad():
            same = all(compare_outputs(e, loaded(x))["ok"] for e, x in zip(eager, imgs))
        rows.append(
            ("(b) ours, TorchScript", benchmark_exported(loaded, imgs, warmup, iters), same)
        )
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        on_cuda = next(models["b"].parameters()).is_cuda
        if on_cuda:  # a CUDA trace run by onnxruntime on the CPU would compare GPU with CPU numbers
            print(
                "\n(ONNX row skipped on --device cuda: this benchmark runs onnxruntime on the CPU "
                "only)"
            )
        if ort is not None and not on_cuda:
            path = os.path.join(tmp, "model.onnx")
            export_onnx(wrapper, imgs[0], path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

            def run_onnx(x):
                return sess.run(None, {"image": x.float().numpy()})

            same = all(
                compare_outputs(e, [torch.from_numpy(o) for o in run_onnx(x)])["ok"]
                for e, x in zip(eager, imgs)
            )
            rows.append(
                (
                    "(b) ours, ONNX (onnxruntime)",
                    benchmark_exported(run_onnx, imgs, warmup, iters),
                    same,
                )
            )
    n = iters * len(imgs)
    print(
        f"\nexported model (trace of (b); single-image calls, median of {n}; 'equal': outputs "
        "= (b)'s eager wrapper to 1e-4 on every image)"
    )
    print(f"{'(a) Detectron2, eager':<36}{_ms(t_a):>10} ms   1.00x")
    for name, t, same in rows:
        eq = same if same == "-" else ("equal" if same else "DIFFERENT")
        print(f"{name:<36}{_ms(t):>10} ms   {t / t_a:.2f}x   {eq}")


def print_breakdown(res):
    print(
        "\nper-component breakdown, median ms per image (ratio: (c) / (a), share: of (c)'s total)"
    )
    labels = list(res["a"]["rows"][0].keys())
    med = {
        k: {lab: statistics.median(row[lab] for row in r["rows"]) for lab in labels}
        for k, r in res.items()
    }
    print(
        f"{'component':<42}{'(a)':>9}{'(b)':>9}{'(c)':>9}{'(b)/(a)':>9}{'(c)/(a)':>9}"
        f"{'share (c)':>10}"
    )
    for lab in labels:
        a, b, c = med["a"][lab], med["b"][lab], med["c"][lab]
        ratio = functools.partial(_ratio, base=a)
        print(
            f"{lab:<42}{_ms(a)}{_ms(b)}{_ms(c)}{ratio(b)}{ratio(c)}"
            f"{100 * c / med['c']['total']:9.1f}%"
        )
    return med


def print_training(res, batch_size, device, warmup):
    mem_label = "CUDA peak MiB (+iter)" if device == "cuda" else "peak RSS MiB (+iter)"
    base = statistics.median(res["a"]["it"])
    print(
        f"\ntraining, batch {batch_size}: forward + backward + SGD step, "
        f"median of {len(res['a']['it'])} iteration(s) after {warmup} warm-up"
    )
    print(f"{'model':<28}{'s/iter':>9}{'vs (a)':>8}   {mem_label}")
    for k, r in res.items():
        med = statistics.median(r["it"])
        print(
            f"{MODEL_NAMES[k]:<28}{med:9.2f}{med / base:7.2f}x   {_mib(r['peak'])} "
            f"({r['delta'] / 2**20:+.0f})"
        )


def print_hardware_use(models, image, res, device):
    """Inference FLOPs per image of each model (``torch.utils.flop_counter``, 2 per multiply-add,
    on ``image``), the GFLOP/s its median latency achieves, and that rate as a share of the
    float32 matrix-multiply peak measured here (on CUDA under PyTorch's TF32 setting for matrix
    products; cuDNN's convolutions may use TF32 regardless, so the share can exceed what plain
    float32 allows)."""
    from train_parts import count_flops, device_matmul_peak

    peak, n = device_matmul_peak(torch.float32, device)
    print(f"\nhardware use (float32 matrix-multiply peak here: {peak:.1f} GFLOP/s, {n}^2 products)")
    print(f"{'model':<28}{'median ms':>10}{'GFLOP/img':>11}{'GFLOP/s':>10}{'% peak':>8}")
    for k, m in models.items():
        with torch.no_grad():
            flops = count_flops(lambda m=m: m(infer_inputs(image)))
        med = statistics.median(res[k]["lat"])
        rate = flops / med / 1e9
        print(
            f"{MODEL_NAMES[k]:<28}{_ms(med):>10}{flops / 1e9:11.2f}{rate:10.1f}"
            f"{100 * rate / peak:7.1f}%"
        )


# ----------------------------------------------------------------------------- main
