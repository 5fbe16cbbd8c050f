"""One-at-a-time studies (``--one-at-a-time``): the base config, then each value of each key of
the search space changed alone. That is what "what does this knob buy and cost?" needs: every
trial differs from the baseline trial in one key (plus the ``also`` overrides of that value,
and the single value a ``when`` condition needs), so its AP and speed next to the baseline's are
that key's effect. Seed variation, if wanted as the noise reference, is a key like any other
(``SEED: {choices: [0, 1]}``).

The trials are enqueued in the study (Optuna's ``enqueue_trial``) with a ``variation`` user
attribute (``"baseline"`` or ``"KEY=value"``): a resumed or joining worker enqueues only the
variations that the study does not hold yet, and a variation enqueued twice by two workers at
the same moment runs once (:func:`cmrcnn_ext.tune.workers.is_surplus`).
"""

import logging
import warnings
from typing import Any, Dict, List, Tuple

from cmrcnn_ext.tune.space import SearchSpace, among, encode

__all__ = ["BASELINE", "include_base_values", "variations", "enqueue_variations"]

logger = logging.getLogger(__name__)

#: The ``variation`` attribute of the trial that runs the base config.
BASELINE = "baseline"


def include_base_values(space: SearchSpace, base: Dict[str, Any]) -> None:
    """Add each key's base value to its choices (the baseline trial must be able to take it)."""
    for p in space.params:
        if p.kind == "choices" and not among(base[p.key], p.choices):
            p.choices.insert(0, base[p.key])


def _params(space: SearchSpace, values: Dict[str, Any]) -> Dict[str, Any]:
    """Optuna params (encoded) of the keys active under ``values``."""
    out = {}
    for p in space.params:
        if p.active(values):
            out[p.key] = encode(values[p.key])
    return out


def _short(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def variations(space: SearchSpace, base: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(name, params)]``: the baseline, then every other value of every key, in file order.

    A key whose ``when`` does not hold for the base config is varied with its condition keys set
    to the first value they allow (a condition on a key the space does not vary cannot be
    changed: such a key is left out, with a log line).
    """
    out = [(BASELINE, _params(space, base))]
    seen = {repr(sorted(out[0][1].items()))}
    varied = set(space.keys())
    for p in space.params:
        changes: Dict[str, Any] = {}
        if not p.active(base):
            fixed = [k for k in p.when if k not in varied]
            if not all(among(base.get(k), p.when[k]) for k in fixed):
                logger.info(
                    "%s: its condition is on keys this space does not vary; left out", p.key
                )
                continue
            changes = {k: allowed[0] for k, allowed in p.when.items() if k in varied}
        for value in p.values():
            if not changes and among(value, [base[p.key]]):
                continue
            values = dict(base, **changes)
            values[p.key] = value
            params = _params(space, values)
            key = repr(sorted(params.items()))
            if key in seen:
                continue
            seen.add(key)
            name = ", ".join(
                f"{k}={_short(v)}" for k, v in list(changes.items()) + [(p.key, value)]
            )
            out.append((name, params))
    return out


def enqueue_variations(study, space: SearchSpace, base: Dict[str, Any]) -> int:
    """Enqueue the variations that ``study`` does not hold yet; returns how many there are."""
    import optuna

    todo = variations(space, base)
    have = {t.user_attrs.get("variation") for t in study.get_trials(deepcopy=False)}
    with warnings.catch_warnings():  # a base value outside an int / float range is intended
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, params in todo:
            if name not in have:
                study.enqueue_trial(params, user_attrs={"variation": name})
    return len(todo)
