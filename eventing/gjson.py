"""The subset of GJSON path syntax that KServe's graph conditions use, evaluated on parsed JSON.

KServe's router evaluates `condition` with tidwall/gjson and only asks whether the result exists.
The one PyPI port (gjson-py) rejects KServe's own documented condition `[@this].#(decision_picker==ERROR)`
(an unquoted query value, which Go's GJSON compares as text) and is GPL-licensed, so thaw carries
this subset. Supported, with Go GJSON's meaning: dotted keys with `\\` escapes and `*`/`?` wildcards,
array indexes, `#` (length, or map over elements), queries `#(...)` (first match) and `#(...)#` (all
matches) with ==, =, !=, <, <=, >, >=, % and !% (wildcard like), nested queries, existence queries,
the `|` pipe, multipaths `[a,b]` and `{a,"k":b}`, and the modifiers @this, @reverse, @keys, @values.
"""

from __future__ import annotations

import json
import re
from typing import Any

from thaw.json_body import NOT_JSON

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
_OPERATORS = ("==", "!=", "<=", ">=", "!%", "<", ">", "=", "%")


class GJSONSyntaxError(ValueError):
    pass


def exists(document: Any, path: str) -> bool:
    """GJSON's Result.Exists(): the path selects something (JSON null counts, as in Go)."""
    return get(document, path) is not MISSING


def exists_in_bytes(body: bytes, path: str) -> bool:
    """Like exists() on raw bytes; a body that is not JSON matches nothing (Go: gjson.ValidBytes)."""
    try:
        return exists(json.loads(body), path)
    except NOT_JSON:
        return False


def get(value: Any, path: str) -> Any:
    """The value the path selects, or MISSING."""
    if value is MISSING or path == "":
        return value
    if path[0] in "[{":
        end = _closing(path, 0)
        selected = _multipath(value, path[1:end], path[0])
        return get(selected, _after(path[end + 1 :]))
    if path[0] == "@":
        name, sep, rest = _split_component(path)
        return get(_modifier(value, name[1:]), rest)
    component, sep, rest = _split_component(path)
    if component == "#":
        if not isinstance(value, list):
            return MISSING
        if rest == "":
            return len(value)
        if sep == "|":
            return get(len(value), rest)
        return _map(value, rest)
    if component.startswith("#("):
        if not isinstance(value, list):
            return MISSING
        every = component.endswith(")#")
        query = component[2 : -2 if every else -1]
        matches = [element for element in value if _matches(element, query)]
        if every:
            return _map(matches, rest) if sep == "." and rest else get(matches, rest)
        return get(matches[0], rest) if matches else MISSING
    key = _unescape(component)
    if isinstance(value, dict):
        if "*" in key or "?" in key:
            key = next((k for k in value if _like(k, key)), None)
        return get(value[key], rest) if key in value else MISSING
    if isinstance(value, list) and key.isdigit():
        index = int(key)
        return get(value[index], rest) if index < len(value) else MISSING
    return MISSING


def _map(elements: list, path: str) -> list:
    """`#.path`: the path applied to each element, keeping those where it exists."""
    return [r for r in (get(e, path) for e in elements) if r is not MISSING]


def _after(rest: str) -> str:
    return rest[1:] if rest[:1] in (".", "|") else rest


def _scan(text: str, start: int = 0):
    """(index, char, depth) for each character outside quoted strings; a closing bracket is reported at
    the depth of its opening one."""
    depth, quoted, i = 0, False, start
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        else:
            if ch in ")]}":
                depth -= 1
            yield i, ch, depth
            if ch in "([{":
                depth += 1
        i += 1


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start`, skipping quoted strings."""
    for i, ch, depth in _scan(text, start):
        if ch in ")]}" and depth == 0:
            return i
    raise GJSONSyntaxError(f"unclosed {text[start]!r} in {text!r}")


def _split_component(path: str) -> tuple[str, str, str]:
    """The first component, the separator after it ('.', '|' or ''), and the rest."""
    i = 0
    while i < len(path):
        ch = path[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "(" and path[i - 1 : i] == "#":
            i = _closing(path, i) + 1
            if path[i : i + 1] == "#":
                i += 1
            continue
        if ch in ".|":
            return path[:i], ch, path[i + 1 :]
        i += 1
    return path, "", ""


def _unescape(key: str) -> str:
    return re.sub(r"\\(.)", r"\1", key)


def _split_top_level(text: str, separator: str) -> list[str]:
    parts, start = [], 0
    for i, ch, depth in _scan(text):
        if ch == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _multipath(value: Any, inner: str, bracket: str) -> Any:
    if bracket == "[":
        return [r for r in (get(value, p) for p in _split_top_level(inner, ",")) if r is not MISSING]
    out = {}
    for part in _split_top_level(inner, ","):
        if part.startswith('"'):
            end = _closing_quote(part)
            key, sub = json.loads(part[: end + 1]), part[end + 1 :].lstrip().removeprefix(":").strip()
        else:
            sub = part
            key = _unescape(_split_top_level(part.replace("|", "."), ".")[-1].split(".")[-1])
        result = get(value, sub)
        if result is not MISSING:
            out[key] = result
    return out


def _closing_quote(text: str) -> int:
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    raise GJSONSyntaxError(f"unclosed string in {text!r}")


def _modifier(value: Any, name: str) -> Any:
    name = name.split(":", 1)[0]
    if name == "this":
        return value
    if name == "reverse":
        if isinstance(value, list):
            return value[::-1]
        return dict(reversed(list(value.items()))) if isinstance(value, dict) else value
    if name in ("keys", "values"):
        if not isinstance(value, dict):
            return MISSING
        return list(value) if name == "keys" else list(value.values())
    raise GJSONSyntaxError(f"unsupported modifier @{name}")


def _matches(element: Any, query: str) -> bool:
    """One `#(...)` query on one array element."""
    left, op, right = _parse_query(query)
    selected = get(element, left) if left else element
    if selected is MISSING:
        return False
    if not op:
        return True
    if isinstance(selected, bool):
        if op in ("==", "="):
            return right == ("true" if selected else "false")
        return op == "!=" and right != ("true" if selected else "false")
    if isinstance(selected, (int, float)):
        try:
            number = float(right)
        except ValueError:
            number = 0.0
        return _compare(float(selected), op, number)
    if isinstance(selected, str):
        if op == "%":
            return _like(selected, right)
        if op == "!%":
            return not _like(selected, right)
        return _compare(selected, op, right)
    return False


def _parse_query(query: str) -> tuple[str, str, str]:
    for i, ch, depth in _scan(query):
        if depth == 0 and ch not in "([{)]}":
            op = next((o for o in _OPERATORS if query.startswith(o, i)), None)
            if op:
                return query[:i].strip(), op, _literal(query[i + len(op):].strip())
    return query.strip(), "", ""


def _literal(text: str) -> str:
    """A query's right-hand side as Go GJSON sees it: quoted strings unquoted, the rest as written."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text[1:-1]
    return text


def _compare(a: Any, op: str, b: Any) -> bool:
    return {
        "==": a == b,
        "=": a == b,
        "!=": a != b,
        "<": a < b,
        "<=": a <= b,
        ">": a > b,
        ">=": a >= b,
    }.get(op, False)


def _like(text: str, pattern: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None
