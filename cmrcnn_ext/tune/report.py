"""The study's report: ``report.md`` and its PNGs in the study folder, rewritten after every trial.

``report.md`` holds the trials table (parameters, box AP, mask AP, training s/iter, inference
ms/image, wall time, status), the best trial with its config as a ready-to-use YAML
(``best_config.yaml``: the trial's own ``config.yaml``), the Pareto front of AP against
inference time (``pareto.png``), parameter importances (Optuna's ``get_param_importances``;
``importances.png``), one slice plot per parameter (``slice_<KEY>.png``) and, for one-at-a-time
studies, each variation's effect next to the baseline and the search space's ``claim``. The
same numbers are in ``trials.csv``. Files are written to a temporary name and renamed: a reader
never sees half a report.
"""

import csv
import io
import json
import math
import os
from typing import Any, Dict, List, Optional

from cmrcnn_ext.fileio import atomic_write
from cmrcnn_ext.tune.effects import effects_rows, effects_table
from cmrcnn_ext.tune.plots import plot_importances, plot_pareto, plot_slices

__all__ = ["trial_rows", "write_hparams", "write_report"]

_COLUMNS = [
    ("box_ap", "box AP"),
    ("mask_ap", "mask AP"),
    ("train_s_per_iter", "train s/iter"),
    ("ms_per_image", "ms/image"),
    ("wall_seconds", "wall s"),
]


