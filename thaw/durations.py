"""Go-style durations ("60s", "1m30s", "500ms"), the form Knative's annotations and config maps use."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")


def parse_duration(value: str | int | float) -> float:
    """Seconds in a Go duration string; a bare number is taken as seconds. Raises ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if text == "0":
        return 0.0
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration such as '60s', '1m30s' or '500ms'")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """The shortest Go duration string for whole or fractional seconds ("90s", "1.5s")."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:g}s"
