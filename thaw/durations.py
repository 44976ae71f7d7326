"""Go durations ("60s", "1m30s", "500ms"), the form Knative's annotations and config maps take.

Converted by `durationpy` (which the kubernetes client depends on). durationpy also takes units Go does
not ("1d", "1w", "1h-2m"), so the text is first held to Go's `time.ParseDuration` grammar: a unit is
required ("60" is refused, as Knative refuses it), except for "0". `GoDuration(low, high)` is the spec's
one typed field for them.
"""

from __future__ import annotations

import re
from typing import Annotated

from datetime import timedelta

import durationpy
from pydantic import AfterValidator, TypeAdapter, ValidationError

_GO_DURATION = re.compile(r"[-+]?(0|((\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)")


def parse_duration(value: str) -> float:
    """Seconds in a Go duration string. Raises ValueError for anything Go's parser refuses."""
    if not isinstance(value, str) or not _GO_DURATION.fullmatch(value):
        raise ValueError(f"{value!r} is not a Go duration: write it with a unit, such as '60s', '1m30s' "
                         "or '500ms'")
    try:
        return durationpy.from_str(value).total_seconds()
    except durationpy.DurationError:
        raise ValueError(f"{value!r} is not a Go duration: write it with a unit, such as '60s', '1m30s' "
                         "or '500ms'") from None


def GoDuration(low: float, high: float):  # noqa: N802 (a type, used as one)
    """A Go duration string between `low` and `high` seconds, kept as written."""

    def check(value: str) -> str:
        if not low <= parse_duration(value) <= high:
            raise ValueError(f"must be between {format_duration(low)} and {format_duration(high)}, got {value!r}")
        return value

    return Annotated[str, AfterValidator(check)]


def format_duration(seconds: float) -> str:
    """The shortest Go duration string for whole or fractional seconds ("90s", "1.5s")."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


_durations = TypeAdapter(timedelta)


def parse_iso_duration(text: str, what: str = "duration") -> float:
    """Seconds in an ISO 8601 duration such as PT0.5S or PT1M (Knative's backoffDelay and timeout)."""
    if not isinstance(text, str) or not text.upper().startswith("P"):
        raise ValueError(f"{what} must be an ISO 8601 duration such as PT0.5S, not {text!r}")
    try:
        seconds = _durations.validate_python(text).total_seconds()
    except ValidationError:
        raise ValueError(f"{what} must be an ISO 8601 duration such as PT0.5S, not {text!r}") from None
    if seconds < 0:
        raise ValueError(f"{what} must not be negative")
    return seconds