def _status(t) -> str:
    a = t.user_attrs
    state = t.state.name
    if state == "FAIL" and "error" not in a:
        return "interrupted (re-run)"
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(state, state.lower())


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _short_key(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else key


def trial_rows(study) -> List[Dict[str, Any]]:
    """One dict per trial (surplus trials, which never ran, left out), by number."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("surplus") or t.state.name == "WAITING":
            continue
        row = {
            "number": t.number,
            "status": _status(t),
            "variation": a.get("variation", ""),
            "params": a.get("overrides") or dict(t.params),
            "note": a.get("error") or a.get("pruned") or "",
            "retry_of": a.get("retry_of"),
            "dir": a.get("dir", ""),
        }
        for key, _ in _COLUMNS:
            row[key] = a.get(key)
        row["value"] = t.values[0] if t.values else None
        rows.append(row)
    return rows


def _params_text(params: Dict[str, Any]) -> str:
    return ", ".join(f"{_short_key(k)}={json.dumps(v)}" for k, v in params.items())


def _table(rows: List[Dict[str, Any]]) -> str:
    head = "| # | status | parameters | " + " | ".join(label for _, label in _COLUMNS) + " | note |"
    lines = [head, "|" + "---|" * (len(_COLUMNS) + 4)]
    for r in rows:
        note = (r["note"] or "").replace("|", "/").replace("\n", " ")
        if r["retry_of"] is not None:
            note = f"re-run of #{r['retry_of']}. {note}".strip()
        params = (r["variation"] + ": " if r["variation"] else "") + _params_text(r["params"])
        cells = [_fmt(r[key]) for key, _ in _COLUMNS]
        lines.append(
            f"| {r['number']} | {r['status']} | {params.replace('|', '/')} | "
            + " | ".join(cells)
            + f" | {note[:200]} |"
        )
    return "\n".join(lines)


def _best(study, rows) -> Optional[Dict[str, Any]]:
    """The best complete trial: the highest objective (multi-objective: the highest AP of the
    Pareto front)."""
    complete = [r for r in rows if r["status"] == "complete" and r["value"] is not None]
    if not complete:
        return None
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        complete = [r for r in complete if r["number"] in front] or complete
    return max(complete, key=lambda r: r["value"])


def _atomic_write(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _write_csv(path: str, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "status", "variation", "params"] + [k for k, _ in _COLUMNS] + ["note"])
    for r in rows:
        w.writerow(
            [r["number"], r["status"], r["variation"], json.dumps(r["params"])]
            + [r[k] for k, _ in _COLUMNS]
            + [r["note"]]
        )
    _atomic_write(path, buf.getvalue())


def _overhead(study_dir: str) -> Optional[str]:
    path = os.path.join(study_dir, "timings.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    if not rows:
        return None
    pct = [r["overhead_percent"] for r in rows]
    sec = [r["overhead_seconds"] for r in rows]
    return (
        f"Study overhead per trial (worker bookkeeping, storage, report; the trial's own run "
        f"excluded): mean {sum(sec) / len(sec):.2f} s = {sum(pct) / len(pct):.2f} % of the "
        f"trial's wall time, max {max(pct):.2f} % ({len(rows)} trials, `timings.jsonl`)."
    )


def write_report(study, study_dir: str, metric: str = "segm/AP") -> str:
    """(Re)write ``report.md``, ``trials.csv``, ``best_config.yaml`` and the PNGs.

    Returns:
        The path of ``report.md``.
    """
    rows = trial_rows(study)
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    ident = study.user_attrs.get("cmrcnn_ext", {})
    metric = ident.get("metric", metric)
    out = [f"# Study `{study.study_name}`", ""]
    if ident:
        out += [
            f"- kind: {ident.get('kind')}; config: `{ident.get('config_file')}` "
            f"{' '.join(ident.get('opts', []))}",
            f"- search space: `{ident.get('space_file')}`; objective: {metric}"
            + (" (max) and inference ms/image (min)" if len(study.directions) > 1 else " (max)"),
        ]
        if ident.get("weights"):
            out.append(f"- checkpoint: `{ident['weights']}`")
    out.append("- trials: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    overhead = _overhead(study_dir)
    if overhead:
        out.append("- " + overhead)
    out += ["", "## Trials", "", _table(rows), ""]
    best = _best(study, rows)
    out += ["## Best trial", ""]
    if best is None:
        out += ["No complete trial yet.", ""]
    else:
        out += [
            f"Trial {best['number']}: {metric} = {_fmt(best['value'])}, box AP "
            f"{_fmt(best['box_ap'])}, mask AP {_fmt(best['mask_ap'])}, "
            f"{_fmt(best['ms_per_image'], 1)} ms/image; {_params_text(best['params'])}.",
            "",
        ]
        src = os.path.join(study_dir, best["dir"], "config.yaml")
        if best["dir"] and os.path.isfile(src):
            with open(src, "rb") as config:
                text = config.read()
            atomic_write(os.path.join(study_dir, "best_config.yaml"), lambda f: f.write(text))
            out += [
                "Its full config: `best_config.yaml` (ready for "
                "`train_net.py --config-file best_config.yaml`).",
                "",
            ]
    effects = effects_rows(rows)
    if effects:
        out += ["## Each variation's effect (one key changed, next to the baseline)", ""]
        out += [effects_table(effects, claims=ident.get("claims", {})), ""]
    figures = [
        ("Pareto front: AP against inference time", plot_pareto(study, rows, study_dir)),
        ("Parameter importances", plot_importances(study, study_dir)),
    ]
    for key, path in plot_slices(rows, study_dir, metric):
        figures.append((f"Slice: {key}", path))
    out += ["## Figures", ""]
    for title, path in figures:
        if path:
            out += [f"### {title}", "", f"![{title}]({os.path.basename(path)})", ""]
    out += [
        "Open the study in a browser: `optuna-dashboard <storage>` (a separate package: `pip "
        "install optuna-dashboard`); TensorBoard's HParams tab: `tensorboard --logdir "
        f"{os.path.join(study_dir, 'trials')}`.",
        "",
    ]
    _write_csv(os.path.join(study_dir, "trials.csv"), rows)
    path = os.path.join(study_dir, "report.md")
    _atomic_write(path, "\n".join(out))
    return path


def write_hparams(study_dir: str, trial, metric: str) -> None:
    """The trial in TensorBoard's HParams view (an event file in the trial's folder)."""
    from torch.utils.tensorboard import SummaryWriter

    a = trial.user_attrs
    if not a.get("dir"):
        return
    params = {
        k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
        for k, v in (a.get("overrides") or {}).items()
    }
    metrics = {
        f"hparam/{k}": float(a[k])
        for k, _ in _COLUMNS
        if isinstance(a.get(k), (int, float)) and math.isfinite(a[k])
    }
    if not params or not metrics:
        return
    with SummaryWriter(os.path.join(study_dir, a["dir"])) as w:
        w.add_hparams(params, metrics, run_name=".")
