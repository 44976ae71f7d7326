"""Decoding a JSON request body that came from anyone: every way it can be wrong is an `InvalidJSON`.

Each surface (the gateway, the function, the broker, the router, the warmer) answers an `InvalidJSON`
with a 400 in its own protocol's shape. Three ways past `json.loads`'s own errors are closed here:
- nesting deep enough to exhaust the parser's recursion (a RecursionError, not a ValueError);
- bytes that are not UTF-8;
- lone surrogate escapes (`"\\ud800"`): valid JSON, but not text, so a tokenizer, a header or a file
  write fails on them later. The error names where the first one is (`messages[0].content`).
"""

from __future__ import annotations

import json
from typing import Any


# What json.loads raises on bytes it cannot decode (UnicodeDecodeError is a ValueError), deep nests included.
NOT_JSON = (ValueError, RecursionError)


class InvalidJSON(ValueError):
    """`message` completes "the body is ...", so each surface can say it in its own words."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def _path(parts: list) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _not_text(value: str) -> bool:
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def first_invalid_text(value: Any) -> str | None:
    """Where (a path like `messages[0].content`) the first string that is not valid Unicode text is in a
    decoded JSON value, or None. Iterative, so a value nested as deep as the parser allows is fine."""
    stack: list[tuple[list, Any]] = [([], value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _not_text(item):
                return _path(path) or "body"
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if _not_text(key):
                    return _path(path) or "body"
                stack.append((path + [key], child))
        elif isinstance(item, list):
            stack.extend((path + [i], child) for i, child in reversed(list(enumerate(item))))
    return None


def decode(raw: bytes | str) -> Any:
    """The JSON value of a request body; raises InvalidJSON saying what is wrong with it."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidJSON("nested too deeply") from None
    except UnicodeDecodeError:
        raise InvalidJSON("not UTF-8 text") from None
    except ValueError as exc:
        raise InvalidJSON(f"not valid JSON ({exc})") from None
    where = first_invalid_text(value)
    if where is not None:
        raise InvalidJSON(f"not valid Unicode text at '{where}' (a lone surrogate escape)", param=where)
    return value
