"""The slim images start: each Dockerfile's own `pip install` runs in a fresh virtual environment (no
Docker needed: the same install, from this checkout) and the image's entry modules import there. The
function's image is vLLM's own (`FROM vllm/vllm-openai`), so only what it adds is checked elsewhere."""

from __future__ import annotations

import re
import shlex
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Dockerfile -> the modules its `thaw` entrypoint loads for the command a cluster runs it with.
IMAGES = {"eventing/Dockerfile.router": ["thaw.cli", "thaw.eventing.router", "thaw.eventing.graph"],
          "cache-warmer/Dockerfile": ["thaw.cli", "thaw.cache_warmer.app", "thaw.cache_warmer.tier.stager",
                                      "thaw.cache_warmer.tier.origins"]}


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of each `pip install` in the Dockerfile's RUN lines, /src being this checkout."""
    text = dockerfile.read_text().replace("\\\n", " ")
    installs = []
    for run in re.findall(r"^RUN (.+)$", text, flags=re.M):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installs.append([str(ROOT) if w == "/src" else w for w in words[2:]])
    return installs


def test_each_slim_image_installs_what_its_entry_modules_import(tmp_path):
    by_install: dict[tuple, list[str]] = {}
    for dockerfile, modules in IMAGES.items():
        installs = pip_installs(ROOT / dockerfile)
        assert installs, f"{dockerfile} installs nothing"
        by_install.setdefault(tuple(map(tuple, installs)), []).extend(modules)
    for n, (installs, modules) in enumerate(by_install.items()):  # the same install set is built once
        env_dir = tmp_path / f"image-{n}"
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = env_dir / "bin" / "python"
        for args in installs:
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                   *args], capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
        imported = subprocess.run([str(python), "-c", "import " + ", ".join(sorted(set(modules)))],
                                  capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert imported.returncode == 0, imported.stderr[-3000:]
