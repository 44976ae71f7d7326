"""Shared fixtures: the tiny model (built once per session) and real function servers on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from thaw.launch import ServerProcess, base_env, free_port, function_command

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_ENGINE = {"max_model_len": 512, "dtype": "bfloat16"}
# The tiny model makes a 460-token answer in under a second, faster than a busy 2-core machine can schedule the
# test's own client: a test that must act on a generation before it ends gives it tens of seconds of tokens.
LONG_CONTEXT = 32768


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from thaw.cli.model_build import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def long_model(tmp_path_factory) -> Path:
    """The tiny model with a LONG_CONTEXT context: room for generations that outlast any scheduling delay."""
    from thaw.cli.model_build import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-long", max_positions=LONG_CONTEXT)


@pytest.fixture(scope="session")
def tiny_embed_model(tmp_path_factory) -> Path:
    """A tiny random BERT embedding model (thaw model tiny-embed), built once per session."""
    from thaw.cli.model_build import build_tiny_embed

    return build_tiny_embed(tmp_path_factory.mktemp("models") / "tiny-embed")


def other_model(model_dir: Path, dst: Path, seed: int, std: float = 0.5) -> Path:
    """`model_dir`'s shape, config and tokenizer with other weights, N(0, std) (norms kept): the tiny model's own
    small initialisation makes every seed answer alike, std 0.5 makes greedy outputs depend on the weights; a
    deep model wants its own initialisation's 0.02."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dst)
    generator = torch.Generator().manual_seed(seed)
    for path in dst.glob("*.safetensors"):
        tensors = {name: (torch.randn(t.shape, generator=generator) * std).to(t.dtype) if t.dim() == 2 else t
                   for name, t in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    return dst


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a real tmpfs of a given size (`tmpfs("2m")`), for disks that really fill up; unmounted after
    the test."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs-{len(mounts)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=True)


def thaw_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """`thaw ARGS...` in a process of its own, output captured as text."""
    return subprocess.run([sys.executable, "-m", "thaw.cli", *args], capture_output=True, text=True, **kw)


@contextlib.contextmanager
def thaw_up(work: Path, spec: dict, deadline_s: float = 60):
    """`thaw up` on `spec` (written to work/thaw.yaml) in a process of its own, once its gateway (on the spec's
    port) answers: its URL and process; stopped afterwards."""
    (work / "thaw.yaml").write_text(yaml.safe_dump(spec))
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(work / "thaw.yaml")], work / "up.log",
                           env=base_env())
    url = f"http://127.0.0.1:{spec['platform']['gateway']['port']}"
    try:
        server.wait_http(url + "/healthz", deadline_s)
        yield url, server
    finally:
        server.stop(60)


def poll(condition, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Call `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s")


class RunningFunction:
    def __init__(self, server: ServerProcess, port: int, served_name: str, startup: dict):
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.served_name = served_name
        self.startup = startup  # what the probes answered while the engine was loading

    def metric(self, name: str) -> float:
        for line in requests.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def start_function(model_dir: Path, log_dir: Path, served_name: str = "tiny", flags: list[str] | None = None,
                   env: dict | None = None, **engine_args) -> RunningFunction:
    """`thaw function serve` on `model_dir` (engine arguments over TINY_ENGINE, more `flags`), once ready."""
    port = free_port()
    server = ServerProcess(function_command(model_dir, served_name, port, {**TINY_ENGINE, **engine_args}, flags),
                           log_dir / f"function-{port}.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        healthz = server.wait_http(url + "/healthz", 60)
        readyz_while_loading = requests.get(url + "/readyz", timeout=5)
        server.wait_http(url + "/readyz", 180)
    except BaseException:
        server.stop()
        raise
    startup = {"healthz": healthz.status_code, "readyz_status": readyz_while_loading.status_code,
               "readyz_body": readyz_while_loading.json()}
    return RunningFunction(server, port, served_name, startup)


@pytest.fixture(scope="module")
def function(tiny_model, tmp_path_factory):
    """One function (gunicorn + Flask + in-process vLLM engine) on the tiny model, per test module."""
    running = start_function(tiny_model, tmp_path_factory.mktemp("logs"))
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def loop():
    """An event loop in a background thread for small in-process aiohttp servers (loop_servers.py)."""
    from loop_servers import LoopThread

    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def upstreams(loop):
    """Upstream models / subscribers on one loopback server, one path each (loop_servers.Upstreams)."""
    from loop_servers import Upstreams

    servers = Upstreams()
    servers.base = loop.serve(servers.app())
    return servers
