"""The stage report: per-stage outputs in code, AP by IoU threshold, IoU shift, proposal recall,
and ``python -m cmrcnn_ext.analyze`` against ``train_net.py --eval-only`` and pycocotools."""

import contextlib
import copy
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances
from torch import nn

from cmrcnn_ext.errors import UserError
from cmrcnn_ext.evaluation.stage_metrics import (
    ap_summary,
    coco_eval,
    greedy_cover,
    load_coco_gt,
    recall_summary,
)
from cmrcnn_ext.modeling import record_stage_outputs
from cmrcnn_ext.modeling.stage_outputs import StageRecorder, cascade_heads_of

from conftest import ROOT, make_batch, tiny_cfg
from reliability_helpers import make_data, train_argv

MODES = [("first", "last"), ("last", "last"), ("all", "last"), ("all", "mean")]


def build(stages, merge, seed=3):
    cfg = tiny_cfg("MODEL.CMRCNN.MASK_STAGES", stages, "MODEL.CMRCNN.TEST_MASK_MERGE", merge)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if stages == "all":  # clearly different heads, so that a mix-up would show
        for i, head in enumerate(model.roi_heads.mask_head):
            nn.init.normal_(head.predictor.weight, std=0.05 * (i + 1))
            nn.init.constant_(head.predictor.bias, 0.3 * (i - 1))
    return model


def roi_forward(model, batch):
    """The ROI heads' test-time output before ``detector_postprocess`` (mask probabilities)."""
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    instances, _ = model.roi_heads(images, features, proposals, None)
    return instances


