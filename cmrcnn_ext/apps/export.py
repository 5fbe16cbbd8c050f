"""``cmrcnn-export``: export a trained model to TorchScript or ONNX (torch + torchvision only).

    cmrcnn-export --run output/mydata --output model.ts \\
        [--format torchscript|onnx] [--sample-image IMG] [--mask-format bool|probs] [KEY VALUE ...]
    cmrcnn-export --config-file cascade_mask_rcnn_R_18_FPN_GN_demo_cpu.yaml \\
        --weights output/demo/model_final.pth --output model.ts

(also ``python -m cmrcnn_ext.apps.export ...``). ``--run`` takes a training run's
``OUTPUT_DIR`` (its ``config.yaml`` and final checkpoint); no data set is read, and the class
names stored with the exported model come from the config. The exported model's contract is in
docs/export.md; after export, the exported model is checked against the eager one on the sample
image and a resized copy (``--no-check`` skips it).
"""

import argparse
import os

import torch
import torch.nn.functional as F

from cmrcnn_ext.engine.cli import add_debug_argument, run
from cmrcnn_ext.export.compare import compare_outputs
from cmrcnn_ext.export.io import (
    FORMATS,
    export_onnx,
    export_torchscript,
    metadata,
    torchscript_calls,
)
from cmrcnn_ext.export.tracing import MASK_FORMATS, build_exportable


def _example_image(cfg, seed=0):
    """A random (3, H, W) float32 image at the config's test size (4:3 landscape)."""
    short = int(cfg.INPUT.MIN_SIZE_TEST) or 800
    long_ = min(int(round(short * 4 / 3)), int(cfg.INPUT.MAX_SIZE_TEST))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, short, long_, generator=g) * 255


def _read_sample(path, cfg):
    from detectron2.data.detection_utils import read_image
    from detectron2.data.transforms import ResizeShortestEdge

    img = read_image(path, format=cfg.INPUT.FORMAT)
    if cfg.INPUT.MIN_SIZE_TEST > 0:
        aug = ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        img = aug.get_transform(img).apply_image(img)
    return torch.as_tensor(img.astype("float32").transpose(2, 0, 1).copy())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run", help="a training run's OUTPUT_DIR: its config.yaml and final checkpoint"
    )
    parser.add_argument("--config-file", help="config (path or packaged name); default: --run's")
    parser.add_argument("--weights", help="checkpoint (.pth / .pkl); default: --run's")
    parser.add_argument("--output", required=True, help="exported file (e.g. model.ts, model.onnx)")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument(
        "--sample-image",
        help="image traced on and checked (resized like DefaultPredictor); default: a random "
        "image at INPUT.MIN_SIZE_TEST",
    )
    parser.add_argument("--mask-format", choices=MASK_FORMATS, default="bool")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16)")
    parser.add_argument("--no-check", action="store_true", help="skip the eager-vs-export check")
    add_debug_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    from detectron2.utils.logger import setup_logger

    from cmrcnn_ext.engine.runs import inference_config

    setup_logger(name="cmrcnn_ext")
    cfg = inference_config(args.config_file, args.weights, args.run, args.opts)
    wrapper = build_exportable(cfg, mask_format=args.mask_format)
    example = _read_sample(args.sample_image, cfg) if args.sample_image else _example_image(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.format == "torchscript":
        exported = export_torchscript(
            wrapper, example, args.output, metadata(cfg, args.mask_format)
        )
        with torchscript_calls():
            exported = torch.jit.load(args.output, map_location=cfg.MODEL.DEVICE)
    else:
        export_onnx(wrapper, example, args.output, args.opset, metadata(cfg, args.mask_format))
        exported = None
        try:
            import onnxruntime as ort
        except ImportError:
            print("onnxruntime is not installed: the ONNX file is not checked")
        else:
            session = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"])

            def exported(img):
                outs = session.run(None, {"image": img.float().cpu().numpy()})
                return tuple(torch.from_numpy(o) for o in outs)

    print(f"exported {args.format} -> {args.output}")
    if not args.no_check and exported is not None:
        h, w = example.shape[-2:]
        checks = [
            example,
            F.interpolate(example[None], size=(max(32, h * 3 // 4), w), mode="bilinear")[0],
        ]
        with torch.no_grad():
            for img in checks:
                res = compare_outputs(wrapper(img), exported(img))
                print(f"check at {tuple(img.shape[-2:])}: {res}")
                if not res["ok"]:
                    raise SystemExit(f"exported model differs from the eager one: {res}")
    return args.output


def cli():
    """Console script ``cmrcnn-export``."""
    run(main)


if __name__ == "__main__":
    cli()
