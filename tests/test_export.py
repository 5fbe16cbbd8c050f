"""Exported (traced TorchScript / ONNX) models give the eager model's predictions.

Random-weight tiny models (tests/conftest.py ``tiny_cfg``, seeded), traced on one image size and
run on others, compared with Detectron2's own inference path (``GeneralizedRCNN.inference`` +
``detector_postprocess``, or its raw mask probabilities pasted with ``_do_paste_mask``).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.modeling import build_model

from cmrcnn_ext.apps.export import main
from cmrcnn_ext.export import (
    ExportableCascadeMaskRCNN,
    compare_outputs,
    export_torchscript,
    load_metadata,
    trace,
)

from conftest import DEMO_CONFIG, ROOT, tiny_cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread here (the cores are shared), the suite's setting restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: (H, W) of the test images; the model is traced at 128 x 128.
SIZES = [(96, 128), (128, 128), (160, 112)]
NMS_OPTS = [
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    10,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST",
    0.3,
    "TEST.DETECTIONS_PER_IMAGE",
    100,
]
MODES = {
    "first": ["MODEL.CMRCNN.MASK_STAGES", "first"],
    "last": ["MODEL.CMRCNN.MASK_STAGES", "last"],
    "all+last": ["MODEL.CMRCNN.MASK_STAGES", "all", "MODEL.CMRCNN.TEST_MASK_MERGE", "last"],
    "all+mean": ["MODEL.CMRCNN.MASK_STAGES", "all", "MODEL.CMRCNN.TEST_MASK_MERGE", "mean"],
}


def build(mode, fast_roi_align=True, *opts):
    """Seeded random-weight tiny model. SCORE_THRESH_TEST 0, 10 proposals (x 5 classes), a
    low NMS threshold and room for all detections: NMS decides how many there are (35-50),
    which differs between images."""
    torch.manual_seed(0)
    cfg = tiny_cfg(
        *MODES[mode],
        "MODEL.CMRCNN.FAST_ROI_ALIGN",
        fast_roi_align,
        *NMS_OPTS,
        *opts,
    )
    return build_model(cfg).eval()


def images(seed=1, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 255 for h, w in sizes]


@torch.no_grad()
def reference(model, img, mask_format):
    """Detectron2's eager predictions for one (3, H, W) image at its own size."""
    h, w = img.shape[-2:]
    if mask_format == "bool":
        inst = model.inference([{"image": img, "height": h, "width": w}])[0]["instances"]
        return inst.pred_boxes.tensor, inst.scores, inst.pred_classes, inst.pred_masks
    raw = model.inference([{"image": img}], do_postprocess=False)[0]
    raw = raw[raw.pred_boxes.nonempty()]  # what detector_postprocess drops
    probs, _ = _do_paste_mask(raw.pred_masks, raw.pred_boxes.tensor, h, w, skip_empty=False)
    return raw.pred_boxes.tensor, raw.scores, raw.pred_classes, probs


def assert_same(ref, out, what):
    res = compare_outputs(ref, out)
    assert res["ok"], f"{what}: {res}"
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[2].dtype == torch.int64
    return res


@pytest.mark.parametrize(
    "mode,fast,mask_format",
    [
        ("first", True, "probs"),
        ("last", True, "probs"),
        ("all+last", True, "probs"),
        ("all+mean", True, "probs"),
        ("all+mean", False, "bool"),
    ],
)
def test_traced_matches_eager(mode, fast, mask_format):
    model = build(mode, fast)
    wrapper = ExportableCascadeMaskRCNN(model, mask_format)
    traced = trace(wrapper, images(seed=0, sizes=[(128, 128)])[0])
    counts = []
    for img in images():
        ref = reference(model, img, mask_format)
        out = traced(img)
        assert_same(ref, out, f"{mode} traced at {tuple(img.shape)}")
        assert out[3].shape == (len(out[0]),) + tuple(img.shape[-2:])
        assert out[3].dtype == (torch.bool if mask_format == "bool" else torch.float32)
        counts.append(len(out[0]))
    assert len(set(counts)) > 1, f"every image gave {counts[0]} detections: not a test of sizes"
    # the un-traced wrapper is Detectron2's inference, computed the same way
    with torch.no_grad():
        res = compare_outputs(reference(model, img, mask_format), wrapper(img))
    assert res["ok"] and res["boxes"] == 0.0 and res["scores"] == 0.0, res


def test_uint8_input_and_no_detections():
    model = build("first", True, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 1.0)  # scores are <= 1
    traced = trace(ExportableCascadeMaskRCNN(model, "bool"), images(seed=0, sizes=[(128, 128)])[0])
    for img in images(sizes=[(96, 128), (64, 200)]):
        boxes, scores, classes, masks = traced(img.to(torch.uint8))
        assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)
        assert masks.shape == (0,) + tuple(img.shape[-2:])
    model = build("last", True)
    traced = trace(ExportableCascadeMaskRCNN(model, "bool"), images(seed=0, sizes=[(128, 128)])[0])
    img = images(sizes=[(96, 128)])[0].round()
    assert_same(reference(model, img, "bool"), traced(img.to(torch.uint8)), "uint8 input")


