"""benchmarks/ablation.py: the config each variant trains with (the demo's precision choice, the
variant's keys, the seed), the per-seed table (hand-computed mean and spread) and --only."""

import json
import os
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import ablation  # noqa: E402


class _Stop(Exception):
    pass


def _trained_cfg(monkeypatch, tmp_path, bf16, name="ours first", extra=()):
    """The config ``run_variant`` hands to the trainer (the trainer is replaced: nothing trains)."""
    import cmrcnn_ext.apps.demo as demo

    seen = {}

    def fake_trainer(cfg):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(demo, "native_bf16", lambda: bf16)
    monkeypatch.setattr(ablation, "Trainer", fake_trainer)
    ns = SimpleNamespace(
        output=str(tmp_path), iters=0, config_file=ablation.DEMO_CONFIG, opts=list(extra)
    )
    (overrides, merges) = {n: (o, m) for n, o, m in ablation.VARIANTS}[name]
    with pytest.raises(_Stop):
        ablation.run_variant(name, overrides, merges, 2, ns)
    return seen["cfg"]


def test_trains_in_float32_where_bfloat16_would_be_emulated(monkeypatch, tmp_path):
    cfg = _trained_cfg(monkeypatch, tmp_path, bf16=False)
    assert cfg.SOLVER.AMP.ENABLED is False  # what the demo trains in on such a CPU
    assert cfg.MODEL.CMRCNN.MASK_STAGES == "first" and cfg.SEED == 2
    assert cfg.OUTPUT_DIR == os.path.join(str(tmp_path), "seed2", "ours_first")


def test_keeps_bfloat16_where_the_cpu_has_it_or_the_user_chose(monkeypatch, tmp_path):
    assert _trained_cfg(monkeypatch, tmp_path, bf16=True).SOLVER.AMP.ENABLED is True
    forced = _trained_cfg(monkeypatch, tmp_path, bf16=False, extra=["SOLVER.AMP.ENABLED", "True"])
    assert forced.SOLVER.AMP.ENABLED is True


def _save(output, seed, name, iters, rows):
    folder = ablation._variant_dir(output, seed, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "ablation_rows.json"), "w") as f:
        json.dump({"iters": iters, "rows": rows}, f)


def test_table_gives_mean_spread_and_each_seed(tmp_path):
    out = str(tmp_path)
    _save(out, 0, "ours last", 1400, [["ours last", 52.0, 50.0, 0.5, 0.1]])
    _save(out, 1, "ours last", 1400, [["ours last", 56.0, 53.0, 0.7, 0.3]])
    _save(out, 0, "ours first", 1400, [["ours first", 51.0, 49.5, 0.6, 0.2]])
    rows, iters = ablation.collect(out, [0, 1, 2])
    assert iters == {1400} and list(rows) == ["ours first", "ours last"]  # VARIANTS order
    lines = ablation.table(rows, [0, 1, 2]).splitlines()
    # ours last: mean (52 + 56) / 2 = 54.0, spread 4.0; mask 51.5 (3.0); s/iter 0.60
    assert (
        lines[3] == "| ours last | 0, 1 | 54.0 (4.0) | 51.5 (3.0) | 52.0 / 56.0 | 50.0 / 53.0 "
        "| 0.60 | 0.200 |"
    )
    assert lines[2].startswith("| ours first | 0 | 51.0 (0.0) | 49.5 (0.0) |")


def test_only_selects_by_exact_name_or_else_by_substring():
    names = [n for n, _, _ in ablation.VARIANTS]
    assert [n for n in names if ablation._selected(n, ["ours all"])] == ["ours all"]
    assert [n for n in names if ablation._selected(n, ["all"])] == [
        "ours all",
        "ours all, weights 1/0.5/0.25",
    ]
    assert all(ablation._selected(n, None) for n in names)
