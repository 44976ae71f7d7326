"""Start and stop server processes on loopback: a function, or vLLM's own server for comparison.

Each process gets its own session (so stopping it stops its engine-core and helper children too) and
writes its output to a log file, never to a pipe: a leftover child holding a pipe open would hang us.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import requests

from thaw.vllm_platform import detect


# The demo model's engine arguments (examples/thaw.yaml's): what the benches run it with, on every server.
DEMO_ENGINE_ARGS = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The environment for a model server here: never a hub, no telemetry, and what this platform's vLLM
    needs (a small CPU KV cache; the CUDA build's sampler setting)."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    env.update(detect().server_env(int(env.get("VLLM_CPU_KVCACHE_SPACE", "1"))))
    env.update(extra)
    return env


def serve_args(model_dir: str | Path | None, served_name: str, port: int, engine_args: dict | None = None,
               source_args: list[str] | None = None, host: str | None = None) -> list[str]:
    """The arguments of `thaw function serve`: the same for a replica here and a pod on a cluster."""
    where = (["--model-dir", str(model_dir)] if model_dir is not None else []) + list(source_args or [])
    args = ["function", "serve", *where, "--served-name", served_name, "--port", str(port)]
    args += ["--host", host] if host else []
    for key, value in (engine_args or {}).items():
        args += ["--engine-arg", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


@dataclass(frozen=True)
class ReplicaBoot:
    """Where a replica gets its weights, its cache tier and its body limit: `thaw function serve`'s options,
    typed. A replica forked from the standby boots from this as it is (functions/boot.py); a new process
    or a pod gets it as flags (`flags`)."""

    model_dir: str | None = None  # a folder of weights, read where it is
    source: str | None = None  # or s3://... or a folder, staged through the cache tier at boot
    cache_root: str | None = None
    cache_capacity: str = "50Gi"
    max_body_size: str = "32Mi"
    prewarm: bool = True
    s3_endpoint: str | None = None
    s3_region: str | None = None
    bandwidth_mbps: float | None = None
    dram_root: str | None = None
    # payload logging (functions/payload_log.py): the sink, and who the events say they are from
    log_url: str | None = None
    log_mode: str = "all"
    log_max_body: str = "1Mi"
    log_service: str | None = None
    log_namespace: str = "default"
    log_metadata_headers: tuple[str, ...] = ()
    # an engine of this model's key, built and waiting without weights for a model to adopt it (functions/pool.py)
    pool: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ReplicaBoot":
        """From `to_json`'s object (JSON has no tuples). Unknown fields raise TypeError."""
        return cls(**{**data, "log_metadata_headers": tuple(data.get("log_metadata_headers") or ())})

    def flags(self) -> list[str]:
        args = ["--model-dir", self.model_dir] if self.model_dir is not None else []
        args += ["--source", self.source] if self.source is not None else []
        args += ["--cache-root", self.cache_root, "--cache-capacity", self.cache_capacity] if self.cache_root else []
        args += ["--max-body-size", self.max_body_size]
        args += [] if self.source is None else ["--prewarm" if self.prewarm else "--no-prewarm"]
        args += ["--s3-endpoint", self.s3_endpoint] if self.s3_endpoint else []
        args += ["--s3-region", self.s3_region] if self.s3_region else []
        args += ["--bandwidth-mbps", str(self.bandwidth_mbps)] if self.bandwidth_mbps else []
        args += ["--dram-root", self.dram_root] if self.dram_root else []
        if self.log_url:
            args += ["--log-url", self.log_url, "--log-mode", self.log_mode, "--log-max-body", self.log_max_body,
                     "--log-namespace", self.log_namespace]
            args += ["--log-service", self.log_service] if self.log_service else []
            for header in self.log_metadata_headers:
                args += ["--log-metadata-header", header]
        return args + (["--pool"] if self.pool else [])