@pytest.mark.one_leg
def test_loads_without_detectron2_or_cmrcnn_ext(tmp_path):
    model = build("all+mean", True)
    wrapper = ExportableCascadeMaskRCNN(model, "probs")
    path = str(tmp_path / "model.ts")
    export_torchscript(
        wrapper, images(seed=0, sizes=[(128, 128)])[0], path, {"input_format": "RGB"}
    )
    assert load_metadata(path) == {"input_format": "RGB"}
    imgs = images(sizes=[(75, 101), (160, 112)])
    with torch.no_grad():
        eager = [reference(model, img, "probs") for img in imgs]
        traced = [torch.jit.load(path)(img) for img in imgs]
    torch.save({"images": imgs, "eager": eager, "traced": traced}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["detectron2"] = None   # any import of them now fails
        sys.modules["cmrcnn_ext"] = None
        import torch, torchvision
        torch.set_num_threads(1)
        m = torch.jit.load("model.ts")
        exp = torch.load("expected.pt")
        for img, eager, traced in zip(exp["images"], exp["eager"], exp["traced"]):
            out = m(img)
            assert len(out) == 4 and len(out[0]) == len(eager[0]), (len(out[0]), len(eager[0]))
            assert all(torch.equal(a, b) for a, b in zip(out, traced))
            assert torch.equal(out[2], eager[2])
            for a, b in zip(out[:2] + out[3:], eager[:2] + eager[3:]):
                assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()
        assert sys.modules["detectron2"] is None and sys.modules["cmrcnn_ext"] is None
        print("OK", [len(o[0]) for o in exp["eager"]])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from exported import benchmark_exported  # the benchmarks' timer takes the .ts file too

    assert benchmark_exported(path, imgs[:1], warmup=1, iters=2) > 0


def _checkpoint(tmp_path, mode):
    model = build(mode, True)
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": model.state_dict()}, path)
    return model, path


CLI_OPTS = [
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "160",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
    "DATASETS.TRAIN",
    "()",
    "DATASETS.TEST",
    "()",
] + [str(v) for v in NMS_OPTS]


def test_cli_torchscript_with_sample_image(tmp_path):
    import numpy as np
    from PIL import Image

    model, ckpt = _checkpoint(tmp_path, "all+mean")
    sample = tmp_path / "sample.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.uniform(0, 255, (90, 120, 3)).astype("uint8")).save(sample)
    out = str(tmp_path / "exported" / "model.ts")
    opts = ["MODEL.CMRCNN.MASK_STAGES", "all", "MODEL.CMRCNN.TEST_MASK_MERGE", "mean"]
    main(
        [
            "--config-file",
            DEMO_CONFIG,
            "--weights",
            ckpt,
            "--output",
            out,
            "--sample-image",
            str(sample),
        ]
        + CLI_OPTS
        + opts
    )
    meta = load_metadata(out)
    assert meta["input_format"] == "RGB" and meta["mask_format"] == "bool"
    assert meta["min_size_test"] == 128 and meta["test_mask_merge"] == "mean"
    exported = torch.jit.load(out)
    for img in images(sizes=[(96, 128), (160, 112)]):
        assert_same(reference(model, img, "bool"), exported(img), "CLI export")


def test_cli_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, ckpt = _checkpoint(tmp_path, "first")
    out = str(tmp_path / "model.onnx")
    main(
        [
            "--config-file",
            DEMO_CONFIG,
            "--weights",
            ckpt,
            "--output",
            out,
            "--format",
            "onnx",
            "--mask-format",
            "probs",
        ]
        + CLI_OPTS
    )
    assert load_metadata(out)["mask_format"] == "probs"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(out, options, providers=["CPUExecutionProvider"])
    counts = []
    for img in images():
        out_ort = tuple(torch.from_numpy(o) for o in session.run(None, {"image": img.numpy()}))
        assert_same(reference(model, img, "probs"), out_ort, f"ONNX at {tuple(img.shape)}")
        counts.append(len(out_ort[0]))
    assert len(set(counts)) > 1


# ------------------------------------------------------------ Detectron2's own TracingAdapter


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("mode", list(MODES))
def test_detectron2_tracing_adapter_with_and_without_detections(mode):
    """Detectron2's ``TracingAdapter`` (Detectron2 main; v0.6's ``detectron2.export`` does not
    import) traces the model with PREFIX_NMS on (the default): traced on an image with
    detections it runs on one without, and the reverse, giving the eager outputs."""
    try:
        from detectron2.export import TracingAdapter
    except ImportError as e:
        pytest.skip(f"the installed Detectron2 has no TracingAdapter ({e})")
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*MODES[mode], "MODEL.CMRCNN.PREFIX_NMS", True)).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g) * 255, torch.full((3, 128, 128), 128.0)]

    def eager(img):
        with torch.no_grad():
            return model([{"image": img}])[0]["instances"]

    # a score threshold between the two images' best scores: one image has detections, the
    # other none
    best = [float(eager(img).scores.max()) for img in images]
    assert best[0] != best[1]
    for predictor in model.roi_heads.box_predictor:
        predictor.test_score_thresh = sum(best) / 2
    expected = [eager(img) for img in images]
    assert sorted(len(e) for e in expected)[0] == 0 < sorted(len(e) for e in expected)[1]

    for traced_on in images:
        adapter = TracingAdapter(model, [{"image": traced_on}])
        with torch.no_grad():
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        for img, want in zip(images, expected):
            with torch.no_grad():
                got = adapter.outputs_schema(traced(img))[0]["instances"]
            assert len(got) == len(want)
            if len(want):
                torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor)
                torch.testing.assert_close(got.scores, want.scores)
                assert torch.equal(got.pred_classes, want.pred_classes)
                assert torch.equal(got.pred_masks, want.pred_masks)
