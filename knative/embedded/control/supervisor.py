"""Replicas as real processes: start (cold, or forked from the standby), probe until ready, stop. Draining,
replacing and placing them are the reconciler's (reconciler.py).

Each replica is the function under gunicorn on a free loopback port, in a session of its own so that
stopping it stops its whole tree. It gets traffic only after /readyz answers 200, probed every 25 ms as
Knative's queue-proxy probes a starting container.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil

from thaw.launch import ReplicaBoot, base_env, free_port, function_command
from thaw.spec import Model
from thaw.vllm_platform import detect

from ..dataplane.replica import Replica, State
from .standby import ReplicaLaunch, die_with_parent, spawn_from_standby

log = logging.getLogger("thaw.supervisor")

PROBE_INTERVAL = 0.025
# A replica of a standby model asked for while the standby is still importing waits for it up to this long:
# the standby started with thaw up, so it is ready before a new process, which would import the same from
# nothing (35 s to ready on a fresh 2-core machine, against 6.4 s forked), could be.
STANDBY_WAIT = 120.0
EXIT_WAIT_S = 30.0  # how long a stop waits for its killed processes to be gone (a process in D state may never be)


def replica_command(model: Model, boot: ReplicaBoot, port: int) -> list[str]:
    """The command a new replica process of `model` runs (the cluster renders the same arguments into its pods)."""
    return function_command(None, model.served_name, port, model.replica_engine().model_dump(exclude_none=True),
                            boot.flags())


class Supervisor:
    def __init__(self, state_dir: Path, standby_socket: Path | None):
        self.log_dir = Path(state_dir) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.standby_socket = standby_socket
        self.standby_process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}  # what every replica's environment gets besides its own
        self._ids = itertools.count(1)

    def standby_ready(self) -> bool:
        return self.standby_socket is not None and self.standby_socket.exists()

    async def wait_standby(self) -> bool:
        """Whether the standby is ready, waiting for it while it is still coming up (STANDBY_WAIT at most)."""
        end = time.monotonic() + STANDBY_WAIT
        while not self.standby_ready():
            starting = self.standby_process is not None and self.standby_process.poll() is None
            if not starting or time.monotonic() > end:
                return False
            await asyncio.sleep(0.1)
        return True

    async def start(self, revision: str, model: Model, boot: ReplicaBoot, extra_env: dict[str, str]) -> Replica:
        """Launch a replica of `revision` (weights from a folder, or staged at boot: `boot`); it is `starting`
        until its readiness probe passes. Forked from the standby, it boots from the typed settings; as a
        new process, from the same settings as `thaw function serve`'s flags."""
        port = free_port()
        rid = f"{revision}-{next(self._ids)}"
        log_path = self.log_dir / f"{rid}.log"
        # Knative's container contract: every container gets PORT and the K_ names of what it serves.
        launched = time.time()  # the replica's own start-up events are counted from it (THAW_LAUNCH_TIME)
        env = base_env(**detect().server_env(model.engine.kv_cache_gib), PORT=str(port), K_SERVICE=model.name,
                       K_CONFIGURATION=model.name, K_REVISION=revision, THAW_LAUNCH_TIME=repr(launched),
                       **self.env, **extra_env)
        replica = None
        if model.standby and await self.wait_standby():
            launch = ReplicaLaunch(boot, model.served_name, model.replica_engine(), port)
            try:
                pid = await asyncio.to_thread(spawn_from_standby, self.standby_socket, launch, env, log_path)
                replica = Replica(rid, revision, port, pid, True, log_path)
            except (RuntimeError, OSError) as exc:  # a refusal says why; the replica still starts, cold
                log.error("%s; starting %s as a new process", exc, rid)
        if replica is None:
            with open(log_path, "ab") as out:
                popen = subprocess.Popen(replica_command(model, boot, port), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                         preexec_fn=die_with_parent)
            replica = Replica(rid, revision, port, popen.pid, False, log_path, popen=popen)
        replica.marks["launched"] = launched
        log.info("replica %s starting on port %d (%s)", rid, port, "forked from standby" if replica.via_standby
                 else "cold process")
        return replica

    async def wait_ready(self, replica: Replica, session: aiohttp.ClientSession, deadline_s: float) -> bool:
        """Probe /readyz until 200 (True), or until the function says its engine failed, the process dies or
        the deadline passes (False, with `replica.error` saying which)."""
        end = time.monotonic() + deadline_s
        timeout = aiohttp.ClientTimeout(total=2)
        while time.monotonic() < end and replica.state == State.STARTING:
            if not replica.alive():
                replica.error = f"its process exited during start-up (see {replica.log_path})"
                return False
            try:
                async with session.get(replica.url + "/readyz", timeout=timeout) as r:
                    body = await r.json(content_type=None)
                    if r.status == 200:
                        replica.phases = body.get("phases", {})
                        replica.engine_pid = body.get("engine_pid")
                        replica.ready_at = time.time()
                        replica.marks.update({**body.get("marks", {}), "seen_ready": replica.ready_at})
                        return True
                    if body.get("status") == "failed":  # it will never be ready: no need to wait it out
                        replica.error = body.get("error") or "its engine failed to load"
                        return False
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(PROBE_INTERVAL)
        replica.error = replica.error or f"not ready within {deadline_s:.0f}s (see {replica.log_path})"
        return False

    async def stop(self, replica: Replica, grace_s: float) -> None:
        """SIGTERM the replica's main process (gunicorn's master: it stops its worker, whose engine shuts its
        engine-core process down in order), SIGKILL the whole session after `grace_s` seconds. A SIGTERM to
        the whole session would reach the engine core first, and the function would see its engine die."""
        replica.move(State.STOPPED)
        try:
            os.kill(replica.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        await _group_gone(replica.pid, grace_s)
        _signal_group(replica.pid, signal.SIGKILL)
        if replica.popen is not None:
            await asyncio.to_thread(replica.popen.wait)
        # killed is not gone: a process with a GPU context gives its memory back as it exits, and the status
        # shows the replica terminating (and its model not at zero) until then
        await _group_gone(replica.pid, EXIT_WAIT_S)
        log.info("replica %s stopped", replica.id)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _group_gone(pgid: int, within_s: float) -> None:
    """Wait until no process of the group is left (zombies aside), for `within_s` seconds at most."""
    end = time.monotonic() + within_s
    while time.monotonic() < end and _group_alive(pgid):
        await asyncio.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return False


def start_standby(state_dir: Path) -> tuple[subprocess.Popen, Path]:
    """The standby process (see standby.py); it dies with this process."""
    socket_path = Path(state_dir) / "standby.sock"
    socket_path.unlink(missing_ok=True)  # its appearance is the standby's "ready"
    log_path = Path(state_dir) / "logs" / "standby.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        popen = subprocess.Popen([sys.executable, "-m", "thaw.knative.embedded.control.standby", str(socket_path)],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=base_env(),
                                 start_new_session=True)
    return popen, socket_path


async def stop_helper(popen: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM a helper process (the standby, the cache warmer), SIGKILL after `grace` seconds."""
    popen.terminate()
    try:
        await asyncio.wait_for(asyncio.to_thread(popen.wait), grace)
    except asyncio.TimeoutError:
        popen.kill()


async def wait_http_ready(session: aiohttp.ClientSession, url: str, popen: subprocess.Popen) -> bool:
    """Poll `url` until it answers 200 (True), or until its process exits (False)."""
    while popen.poll() is None:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return True
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.1)
    return False


def start_warmer(spec_path: Path, state_dir: Path) -> tuple[subprocess.Popen, str]:
    """The cache warmer's CloudEvents service (gunicorn); it dies with this process."""
    port = free_port()
    log_path = Path(state_dir) / "logs" / "cache-warmer.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        popen = subprocess.Popen([sys.executable, "-m", "thaw.cli", "cache-warmer", "-f", str(spec_path),
                                  "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=base_env(), start_new_session=True,
                                 preexec_fn=die_with_parent)
    return popen, f"http://127.0.0.1:{port}/"
