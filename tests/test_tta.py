"""Test-time augmentation (Detectron2's GeneralizedRCNNWithTTA) on cmrcnn_ext's cascade heads.

For every mask mode: TTA over several scales and flips runs and gives masks, and TTA with one
scale equal to the test size and no flip gives plain inference's detections and masks. Also
train_net.py with TEST.AUG.ENABLED, after training and with --eval-only.
"""

import os

import numpy as np
import pytest
import torch
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model

from conftest import DEMO_CONFIG, tiny_cfg

MODES = [("first", "last"), ("last", "last"), ("all", "last"), ("all", "mean")]
TEST_SIZE = 128  # tiny_cfg's INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST


def _model(mask_stages, merge, *opts):
    """The tiny demo model with seeded random weights, in eval mode, and a score threshold that
    keeps a moderate number of its detections.

    Detectron2 initialises the box classifiers with std 0.01, so every class scores ~1/6 and a
    fixed threshold keeps all or nothing; a wider seeded init spreads the scores. The threshold
    is then read off the model's own scores (:func:`_threshold`), so that it holds for whatever
    widths the demo config gives the features and the box head.
    """

    def build(score_thresh):
        cfg = tiny_cfg(
            "MODEL.CMRCNN.MASK_STAGES",
            mask_stages,
            "MODEL.CMRCNN.TEST_MASK_MERGE",
            merge,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            score_thresh,
            *opts,
        )
        torch.manual_seed(0)
        model = build_model(cfg)
        for predictor in model.roi_heads.box_predictor:
            torch.nn.init.normal_(predictor.cls_score.weight, std=0.1)
        return cfg, model.eval()

    cfg, model = build(0.0)
    return build(_threshold(model, cfg.TEST.DETECTIONS_PER_IMAGE))


def _threshold(model, max_detections):
    """A score threshold that keeps 3 to ``max_detections // 2`` detections of each test image:
    the midpoint of the widest gap between consecutive scores (over both images) that does so.

    The model runs at threshold 0. Detectron2 keeps a candidate when its score is above the
    threshold, before per-class NMS, which only suppresses boxes of higher score; so the
    detections above the threshold are the same whether it is applied before or after. A wide
    gap keeps score differences of float tolerance (TTA against plain inference) from moving a
    detection across it.
    """
    with torch.no_grad():
        scores = [model([item])[0]["instances"].scores for item in _inputs()]
    ranked = torch.cat(scores).sort(descending=True).values.tolist()
    best, widest = None, 0.0
    for above, below in zip(ranked[:-1], ranked[1:]):
        thresh = (above + below) / 2
        kept = [int((s > thresh).sum()) for s in scores]
        if all(3 <= k <= max_detections // 2 for k in kept) and above - below > widest:
            best, widest = thresh, above - below
    assert best is not None and widest > 1e-3, f"no clear score gap: {ranked}"
    return best


def _inputs():
    """Two test-loader inputs: a 128x128 image, and a 192x256 image that the test mapper has
    resized to 96x128 (``height`` / ``width`` are the original size, as in a data loader)."""
    items = []
    for seed, (h, w), (oh, ow) in ((0, (128, 128), (128, 128)), (1, (96, 128), (192, 256))):
        rng = np.random.default_rng(seed)
        img = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)  # background noise
        for _ in range(4):  # a few filled rectangles as "objects"
            y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
            dy, dx = rng.integers(10, h // 2), rng.integers(10, w // 2)
            img[y0 : y0 + dy, x0 : x0 + dx] = rng.integers(0, 255, 3)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        items.append({"image": image, "height": oh, "width": ow})
    return items


def _check_instances(inst, height, width, num_classes):
    assert inst.image_size == (height, width)
    assert inst.has("pred_masks") and inst.pred_masks.shape == (len(inst), height, width)
    assert inst.pred_masks.dtype == torch.bool
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < num_classes)).all()
    assert torch.isfinite(inst.pred_boxes.tensor).all() and torch.isfinite(inst.scores).all()


