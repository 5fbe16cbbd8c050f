"""Search spaces: which config keys a study varies, and how.

A search-space file is YAML mapping config keys (any key of the config) to a spec, in the order
they are sampled::

    MODEL.RPN.POST_NMS_TOPK_TEST: {int: [100, 1000], step: 100}
    SOLVER.BASE_LR: {float: [1.0e-4, 1.0e-2], log: true}
    MODEL.RPN.IOU_THRESHOLDS: {choices: [[0.3, 0.7], [0.4, 0.6]]}
    MODEL.CMRCNN.MASK_STAGES: {choices: [first, last, all]}
    MODEL.CMRCNN.TEST_MASK_MERGE: {choices: [last, mean], when: {MODEL.CMRCNN.MASK_STAGES: all}}
    MODEL.RESNETS.DEPTH:
      choices: [18, 50]
      also: {18: {MODEL.RESNETS.RES2_OUT_CHANNELS: 64}, 50: {MODEL.RESNETS.RES2_OUT_CHANNELS: 256}}

Each spec has exactly one of ``choices`` (any values, lists included), ``int`` or ``float``
(``[low, high]``, optional ``step`` and ``log``). ``when`` samples the key only if earlier keys
(or, for keys the file does not vary, the base config) have the given value or one of a list
of values (a list value itself is written inside a list: ``[[0.3, 0.7]]``); ``also`` adds
overrides that go with a choice; ``claim`` is free text (what the reference says the key does),
shown next to the measured effect in one-at-a-time reports. :func:`load_space` checks the file and
raises :class:`SearchSpaceError` naming every problem.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from cmrcnn_ext.config.values import plain_value
from cmrcnn_ext.errors import UserError

__all__ = ["Param", "SearchSpace", "SearchSpaceError", "among", "encode", "load_space"]

_KINDS = ("choices", "int", "float")
_FIELDS = set(_KINDS) | {"step", "log", "when", "also", "claim"}


class SearchSpaceError(UserError, ValueError):
    """A search-space file that cannot be used; the message lists every problem."""


@dataclass
class Param:
    """One varied config key (see the module docstring)."""

    key: str
    kind: str
    choices: List[Any] = field(default_factory=list)
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    when: Dict[str, List[Any]] = field(default_factory=dict)
    also: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    claim: str = ""

    def suggest(self, trial):
        """The value an Optuna trial suggests for this key (list choices round-trip as JSON)."""
        if self.kind == "int":
            step = self.step or 1
            return trial.suggest_int(self.key, self.low, self.high, step=step, log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        encoded = [encode(c) for c in self.choices]
        return _decode(trial.suggest_categorical(self.key, encoded))

    def values(self) -> List[Any]:
        """Every value of the key (the choices, or the points of an int / stepped range; a
        continuous range gives its two ends): what a one-at-a-time study tries."""
        if self.kind == "choices":
            return list(self.choices)
        if self.step:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        if self.kind == "int" and self.high - self.low <= 8:
            return list(range(self.low, self.high + 1))
        return [self.low, self.high]

    def active(self, values: Dict[str, Any]) -> bool:
        """Whether the ``when`` conditions hold for the values chosen so far."""
        return all(among(values.get(key), allowed) for key, allowed in self.when.items())

    def extra(self, value) -> Dict[str, Any]:
        """The ``also`` overrides that go with ``value``."""
        return dict(self.also.get(encode(value), {}))


@dataclass
class SearchSpace:
    """The parameters of a search-space file, in sampling order."""

    params: List[Param]
    path: str = ""

    def sample(self, trial, base: Dict[str, Any]) -> Dict[str, Any]:
        """The overrides of one trial: each active key's suggested value, plus ``also``.

        Args:
            trial: an Optuna trial.
            base: the base config's values of the keys that ``when`` refers to.
        """
        values, overrides = dict(base), {}
        for p in self.params:
            if not p.active(values):
                continue
            value = p.suggest(trial)
            values[p.key] = overrides[p.key] = value
            overrides.update(p.extra(value))
        return overrides

    def keys(self) -> List[str]:
        return [p.key for p in self.params]

    def active_params(self, base: Dict[str, Any]) -> List[Param]:
        """Parameters whose ``when`` holds for the base config alone (a grid's axes)."""
        return [
            p for p in self.params if all(k not in self.keys() for k in p.when) and p.active(base)
        ]

    def grid(self, base: Dict[str, Any]) -> Dict[str, List[Any]]:
        """Every value of every parameter, as Optuna's GridSampler takes them.

        Raises:
            SearchSpaceError: a continuous range, or a ``when`` on a varied key (a grid
                has no conditional axes).
        """
        bad = [p.key for p in self.params if p.kind == "float" and not p.step]
        cond = [p.key for p in self.params if any(k in self.keys() for k in p.when)]
        if bad or cond:
            raise SearchSpaceError(
                "--sampler grid needs a finite space without conditions on varied keys: "
                + "; ".join(
                    ([f"float without step: {bad}"] if bad else [])
                    + ([f"conditional on a varied key: {cond}"] if cond else [])
                )
            )
        return {p.key: [encode(v) for v in p.values()] for p in self.active_params(base)}

    def grid_size(self, base: Dict[str, Any]) -> int:
        n = 1
        for values in self.grid(base).values():
            n *= len(values)
        return n

    def condition_keys(self) -> List[str]:
        """Keys that ``when`` refers to (their base values are needed to sample)."""
        return sorted({k for p in self.params for k in p.when})


def among(value, values) -> bool:
    """Whether ``value`` is one of ``values``, tuples and lists alike (config values come as
    tuples, YAML values as lists)."""
    return plain_value(value) in [plain_value(v) for v in values]


def encode(value) -> Any:
    """A choice as Optuna stores categorical values: primitives as they are, others as JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def _decode(value) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def _number(value, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if integer else math.isfinite(value)


def _parse(key: str, spec, known: set, problems: List[str]) -> Optional[Param]:
    where = f"{key}:"
    if not isinstance(spec, dict):
        problems.append(f"{where} the spec must be a mapping such as {{choices: [...]}}")
        return None
    unknown = sorted(set(spec) - _FIELDS)
    kinds = [k for k in _KINDS if k in spec]
    if unknown:
        problems.append(f"{where} unknown field(s) {unknown}; use {sorted(_FIELDS)}")
    if len(kinds) != 1:
        problems.append(f"{where} give exactly one of choices / int / float (found {kinds})")
        return None
    kind = kinds[0]
    p = Param(key, kind, log=bool(spec.get("log", False)), step=spec.get("step"))
    p.claim = str(spec.get("claim", ""))
    if kind == "choices":
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            problems.append(f"{where} choices must be a non-empty list")
            return None
        p.choices = list(spec["choices"])
    else:
        bounds = spec[kind]
        integer = kind == "int"
        if not (isinstance(bounds, list) and len(bounds) == 2):
            problems.append(f"{where} {kind} must be [low, high]")
            return None
        if not all(_number(b, integer) for b in bounds) or bounds[0] >= bounds[1]:
            problems.append(f"{where} {kind}: [low, high] must be {kind}s with low < high")
            return None
        p.low, p.high = bounds
        if p.log and p.low <= 0:
            problems.append(f"{where} log scale needs low > 0")
        if p.step is not None and (not _number(p.step, integer) or p.step <= 0):
            problems.append(f"{where} step must be a positive {kind}")
        if p.log and p.step is not None:
            problems.append(f"{where} log and step cannot be combined (Optuna)")
    when = spec.get("when", {})
    if not isinstance(when, dict):
        problems.append(f"{where} when must map config keys to a value or a list of values")
        when = {}
    for cond, allowed in when.items():
        if cond not in known:
            problems.append(f"{where} when refers to {cond}, which is not a config key")
        p.when[cond] = allowed if isinstance(allowed, list) else [allowed]
    also = spec.get("also", {})
    if also and kind != "choices":
        problems.append(f"{where} also goes with choices")
    elif not isinstance(also, dict):
        problems.append(f"{where} also must map choices to {{config key: value}}")
    else:
        for choice, overrides in also.items():
            if not isinstance(overrides, dict):
                problems.append(f"{where} also[{choice!r}] must map config keys to values")
                continue
            bad = [k for k in overrides if k not in known]
            if bad:
                problems.append(f"{where} also[{choice!r}] sets unknown config key(s) {bad}")
            p.also[encode(choice)] = overrides
    return p


def load_space(path: str, cfg) -> SearchSpace:
    """Read and check a search-space file against ``cfg`` (its keys must exist).

    Raises:
        SearchSpaceError: the file is missing or not YAML, or any spec is invalid.
    """
    from cmrcnn_ext.config.values import cfg_value, config_keys

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SearchSpaceError(f"Cannot read the search-space file '{path}': {e}") from None
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"The search-space file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise SearchSpaceError(
            f"The search-space file '{path}' must map config keys to specs (module docstring of "
            "cmrcnn_ext.tune.space)"
        )
    known = set(config_keys(cfg))
    problems, params = [], []
    for key, spec in data.items():
        try:
            cfg_value(cfg, key)
        except KeyError:
            problems.append(f"{key}: not a config key (Detectron2's or cmrcnn_ext's)")
            continue
        p = _parse(key, spec, known, problems)
        if p is not None:
            params.append(p)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        head = f"{len(problems)} problem(s) in search-space file '{path}':"
        raise SearchSpaceError(f"{head}\n{lines}")
    return SearchSpace(params, path)
