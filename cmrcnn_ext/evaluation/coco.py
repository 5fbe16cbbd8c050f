"""COCO box + mask evaluation with the ``faster-coco-eval`` package.

:class:`FastCOCOEvaluator` is Detectron2's :class:`~detectron2.evaluation.COCOEvaluator`
(same constructor, same ``process`` / ``evaluate`` / result dict, same files in
``output_dir``) whose AP computation runs in ``faster_coco_eval.COCOeval_faster`` (C++ IoU
matching and accumulation) instead of pycocotools' pure-Python ``COCOeval.evaluate`` /
``accumulate``. Detectron2's own C++ alternative (``use_fast_impl=True``) needs a compiled
``detectron2._C``, which Detectron2 v0.6 from PyPI does not have.

It gives the same numbers as pycocotools: all 12 summary statistics and the per-category AP
of ``bbox`` and ``segm`` agree to 4 decimals, including RLE / polygon ground truth,
``iscrowd`` regions, score ties and images without annotations (``tests/test_evaluation.py``;
``benchmarks/bench_eval.py`` shows it on 500+ images with the timings).

:func:`build_coco_evaluator` picks the implementation from ``cfg.TEST.CMRCNN.EVALUATOR``
(``"faster"``, the default, or ``"pycocotools"``); ``Trainer.build_evaluator`` uses it.
"""

import copy
import gc
import logging

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.file_io import PathManager

from cmrcnn_ext.compat import coco_ap_function
from cmrcnn_ext.config.schema import allowed_values
from cmrcnn_ext.config.validate import check_values

logger = logging.getLogger(__name__)

#: Allowed values of ``cfg.TEST.CMRCNN.EVALUATOR``.
EVALUATOR_BACKENDS = allowed_values("TEST.CMRCNN.EVALUATOR")


def _import_faster_coco_eval():
    try:
        import faster_coco_eval
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "TEST.CMRCNN.EVALUATOR='faster' needs the 'faster-coco-eval' package "
            "(pip install faster-coco-eval); or set TEST.CMRCNN.EVALUATOR 'pycocotools'."
        ) from e
    return faster_coco_eval


