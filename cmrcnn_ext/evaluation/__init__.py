"""COCO box / mask evaluation with faster-coco-eval, inside Detectron2's COCOEvaluator."""

from cmrcnn_ext.evaluation.coco import (
    EVALUATOR_BACKENDS,
    FastCOCOEvaluator,
    build_coco_evaluator,
    evaluate_predictions_on_coco_faster,
)

__all__ = [
    "EVALUATOR_BACKENDS",
    "FastCOCOEvaluator",
    "build_coco_evaluator",
    "evaluate_predictions_on_coco_faster",
]
