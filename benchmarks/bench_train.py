"""Training-step speed: where the time goes, how close it is to the hardware, and ratios against
an older commit and Detectron2's built-in cascade, measured in one run.

    python benchmarks/bench_train.py [--config demo|r50|FILE] [--against 78ab4c2] [--d2]
        [--device cpu|cuda] [--rounds 4] [--steps 5] [--warmup 3] [--breakdown 5] [KEY VALUE ...]

Each compared model trains in its own worker process (the same trainer as ``train_net.py``:
``cmrcnn_ext.engine.Trainer``, its data loader, optimizer and, with ``SOLVER.AMP.ENABLED``,
bfloat16 autocast on the CPU), from the same seed on the same images. The workers take turns,
``--steps`` iterations at a time for ``--rounds`` rounds, so that a change in machine load
affects them alike; the first ``--warmup`` iterations of each are not timed. Printed:

* the machine's measured matrix-multiply peak (float32 and bfloat16), in this run;
* per model: median seconds per iteration and IQR, the ratio to the first model, training-step
  and inference FLOPs (``torch.utils.flop_counter``; 2 per multiply-add) and the GFLOP/s achieved
  as a share of the peak of the dtype the convolutions run in;
* the losses of the compared models over their first iterations (same arithmetic: equal to
  float tolerance);
* for our model, the per-part breakdown of a step (``train_parts.StepBreakdown``).

``--against COMMIT`` runs the same config with the package as it was at ``COMMIT`` (extracted
with ``git archive``; the config is read from that tree). ``--d2`` adds Detectron2's
``CascadeROIHeads`` + ``MaskRCNNConvUpsampleHead`` (what Detectron2's cascade configs build) with
the same config otherwise. ``--config r50`` trains ``cascade_mask_rcnn_R_50_FPN_1x.yaml`` from
random weights on the embedded shapes data at the config's input size (800 px short side),
batch 2 (the config's batch of 16 takes minutes per step on a 2-core CPU).

``--device cuda`` trains on the GPU (``MODEL.DEVICE cuda``; with ``SOLVER.AMP.ENABLED``,
Detectron2's ``AMPTrainer``: float16 autocast and a gradient scaler). Each timed step ends with
``torch.cuda.synchronize()``, the peak is measured on the GPU (float32 under PyTorch's TF32
setting, float16, bfloat16), the table adds each model's CUDA peak memory, and the per-part
breakdown is not run (its profiler ranges time the CPU's kernel launches, not the GPU's work).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = {
    "demo": "cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml",
    "r50": "cascade_mask_rcnn_R_50_FPN_1x.yaml",
}
SHAPES = ["DATASETS.TRAIN", "('cmrcnn_shapes_train',)", "DATASETS.TEST", "('cmrcnn_shapes_val',)"]
# batch 2: the config's 16 images take minutes per step on a 2-core CPU
R50_OPTS = SHAPES + ["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "5", "MODEL.DEVICE", "cpu",
                     "INPUT.MASK_FORMAT", "bitmask", "DATALOADER.NUM_WORKERS", "0",
                     "SOLVER.IMS_PER_BATCH", "2"]  # fmt: skip
D2_OPTS = ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_MASK_HEAD.NAME",
           "MaskRCNNConvUpsampleHead"]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="demo", help="demo, r50 or a config file")
    p.add_argument("--against", default="", help="also time the package as of this commit")
    p.add_argument("--d2", action="store_true", help="also time Detectron2's built-in cascade")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=KEY VALUE ...",
        help="also time this tree with these extra overrides (repeatable), e.g. "
        "--compare 'float32=SOLVER.AMP.ENABLED False'",
    )
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="iterations per worker per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed first iterations per worker")
    p.add_argument("--breakdown", type=int, default=5, help="profiled steps (0: no breakdown)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


# -- worker (one model, commands on stdin, JSON on stdout) -------------------------------------
def worker(args):
    import torch
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # package layout since the restructure; before it, both lived in cmrcnn_ext.engine
        from cmrcnn_ext.config import setup_cfg
    except ImportError:
        from cmrcnn_ext.engine import setup_cfg
    from cmrcnn_ext.engine import Trainer

    spec = json.loads(args.worker)
    out = tempfile.mkdtemp(prefix="bench_train_")
    cfg = setup_cfg(spec["config"], spec["opts"] + ["OUTPUT_DIR", out])
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    inner = getattr(trainer, "_trainer", None) or trainer
    storage = EventStorage(0).__enter__()
    inner.storage = storage
    amp = bool(cfg.SOLVER.AMP.ENABLED)
    cuda = str(cfg.MODEL.DEVICE).startswith("cuda")
    # the dtype the convolutions run in: Detectron2's AMPTrainer autocasts CUDA to float16, our
    # Trainer the CPU to bfloat16
    dtype = ("float16" if cuda else "bfloat16") if amp else "float32"
    reply = {"ready": True, "device": str(cfg.MODEL.DEVICE), "amp": amp, "dtype": dtype}
    while True:
        print(json.dumps(reply), flush=True)
        cmd = sys.stdin.readline().split()
        if not cmd or cmd[0] == "quit":
            return
        n = int(cmd[1]) if len(cmd) > 1 else 1
        if cmd[0] == "steps":
            reply = {"seconds": [], "loss": []}
            for _ in range(n):
                import time

                start = time.perf_counter()
                inner.run_step()
                if cuda:  # the step's kernels, not only their launches
                    torch.cuda.synchronize()
                reply["seconds"].append(time.perf_counter() - start)
                reply["loss"].append(storage.history("total_loss").latest())
                storage.iter += 1
        elif cmd[0] == "flops":
            sys.path.insert(0, HERE)
            from train_parts import step_flops

            autocast = ("cuda" if cuda else "cpu", getattr(torch, dtype)) if amp else None
            # peak memory of the timed steps, read before the FLOP count's own step
            mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            train, infer = step_flops(inner, autocast)
            reply = {"train_flops": train, "infer_flops_per_image": infer, "cuda_peak_mib": mib}
        elif cmd[0] == "breakdown":
            sys.path.insert(0, HERE)
            from train_parts import StepBreakdown

            parts = StepBreakdown(inner)
            try:
                reply = {"parts": parts.run(n)}
            finally:
                parts.remove()


class Worker:
    """A worker process for one (package tree, config, overrides)."""

    def __init__(self, name, tree, config, opts, threads):
        self.name = name
        env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("CMRCNN_DATA", os.path.join(ROOT, "datasets", "cmrcnn_shapes"))
        spec = json.dumps({"config": config, "opts": opts})
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            spec,
            "--threads",
            str(threads),
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self._read()
        self.seconds, self.loss = [], []

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait()


def extract_tree(commit):
    """The repository as of ``commit`` in a temporary folder (``git archive``)."""
    dest = tempfile.mkdtemp(prefix=f"cmrcnn_{commit[:8]}_")
    tar = os.path.join(dest, "tree.tar")
    subprocess.run(["git", "archive", "-o", tar, commit], cwd=ROOT, check=True)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    os.remove(tar)
    return dest


def config_path(tree, name, current):
    """The config file ``name`` inside ``tree`` (packaged configs moved into cmrcnn_ext/configs;
    older trees keep them in configs/)."""
    if os.path.isfile(name):
        return os.path.abspath(name)
    for sub in ("cmrcnn_ext/configs", "configs"):
        path = os.path.join(tree, sub, name)
        if os.path.isfile(path):
            return path
    return name if current else os.path.join(tree, "configs", name)


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    sys.path.insert(0, HERE)
    from train_parts import device_matmul_peak, require_device

    if args.threads:
        torch.set_num_threads(args.threads)
    name = CONFIGS.get(args.config, args.config)
    opts = (R50_OPTS if args.config == "r50" else []) + list(args.opts)
    require_device(args.device)
    if args.device == "cuda":
        opts += ["MODEL.DEVICE", "cuda"]
        args.breakdown = 0  # CPU-side profiler ranges; see the module docstring
    specs = []
    if args.against:
        specs.append((f"ours @ {args.against}", extract_tree(args.against), opts))
    if args.d2:
        specs.append(("Detectron2 CascadeROIHeads", ROOT, opts + D2_OPTS))
    for item in args.compare:
        label, _, extra = item.partition("=")
        specs.append((f"ours, {label}", ROOT, opts + extra.split()))
    specs.append(("ours (this tree)", ROOT, opts))

    # {dtype: (GFLOP/s, matrix size)}
    dtypes = ["float32", "bfloat16"] + (["float16"] if args.device == "cuda" else [])

    def measure(dtype):
        return device_matmul_peak(getattr(torch, dtype), args.device)

    peak = {k: measure(k) for k in dtypes}
    where = (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
             if args.device == "cuda" else f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"config {name}, overrides {opts or '-'}; torch {torch.__version__}, {where}")
    workers = []
    try:
        for label, tree, o in specs:
            workers.append(
                Worker(label, tree, config_path(tree, name, tree == ROOT), o, args.threads)
            )
        for w in workers:
            if args.warmup:
                w.loss += w.ask(f"steps {args.warmup}")["loss"]
        for _ in range(args.rounds):
            for w in workers:
                r = w.ask(f"steps {args.steps}")
                w.seconds += r["seconds"]
                w.loss += r["loss"]
        flops = {w.name: w.ask("flops") for w in workers}
        parts = workers[-1].ask(f"breakdown {args.breakdown}")["parts"] if args.breakdown else {}
    finally:
        for w in workers:
            w.close()
    for k in peak:  # the better of the two: a busy moment only lowers it
        peak[k] = max(peak[k], measure(k), key=lambda rate_size: rate_size[0])
    report(workers, flops, peak, parts, args)


def report(workers, flops, peak, parts, args):
    print("matrix-multiply peak (best of two measurements, before and after the models): "
          + ", ".join(f"{k} {rate:.1f} GFLOP/s ({n}^2)"
                      for k, (rate, n) in peak.items()))  # fmt: skip
    base = statistics.median(workers[0].seconds)
    print(f"\ntraining step: {args.rounds} rounds x {args.steps} iterations per model after "
          f"{args.warmup} warm-up; ratio = median / first row's median")  # fmt: skip
    mem = any(flops[w.name].get("cuda_peak_mib") is not None for w in workers)
    print(f"{'model':32}{'s/iter':>9}{'IQR':>17}{'ratio':>8}{'train GFLOP':>13}"
          f"{'GFLOP/s':>9}{'% peak':>8}{'infer GFLOP/img':>17}"
          + (f"{'CUDA peak MiB':>15}" if mem else ""))  # fmt: skip
    for w in workers:
        med = statistics.median(w.seconds)
        q1, _, q3 = quartiles(w.seconds)
        f = flops[w.name]
        dtype = w.info["dtype"]  # every worker runs this file's worker(), which sends it
        rate = f["train_flops"] / med / 1e9
        print(f"{w.name:32}{med:9.3f}   {q1:6.3f} - {q3:6.3f}{med / base:7.2f}x"
              f"{f['train_flops'] / 1e9:13.1f}{rate:9.1f}{100 * rate / peak[dtype][0]:7.1f}%"
              f"{f['infer_flops_per_image'] / 1e9:17.2f}"
              + (f"{f['cuda_peak_mib']:15.0f}" if mem else ""))  # fmt: skip
    print("(% peak: of the matrix-multiply peak of the dtype the convolutions run in: "
          + ", ".join(f"{w.name}: {w.info['dtype']}"
                      for w in workers) + ")")  # fmt: skip
    n = min(len(w.loss) for w in workers)
    print(f"\ntotal loss, iterations 1-{min(n, 20)} (same seed and images):")
    for w in workers:
        print(f"  {w.name:32}" + " ".join(f"{x:.4f}" for x in w.loss[: min(n, 20)]))
    if len(workers) > 1:
        ref = workers[-1].loss[: min(n, 20)]
        for w in workers[:-1]:
            d = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(w.loss, ref))
            print(f"  max relative difference, {w.name} vs ours: {d:.2e}")
    if parts:
        total = parts.pop("total")
        print(f"\nbreakdown of our step ({args.breakdown} profiled iterations, {total:.0f} ms each "
              "with the profiler on; exclusive times, backward charged to the forward part "
              "that created it):")  # fmt: skip
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {k:60}{v:8.1f} ms {100 * v / total:5.1f}%")
        print(f"  {'sum':60}{sum(parts.values()):8.1f} ms")


if __name__ == "__main__":
    main()
