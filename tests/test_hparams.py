"""cmrcnn_ext.config.hparams: the documented defaults are the configs' values; table and README."""
import os
import subprocess
import sys

import pytest

import cmrcnn_ext
from cmrcnn_ext.config import hparams
from cmrcnn_ext.config.hparams import HPARAMS, cfg_value, format_value, plain_value

from conftest import ROOT

OWN_PREFIXES = ("MODEL.CMRCNN.", "DATASETS.CMRCNN.", "TEST.CMRCNN_", "SOLVER.CMRCNN_")
REQUIRED = """
MODEL.RESNETS.DEPTH MODEL.RESNETS.NUM_GROUPS MODEL.RESNETS.WIDTH_PER_GROUP MODEL.BACKBONE.NAME
MODEL.RPN.IOU_THRESHOLDS MODEL.ROI_BOX_HEAD.NUM_CONV MODEL.ROI_BOX_HEAD.NUM_FC MODEL.WEIGHTS
MODEL.RPN.PRE_NMS_TOPK_TRAIN MODEL.RPN.POST_NMS_TOPK_TRAIN MODEL.RPN.PRE_NMS_TOPK_TEST
MODEL.RPN.POST_NMS_TOPK_TEST MODEL.BACKBONE.FREEZE_AT MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO
MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO MODEL.ROI_BOX_CASCADE_HEAD.IOUS
MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS MODEL.CMRCNN.MASK_STAGES
MODEL.CMRCNN.STAGE_LOSS_WEIGHTS MODEL.CMRCNN.TEST_MASK_MERGE DATASETS.CMRCNN.TRAIN_JSON
DATASETS.CMRCNN.TRAIN_IMAGE_ROOT DATASETS.CMRCNN.VAL_JSON DATASETS.CMRCNN.VAL_IMAGE_ROOT
MODEL.ROI_HEADS.NUM_CLASSES INPUT.MIN_SIZE_TRAIN INPUT.MAX_SIZE_TRAIN INPUT.MIN_SIZE_TEST
INPUT.MAX_SIZE_TEST SOLVER.IMS_PER_BATCH SOLVER.BASE_LR SOLVER.STEPS SOLVER.MAX_ITER
SOLVER.WARMUP_ITERS TEST.DETECTIONS_PER_IMAGE MODEL.ROI_HEADS.SCORE_THRESH_TEST
MODEL.ROI_HEADS.NMS_THRESH_TEST
""".split()


@pytest.fixture(scope="module")
def reference_cfg():
    cfg = cmrcnn_ext.get_cfg()
    cfg.merge_from_file(cmrcnn_ext.model_zoo.get_config_file(hparams.REFERENCE_CONFIG))
    return cfg


def test_required_keys_documented_once():
    keys = [h.key for h in HPARAMS]
    assert len(keys) == len(set(keys)), "duplicate entries"
    assert set(REQUIRED) <= set(keys), set(REQUIRED) - set(keys)


def test_defaults_are_the_reference_config(reference_cfg):
    wrong = {
        h.key: (h.default, cfg_value(reference_cfg, h.key))
        for h in HPARAMS
        if plain_value(cfg_value(reference_cfg, h.key)) != plain_value(h.default)
    }
    assert not wrong, f"HParam.default != {hparams.REFERENCE_CONFIG}: {wrong}"


def test_detectron2_defaults_are_get_cfg():
    from detectron2.config import get_cfg

    d2 = get_cfg()
    for h in HPARAMS:
        if h.detectron2_default is None:  # cmrcnn_ext's own key: never a duplicate of Detectron2's
            assert h.key.startswith(OWN_PREFIXES), h.key
            with pytest.raises(KeyError):
                cfg_value(d2, h.key)
        else:
            assert not h.key.startswith(OWN_PREFIXES), h.key
            assert plain_value(cfg_value(d2, h.key)) == plain_value(h.detectron2_default), h.key


def test_detectron2_zoo_values_are_its_cascade_config():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    zoo = get_cfg()
    zoo.merge_from_file(model_zoo.get_config_file(hparams.DETECTRON2_ZOO_CONFIG))
    for h in HPARAMS:
        if h.detectron2_default is not None:
            assert plain_value(cfg_value(zoo, h.key)) == plain_value(h.detectron2_zoo), h.key


def test_defaults_are_allowed():
    bad = [h.key for h in HPARAMS if not h.allowed.contains(h.default)]
    assert not bad


def test_detectron2_column():
    col = {h.key: h.detectron2_column() for h in HPARAMS}
    assert col["MODEL.ROI_BOX_HEAD.NUM_CONV"] == "0"
    assert (
        col["MODEL.RPN.PRE_NMS_TOPK_TRAIN"].startswith("12000")
        and "2000" in col["MODEL.RPN.PRE_NMS_TOPK_TRAIN"]
    )
    assert col["MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"] == "0"
    assert col["MODEL.RPN.IOU_THRESHOLDS"] == col["MODEL.BACKBONE.FREEZE_AT"] == "same"
    assert col["MODEL.CMRCNN.MASK_STAGES"].startswith("n/a")


def test_markdown_cli_lists_every_key_with_default_and_allowed():
    r = subprocess.run(
        [sys.executable, "-m", "cmrcnn_ext.config.hparams", "--markdown"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == hparams.render_markdown()
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| key | default | allowed | Detectron2 default |")
    for h in HPARAMS:
        (row,) = [line for line in lines if line.startswith(f"| `{h.key}` |")]
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 5, row
        assert cells[1] == f"`{format_value(h.default)}`"
        assert cells[2].replace("\\*", "*") == str(h.allowed)
        assert cells[4].replace("\\*", "*").startswith(h.meaning)


def test_terminal_table_lists_every_key(capsys):
    assert hparams.main([]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("key ")
    for h in HPARAMS:
        assert f"\n{h.key} " in out


def test_update_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n{hparams.README_BEGIN}\nold\n{hparams.README_END}\nend\n")
    assert hparams.update_readme(str(readme))
    text = readme.read_text()
    assert text == (
        f"# x\n\nintro\n{hparams.README_BEGIN}\n{hparams.render_markdown()}"
        f"{hparams.README_END}\nend\n"
    )
    assert not hparams.update_readme(str(readme))  # idempotent
    assert hparams.main(["--update-readme", str(readme)]) == 0
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="HPARAMS:BEGIN"):
        hparams.update_readme(str(readme))


def test_readme_table_is_up_to_date():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = hparams.readme_section(f.read())
    assert section is not None, (
        f"README.md lacks the lines {hparams.README_BEGIN} and {hparams.README_END}; add them "
        f"and run `{hparams.UPDATE_COMMAND}`"
    )
    assert (
        section == hparams.render_markdown()
    ), f"README.md's hyperparameter table is out of date: run `{hparams.UPDATE_COMMAND}`"