@pytest.mark.parametrize("stages,merge", MODES)
def test_recorded_stages_reproduce_the_cascade_and_change_nothing(stages, merge, monkeypatch):
    model = build(stages, merge)
    batch = make_batch(num_images=2, seed=5, with_gt=False)
    calls = []
    original = StageRecorder.add_stage

    def counting(self, *args):
        calls.append(args[1])
        return original(self, *args)

    monkeypatch.setattr(StageRecorder, "add_stage", counting)
    with torch.no_grad():
        plain = roi_forward(model, copy.deepcopy(batch))
    assert calls == [] and model.roi_heads._stage_recorder is None  # off: nothing runs
    with torch.no_grad(), record_stage_outputs(model) as rec:
        recorded = roi_forward(model, copy.deepcopy(batch))
    assert calls == [0, 1, 2] and model.roi_heads._stage_recorder is None
    roi = model.roi_heads
    predictor = roi.box_predictor[-1]
    for a, b, image in zip(plain, recorded, rec.images):
        assert len(a) > 0
        for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
            x, y = a.get(field), b.get(field)
            x, y = (x.tensor, y.tensor) if isinstance(x, Boxes) else (x, y)
            assert torch.equal(x, y), field  # the recorder changes no output
        # Detectron2's cascade output, rebuilt from the recorded stages: the last stage's
        # boxes scored by the mean of the three classifiers
        mean = sum(list(image.stage_probs)) * (1.0 / 3)
        ref, _ = fast_rcnn_inference(
            [image.stage_boxes[-1]],
            [mean],
            [image.image_size],
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        assert torch.equal(ref[0].pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(ref[0].scores, b.scores)
        # stage k's input is stage k-1's output clipped to the image
        for k in (1, 2):
            prev = Boxes(image.stage_boxes[k - 1].clone())
            prev.clip(image.image_size)
            assert torch.equal(image.stage_inputs[k], prev.tensor)
        assert torch.equal(image.stage_inputs[0], image.proposals)
        # each mask head's probabilities on the final boxes; the output is the last or the mean
        assert sorted(image.mask_probs) == roi.mask_train_stages()
        heads = [image.mask_probs[s] for s in roi.mask_train_stages()]
        expect = heads[-1] if merge == "last" else sum(heads) / len(heads)
        torch.testing.assert_close(expect, b.pred_masks, rtol=0, atol=1e-6)
    if stages == "all":  # the heads differ, so the per-head rows are not copies
        assert not torch.allclose(rec.images[0].mask_probs[0], rec.images[0].mask_probs[2])


def test_models_without_the_cascade_heads_are_refused_clearly():
    model = build_model(tiny_cfg("MODEL.ROI_HEADS.NAME", "StandardROIHeads"))
    with pytest.raises(UserError, match="MODEL.ROI_HEADS.NAME CascadeMaskROIHeads"):
        cascade_heads_of(model)


def _hand_case(tmp_path):
    """Two 10 x 10 ground-truth boxes; a detection at IoU 0.78 with the first (higher score) and
    one at IoU 1 with the second."""
    gt = {
        "images": [{"id": 1, "width": 40, "height": 40, "file_name": "a.png"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "bbox": [0, 0, 10, 10],
                "area": 100,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 3,
                "bbox": [20, 20, 10, 10],
                "area": 100,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 3, "name": "thing"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    results = [
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 7.8], "score": 0.9},  # IoU 0.78
        {"image_id": 1, "category_id": 3, "bbox": [20, 20, 10, 10], "score": 0.8},  # IoU 1
    ]
    return str(path), results


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_ap_by_iou_threshold_is_hand_computed_and_pycocotools_summary(tmp_path, backend):
    path, results = _hand_case(tmp_path)
    row = ap_summary(coco_eval(load_coco_gt(path, backend), results, "bbox", backend))
    # up to IoU 0.75 both detections match (precision 1 at recall 1: AP 100); from 0.80 only
    # the second, which has the lower score: precision 1/2 at recall 1/2 -> 101-point AP
    # = mean over recall points r of the best precision at recall >= r = (51 * 0.5) / 101
    half = 51 * 0.5 / 101 * 100
    expect = {f"{0.5 + 0.05 * i:.2f}": (100.0 if i <= 5 else half) for i in range(10)}
    for t, v in expect.items():
        assert row["AP@IoU"][t] == pytest.approx(v, abs=1e-9), t
    assert row["AP50"] == row["AP@IoU"]["0.50"] and row["AP75"] == row["AP@IoU"]["0.75"]
    assert row["AP"] == pytest.approx(np.mean(list(expect.values())), abs=1e-9)


def test_proposal_recall_equals_detectron2_proposal_evaluation():
    from detectron2.evaluation.coco_evaluation import _evaluate_box_proposals

    rng = np.random.default_rng(0)
    anns, predictions, covers = [], [], []
    for image_id in range(1, 6):
        n_gt = int(rng.integers(1, 6))
        xy = rng.uniform(0, 80, (n_gt, 2))
        wh = rng.uniform(5, 40, (n_gt, 2))
        gt = np.concatenate([xy, xy + wh], 1).astype("float32")
        for b in gt:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                    "area": float((b[2] - b[0]) * (b[3] - b[1])),
                }
            )
        jitter = rng.normal(0, 4, (60, 4)).astype("float32")
        props = torch.from_numpy(np.resize(gt, (60, 4)) + jitter)  # each gt, repeated
        props[:, 2:] = torch.maximum(props[:, 2:], props[:, :2] + 1)
        logits = torch.from_numpy(rng.normal(size=60).astype("float32"))
        inst = Instances((120, 120), proposal_boxes=Boxes(props), objectness_logits=logits)
        predictions.append({"image_id": image_id, "proposals": inst})
        order = logits.argsort(descending=True)
        covers.append((props[order], torch.tensor([a["bbox"] for a in anns[-n_gt:]])))
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in range(1, 6)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "x"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    for limit in (5, 20, 60):
        ref = _evaluate_box_proposals(predictions, coco, limit=limit)
        got = recall_summary(
            np.concatenate(
                [
                    greedy_cover(p[:limit], torch.cat([g[:, :2], g[:, :2] + g[:, 2:]], 1))
                    for p, g in covers
                ]
            )
        )
        assert got["AR"] == pytest.approx(float(ref["ar"]) * 100, abs=1e-4)
        assert got["R@0.5"] == pytest.approx(float(ref["recalls"][0]) * 100, abs=1e-4)
        assert got["R@0.7"] == pytest.approx(float(ref["recalls"][4]) * 100, abs=1e-4)
        assert got["R@0.5"] > got["R@0.7"] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model with a mask head per stage, trained a few iterations on 64 px shapes."""
    root = tmp_path_factory.mktemp("stage_report")
    data = make_data(root / "data", num_train=6, num_val=3)
    out = root / "train"
    opts = ["SOLVER.MAX_ITER", 15, "SOLVER.AMP.ENABLED", False, "MODEL.CMRCNN.MASK_STAGES", "all"]
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_net.py")] + train_argv(data, out, opts),
        check=True,
        cwd=root,
        capture_output=True,
    )
    return root, data, out


def _eval_opts(merge):
    return [
        "MODEL.CMRCNN.MASK_STAGES",
        "all",
        "MODEL.CMRCNN.TEST_MASK_MERGE",
        merge,
        "TEST.CMRCNN.EVALUATOR",
        "pycocotools",
    ]


def test_analyze_final_rows_equal_eval_only_and_rows_equal_pycocotools(trained):
    root, data, out = trained
    argv = train_argv(data, root / "eval", _eval_opts("mean"), extra_args=["--eval-only"])
    argv += ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_net.py")] + argv,
        check=True,
        cwd=root,
        capture_output=True,
    )
    eval_only = json.loads((root / "eval" / "results.json").read_text())["results"]
    report_dir = root / "report"
    cmd = [sys.executable, "-m", "cmrcnn_ext.analyze", "--run", str(out), "--output"]
    cmd += [str(report_dir), "--val-json", str(data / "val.json"), "--val-images"]
    cmd += [str(data / "val")] + _eval_opts("mean")
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((report_dir / "stage_report.json").read_text())
    for files in ("ap_vs_iou.png", "iou_shift.png", "summary.md"):
        assert (report_dir / files).stat().st_size > 0
    # the final rows are eval-only's numbers, to the last digit
    for key, task in (("box", "bbox"), ("mask", "segm")):
        for metric in ("AP", "AP50", "AP75", "APs"):
            assert report[key]["final"][metric] == eval_only[task][metric], (task, metric)
    # the mean classifier of all stages is the cascade's own output
    assert report["box"]["stages 1-3 mean"] == report["box"]["final"]
    # any row: pycocotools on the row's written results file gives the row's numbers
    gt = load_coco_gt(str(data / "val.json"), "pycocotools")
    for name, iou_type, key, row in (
        ("bbox_stage_1.json", "bbox", "box", "stage 1"),
        ("bbox_stage_2.json", "bbox", "box", "stage 2"),
        ("segm_mask_head_2.json", "segm", "mask", "mask head 2"),
    ):
        results = json.loads((report_dir / "stage_results" / name).read_text())
        assert results, name
        with contextlib.redirect_stdout(io.StringIO()):
            from pycocotools.cocoeval import COCOeval

            if iou_type == "segm":
                results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert report[key][row]["AP"] == float(ev.stats[0] * 100), row
        assert report[key][row]["AP75"] == float(ev.stats[2] * 100), row
    assert list(report["mask"]) == [
        "mask head 1",
        "mask head 2",
        "mask head 3",
        "mask heads mean",
        "final",
    ]
    assert len(report["iou_shift"]) == 3 and report["num_images"] == 3
    assert report["iou_shift"][0]["input_boxes"] == 3 * 32  # POST_NMS_TOPK_TEST per image


@pytest.mark.one_leg
def test_analyze_under_ddp_gathers_like_one_process(trained):
    root, data, out = trained

    def run(n, folder):
        cmd = [sys.executable, "-m", "cmrcnn_ext.analyze", "--run", str(out), "--num-gpus"]
        cmd += [str(n), "--output", str(root / folder), "--val-json", str(data / "val.json")]
        cmd += ["--val-images", str(data / "val"), "MODEL.CMRCNN.TEST_MASK_MERGE", "last"]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((root / folder / "stage_report.json").read_text())

    one, two = run(1, "one"), run(2, "two")
    assert two["num_images"] == one["num_images"] == 3
    for key in ("box", "mask", "proposals", "iou_shift"):
        assert two[key] == one[key], key


def test_analyze_in_code_on_a_data_set_registered_by_detectron2(trained):
    """A data set registered with Detectron2's own ``register_coco_instances`` gets its category
    id mapping only when first loaded; the stage rows must still use the file's ids (the final
    row is checked against the COCO evaluator inside ``analyze``)."""
    from detectron2.data.datasets import register_coco_instances

    from cmrcnn_ext.config import setup_cfg
    from cmrcnn_ext.engine import Trainer
    from cmrcnn_ext.engine.checkpoint import CMRCNNCheckpointer
    from cmrcnn_ext.evaluation.stage_analysis import analyze

    root, data, out = trained
    register_coco_instances("stage_report_d2_val", {}, str(data / "val.json"), str(data / "val"))
    cfg = setup_cfg(
        str(out / "config.yaml"),
        [
            x
            for k in ("TRAIN_JSON", "TRAIN_IMAGE_ROOT", "VAL_JSON", "VAL_IMAGE_ROOT")
            for x in (f"DATASETS.CMRCNN.{k}", "")
        ]
        + [
            "DATASETS.TRAIN",
            "('stage_report_d2_val',)",
            "DATASETS.TEST",
            "('stage_report_d2_val',)",
        ]
        + ["OUTPUT_DIR", str(root / "in_code")],
    )
    model = Trainer.build_model(cfg)
    CMRCNNCheckpointer(model, for_inference=True).load(str(out / "model_final.pth"))
    report = analyze(cfg, model)["stage_report_d2_val"]
    assert report["box"]["final"]["AP"] == report["coco"]["bbox"]["AP"]
    same = json.dumps(report["box"]["stages 1-3 mean"]) == json.dumps(report["box"]["final"])
    assert same  # (json: NaN == NaN)
    # the rows' results carry the file's category ids (1..5), not Detectron2's 0..4
    written = json.loads((root / "in_code" / "stage_results" / "bbox_stage_1.json").read_text())
    assert written and {r["category_id"] for r in written} <= {1, 2, 3, 4, 5}
    assert 5 in {r["category_id"] for r in written}