def replica_boot(model, spec, cache_root: str | Path, dram_root: str | Path | None = None,
                 local: Callable[[str], str] = lambda p: str(Path(p).resolve()),
                 broker_url: Callable[[str], str] | None = None) -> ReplicaBoot:
    """How a replica gets its weights: a folder (`local` maps the spec's path to where the replica sees
    it), or its source staged into the cache tier at `cache_root` at boot. Either way the replica keeps
    vLLM's compile cache in the tier, and takes request bodies up to the spec's limit. With a payload logger,
    where its events go (`broker_url(name)`: a broker's ingress here or on a cluster)."""
    cache, s3 = spec.platform.cache, spec.platform.origin.s3
    tier = {"cache_root": str(cache_root), "cache_capacity": cache.capacity,
            "max_body_size": spec.platform.gateway.maxBodySize}
    logger = model.logger
    if logger is not None:
        url = logger.url or (broker_url or (lambda b: f"{spec.platform.gateway.local_url}/{spec.platform.namespace}/{b}"))(
            logger.broker)
        tier.update(log_url=url, log_mode=logger.mode, log_max_body=logger.maxBodySize, log_service=model.name,
                    log_namespace=spec.platform.namespace, log_metadata_headers=tuple(logger.metadataHeaders))
    if not model.stages_through_tier:
        return ReplicaBoot(model_dir=local(model.source), **tier)
    return ReplicaBoot(source=model.source if model.source.startswith(("s3://", "hf://")) else local(model.source),
                       prewarm=model.cache.prewarm, s3_endpoint=s3.endpointUrl, s3_region=s3.region,
                       bandwidth_mbps=s3.bandwidthMbps,
                       dram_root=str(dram_root) if model.cache.tier == "dram" and dram_root else None, **tier)


def function_command(model_dir: Path | None, served_name: str, port: int, engine_args: dict | None = None,
                     source_args: list[str] | None = None) -> list[str]:
    """`thaw function serve` for a folder of weights, or for a source staged at boot (`source_args`: also
    the cache tier, for a folder too)."""
    return [sys.executable, "-m", "thaw.cli", *serve_args(model_dir, served_name, port, engine_args, source_args)]


def vllm_server_command(model_dir: Path, served_name: str, port: int, engine_args: dict) -> list[str]:
    """vLLM's own OpenAI server (what KServe's huggingfaceserver wraps), same engine arguments."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--disable-log-stats"]
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag] if value else []
        else:
            cmd += [flag, str(value)]
    return cmd


def stop_servers_on_sigterm() -> None:
    """A SIGTERM to this process (`timeout` sends one to a bench part past its bound) raises SystemExit, so the
    `finally` that stops each ServerProcess runs: a server in a session of its own otherwise outlives the bench
    and keeps its GPU memory (a vLLM server left holding 90% of the card failed the next part's start)."""
    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)


class ServerProcess:
    """A server launched in its own session; `launched_at` is wall-clock time just before exec."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.cmd = cmd
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.launched_at = time.time()
        env = dict(env or base_env())
        env["THAW_LAUNCH_TIME"] = repr(self.launched_at)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_http(self, url: str, deadline_s: float, ok=lambda r: r.status_code == 200) -> requests.Response:
        """Poll `url` until `ok`; raise with the log's tail if the process dies or time runs out."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if not self.alive():
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(url, timeout=2)
                if ok(r):
                    return r
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{url} not ready within {deadline_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 20) -> int | None:
        """SIGTERM the whole session, SIGKILL what is left after `grace_s`."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the session, e.g. an engine core
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None


def wait_until(condition, timeout: float, what: str, server: "ServerProcess | None" = None,
               interval: float = 0.2) -> None:
    """Call `condition` until it is truthy (HTTP errors count as not yet); raise after `timeout` seconds
    or as soon as `server` has exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server is not None and not server.alive():
            raise RuntimeError(f"{what}: the server exited:\n{server.log_tail()}")
        try:
            if condition():
                return
        except requests.RequestException:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s" + (f"; see {server.log_path}" if server else ""))
