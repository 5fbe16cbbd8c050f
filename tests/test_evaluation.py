"""FastCOCOEvaluator (faster-coco-eval) == Detectron2's COCOEvaluator with pycocotools.

The ground truth and predictions are synthetic (synthetic_results): RLE and
polygon masks, iscrowd regions, images without annotations, non-contiguous category ids,
duplicates, false positives and score ties. benchmarks/bench_eval.py shows the same on 500+
images with timings.
"""

import contextlib
import copy
import io
import json
import os

import numpy as np
import pytest
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco_evaluation

import cmrcnn_ext
from cmrcnn_ext.engine.trainer import Trainer
from cmrcnn_ext.evaluation.coco import FastCOCOEvaluator, build_coco_evaluator

from synthetic_results import (
    CATEGORIES,
    iter_model_outputs,
    make_coco_eval_set,
    register_eval_set,
)

TASKS = ("bbox", "segm")


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """500 images: the ground-truth JSON and the model outputs, processed once."""
    tmp = tmp_path_factory.mktemp("eval_set")
    gt, dets = make_coco_eval_set(500, seed=0)
    json_file = str(tmp / "gt.json")
    with open(json_file, "w") as f:
        json.dump(gt, f)
    register_eval_set("cmrcnn_test_eval_set", json_file)
    ev = COCOEvaluator("cmrcnn_test_eval_set", tasks=TASKS, distributed=False, use_fast_impl=False)
    ev.reset()
    for inputs, outputs in iter_model_outputs(dets):
        ev.process(inputs, outputs)
    # Both evaluators receive exactly these (Detectron2's process() output).
    return {"gt": gt, "name": "cmrcnn_test_eval_set", "predictions": ev._predictions, "tmp": tmp}


def _run(evaluator, predictions):
    evaluator.reset()
    evaluator._predictions = copy.deepcopy(predictions)  # Detectron2 modifies them in place
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its summary
        return evaluator.evaluate()


def _run_pycocotools(monkeypatch, evaluator, predictions):
    """Detectron2's evaluation, also returning the 12 COCOeval stats of each task."""
    stats = {}
    original = d2_coco_evaluation._evaluate_predictions_on_coco

    def recording(coco_gt, coco_results, iou_type, **kwargs):
        coco_eval = original(coco_gt, coco_results, iou_type, **kwargs)
        stats[iou_type] = [float(s) for s in coco_eval.stats]
        return coco_eval

    monkeypatch.setattr(d2_coco_evaluation, "_evaluate_predictions_on_coco", recording)
    results = _run(evaluator, predictions)
    monkeypatch.undo()
    return results, stats


def _assert_same(ref_results, ref_stats, ours, our_results):
    for task in TASKS:
        assert len(ref_stats[task]) == len(ours.coco_stats[task]) == 12
        np.testing.assert_allclose(
            ours.coco_stats[task], ref_stats[task], rtol=0, atol=5e-5, err_msg=task
        )
        assert set(our_results[task]) == set(ref_results[task])
        for key, ref in ref_results[task].items():  # AP, AP50, ..., AP-<class>, in percent
            assert our_results[task][key] == pytest.approx(ref, abs=5e-3, nan_ok=True), (task, key)


def test_same_stats_and_per_category_ap_as_pycocotools(eval_set, monkeypatch, tmp_path):
    gt = eval_set["gt"]
    # The set exercises what differs between evaluators: crowd, polygons, empty images, ties.
    anns = gt["annotations"]
    assert sum(a["iscrowd"] for a in anns) >= 5
    assert sum(isinstance(a["segmentation"], list) for a in anns) >= 20
    assert len({a["image_id"] for a in anns}) < len(gt["images"])
    scores = [r["score"] for p in eval_set["predictions"] for r in p["instances"]]
    assert len(scores) - len(set(scores)) >= 20

    ref = COCOEvaluator(
        eval_set["name"],
        tasks=TASKS,
        distributed=False,
        output_dir=str(tmp_path / "ref"),
        use_fast_impl=False,
    )
    ours = FastCOCOEvaluator(
        eval_set["name"], tasks=TASKS, distributed=False, output_dir=str(tmp_path / "ours")
    )
    ref_results, ref_stats = _run_pycocotools(monkeypatch, ref, eval_set["predictions"])
    our_results = _run(ours, eval_set["predictions"])
    _assert_same(ref_results, ref_stats, ours, our_results)
    assert {f"AP-{name}" for _, name in CATEGORIES} <= set(our_results["segm"])
    assert 5 < our_results["segm"]["AP"] < 95 and 5 < our_results["bbox"]["AP"] < 95
    # Same results file (category ids mapped back to the dataset's).
    with (
        open(tmp_path / "ref" / "coco_instances_results.json") as a,
        open(tmp_path / "ours" / "coco_instances_results.json") as b,
    ):
        assert json.load(a) == json.load(b)
    # evaluate() leaves the stored predictions as they are: a second call gives the same.
    assert ours.evaluate() == our_results


