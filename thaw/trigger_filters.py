"""Knative Trigger filter dialects, their grammar: what a spec's (or a Trigger's) `filters` may say. Matching
an event against them is eventing/filters.py's."""

from __future__ import annotations

from typing import Any

DIALECTS = ("exact", "prefix", "suffix", "all", "any", "not")


class FilterInvalid(ValueError):
    pass


def check_filters(filters: list[dict[str, Any]], where: str = "filters") -> None:
    """Raise FilterInvalid naming the first malformed dialect."""
    for i, f in enumerate(filters):
        _check(f, f"{where}[{i}]")


def _check(f: Any, where: str) -> None:
    if not isinstance(f, dict) or len(f) != 1:
        raise FilterInvalid(f"{where}: a filter is one of {', '.join(DIALECTS)} (exactly one key per list item)")
    (dialect, value), = f.items()
    if dialect == "cesql":
        raise FilterInvalid(f"{where}: the cesql dialect is not supported by thaw's broker; use exact/prefix/suffix/all/any/not")
    if dialect not in DIALECTS:
        raise FilterInvalid(f"{where}: unknown filter dialect {dialect!r}; use one of {', '.join(DIALECTS)}")
    if dialect in ("exact", "prefix", "suffix"):
        if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
            raise FilterInvalid(f"{where}.{dialect}: a map of attribute name to string value")
        if dialect == "exact" and any(v == "" for v in value.values()):
            raise FilterInvalid(f"{where}.exact: values must not be empty")
    elif dialect in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise FilterInvalid(f"{where}.{dialect}: a non-empty list of filters")
        for j, sub in enumerate(value):
            _check(sub, f"{where}.{dialect}[{j}]")
    else:
        _check(value, f"{where}.not")
