"""Export to TorchScript / ONNX: the traceable model, saving and loading, output comparison."""

from cmrcnn_ext.export.compare import compare_outputs, match_detections
from cmrcnn_ext.export.io import (
    FORMATS,
    METADATA_NAME,
    OUTPUT_NAMES,
    export_onnx,
    export_torchscript,
    load_metadata,
    metadata,
    trace,
)
from cmrcnn_ext.export.tracing import MASK_FORMATS, ExportableCascadeMaskRCNN, build_exportable

__all__ = [
    "FORMATS",
    "MASK_FORMATS",
    "METADATA_NAME",
    "OUTPUT_NAMES",
    "ExportableCascadeMaskRCNN",
    "build_exportable",
    "compare_outputs",
    "export_onnx",
    "export_torchscript",
    "load_metadata",
    "match_detections",
    "metadata",
    "trace",
]