def test_same_with_max_dets_and_img_ids(eval_set, monkeypatch):
    """max_dets_per_image != 100 (Detectron2's COCOevalMaxDets) and a subset of images."""
    ref = COCOEvaluator(
        eval_set["name"], tasks=TASKS, distributed=False, use_fast_impl=False, max_dets_per_image=5
    )
    ours = FastCOCOEvaluator(eval_set["name"], tasks=TASKS, distributed=False, max_dets_per_image=5)
    img_ids = [img["id"] for img in eval_set["gt"]["images"][::3]]
    stats = {}
    original = d2_coco_evaluation._evaluate_predictions_on_coco

    def recording(coco_gt, coco_results, iou_type, **kwargs):
        coco_eval = original(coco_gt, coco_results, iou_type, **kwargs)
        stats[iou_type] = [float(s) for s in coco_eval.stats]
        return coco_eval

    monkeypatch.setattr(d2_coco_evaluation, "_evaluate_predictions_on_coco", recording)
    results = []
    for ev in (ref, ours):
        ev.reset()
        ev._predictions = copy.deepcopy(eval_set["predictions"])
        with contextlib.redirect_stdout(io.StringIO()):
            results.append(ev.evaluate(img_ids=img_ids))
    monkeypatch.undo()
    _assert_same(results[0], stats, ours, results[1])


def test_no_predictions_gives_nan_like_detectron2(eval_set):
    ours = FastCOCOEvaluator(eval_set["name"], tasks=TASKS, distributed=False)
    preds = [{"image_id": p["image_id"], "instances": []} for p in eval_set["predictions"]]
    results = _run(ours, preds)
    assert set(results) == set(TASKS)
    assert all(np.isnan(v) for v in results["bbox"].values())


def test_build_coco_evaluator_switch(eval_set, tmp_path):
    cfg = cmrcnn_ext.get_cfg()
    assert cfg.TEST.CMRCNN.EVALUATOR == "faster"
    cfg.MODEL.MASK_ON = True
    name = eval_set["name"]
    ev = Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path))
    assert isinstance(ev, FastCOCOEvaluator)
    assert ev._tasks == ("bbox", "segm") and ev._distributed
    # as in Trainer.test: distributed=True in a single process
    results = _run(ev, eval_set["predictions"][:20])
    assert set(results) == {"bbox", "segm"} and np.isfinite(results["segm"]["AP"])
    cfg.TEST.CMRCNN.EVALUATOR = "pycocotools"
    ev = Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path))
    assert type(ev) is COCOEvaluator and ev._use_fast_impl is False
    cfg.MODEL.MASK_ON = False
    assert build_coco_evaluator(cfg, name, backend="faster")._tasks == ("bbox",)
    cfg.TEST.CMRCNN.EVALUATOR = "fast"
    with pytest.raises(
        ValueError, match='TEST.CMRCNN.EVALUATOR = "fast": .*"faster", "pycocotools"'
    ):
        Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path))
    assert os.path.isdir(tmp_path)


