"""The standby: a process that has already imported torch, vLLM and the function, and forks replicas.

A replica launched cold spends most of its start importing (about 7 s on a 2-core CPU, 20 s on a GPU
node). The standby pays that once, ahead of time; a replica forked from it starts at engine init. It holds
no engine and no GPU context (importing torch and vLLM's CUDA modules does not create one), so a fork is
safe on a GPU node. A CUDA context cannot cross a fork, so before each fork the standby checks that it
has none and refuses to fork otherwise, with an error that says why.

Protocol: a Unix socket; one JSON request per connection, {"replica": ReplicaLaunch's fields, "env": {...},
"log": path}, answered with {"pid": N} or {"error": "..."}. The child boots the function from those typed
settings (functions/boot.py's `function_config`, as `thaw function serve` does from its flags); it never
goes through the CLI.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from thaw.launch import ReplicaBoot
from thaw.spec import EngineArgs
from thaw.vllm_platform import cuda_initialised, detect

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ReplicaLaunch:
    """What a forked replica serves, and where: typed end to end (engine arguments stay EngineArgs)."""

    boot: ReplicaBoot
    served_name: str
    engine: EngineArgs
    port: int
    host: str = "127.0.0.1"

    def to_json(self) -> dict:
        return {"boot": self.boot.to_json(), "served_name": self.served_name,
                "engine": self.engine.model_dump(mode="json", exclude_none=True), "port": self.port, "host": self.host}

    @classmethod
    def from_json(cls, data: dict) -> "ReplicaLaunch":
        return cls(ReplicaBoot.from_json(data["boot"]), data["served_name"], EngineArgs.model_validate(data["engine"]),
                   int(data["port"]), data.get("host", "127.0.0.1"))


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal this process when its parent dies, so nothing outlives the plane."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def preload() -> float:
    """Import what every replica needs before its engine starts; returns the seconds it took."""
    start = time.perf_counter()
    import gunicorn.app.base  # noqa: F401
    import torch  # noqa: F401
    import vllm  # noqa: F401
    from vllm.engine.llm_engine import LLMEngine  # noqa: F401

    import thaw.cache_warmer.tier.ensure  # noqa: F401 - a replica with an s3:// source stages at boot
    import thaw.cache_warmer.tier.origins
    import thaw.functions.app  # noqa: F401
    import thaw.functions.boot  # noqa: F401
    import thaw.functions.serve  # noqa: F401

    # botocore reads and parses its S3 service description on a client's first creation
    thaw.cache_warmer.tier.origins.S3Origin("s3://preload", region="us-east-1")

    # What vLLM imports while its engine starts (hundreds of modules: worker, model runner, loader, layers,
    # scheduler, sampler). Names move between vLLM versions, so a missing one is skipped, not an error.
    for name in detect().engine_modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional speed-up
            pass

    # Everything loaded so far lives as long as the standby: move it out of the collector's reach, so a
    # replica's gc.collect() (vLLM calls it several times while starting) skips it and fork's
    # copy-on-write pages stay shared.
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start


class ForkRefused(Exception):
    """Forking now would give the replica a broken GPU context."""


def _reap(signum, frame) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _run_replica(launch: ReplicaLaunch, env: dict[str, str], log: str) -> None:
    """In the forked child: a session of its own, output to the log, then the function."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        die_with_parent()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.environ.clear()
        os.environ.update(env)
        os.environ["THAW_FORKED_FROM_STANDBY"] = "1"
        from thaw.functions.boot import function_config
        from thaw.functions.serve import serve

        try:
            serve(function_config(launch.boot, launch.served_name, launch.engine), launch.host, launch.port)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve_standby(socket_path: Path) -> None:
    """Preload, then fork a replica for each request on the socket, until terminated."""
    die_with_parent()
    seconds = preload()
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    server.listen(16)
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"standby ready: preloaded in {seconds:.2f}s, pid {os.getpid()}", flush=True)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    request = json.loads(conn.makefile("rb").readline())
                    launch = ReplicaLaunch.from_json(request["replica"])
                    if cuda_initialised():
                        raise ForkRefused("the standby has initialised CUDA, and a CUDA context does not "
                                          "survive fork(): a forked replica could not use the GPU. Something "
                                          "preloaded touched the GPU; restart the plane (replicas start as new "
                                          "processes meanwhile with standby: false)")
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        server.close()
                        conn.close()
                        _run_replica(launch, request["env"], request["log"])
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                except (ValueError, TypeError, KeyError, OSError, ForkRefused) as exc:
                    conn.sendall(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)


def spawn_from_standby(socket_path: Path, launch: ReplicaLaunch, env: dict[str, str], log: Path,
                       timeout: float = 10) -> int:
    """Ask the standby for a replica; returns its pid (a session leader: kill its group to stop it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(json.dumps({"replica": launch.to_json(), "env": env, "log": str(log)}).encode() + b"\n")
        answer = json.loads(s.makefile("rb").readline())
    if "error" in answer:
        raise RuntimeError(f"standby could not fork a replica: {answer['error']}")
    return int(answer["pid"])


if __name__ == "__main__":
    serve_standby(Path(sys.argv[1]))
