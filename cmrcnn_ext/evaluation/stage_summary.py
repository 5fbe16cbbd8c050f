"""The stage report's short Markdown summary (``summary.md``) from its JSON report."""

import math
from typing import List

__all__ = ["high_iou_finding", "summary_markdown"]


def _f(value, digits=1) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def _ap_table(rows: dict) -> List[str]:
    thresholds = sorted(next(iter(rows.values()))["AP@IoU"], key=float)
    head = "| row | AP | AP50 | AP75 | " + " | ".join(f"@{t}" for t in thresholds) + " |"
    lines = [head, "|---|" + "---:|" * (3 + len(thresholds))]
    for name, r in rows.items():
        cells = [_f(r["AP"]), _f(r["AP50"]), _f(r["AP75"])]
        cells += [_f(r["AP@IoU"][t]) for t in thresholds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def high_iou_finding(box_rows: dict, num_stages: int, from_iou: float = 0.75) -> str:
    """One sentence: do the later stages, on their own, raise AP at IoU >= ``from_iou``?"""
    first, last = box_rows.get("stage 1"), box_rows.get(f"stage {num_stages}")
    if first is None or last is None or num_stages < 2:
        return "One stage only: nothing to compare."
    keys = [t for t in first["AP@IoU"] if float(t) >= from_iou - 1e-9]
    a = [first["AP@IoU"][t] for t in keys]
    b = [last["AP@IoU"][t] for t in keys]
    if any(math.isnan(v) for v in a + b):
        return "Not enough detections to compare the stages."
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    verdict = "raises" if mean_b > mean_a else "does not raise"
    return (
        f"Stage {num_stages} on its own {verdict} AP at IoU >= {from_iou:.2f} over stage 1: "
        f"mean AP over those thresholds {mean_a:.1f} (stage 1) -> {mean_b:.1f} (stage "
        f"{num_stages}), {mean_b - mean_a:+.1f}; at AP {_f(first['AP'])} -> {_f(last['AP'])} "
        f"over all thresholds."
    )


def summary_markdown(report: dict, header: str = "") -> str:
    """The summary text: box and mask AP tables, IoU shift, proposal recall and the finding."""
    box = report["box"]
    num_stages = len(report["iou_shift"])
    lines = ["# Stage report", ""]
    if header:
        lines += [header, ""]
    lines += [f"{report['num_images']} images. " + high_iou_finding(box, num_stages), ""]
    lines += [
        "## Box AP by stage",
        "",
        "`stage k`: stage k's boxes scored by stage k's classifier alone; `stages 1-k mean`: "
        "stage k's boxes scored by the mean classifier of stages 1..k (at k = last, what the "
        "cascade outputs); `final`: the model's output, as `train_net.py --eval-only` "
        "evaluates it. Columns @t: AP at IoU threshold t. Plot: `ap_vs_iou.png`.",
        "",
    ]
    lines += _ap_table(box) + [""]
    if "mask" in report:
        lines += [
            "## Mask AP by mask head (on the final boxes)",
            "",
            "`mask head k`: the mask head of stage k alone; `mask heads mean`: their mean "
            "probabilities (`TEST_MASK_MERGE mean`); `final`: the model's output.",
            "",
        ]
        lines += _ap_table(report["mask"]) + [""]
    lines += [
        "## IoU of each stage's input boxes with their best ground truth",
        "",
        "Plot: `iou_shift.png` (boxes with IoU >= 0.5).",
        "",
    ]
    levels = list(report["iou_shift"][0]["fraction_at_or_above"])
    lines += [
        "| stage | trained for IoU | input boxes | mean IoU | "
        + " | ".join(f">= {t}" for t in levels)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(levels),
    ]
    for s in report["iou_shift"]:
        shares = [f"{100 * s['fraction_at_or_above'][t]:.1f}%" for t in levels]
        lines.append(
            f"| {s['stage']} | {s['trained_iou']:.2f} | {s['input_boxes']} | "
            f"{_f(s['mean_iou'], 3)} | " + " | ".join(shares) + " |"
        )
    lines += ["", "## RPN proposal recall (ground truth covered, one proposal each)", ""]
    lines += ["| top-N proposals | recall @ IoU 0.5 | recall @ IoU 0.7 | AR (0.50:0.95) |"]
    lines += ["|---:|---:|---:|---:|"]
    for n, r in report["proposals"].items():
        lines.append(f"| {n} | {_f(r['R@0.5'])} | {_f(r['R@0.7'])} | {_f(r['AR'])} |")
    return "\n".join(lines) + "\n"
