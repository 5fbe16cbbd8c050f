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


def test_eval_on_reevaluates_the_saved_weights_without_training(monkeypatch, tmp_path):
    """--eval-on: the variant's config and final weights, evaluated on the named data set once
    per test-time merge mode; the train s/iter is carried over from the variant's own rows."""
    import torch
    from detectron2.data import DatasetCatalog

    import cmrcnn_ext.apps.demo as demo
    from cmrcnn_ext.config import setup_cfg

    dataset = "test_ablation_eval_on"
    DatasetCatalog.register(dataset, lambda: [{"image_id": i} for i in range(4)])
    monkeypatch.setattr(demo, "native_bf16", lambda: True)
    out = str(tmp_path)
    name = "ours all"
    folder = ablation._variant_dir(out, 1, name)
    trained_rows = [["ours all, test merge last", 50.0, 51.0, 0.38, 0.1]]
    trained_rows.append(["ours all, test merge mean", 50.0, 52.0, 0.38, 0.1])
    _save(out, 1, name, 1400, trained_rows)
    cfg = setup_cfg(ablation.DEMO_CONFIG, ["MODEL.CMRCNN.MASK_STAGES", "all"])
    torch.manual_seed(3)
    saved = ablation.Trainer.build_model(cfg).state_dict()
    torch.save({"model": saved}, os.path.join(folder, "model_final.pth"))

    calls = []

    def fake_test(cfg, model):
        state = model.state_dict()
        same = all(torch.equal(state[k], v) for k, v in saved.items())
        calls.append((tuple(cfg.DATASETS.TEST), cfg.MODEL.CMRCNN.MASK_STAGES, same, model.training))
        merge = model.roi_heads.test_mask_merge
        return {"bbox": {"AP": 40.0}, "segm": {"AP": {"last": 41.0, "mean": 42.0}[merge]}}

    monkeypatch.setattr(ablation.Trainer, "test", staticmethod(fake_test))
    ns = SimpleNamespace(
        output=out, config_file=ablation.DEMO_CONFIG, opts=[], eval_on=dataset, iters=0
    )
    try:
        overrides, merges = {n: (o, m) for n, o, m in ablation.VARIANTS}[name]
        rows = ablation.reevaluate(name, overrides, merges, 1, ns)
        # not trained for SEED 0: skipped, nothing written
        assert ablation.reevaluate(name, overrides, merges, 0, ns) == []
    finally:
        DatasetCatalog.remove(dataset)
    assert calls == [((dataset,), "all", True, False)] * 2
    assert [r[:4] for r in rows] == [
        ("ours all, test merge last", 40.0, 41.0, 0.38),
        ("ours all, test merge mean", 40.0, 42.0, 0.38),
    ]
    got, iters = ablation.collect(out, [0, 1], dataset)
    assert iters == {1400} and got["ours all, test merge mean"][1][:3] == (40.0, 42.0, 0.38)
    own, _ = ablation.collect(out, [0, 1])  # the variant's own rows are left as they were
    assert own["ours all, test merge mean"][1][:2] == (50.0, 52.0)
