"""Comparison of the benchmarked models' outputs: (a) Detectron2's cascade against (b) ours
with MASK_STAGES=first (and (c)) over every inference round, within the tolerances of
bench_inference.py's docstring."""

import torch


class OutputChecker:
    """Accumulates the comparison of (a) with (b) (and (c)) over inference rounds."""

    def __init__(self):
        self.n_img = self.n_det = self.classes = self.mask_px = self.total_px = 0
        self.distinct = 0
        self.boxes = self.box_rel = self.scores = self.box_c = 0.0
        self.counts_differ = 0
        self.ious = []
        self.forward_same = None

    @torch.no_grad()
    def add(self, outs):
        a, b, c = (outs[k][0]["instances"].to("cpu") for k in ("a", "b", "c"))
        self.n_img += 1
        if len(a) != len(b) or len(a) != len(c):
            self.counts_differ += 1
            return
        if len(a) == 0:
            return
        self.n_det += len(a)
        self.distinct += len(torch.unique(a.pred_boxes.tensor, dim=0))
        diff = (a.pred_boxes.tensor - b.pred_boxes.tensor).abs()
        self.boxes = max(self.boxes, diff.max().item())
        self.box_rel = max(
            self.box_rel, (diff / a.pred_boxes.tensor.abs().clamp(min=1)).max().item()
        )
        self.scores = max(self.scores, (a.scores - b.scores).abs().max().item())
        self.classes += int((a.pred_classes != b.pred_classes).sum())
        self.mask_px += int((a.pred_masks != b.pred_masks).sum())
        self.total_px += a.pred_masks.numel()
        self.box_c = max(self.box_c, (a.pred_boxes.tensor - c.pred_boxes.tensor).abs().max().item())
        inter = (a.pred_masks & c.pred_masks).flatten(1).sum(1).float()
        union = (a.pred_masks | c.pred_masks).flatten(1).sum(1).float()
        self.ious.append((inter / union.clamp(min=1))[union > 0])

    def same_as_forward(self, forward_out, timed_out):
        x, y = forward_out[0]["instances"], timed_out[0]["instances"]
        self.forward_same = (
            len(x) == len(y)
            and torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
            and torch.equal(x.scores, y.scores)
            and torch.equal(x.pred_masks, y.pred_masks)
        )

    @property
    def ok(self):
        # Boxes: 1e-4 relative to the coordinate (1e-4 px up to 1 px). Absolute 1e-4 px would be
        # below float32's resolution beyond 1024 px (its step there is 1.2e-4 px).
        return (
            self.n_det > 0
            and self.counts_differ == 0
            and self.box_rel <= 1e-4
            and self.scores <= 1e-4
            and self.classes == 0
            and self.mask_px <= 1e-4 * self.total_px
            and self.forward_same is not False
        )

    def lines(self):
        out = [
            f"  (a) vs (b) over {self.n_img} inference runs, {self.n_det} detections: "
            f"max |box diff| {self.boxes:.2e} px (relative to the coordinate {self.box_rel:.1e}), "
            f"max |score diff| {self.scores:.2e}, class mismatches {self.classes}, "
            f"differing mask pixels {self.mask_px} of {self.total_px}, "
            "runs with different detection "
            f"counts {self.counts_differ} -> {'EQUAL (1e-4)' if self.ok else 'DIFFERENT'}"
        ]
        if self.n_det:
            out.append(
                f"  distinct boxes among the detections: {self.distinct} of {self.n_det} "
                f"({100 * (1 - self.distinct / self.n_det):.0f}% of the detections repeat a box of "
                "another class; (b) and (c) run the mask head once per distinct box, (a) once "
                "per detection)"
            )
        if self.ious:
            out.append(
                f"  (c) vs (a): max |box diff| {self.box_c:.2e} (same box path); mean mask IoU "
                f"{torch.cat(self.ious).mean().item():.3f} (masks: mean of 3 heads' probabilities)"
            )
        if self.forward_same is not None:
            out.append(
                f"  timed part-by-part path gives model(inputs)'s outputs: {self.forward_same}"
            )
        return out
