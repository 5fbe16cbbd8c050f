"""Config keys declared once (schema, tuned): their values are the configs'; generated docs."""

import importlib.util
import os
import subprocess
import sys

import pytest

import cmrcnn_ext
from cmrcnn_ext.config import schema, tuned
from cmrcnn_ext.config.defaults import add_cmrcnn_config
from cmrcnn_ext.config.schema import KEYS
from cmrcnn_ext.config.tuned import TUNED
from cmrcnn_ext.config.values import cfg_value, format_value, plain_value

from conftest import ROOT

REQUIRED_TUNED = """
MODEL.RESNETS.DEPTH MODEL.RESNETS.NUM_GROUPS MODEL.RESNETS.WIDTH_PER_GROUP MODEL.BACKBONE.NAME
MODEL.RPN.IOU_THRESHOLDS MODEL.ROI_BOX_HEAD.NUM_CONV MODEL.ROI_BOX_HEAD.NUM_FC MODEL.WEIGHTS
MODEL.RPN.PRE_NMS_TOPK_TRAIN MODEL.RPN.POST_NMS_TOPK_TRAIN MODEL.RPN.PRE_NMS_TOPK_TEST
MODEL.RPN.POST_NMS_TOPK_TEST MODEL.BACKBONE.FREEZE_AT MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO
MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO MODEL.ROI_BOX_CASCADE_HEAD.IOUS
MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS MODEL.ROI_HEADS.NUM_CLASSES INPUT.MIN_SIZE_TRAIN
INPUT.MAX_SIZE_TRAIN INPUT.MIN_SIZE_TEST INPUT.MAX_SIZE_TEST SOLVER.IMS_PER_BATCH SOLVER.BASE_LR
SOLVER.STEPS SOLVER.MAX_ITER SOLVER.WARMUP_ITERS TEST.DETECTIONS_PER_IMAGE
MODEL.ROI_HEADS.SCORE_THRESH_TEST MODEL.ROI_HEADS.NMS_THRESH_TEST
""".split()
OWN_NODES = ("MODEL.CMRCNN.", "DATASETS.CMRCNN.", "SOLVER.CMRCNN.", "TEST.CMRCNN.")


def _load_tool():
    """tools/gen_config_docs.py, loaded by path (a repository tool, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", os.path.join(ROOT, "tools", "gen_config_docs.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_tool()


def _flat_keys(node, prefix=""):
    keys = set()
    for k, v in node.items():
        if isinstance(v, dict):
            keys |= _flat_keys(v, prefix + k + ".")
        else:
            keys.add(prefix + k)
    return keys


@pytest.fixture(scope="module")
def reference_cfg():
    return tuned.load_reference_config()


@pytest.fixture(scope="module")
def config_doc(reference_cfg):
    return gen.render_config_doc(reference_cfg)


def _rows(markdown, ncols):
    """{key: cells} of the table rows of ``markdown`` whose first cell is a key."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            assert len(cells) == ncols, line
            rows.setdefault(cells[0].strip("`"), []).append(cells)
    return rows


def test_every_project_key_declared_once():
    """schema.KEYS is exactly what add_cmrcnn_config adds, each default allowed by its own
    ``allowed``, all under CMRCNN nodes; no key is both cmrcnn_ext's and a tuned one."""
    from detectron2.config import get_cfg

    names = [k.key for k in KEYS]
    assert len(names) == len(set(names)), "duplicate schema entries"
    plain, ours = get_cfg(), add_cmrcnn_config(get_cfg())
    assert _flat_keys(ours) - _flat_keys(plain) == set(names)
    for k in KEYS:
        assert k.key.startswith(OWN_NODES) and k.key.count(".") == 2, k.key
        assert k.allowed.contains(k.default), k.key
        assert plain_value(cfg_value(ours, k.key)) == plain_value(k.default), k.key
        assert k.meaning and "\n" not in k.meaning, k.key
    tuned_names = [t.key for t in TUNED]
    assert len(tuned_names) == len(set(tuned_names)), "duplicate tuned entries"
    assert not set(tuned_names) & set(names)
    assert not [t for t in tuned_names if t.startswith(OWN_NODES)]
    assert set(REQUIRED_TUNED) <= set(tuned_names), set(REQUIRED_TUNED) - set(tuned_names)


def test_add_cmrcnn_config_is_idempotent_and_leaves_detectron2_alone():
    from detectron2.config import get_cfg

    cfg = add_cmrcnn_config(get_cfg())
    cfg.MODEL.CMRCNN.MASK_STAGES = "all"
    cfg.MODEL.CMRCNN.STAGE_LOSS_WEIGHTS.append(2.0)  # must not reach the schema's default
    del cfg.SOLVER.CMRCNN["BETAS"]  # a partial config: the missing key comes back
    assert add_cmrcnn_config(cfg) is cfg
    assert cfg.MODEL.CMRCNN.MASK_STAGES == "all" and cfg.SOLVER.CMRCNN.BETAS == [0.9, 0.999]
    assert schema.get_key("MODEL.CMRCNN.STAGE_LOSS_WEIGHTS").default == [1.0, 1.0, 1.0]
    for old, new in schema.RENAMED.items():
        assert cfg.key_is_renamed(old) and cfg.clone().key_is_renamed(old)
        assert cfg_value(cfg, new) is not None
    fresh = get_cfg()
    assert not any("CMRCNN" in node for node in (fresh.MODEL, fresh.SOLVER, fresh.TEST))
    assert not fresh.key_is_renamed("SOLVER.CMRCNN_OPTIMIZER")


