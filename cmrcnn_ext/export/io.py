"""Saving and loading exported models: trace, TorchScript and ONNX files, their metadata.

The exported model's input / output contract is :class:`~cmrcnn_ext.export.tracing.
ExportableCascadeMaskRCNN`'s; ``docs/export.md`` describes it for users.
"""

import contextlib
import copy
import inspect
import json
import logging
import warnings

import torch

from cmrcnn_ext.export.tracing import ExportableCascadeMaskRCNN

logger = logging.getLogger(__name__)

#: Export formats of ``cmrcnn-export``.
FORMATS = ("torchscript", "onnx")
#: Name of the JSON metadata stored in an exported TorchScript file (``_extra_files``).
METADATA_NAME = "cmrcnn_export.json"
#: Names of the exported model's outputs.
OUTPUT_NAMES = ("boxes", "scores", "classes", "masks")


@contextlib.contextmanager
def torchscript_calls():
    """Silence torch's deprecation warnings of its TorchScript API (``torch.jit.trace``,
    ``save``, ``load``) around the export's own calls: TorchScript is the format this export
    produces (docs/export.md); other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning
        )
        yield


def trace(wrapper: ExportableCascadeMaskRCNN, example: torch.Tensor):
    """``torch.jit.trace`` a copy of the wrapper, without gradients, on one example image
    (3, H, W). The trace is valid for other sizes and detection counts (checked by
    tests/test_export.py); ``check_trace`` is off because it would re-run the model to compare
    graphs, which data-dependent sizes make differ anyway."""
    wrapper = copy.deepcopy(wrapper).eval().requires_grad_(False)
    with torch.no_grad(), torchscript_calls(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(wrapper, (example,), check_trace=False, strict=False)


def metadata(cfg, mask_format):
    """The contract of an exported model, stored with it (JSON-serialisable dict)."""
    from cmrcnn_ext.engine.runs import class_names

    return {
        "input": "image (3, H, W) float32 or uint8, 0-255, channel order input_format, "
        "resized by the caller (e.g. short side min_size_test, long side <= max_size_test)",
        "outputs": list(OUTPUT_NAMES),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "mask_format": mask_format,
        "score_thresh_test": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
        "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),
        "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        "class_names": class_names(cfg),
        "mask_stages": cfg.MODEL.CMRCNN.MASK_STAGES,
        "test_mask_merge": cfg.MODEL.CMRCNN.TEST_MASK_MERGE,
        "device": str(cfg.MODEL.DEVICE),
    }


def export_torchscript(wrapper, example, path, meta=None):
    """Trace ``wrapper`` on ``example`` and save it (with ``meta`` as JSON extra file)."""
    traced = trace(wrapper, example)
    extra = {METADATA_NAME: json.dumps(meta or {}, indent=1)}
    with torchscript_calls():
        torch.jit.save(traced, path, _extra_files=extra)
    return traced


def export_onnx(wrapper, example, path, opset=17, meta=None):
    """Export ``wrapper`` to ONNX with torch's TorchScript-based exporter (``dynamo=False``):
    dynamic image height / width and number of detections; ``meta`` goes into the model's
    ``metadata_props`` under ``cmrcnn_export`` (when the ``onnx`` package is installed).
    Needs opset >= 16 (``RoiAlign`` with half-pixel coordinates, ``GridSample``)."""

    if opset < 16:
        raise ValueError(
            f"opset {opset} < 16: torchvision exports roi_align(aligned=True) as RoiAlign with "
            "coordinate_transformation_mode='half_pixel' (opset 16) and mask pasting needs "
            "GridSample (opset 16)"
        )
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    wrapper.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            path,
            opset_version=opset,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                "boxes": {0: "num_detections"},
                "scores": {0: "num_detections"},
                "classes": {0: "num_detections"},
                "masks": {0: "num_detections", 1: "height", 2: "width"},
            },
            **kwargs,
        )
    if meta is not None:
        try:
            import onnx
        except ImportError:
            logger.warning("onnx is not installed: no metadata stored in %s", path)
            return
        proto = onnx.load(path)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_NAME.split(".")[0], json.dumps(meta)
        onnx.save(proto, path)


def load_metadata(path):
    """The metadata dict stored in an exported TorchScript or ONNX file ({} if none)."""
    if str(path).endswith(".onnx"):
        import onnx

        props = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
        return json.loads(props.get(METADATA_NAME.split(".")[0], "{}"))
    extra = {METADATA_NAME: ""}
    with torchscript_calls():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_NAME] or "{}")
