"""Each Detectron2 v0.6 fix of tools/install_detectron2.py and cmrcnn_ext.compat, tested.

These tests exercise the installed detectron2 (a user's script imports it without cmrcnn_ext),
so each fails if the corresponding install-time patch is missing.
"""

import importlib.util
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

spec = importlib.util.spec_from_file_location(
    "install_detectron2", os.path.join(ROOT, "tools", "install_detectron2.py")
)
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)


def run_python(code):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_detectron2_imports_on_its_own():
    """Missing _C (module-level imports in layers/evaluation) and Image.LINEAR broke imports."""
    r = run_python(
        "import detectron2.modeling, detectron2.evaluation, detectron2.data, detectron2.engine;"
        "import detectron2.data.transforms; print('ok')"
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_collect_env_works():
    """default_setup() calls collect_env_info(), which asks _C for compiler versions."""
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert "detectron2" in info and "PyTorch" in info


def test_extent_transform_default_interp_is_bilinear():
    from detectron2.data.transforms import ExtentTransform

    default = inspect.signature(ExtentTransform.__init__).parameters["interp"].default
    assert default == Image.BILINEAR
    img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    out = ExtentTransform((0, 0, 30, 20), (10, 15)).apply_image(img)
    assert out.shape == (10, 15, 3)


def test_empty_polygons_on_numpy2():
    """structures/masks.py used np.bool, removed in numpy 1.24."""
    from detectron2.structures.masks import PolygonMasks, polygons_to_bitmask

    m = polygons_to_bitmask([], 4, 5)
    assert m.shape == (4, 5) and m.dtype == bool and not m.any()
    tri = [np.array([0.0, 0.0, 4.0, 0.0, 0.0, 4.0])]
    assert polygons_to_bitmask(tri, 8, 8).sum() > 0
    keep = PolygonMasks([tri, []]).nonempty()
    assert keep.tolist() == [True, False]


def test_map_dataset_skips_a_bad_sample():
    """v0.6 MapDataset retried with random.sample(set), a TypeError on Python 3.11."""
    from detectron2.data.common import MapDataset

    ds = MapDataset(list(range(10)), lambda x: None if x == 3 else x * 10)
    out = ds[3]
    assert out in {x * 10 for x in range(10) if x != 3}
    assert [ds[i] for i in (0, 9)] == [0, 90]


def test_model_zoo_configs_installed():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml")
    assert os.path.isfile(path)


def test_placeholder_C_fails_clearly():
    from detectron2 import _C

    from cmrcnn_ext import compat

    if compat.has_compiled_ops():
        pytest.skip("official detectron2 with compiled ops is installed")
    assert _C.get_compiler_version().startswith("none")
    with pytest.raises(AttributeError, match="without its C\\+\\+ extension"):
        _ = _C.box_iou_rotated


def test_apply_patches_applies_once_and_leaves_fixed_code_alone(tmp_path):
    rel = "detectron2/data/transforms/transform.py"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text("def f(interp=Image.LINEAR):\n    pass\n")
    patches = [p for p in installer.PATCHES if p[0] == rel]
    report = installer.apply_patches(str(tmp_path), patches, log=lambda *_: None)
    assert report[0].startswith("patched")
    assert "Image.BILINEAR" in (tmp_path / rel).read_text()
    again = installer.apply_patches(str(tmp_path), patches, log=lambda *_: None)
    assert again[0].startswith("unchanged")


def test_installer_reports_usable_state():
    state, detail = installer.installed_state()
    assert state in ("official", "patched"), detail
