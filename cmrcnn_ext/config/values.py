"""Allowed-value types of config keys, and reading and formatting config values.

An :class:`Allowed` says which values a key accepts (``contains``) and describes them in words
(``str()``): :class:`OneOf` a fixed set, :class:`Number` a range, :class:`ListOf` a list of
allowed items, :class:`Text` a non-empty string. :mod:`cmrcnn_ext.config.schema` and
:mod:`cmrcnn_ext.config.tuned` declare each key's allowed values with them;
:mod:`cmrcnn_ext.config.validate` enforces them.

Example::

    betas = ListOf(Number(0, 1, high_open=True), length=2)
    betas.contains([0.9, 0.999])  # True
    str(betas)  # 'list of 2 values, each number in [0, 1)'
"""

import math
from typing import Any, Optional

__all__ = [
    "Allowed",
    "ListOf",
    "Number",
    "OneOf",
    "Text",
    "cfg_value",
    "config_keys",
    "format_value",
    "plain_value",
]


def format_value(value: Any) -> str:
    """A config value as text: tuples as lists, strings double-quoted.

    Args:
        value: a config value.

    Returns:
        str: e.g. ``'[0.5, 0.6]'``, ``'"first"'``, ``'True'``.
    """
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def plain_value(value: Any) -> Any:
    """Tuples as lists, recursively, so that config values compare equal to literals.

    Args:
        value: a config value.

    Returns:
        The value with every tuple turned into a list.
    """
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


def cfg_value(cfg, key: str) -> Any:
    """Value of a dotted config key.

    Args:
        cfg: a ``CfgNode`` (nested), or a flat mapping ``{dotted key: value}``.
        key: e.g. ``"MODEL.RPN.IOU_THRESHOLDS"``.

    Returns:
        The value.

    Raises:
        KeyError: if the key (or one of its parent nodes) is missing.
    """
    if key in cfg:  # a flat mapping; a CfgNode never holds dotted names
        return cfg[key]
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


class Allowed:
    """Allowed values described in words only: every value passes ``contains``.

    Args:
        text: the description shown in error messages and documentation.
    """

    def __init__(self, text: str):
        self.text = text

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        return True

    def __str__(self) -> str:
        return self.text


class OneOf(Allowed):
    """One of a fixed set of values (of the same types: ``1`` does not match ``True``).

    Args:
        values: the allowed values, in the order documentation lists them.
        text: description; default: the values, comma-separated.
    """

    def __init__(self, *values: Any, text: Optional[str] = None):
        self.values = values
        super().__init__(text or ", ".join(format_value(v) for v in values))

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one of :attr:`values`, with the same type."""
        return type(value) in {type(v) for v in self.values} and value in self.values


class Number(Allowed):
    """A finite number (or integer) within optional bounds, each closed or open.

    Args:
        low: lower bound, or ``None``.
        high: upper bound, or ``None``.
        integer: only integers.
        low_open: ``low`` itself is not allowed.
        high_open: ``high`` itself is not allowed.
        text: description; default: generated from the bounds.
    """

    def __init__(
        self,
        low=None,
        high=None,
        *,
        integer=False,
        low_open=False,
        high_open=False,
        text: Optional[str] = None,
    ):
        self.low, self.high, self.integer = low, high, integer
        self.low_open, self.high_open = low_open, high_open
        super().__init__(text or self._describe())

    def _describe(self) -> str:
        kind = "integer" if self.integer else "number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None and self.integer:
            return f"{kind} {lo}..{hi}"
        if lo is not None and hi is not None:
            left, right = "(["[not self.low_open], ")]"[not self.high_open]
            return f"{kind} in {left}{lo}, {hi}{right}"
        if lo is not None:
            return f"{kind} {'>' if self.low_open else '>='} {lo}"
        if hi is not None:
            return f"{kind} {'<' if self.high_open else '<='} {hi}"
        return kind

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a finite number (not a bool) within the bounds."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True


class Text(Allowed):
    """A non-empty string (not only spaces).

    Args:
        text: description.
    """

    def __init__(self, text: str = "non-empty text"):
        super().__init__(text)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a string with a non-space character."""
        return isinstance(value, str) and bool(value.strip())


class ListOf(Allowed):
    """A list or tuple whose items are all allowed by ``item``.

    Args:
        item: allowed values of each item.
        length: required length, or ``None``.
        min_length: minimum length.
        text: description; default: generated from ``item`` and ``length``.
    """

    def __init__(
        self,
        item: Allowed,
        *,
        length: Optional[int] = None,
        min_length: int = 0,
        text: Optional[str] = None,
    ):
        self.item, self.length, self.min_length = item, length, min_length
        size = f"{length} " if length is not None else ""
        super().__init__(text or f"list of {size}values, each {item}")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a list/tuple of the right length with allowed items."""
        if not isinstance(value, (list, tuple)) or len(value) < self.min_length:
            return False
        if self.length is not None and len(value) != self.length:
            return False
        return all(self.item.contains(v) for v in value)


def config_keys(cfg) -> list:
    """Every key of ``cfg`` as a dotted path (``"MODEL.RPN.IOU_THRESHOLDS"``), nodes included."""
    keys = []

    def walk(node, prefix):
        for k, v in node.items():
            keys.append(prefix + k)
            if hasattr(v, "items"):
                walk(v, prefix + k + ".")

    walk(cfg, "")
    return keys