def test_bulk_result_loading_equals_load_res(eval_set):
    """The evaluator's result loader (mask areas and boxes in one call) builds the same
    annotations, with the same value types, as faster-coco-eval's ``loadRes``."""
    import faster_coco_eval as fce

    from cmrcnn_ext.evaluation.coco import _load_results

    dataset_ids = [c for c, _ in CATEGORIES]  # contiguous id -> the JSON's category id
    results = [
        dict(r, category_id=dataset_ids[r["category_id"]])
        for p in eval_set["predictions"]
        for r in p["instances"]
    ]
    coco_gt = fce.COCO(FastCOCOEvaluator(eval_set["name"], distributed=False)._metadata.json_file)
    for task in TASKS:

        def fresh():
            drop = {"bbox"} if task == "segm" else set()  # as the evaluator does for segm
            return [{k: copy.copy(v) for k, v in r.items() if k not in drop} for r in results]

        ref = coco_gt.loadRes(fresh()).dataset
        ours = _load_results(fce, coco_gt, fresh(), task).dataset
        assert set(ours) == set(ref) and ours["categories"] == ref["categories"]
        assert ours["images"] == ref["images"]
        assert len(ours["annotations"]) == len(ref["annotations"]) == len(results) > 1000
        for a, b in zip(ours["annotations"], ref["annotations"]):
            assert set(a) == set(b)
            for key in a:
                assert type(a[key]) is type(b[key]), (task, key)
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{task} {key}")
    with pytest.raises(AssertionError, match="do not correspond"):
        _load_results(fce, coco_gt, [dict(results[0], image_id=-5)], "bbox")


def test_evaluate_pauses_and_restores_the_garbage_collector(eval_set, monkeypatch):
    import gc

    ours = FastCOCOEvaluator(eval_set["name"], tasks=TASKS, distributed=False)
    seen = []
    original = FastCOCOEvaluator._eval_predictions

    def spy(self, predictions, img_ids=None):
        seen.append(gc.isenabled())
        return original(self, predictions, img_ids)

    monkeypatch.setattr(FastCOCOEvaluator, "_eval_predictions", spy)
    assert gc.isenabled()
    _run(ours, eval_set["predictions"][:50])
    assert seen == [False] and gc.isenabled()
    # a collector the caller had disabled stays disabled; an error restores the state too
    gc.disable()
    try:
        _run(ours, eval_set["predictions"][:50])
        assert not gc.isenabled()
    finally:
        gc.enable()

    def boom(self, predictions, img_ids=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(FastCOCOEvaluator, "_eval_predictions", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _run(ours, eval_set["predictions"][:50])
    assert gc.isenabled()


def test_keypoints_are_evaluated_by_detectron2s_own_code(tmp_path):
    """Tasks other than bbox / segm go through Detectron2's own COCOeval call with the arguments
    it chose (their keywords differ between Detectron2 versions): keypoint AP equals
    Detectron2's COCOEvaluator's."""
    from detectron2.data import MetadataCatalog

    rng = np.random.default_rng(0)
    images, anns, preds = [], [], []
    for image_id in range(1, 9):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 200, "height": 200})
        instances = []
        for _ in range(2):
            x, y = rng.uniform(10, 100, 2)
            w, h = rng.uniform(40, 90, 2)
            pts = np.stack([rng.uniform(x, x + w, 17), rng.uniform(y, y + h, 17)], 1)
            kps = np.concatenate([pts, np.full((17, 1), 2.0)], 1)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "num_keypoints": 17,
                    "keypoints": kps.ravel().round(2).tolist(),
                }
            )
            noisy = kps.copy()
            noisy[:, :2] += rng.normal(0, rng.uniform(0.5, 6), (17, 2))
            instances.append(
                {
                    "image_id": image_id,
                    "category_id": 0,
                    "bbox": [x, y, w, h],
                    "keypoints": noisy.ravel().tolist(),
                    "score": float(rng.uniform()),
                }
            )
        preds.append({"image_id": image_id, "instances": instances})
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "person", "keypoints": [str(i) for i in range(17)], "skeleton": []}
        ],
    }
    json_file = tmp_path / "kp.json"
    json_file.write_text(json.dumps(gt))
    name = "cmrcnn_test_keypoints"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        json_file=str(json_file), thing_classes=["person"], thing_dataset_id_to_contiguous_id={1: 0}
    )
    ref = COCOEvaluator(name, tasks=("keypoints",), distributed=False, use_fast_impl=False)
    ours = FastCOCOEvaluator(name, tasks=("keypoints",), distributed=False)
    ref_results, our_results = _run(ref, preds), _run(ours, preds)
    assert 5 < ref_results["keypoints"]["AP"] < 95
    assert set(our_results) == {"keypoints"} and set(our_results["keypoints"]) == set(
        ref_results["keypoints"]
    )
    for key, value in ref_results["keypoints"].items():  # APl is NaN: no large persons
        assert our_results["keypoints"][key] == pytest.approx(value, abs=0, nan_ok=True), key
