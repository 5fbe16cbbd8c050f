"""One-at-a-time effects: each variation's AP and speed next to the baseline trial's.

Rows come from :func:`cmrcnn_ext.tune.report.trial_rows`; the table is what ``report.md`` shows
under "Each variation's effect" and what the README's claims table is made of.
"""

from typing import Any, Dict, List, Optional

from cmrcnn_ext.tune.one_at_a_time import BASELINE

__all__ = ["effects_rows", "effects_table"]

_METRICS = ("box_ap", "mask_ap", "train_s_per_iter", "ms_per_image")


def effects_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``[{variation, key, base: {...}, value: {...}, status}]``, baseline first; ``[]`` when the
    study has no complete baseline trial."""
    base = [r for r in rows if r["variation"] == BASELINE and r["status"] == "complete"]
    if not base:
        return []
    b = base[-1]
    out = [{"variation": BASELINE, "key": "", "base": b, "value": b, "status": "complete"}]
    for r in rows:
        if not r["variation"] or r["variation"] == BASELINE or r["status"].startswith("interr"):
            continue
        key = r["variation"].rsplit(", ", 1)[-1].split("=", 1)[0]
        out.append(
            {"variation": r["variation"], "key": key, "base": b, "value": r, "status": r["status"]}
        )
    return out


def _cell(base: Optional[float], value: Optional[float], ratio: bool) -> str:
    if value is None:
        return ""
    if base is None or value is base:
        return f"{value:.3g}" if ratio else f"{value:.1f}"
    if ratio:
        return f"{base:.3g} → {value:.3g} ({value / base:.2f}x)" if base else f"{value:.3g}"
    return f"{base:.1f} → {value:.1f} ({value - base:+.1f})"


def effects_table(effects: List[Dict[str, Any]], claims: Optional[Dict[str, str]] = None) -> str:
    """The effects as a Markdown table, with the search space's claim of each key."""
    claims = claims or {}
    lines = [
        "| variation | box AP | mask AP | train s/iter | inference ms/image | reference says |",
        "|---|---|---|---|---|---|",
    ]
    for e in effects:
        b, v = e["base"], e["value"]
        same = e["variation"] == BASELINE
        cells = [
            _cell(None if same else b[m], v[m], m in ("train_s_per_iter", "ms_per_image"))
            for m in _METRICS
        ]
        name = e["variation"] if e["status"] == "complete" else f"{e['variation']} ({e['status']})"
        claim = claims.get(e["key"], "").replace("|", "/")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {claim} |")
    return "\n".join(lines)