@pytest.mark.parametrize("mask_stages,merge", MODES)
def test_multi_scale_flip_tta_runs(mask_stages, merge):
    # Detectron2's default TEST.AUG (short sides 400-1200, flip) scaled down to the 128 px test
    # size: three scales (one below, one at, one above the test size) and flips.
    cfg, model = _model(
        mask_stages,
        merge,
        "TEST.AUG.MIN_SIZES",
        (96, 128, 160),
        "TEST.AUG.MAX_SIZE",
        213,
        "TEST.AUG.FLIP",
        True,
    )
    tta = GeneralizedRCNNWithTTA(cfg, model)
    with torch.no_grad():
        outputs = tta(_inputs())
    assert len(outputs) == 2
    for out, item in zip(outputs, _inputs()):
        inst = out["instances"]
        assert 0 < len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
        _check_instances(inst, item["height"], item["width"], cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        assert inst.pred_masks.flatten(1).any(1).float().mean() > 0.5  # most masks non-empty


def _match(plain, tta):
    """For each plain detection the TTA detection of the same class with the closest box and
    score; asserts that the matching is one to one."""
    order = []
    for i in range(len(plain)):
        same = (tta.pred_classes == plain.pred_classes[i]).nonzero().flatten()
        assert len(same), f"no TTA detection of class {int(plain.pred_classes[i])}"
        dist = (tta.pred_boxes.tensor[same] - plain.pred_boxes.tensor[i]).abs().sum(1)
        dist = dist + (tta.scores[same] - plain.scores[i]).abs()
        order.append(int(same[dist.argmin()]))
    assert sorted(order) == list(range(len(tta))), "plain and TTA detections do not pair up"
    return tta[torch.tensor(order, dtype=torch.long)]


@pytest.mark.parametrize("mask_stages,merge", MODES)
def test_single_scale_tta_equals_plain_inference(mask_stages, merge):
    cfg, model = _model(
        mask_stages,
        merge,
        "TEST.AUG.MIN_SIZES",
        (TEST_SIZE,),
        "TEST.AUG.MAX_SIZE",
        TEST_SIZE,
        "TEST.AUG.FLIP",
        False,
    )
    tta = GeneralizedRCNNWithTTA(cfg, model)
    for item in _inputs():
        with torch.no_grad():
            # one image per call: batching would pad the 96x128 image to 128x128, and the
            # GroupNorm statistics of the padded image differ from TTA's unpadded one
            plain = model([item])[0]["instances"]
            aug = tta([item])[0]["instances"]
        n = len(plain)
        assert 0 < n < cfg.TEST.DETECTIONS_PER_IMAGE, f"{n} detections: adjust the threshold"
        assert len(aug) == n
        _check_instances(aug, item["height"], item["width"], cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        aug = _match(plain, aug)
        assert torch.equal(aug.pred_classes, plain.pred_classes)
        torch.testing.assert_close(aug.scores, plain.scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            aug.pred_boxes.tensor, plain.pred_boxes.tensor, rtol=1e-4, atol=1e-3
        )
        assert plain.pred_masks.any(), "all masks empty: the comparison would say nothing"
        differ = (aug.pred_masks != plain.pred_masks).float().mean().item()
        assert differ < 1e-3, f"{differ:.2%} of mask pixels differ"


def test_train_net_runs_tta_after_training_and_with_eval_only(tmp_path, monkeypatch):
    """train_net.py with TEST.AUG.ENABLED: TTA after the last iteration, and in --eval-only
    its ``*_TTA`` results next to the plain ones; files in OUTPUT_DIR/inference_TTA/."""
    from coco_helpers import _quirky
    from test_train_cli import SMALL, load_train_net

    monkeypatch.setenv("CMRCNN_EXT_CACHE_DIR", str(tmp_path / "clean_cache"))
    json_file, root, _ = _quirky(tmp_path)
    out = tmp_path / "out"
    train_net = load_train_net()
    argv = [
        "--config-file",
        DEMO_CONFIG,
        "--train-json",
        json_file,
        "--train-images",
        root,
        "--val-json",
        json_file,
        "--val-images",
        root,
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "0",
        "OUTPUT_DIR",
        str(out),
        *[str(x) for x in SMALL],
        # fast: one float32 iteration (training is not what is tested), 10 detections per image
        "SOLVER.MAX_ITER",
        "1",
        "SOLVER.AMP.ENABLED",
        "False",
        "TEST.DETECTIONS_PER_IMAGE",
        "10",
        "TEST.AUG.ENABLED",
        "True",
        "TEST.AUG.MIN_SIZES",
        "(64,)",
        "TEST.AUG.MAX_SIZE",
        "100",
    ]
    train_net.main(train_net.get_parser().parse_args(argv))
    tta_dir = out / "inference_TTA" / "user_val"
    assert os.path.isfile(tta_dir / "instances_predictions.pth")  # written by the TTA hook
    os.remove(tta_dir / "instances_predictions.pth")

    args = train_net.get_parser().parse_args(
        ["--eval-only"] + argv + ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    )
    results = train_net.main(args)
    assert set(results) == {"bbox", "segm", "timing", "bbox_TTA", "segm_TTA", "timing_TTA"}
    assert all(np.isfinite(results[k]["AP"]) for k in results if "timing" not in k)
    assert os.path.isfile(tta_dir / "instances_predictions.pth")
