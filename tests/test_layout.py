"""The tree keeps the shape docs/architecture.md draws: imports point down its floors (cli > loadtests > knative >
functions > cache-warmer > eventing > thaw), each room uses only the rooms the map lets it, and no modules import
each other in a circle. An AST pass over the files, through pyproject's `package-dir` mapping (which
farm-studio misreads); lazy imports inside functions count too."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
FLOORS = ["thaw", "thaw.eventing", "thaw.cache_warmer", "thaw.functions", "thaw.knative", "thaw.loadtests", "thaw.cli"]
FRONT_DOOR = ["thaw.knative.embedded.gateway", "thaw.knative.embedded.auth", "thaw.knative.embedded.up"]
# a room -> the rooms it must not import (docs/architecture.md)
MUST_NOT = {
    "thaw.knative.embedded.dataplane": ["thaw.knative.embedded.control", *FRONT_DOOR],
    "thaw.knative.embedded.control": FRONT_DOOR,
    "thaw.cache_warmer.tier": ["thaw.cache_warmer.app", "thaw.cache_warmer.optimizer"],
    "thaw.cache_warmer.optimizer": ["thaw.cache_warmer.app", "thaw.cache_warmer.tier"],
}


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, whether it is a package's __init__)."""
    out = {}
    for package, folder in PACKAGE_DIR.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return out


def imports() -> dict[str, set[str]]:
    """Module -> the thaw modules it imports (an imported name resolves to the module that defines it)."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, (path, is_package) in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target.startswith("thaw") and target != name:
                    edges[name].add(target)
    return edges


def within(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def floor(module: str) -> int:
    return max(i for i, f in enumerate(FLOORS) if within(module, f))


def test_imports_point_down_the_floors():
    upward = sorted(f"{a} -> {b}" for a, targets in imports().items() for b in targets if floor(b) > floor(a))
    assert not upward, "imports running back up the stack:\n" + "\n".join(upward)


@pytest.mark.parametrize("room", sorted(MUST_NOT))
def test_each_room_uses_only_what_the_map_lets_it(room):
    crossing = sorted(f"{a} -> {b}" for a, targets in imports().items() if within(a, room)
                      for b in targets for banned in MUST_NOT[room] if within(b, banned))
    assert not crossing, f"{room} imports what docs/architecture.md keeps out of it:\n" + "\n".join(crossing)


def test_no_import_circles():
    edges = imports()
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_pass_resolves_real_imports():
    """The pass itself: absolute, relative and package imports resolve, so an empty answer above means none."""
    edges = imports()
    assert "thaw.functions.engine" in edges["thaw.functions.service"]
    assert "thaw.openai_wire" in edges["thaw.knative.embedded.dataplane.proxy"]
    assert "thaw.cache_warmer.tier.cache" in edges["thaw.cache_warmer.tier.ensure"]