def evaluate_predictions_on_coco_faster(
    coco_gt, coco_results, iou_type, img_ids=None, max_dets_per_image=None, print_function=None
):
    """faster-coco-eval's counterpart of Detectron2's ``_evaluate_predictions_on_coco`` for
    ``bbox`` and ``segm``.

    Args:
        coco_gt (faster_coco_eval.COCO): ground truth.
        coco_results (list[dict]): COCO-format results with COCO category ids (not modified).
        iou_type (str): "bbox" or "segm".
        img_ids (list[int] or None): evaluate these images only.
        max_dets_per_image (list[int] or None): COCOeval's ``maxDets`` (default [1, 10, 100]);
            AP and the area-range ARs use the last value, as Detectron2's ``COCOevalMaxDets``.
        print_function (callable or None): receives COCOeval's summary lines.

    Returns:
        faster_coco_eval.COCOeval_faster: evaluated, accumulated and summarised; ``stats``
        holds the 12 standard numbers and ``eval["precision"]`` is (T, R, K, A, M) as in
        pycocotools.
    """
    fce = _import_faster_coco_eval()
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"faster-coco-eval path supports 'bbox' and 'segm', got {iou_type!r}")
    assert len(coco_results) > 0
    # loadRes adds fields (id, area, iscrowd, ...) to the result dicts: give it copies.
    if iou_type == "segm":
        # As Detectron2: without "bbox", COCO takes the area of a detection (for the
        # small / medium / large ranges) from its mask instead of its box.
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in coco_results]
        for r in results:
            r["segmentation"] = dict(r["segmentation"])
    else:
        results = [dict(r) for r in coco_results]
    coco_dt = _load_results(fce, coco_gt, results, iou_type)
    kwargs = {} if print_function is None else {"print_function": print_function}
    coco_eval = fce.COCOeval_faster(coco_gt, coco_dt, iou_type, **kwargs)
    coco_eval.params.maxDets = list(max_dets_per_image or [1, 10, 100])
    assert len(coco_eval.params.maxDets) >= 3, "maxDets needs at least 3 values"
    if img_ids is not None:
        coco_eval.params.imgIds = img_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def _load_results(fce, coco_gt, anns, iou_type):
    """``coco_gt.loadRes(anns)`` for box or mask results, with the masks' areas and boxes
    computed in one call for all results instead of one call per result (the per-result calls
    were ~40% of faster-coco-eval's segm time on 500 images).

    Fills the same fields with the same values as ``loadRes``: ``id`` (1-based position),
    ``iscrowd`` 0, and ``area`` = box area (bbox) or mask area (segm, where a missing ``bbox``
    becomes the mask's box). ``anns`` are modified in place, as by ``loadRes``.
    """
    if (
        not anns
        or iou_type not in ("bbox", "segm")
        or (iou_type == "bbox" and not anns[0].get("bbox"))
        or (iou_type == "segm" and ("bbox" in anns[0] or "segmentation" not in anns[0]))
    ):
        return coco_gt.loadRes(anns)  # loadRes's other branches: not used by the evaluator
    gt_images = set(coco_gt.getImgIds())
    unknown = {a["image_id"] for a in anns} - gt_images
    assert not unknown, "Results do not correspond to current coco set"
    if iou_type == "bbox":
        for index, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            if "segmentation" not in ann:
                ann["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
            ann["area"] = w * h
            ann["id"] = index + 1
            ann["iscrowd"] = 0
    else:
        rles = [a["segmentation"] for a in anns]
        areas = fce.mask.area(rles)
        boxes = fce.mask.toBbox(rles)
        for index, ann in enumerate(anns):
            ann["area"] = areas[index]
            if "bbox" not in ann:
                ann["bbox"] = boxes[index]
            ann["id"] = index + 1
            ann["iscrowd"] = 0
    res = fce.COCO()
    res.dataset["info"] = copy.deepcopy(coco_gt.dataset.get("info", {}))
    res.dataset["images"] = list(coco_gt.dataset["images"])
    res.dataset["categories"] = copy.deepcopy(coco_gt.dataset["categories"])
    res.dataset["annotations"] = anns
    res.createIndex()
    return res


class FastCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` computing box and mask AP with ``faster-coco-eval``.

    Construction, ``process()``, ``evaluate()``, the result dict (``bbox`` / ``segm``: AP,
    AP50, AP75, APs, APm, APl and ``AP-<class>``), the files written to ``output_dir``, the
    category-id mapping and the box-proposal and keypoint evaluation are Detectron2's own code:
    only the COCOeval of ``bbox`` and ``segm`` is replaced, by
    :func:`evaluate_predictions_on_coco_faster` (``use_fast_impl`` is ignored).

    ``evaluate()`` may be called again: the stored predictions are not modified (Detectron2's
    own evaluator maps their category ids in place).

    After ``evaluate()``, ``coco_stats[task]`` holds the 12 COCO summary numbers (0-1 scale,
    -1 where undefined) of ``bbox`` and ``segm``.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, **kwargs):
        _import_faster_coco_eval()  # fail early with a clear message
        kwargs["use_fast_impl"] = False  # only consulted for keypoints (pycocotools)
        super().__init__(dataset_name, tasks, distributed, output_dir, **kwargs)
        # COCOEvaluator has written the COCO JSON of a data set without one by now
        self._gt_json = MetadataCatalog.get(dataset_name).json_file
        self._faster_coco_gt = None
        self.coco_stats = {}

    def evaluate(self, img_ids=None):
        """Detectron2's ``evaluate()``, with Python's cyclic garbage collector paused.

        The evaluation allocates some 10^5-10^6 small objects (result dicts, RLE strings, the
        pickled and JSON-encoded predictions) while the predictions hold as many; the collector
        would walk all of them again and again (docs/performance.md). The evaluation creates
        no reference cycles that need collecting; the collector's previous state is restored
        afterwards, also on errors.
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            return super().evaluate(img_ids)
        finally:
            if enabled:
                gc.enable()

    def _eval_predictions(self, predictions, img_ids=None):
        # Detectron2's _eval_predictions on copies of the result dicts (it maps their category
        # ids in place), with the per-task COCOeval routed through self._compute_ap.
        copies = [{**p, "instances": [dict(r) for r in p["instances"]]} for p in predictions]
        with coco_ap_function(self._compute_ap):
            super()._eval_predictions(copies, img_ids)

    def _compute_ap(self, original, coco_gt, coco_results, iou_type, **kwargs):
        """COCOeval of one task: faster-coco-eval for ``bbox`` / ``segm``, Detectron2's own
        function (``original``, called with the arguments it was given) for the others."""
        if iou_type not in ("bbox", "segm"):
            return original(coco_gt, coco_results, iou_type, **kwargs)
        logger.info("Computing %s AP with faster-coco-eval ...", iou_type)
        coco_eval = evaluate_predictions_on_coco_faster(
            self._coco_gt_faster(),
            coco_results,
            iou_type,
            img_ids=kwargs.get("img_ids"),
            max_dets_per_image=kwargs.get("max_dets_per_image"),
            print_function=logger.info,
        )
        self.coco_stats[iou_type] = [float(s) for s in coco_eval.stats]
        return coco_eval

    def _coco_gt_faster(self):
        # Loaded from the JSON file (not shared with Detectron2's pycocotools COCO, whose
        # annotation dicts pycocotools modifies), once per evaluator.
        if self._faster_coco_gt is None:
            fce = _import_faster_coco_eval()
            json_file = PathManager.get_local_path(self._gt_json)
            self._faster_coco_gt = fce.COCO(json_file)
        return self._faster_coco_gt


def build_coco_evaluator(cfg, dataset_name, output_folder=None, backend=None, **kwargs):
    """COCO box + mask evaluator for ``dataset_name``.

    Args:
        cfg (CfgNode): with ``TEST.CMRCNN.EVALUATOR`` (see ``add_cmrcnn_config``).
        dataset_name (str): a registered data set with a COCO JSON (``json_file``) or in
            Detectron2's format (converted by Detectron2).
        output_folder (str or None): where predictions are saved.
        backend (str or None): overrides ``cfg.TEST.CMRCNN.EVALUATOR``:
            ``"faster"``: :class:`FastCOCOEvaluator` (faster-coco-eval);
            ``"pycocotools"``: Detectron2's ``COCOEvaluator`` with the official pycocotools
            ``COCOeval`` (``use_fast_impl=False``).
        kwargs: more ``COCOEvaluator`` arguments (``distributed``, ``max_dets_per_image``...).

    Returns:
        COCOEvaluator
    """
    if backend is None:
        backend = cfg.TEST.get("CMRCNN", {}).get("EVALUATOR", "faster")
    check_values({"TEST.CMRCNN.EVALUATOR": backend})
    kwargs.setdefault("tasks", ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",))
    kwargs.setdefault("distributed", True)
    if backend == "faster":
        return FastCOCOEvaluator(dataset_name, output_dir=output_folder, **kwargs)
    return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False, **kwargs)
