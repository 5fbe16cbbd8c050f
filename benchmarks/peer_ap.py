"""torchvision's Mask R-CNN v2 trained on the demo data for the same wall-clock budget as the demo
model, evaluated by the same COCO evaluator on the same held-out split.

    python benchmarks/peer_ap.py --budget-from output/demo/results.json [--output DIR]
    python benchmarks/peer_ap.py --seconds 400

What a user who picks torchvision instead gets on this data in the time our demo trains: the
demo's data loader (same images, augmentation, batch 2, seeded), AdamW at the demo's learning
rate, warm-up and step decay (at 80% and 92.5% of the budget, as the demo's steps at 1120 and
1295 of 1400 iterations), bfloat16 autocast where the demo uses it. The model is
``maskrcnn_resnet50_fpn_v2`` from scratch (no pretrained weights, as the demo), with the demo's
image size and pixel normalisation. Prints and writes ``peer_ap.json``: iterations, seconds,
box and mask AP.
"""

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--seconds", type=float, help="training budget in seconds")
    g.add_argument("--budget-from", help="a demo results.json: its training seconds")
    p.add_argument("--output", default="output/peer_ap")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the demo config")
    return p.parse_args(argv)


def to_instances(out, image_size):
    """torchvision's detections as the Detectron2 Instances COCOEvaluator reads."""
    from detectron2.structures import Boxes, Instances

    inst = Instances(image_size)
    inst.pred_boxes = Boxes(out["boxes"].float())
    inst.scores = out["scores"].float()
    inst.pred_classes = out["labels"] - 1
    inst.pred_masks = out["masks"][:, 0] > 0.5
    return inst


def main(argv=None):
    args = parse_args(argv)
    from bench_peers import torchvision_model, tv_inputs
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.env import seed_all_rng

    from cmrcnn_ext.apps.demo import DEMO_CONFIG, precision_opts
    from cmrcnn_ext.config import setup_cfg
    from cmrcnn_ext.engine import Trainer

    if args.budget_from:
        with open(args.budget_from) as f:
            budget = json.load(f)["seconds"]["train"]
    else:
        budget = args.seconds
    opts = list(args.opts) + precision_opts(DEMO_CONFIG, list(args.opts))
    cfg = setup_cfg(DEMO_CONFIG, opts + ["OUTPUT_DIR", args.output])
    os.makedirs(args.output, exist_ok=True)
    seed_all_rng(cfg.SEED)
    loader = iter(Trainer.build_train_loader(cfg))
    size = cfg.INPUT.MIN_SIZE_TEST
    torch.manual_seed(cfg.SEED)
    model = torchvision_model(cfg, size, size)
    # the demo's pixel normalisation, in torchvision's [0, 1] scale
    model.transform.image_mean = [m / 255.0 for m in cfg.MODEL.PIXEL_MEAN]
    model.transform.image_std = [s / 255.0 for s in cfg.MODEL.PIXEL_STD]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    amp = cfg.SOLVER.AMP.ENABLED
    bgr = cfg.INPUT.FORMAT == "BGR"
    model.train()
    start, it = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < budget:
        warm = min(1.0, (it + 1) / cfg.SOLVER.WARMUP_ITERS)
        decay = 0.1 ** sum(elapsed >= f * budget for f in (0.8, 0.925))
        for group in opt.param_groups:
            group["lr"] = cfg.SOLVER.BASE_LR * warm * decay
        batch = next(loader)
        imgs, targets = zip(*(tv_inputs(d, bgr) for d in batch))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            losses = model(list(imgs), list(targets))
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        if it % 50 == 0:
            print(f"[peer_ap] iter {it}, {elapsed:.0f} s, loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start

    evaluator = Trainer.build_evaluator(cfg, cfg.DATASETS.TEST[0], args.output)
    evaluator.reset()
    model.eval()
    with torch.no_grad():
        for d in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
            img = read_image(d["file_name"], format="RGB")
            tensor = torch.as_tensor(img.astype("float32").transpose(2, 0, 1)) / 255.0
            out = model([tensor])[0]
            inst = to_instances(out, img.shape[:2])
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()
    summary = {
        "model": "torchvision maskrcnn_resnet50_fpn_v2 (from scratch)",
        "iterations": it,
        "train_seconds": seconds,
        "seconds_per_iter": seconds / max(it, 1),
        "box_AP": res["bbox"]["AP"],
        "mask_AP": res["segm"]["AP"],
        "amp": bool(amp),
    }
    with open(os.path.join(args.output, "peer_ap.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
