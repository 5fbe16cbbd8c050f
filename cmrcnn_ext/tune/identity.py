"""What a study is, stored with it: a worker that joins (or a restarted command) must run the
same study, not mix trials of another config, search space or metric into it.

The identity is the study's kind, its config as Detectron2 dumps it (file + overrides, with
``OUTPUT_DIR`` left out: paths may differ between machines), the search space as parsed, the
metric, the objectives and, for a test-time sweep, the checkpoint's file name. The options that
only say how long to run (``--trials``, ``--timeout``), the seed and the storage may differ.
"""

import hashlib
import json

from cmrcnn_ext.errors import UserError

__all__ = ["IDENTITY_ATTR", "check_identity", "study_identity"]

#: The study user attribute that holds the identity.
IDENTITY_ATTR = "cmrcnn_ext"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def study_identity(o, cfg, space) -> dict:
    """The identity of the study that options ``o`` describe (module docstring)."""
    import os

    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    params = [
        {k: v for k, v in vars(p).items() if k != "claim"}
        for p in space.params  # the claims are comments: editing them is not a new study
    ]
    return {
        "kind": o.kind,
        "config": _digest(cfg.dump()),
        "space": _digest(json.dumps(params, sort_keys=True, default=str)),
        "metric": o.metric,
        "multi_objective": bool(o.multi_objective),
        "one_at_a_time": bool(o.one_at_a_time),
        "weights": os.path.basename(o.weights) if o.weights else "",
        # for people reading the storage (optuna-dashboard shows user attributes)
        "config_file": o.config_file,
        "opts": [str(x) for x in o.opts],
        "space_file": o.space_path,
        "claims": {p.key: p.claim for p in space.params if p.claim},
    }


_COMPARED = {
    "kind": "the study's kind (run / sweep)",
    "config": "the config (file + KEY VALUE overrides)",
    "space": "the search space",
    "metric": "--metric",
    "multi_objective": "--multi-objective",
    "one_at_a_time": "--one-at-a-time",
    "weights": "--weights",
}


def check_identity(study, o, cfg, space) -> None:
    """Store the identity in a new study; check it against an existing one.

    Raises:
        UserError: the study in the storage was started with other settings (which ones, and
            the fix).
    """
    mine = study_identity(o, cfg, space)
    theirs = study.user_attrs.get(IDENTITY_ATTR)
    if theirs is None:
        study.set_user_attr(IDENTITY_ATTR, mine)
        return
    differ = [label for key, label in _COMPARED.items() if theirs.get(key) != mine.get(key)]
    if differ:
        raise UserError(
            f"the study {study.study_name!r} in this storage was started with different "
            f"settings: {', '.join(differ)} differ (it was started as: --config-file "
            f"{theirs.get('config_file')} {' '.join(theirs.get('opts', []))}, space "
            f"{theirs.get('space_file')}). Give the same settings to continue it, or another "
            "--study-dir / --study-name for a new study."
        )
