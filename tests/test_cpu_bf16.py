"""CPU bfloat16 detection, and the demo's float32 choice on CPUs that would emulate bfloat16."""

import os

import pytest

from cmrcnn_ext.apps import demo
from cmrcnn_ext.engine import cpu_bf16


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux CPU flags needed")
def test_native_bf16_agrees_with_the_kernel_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert cpu_bf16.native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("native", [True, False])
def test_demo_precision_follows_the_cpu_unless_the_user_sets_it(monkeypatch, native):
    monkeypatch.setattr(demo, "native_bf16", lambda: native)
    expected = [] if native else ["SOLVER.AMP.ENABLED", "False"]
    assert demo.precision_opts(demo.DEMO_CONFIG, []) == expected
    # the user's own choice always stands
    assert demo.precision_opts(demo.DEMO_CONFIG, ["SOLVER.AMP.ENABLED", "True"]) == []
    # nothing to change when the run is float32 anyway
    assert demo.precision_opts(demo.DEMO_CONFIG, ["SOLVER.AMP.ENABLED", "False"]) == []


@pytest.mark.parametrize("native", [True, False])
def test_demo_quotes_the_reference_run_of_the_precision_it_trains_in(monkeypatch, native):
    from cmrcnn_ext.config import setup_cfg

    monkeypatch.setattr(demo, "native_bf16", lambda: native)
    cfg = setup_cfg(demo.DEMO_CONFIG, demo.precision_opts(demo.DEMO_CONFIG, []))
    line = demo.reference_run(cfg)
    assert line == demo.REFERENCE_RUNS["bfloat16" if native else "float32"]
    assert ("in float32" in line) != native


def test_demo_on_a_gpu_quotes_no_cpu_reference_as_its_own(monkeypatch):
    import torch

    from cmrcnn_ext.config import setup_cfg

    # config only (no model is built); setup_cfg would fall back to the CPU without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = setup_cfg(demo.DEMO_CONFIG, ["MODEL.DEVICE", "cuda"])
    assert demo.precision_opts(demo.DEMO_CONFIG, ["MODEL.DEVICE", "cuda"]) == []
    assert demo.reference_run(cfg) == demo.REFERENCE_RUNS["gpu"]
    assert "float16" in demo.reference_run(cfg)