def test_tuned_reference_values_are_the_reference_config(reference_cfg):
    wrong = {
        t.key: (t.reference, cfg_value(reference_cfg, t.key))
        for t in TUNED
        if plain_value(cfg_value(reference_cfg, t.key)) != plain_value(t.reference)
    }
    assert not wrong, f"Tuned.reference != {tuned.REFERENCE_CONFIG}: {wrong}"


def test_own_keys_documented_with_default_and_reference(reference_cfg, config_doc):
    """docs/config.md: an own key's default is add_cmrcnn_config's, its reference the preset's."""
    rows = _rows(config_doc, 5)
    defaults = cmrcnn_ext.get_cfg()
    for k in KEYS:
        ((key, default, reference, allowed, meaning),) = rows[k.key]
        assert default == f"`{format_value(cfg_value(defaults, k.key))}`", k.key
        assert reference == f"`{format_value(cfg_value(reference_cfg, k.key))}`", k.key
        assert allowed.replace("\\*", "*") == str(k.allowed), k.key
        assert meaning.replace("\\*", "*") == k.meaning, k.key
    # the two meanings of "default" that used to be mixed up
    assert rows["MODEL.CMRCNN.MASK_STAGES"][0][1:3] == ['`"first"`', '`"all"`']


def test_detectron2_defaults_are_get_cfg():
    from detectron2.config import get_cfg

    d2 = get_cfg()
    for t in TUNED:
        assert plain_value(cfg_value(d2, t.key)) == plain_value(t.detectron2_default), t.key
    for k in KEYS:  # cmrcnn_ext's own keys: never a duplicate of Detectron2's
        with pytest.raises(KeyError):
            cfg_value(d2, k.key)


def test_detectron2_zoo_values_are_its_cascade_config():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    zoo = get_cfg()
    zoo.merge_from_file(model_zoo.get_config_file(tuned.DETECTRON2_ZOO_CONFIG))
    for t in TUNED:
        assert plain_value(cfg_value(zoo, t.key)) == plain_value(t.detectron2_zoo), t.key


def test_reference_values_are_allowed():
    assert not [t.key for t in TUNED if not t.allowed.contains(t.reference)]


def test_detectron2_column():
    col = {t.key: gen.detectron2_column(t, format_value) for t in TUNED}
    assert col["MODEL.ROI_BOX_HEAD.NUM_CONV"] == "0"
    assert (
        col["MODEL.RPN.PRE_NMS_TOPK_TRAIN"].startswith("12000")
        and "2000" in col["MODEL.RPN.PRE_NMS_TOPK_TRAIN"]
    )
    assert col["MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"] == "0"
    assert col["MODEL.RPN.IOU_THRESHOLDS"] == col["MODEL.BACKBONE.FREEZE_AT"] == "same"


def test_config_doc_lists_tuned_keys(config_doc):
    tuned_part = config_doc.split("## Tuned Detectron2 keys")[1]
    lines = tuned_part.splitlines()
    assert "| key | reference | Detectron2 default | allowed | meaning |" in lines
    rows = _rows(tuned_part, 5)
    assert set(rows) == {t.key for t in TUNED}
    for t in TUNED:
        ((_, reference, d2, allowed, meaning),) = rows[t.key]
        assert reference == f"`{format_value(t.reference)}`", t.key
        assert d2 == gen.detectron2_column(t), t.key
        assert allowed.replace("\\*", "*") == str(t.allowed), t.key
        assert meaning.replace("\\*", "*") == t.meaning, t.key
    for old, new in schema.RENAMED.items():
        assert f"`{old}` is now `{new}`" in config_doc


def test_readme_block_lists_only_the_project_keys():
    block = gen.render_readme_block()
    rows = _rows(block, 3)
    assert set(rows) == {k.key for k in KEYS}
    for k in KEYS:
        assert rows[k.key][0][1] == f"`{format_value(k.default)}`"
    assert "(docs/config.md)" in block


def test_readme_block_rewrite():
    text = f"# x\n\nintro\n{gen.README_BEGIN}\nold\n{gen.README_END}\nend\n"
    new = gen.with_readme_block(text)
    assert (
        new
        == f"# x\n\nintro\n{gen.README_BEGIN}\n{gen.render_readme_block()}{gen.README_END}\nend\n"
    )
    assert gen.with_readme_block(new) == new  # idempotent
    assert gen.readme_section(new) == gen.render_readme_block()
    with pytest.raises(ValueError, match="HPARAMS:BEGIN"):
        gen.with_readme_block("# no markers\n")


def test_check_reports_stale_files(tmp_path):
    (tmp_path / "README.md").write_text(f"# x\n{gen.README_BEGIN}\nold\n{gen.README_END}\n")
    assert sorted(gen.stale_files(str(tmp_path))) == sorted([gen.CONFIG_DOC, gen.README])
    assert gen.main(["--check", "--root", str(tmp_path)]) == 1
    assert gen.main(["--root", str(tmp_path)]) == 0
    assert gen.stale_files(str(tmp_path)) == []
    assert gen.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "docs" / "config.md").write_text("edited by hand\n")
    assert gen.stale_files(str(tmp_path)) == [gen.CONFIG_DOC]


def test_generated_docs_are_up_to_date():
    """README.md's key table and docs/config.md are what the schema generates."""
    stale = gen.stale_files(ROOT)
    assert not stale, f"{stale} out of date: run `{gen.COMMAND}`"


def test_import_cmrcnn_ext_loads_no_doc_tool():
    code = (
        "import sys, importlib.util, cmrcnn_ext\n"
        "bad = [m for m in sys.modules if 'gen_config_docs' in m or m.startswith('matplotlib')]\n"
        "assert not bad, bad\n"
        "assert importlib.util.find_spec('cmrcnn_ext.config.hparams') is None\n"
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
