"""benchmarks/bench_train.py and train_parts.py: the step breakdown's bookkeeping (hand-computed
cases) and one short end-to-end run against Detectron2's built-in cascade."""

import os
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import train_parts  # noqa: E402


def _event(name, start, end, seq=-1, thread=1):
    return SimpleNamespace(
        name=name, time_range=SimpleNamespace(start=start, end=end), sequence_nr=seq, thread=thread
    )


def test_exclusive_time_of_nested_ranges():
    ranges = [(0, 10, "a"), (2, 5, "b"), (6, 7, "c"), (3, 4, "d")]
    assert train_parts._exclusive(ranges) == {"a": 6, "b": 2, "c": 1, "d": 1}


def test_backward_is_charged_to_the_forward_part_that_created_it():
    p = train_parts.PREFIX
    events = [
        _event(p + "step", 0, 100),
        _event(p + "data", 0, 5),
        _event(p + "backbone", 10, 30),
        _event("aten::conv", 12, 20, seq=1),
        _event(p + "RPN", 30, 40),
        _event("aten::mm", 31, 35, seq=2),
        _event("aten::copy_", 36, 37),  # no autograd node
        _event("autograd::engine::evaluate_function: MmBackward0", 50, 56, seq=2),
        _event("autograd::engine::evaluate_function: ConvolutionBackward0", 56, 70, seq=1),
        _event("autograd::engine::evaluate_function: AccumulateGrad", 70, 72),
        _event(p + "optimizer", 80, 90),
        _event("aten::conv", 0, 1000, seq=9, thread=2),  # another thread: ignored
    ]
    parts = train_parts._attribute(events)
    assert parts["data"] == 5
    assert parts["forward: backbone"] == 20
    assert parts["forward: RPN"] == 10
    assert parts["backward: RPN"] == 6
    assert parts["backward: backbone"] == 14
    assert parts["backward: autograd (weights' gradient accumulation, unattributed)"] == 2
    assert parts["optimizer"] == 10
    # the rest of the step: 100 - 5 - 20 - 10 - 10 - (6 + 14 + 2)
    assert parts["other (Python, metrics, per-step bookkeeping)"] == 33
    assert sum(parts.values()) == 100


def test_bench_train_runs_against_detectron2s_cascade(capsys):
    import bench_train

    from reliability_helpers import SMALL_OPTS

    bench_train.main(
        [
            "--d2",
            "--rounds",
            "1",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--breakdown",
            "2",
            "--threads",
            "1",
        ]
        + [str(x) for x in SMALL_OPTS]
        + ["SOLVER.AMP.ENABLED", "False"]
    )
    out = capsys.readouterr().out
    assert "Detectron2 CascadeROIHeads" in out and "ours (this tree)" in out
    assert "GFLOP/s" in out and "matrix-multiply peak" in out
    rows = [line for line in out.splitlines() if line.startswith("  backward: ")]
    assert any("backbone" in r for r in rows) and any("box stage 3" in r for r in rows)
    # the breakdown's parts add up to the profiled step
    total = float(out.split("iterations, ")[1].split(" ms")[0])
    summed = float([ln for ln in out.splitlines() if ln.strip().startswith("sum")][0].split()[1])
    assert abs(summed - total) <= 0.02 * total


def test_bench_peers_prints_every_model(capsys):
    import bench_peers

    from reliability_helpers import MODEL_OPTS

    small = [str(x) for x in MODEL_OPTS] + [
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
    ]
    bench_peers.main(
        ["--config", "demo", "--iters", "1", "--train-iters", "1", "--threads", "1"] + small
    )
    out = capsys.readouterr().out
    rows = {name: line for line in out.splitlines() for name in bench_peers.NAMES.values()
            if line.startswith(name)}  # fmt: skip
    assert len(rows) == 5, out
    # Detectron2's row is the reference of both ratios
    assert rows[bench_peers.NAMES["a"]].count("1.00x") == 2


def test_bench_peers_mmdet_flag_without_mmdet_names_what_is_missing():
    """``--mmdet`` where MMDetection or mmcv's compiled ops do not import: one line naming the
    packages and where the build is described, before any model is built."""
    import bench_peers
    import peer_mmdet

    if peer_mmdet.available() is None:
        pytest.skip("MMDetection imports here; bench_peers --mmdet runs it")
    with pytest.raises(SystemExit, match=r"mmcv 2\.x < 2\.2\.0 built with its ops"):
        bench_peers.main(["--mmdet", "--config", "demo", "--iters", "1", "--train-iters", "1"])


def test_matmul_peak_bounds_its_time_where_bfloat16_is_emulated():
    """A CPU without native bfloat16 multiplies it ~100x slower: the peak measurement takes a
    smaller product there instead of minutes of 2048^2 products."""
    import time

    import torch

    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        rate, n = train_parts.matmul_peak(dtype, seconds=0.5)
        assert time.perf_counter() - start < 30
        assert rate > 0 and n in (128, 256, 512, 1024, 2048)


def test_inference_hardware_use_is_flops_over_median_time(capsys, monkeypatch):
    """bench_inference's hardware table: FLOPs by torch's counter (2 per multiply-add), divided
    by the median latency, as a share of the peak measured in the run (hand-computed case)."""
    import bench_report
    import torch

    monkeypatch.setattr(train_parts, "matmul_peak", lambda dtype: (100.0, 128))

    class OneProduct(torch.nn.Module):
        def forward(self, inputs):  # 1000 x 1000 @ 1000 x 500: 2 * 1000 * 1000 * 500 = 1e9 FLOPs
            return torch.mm(torch.ones(1000, 1000), torch.ones(1000, 500))

    image = {"image": torch.zeros(3, 8, 8), "height": 8, "width": 8}
    res = {"a": {"lat": [0.4, 0.5, 0.9]}}  # median 0.5 s -> 2.0 GFLOP/s -> 2.0% of 100
    bench_report.print_hardware_use({"a": OneProduct()}, image, res, "cpu")
    out = capsys.readouterr().out
    assert "peak here: 100.0 GFLOP/s" in out
    row = [ln for ln in out.splitlines() if ln.startswith(bench_report.MODEL_NAMES["a"])][0]
    assert row.split()[-4:] == ["500.0", "1.00", "2.0", "2.0%"], row
