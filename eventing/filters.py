"""Knative Trigger filters, as pure functions over an event's attributes (context attributes and
extensions, as strings).

- `filter.attributes`: every entry must match exactly (AND); an empty value means "the attribute exists".
- `filters` (Knative's filter dialects): a list AND-ed together, each one of `exact`, `prefix`, `suffix`
  (maps of attribute -> value, every entry must hold), `all` / `any` (lists of dialects), `not` (one
  dialect). When `filters` is set, `filter` is ignored, as in Knative. `cesql` is not supported here.
"""

from __future__ import annotations

from typing import Any, Mapping

def matches(attributes: Mapping[str, str], filter_attributes: Mapping[str, str] | None,
            filters: list[dict[str, Any]] | None) -> bool:
    """Does an event with these attributes pass the trigger's filters?"""
    if filters:
        return all(_dialect(f, attributes) for f in filters)
    return all((name in attributes) if want == "" else attributes.get(name) == want
               for name, want in (filter_attributes or {}).items())


def _dialect(f: dict[str, Any], attributes: Mapping[str, str]) -> bool:
    (dialect, value), = f.items()
    if dialect == "exact":
        return all(attributes.get(k) == v for k, v in value.items())
    if dialect == "prefix":
        return all(k in attributes and attributes[k].startswith(v) for k, v in value.items())
    if dialect == "suffix":
        return all(k in attributes and attributes[k].endswith(v) for k, v in value.items())
    if dialect == "all":
        return all(_dialect(sub, attributes) for sub in value)
    if dialect == "any":
        return any(_dialect(sub, attributes) for sub in value)
    return not _dialect(value, attributes)
