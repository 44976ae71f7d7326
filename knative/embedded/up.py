"""`thaw up`: the embedded plane and its gateway in the foreground, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import secrets
import signal
from pathlib import Path

import uvloop
from aiohttp import web
from rich.console import Console
from rich.logging import RichHandler

from thaw.cache_warmer.optimizer.loop import graph_look_ahead
from thaw.functions.payload_log import PAYLOAD_LOG_TOKEN_ENV
from thaw.eventing.host import EventingHost
from thaw.durations import parse_duration
from thaw.spec import Spec

from .auth import Authenticator, Token, eventing_gate
from .control.backend import EmbeddedBackend
from .control.plane import ServingPlane
from .control.supervisor import start_warmer, stop_helper, wait_http_ready
from .control.traffic import RevisionHistory, SpecRefused, traffic_problems
from .gateway import Gateway, GatewayRunner

log = logging.getLogger("thaw.up")


class StartConflict(Exception):
    """thaw up cannot start here: another instance holds the state directory, or the port is taken."""


def hold_state_dir(state_dir: Path):
    """One thaw up per state directory (its broker's log, standby socket, replicas' logs): a lock held for
    the process's life; the open file is returned to keep it. A second instance gets StartConflict."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "thaw-up.lock", "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise StartConflict(f"another thaw up (pid {holder}) runs on the state directory {state_dir}: stop "
                            "it, or give this spec another platform.stateDir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(spec: Spec, spec_path: Path | None, ready: asyncio.Event | None = None) -> None:
    auth = Authenticator.from_spec(spec.platform.auth)
    gate = eventing_gate(auth)
    # The broker's deliveries to models: a per-process token nobody else holds (it matters once auth is on,
    # which a spec reload may do at any time).
    internal = secrets.token_urlsafe(32)
    auth.internal = Token(internal, None)
    # Replicas' payload logs to the broker: a token that may publish and reach no model (least privilege).
    publisher = secrets.token_urlsafe(32)
    auth.publisher = Token(publisher, frozenset())
    # Revision events and the optimizer's warm requests go into the local broker, whose triggers take
    # them to the cache warmer: the event path a cluster has (ApiServerSource -> Broker -> Trigger).
    state_dir = Path(spec.platform.stateDir)
    warmer, warmer_url = start_warmer(spec_path, state_dir) if spec_path is not None else (None, None)
    gateway_url = spec.platform.gateway.local_url
    eventing = EventingHost(spec, gateway_url, state_dir, None, gate, internal, warmer_url, scope=auth.models_of)
    plane = ServingPlane(spec, spec_path, publish=eventing.publish)
    plane.supervisor.env[PAYLOAD_LOG_TOKEN_ENV] = publisher
    eventing.on_graph_begin = graph_look_ahead(EmbeddedBackend(plane))  # a request entering a graph wakes its models
    # Events accepted while thaw's own subscribers start wait for them (eventing/broker.py's readiness).
    gateway_ready, warmer_ready = asyncio.Event(), asyncio.Event()
    eventing.broker.readiness[gateway_url] = gateway_ready
    if warmer_url:
        eventing.broker.readiness[warmer_url] = warmer_ready
    idle_timeout = parse_duration(spec.platform.gateway.idleTimeout)
    gateway = Gateway(plane, auth, spec.platform.gateway.max_body_bytes, idle_timeout, spec.platform.namespace,
                      spec.platform.gateway.domain)
    eventing.broker.gateway_url, eventing.broker.in_process = gateway_url, gateway.deliver_event
    host, port = spec.platform.gateway.host, spec.platform.gateway.port
    plane.spec_listeners.append(eventing.apply_spec)

    def reload_auth(new: Spec) -> None:
        try:
            auth.reload(new.platform.auth)
        except (OSError, ValueError) as exc:
            log.error("tokens not reloaded, the previous ones stay in force: %s", exc)
            return
        log.info("auth: %d token(s) in force", len(auth.tokens))

    plane.spec_listeners.append(reload_auth)
    app = gateway.app()
    eventing.add_routes(app)
    # aiohttp's keep-alive timer runs from a connection's start and from each answer, and closes the
    # connection if no whole request has arrived by then: idle and slow-header connections alike.
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=idle_timeout)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    helpers: list[asyncio.Task] = []
    try:
        await eventing.start()  # before the plane: its first revision events go into the broker
        if warmer is not None:
            async def warmer_started() -> None:
                if await wait_http_ready(eventing.session, warmer_url + "readyz", warmer):
                    warmer_ready.set()
                else:
                    log.error("the cache warmer exited at start (see %s)", state_dir / "logs" / "cache-warmer.log")

            helpers.append(asyncio.create_task(warmer_started()))
        await plane.start()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise StartConflict(f"the gateway's address {host}:{port} is taken: stop what listens there, or "
                                "set platform.gateway.port") from None
        gateway_ready.set()
        log.info("gateway on http://%s:%d  (OpenAI base_url http://%s:%d/v1); models: %s", host, port, host,
                 port, ", ".join(m.name for m in spec.models) or "none")
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        log.info("stopping: draining replicas and the standby")
        await eventing.stop_dispatching()  # before the gateway its deliveries go through closes
        await runner.cleanup()
        await plane.stop()
        for task in helpers:
            task.cancel()
        if warmer is not None:
            await stop_helper(warmer)
        await eventing.stop()
        log.info("stopped")


def run_up(spec: Spec, spec_path: Path | None) -> None:
    """Raises StartConflict (before anything starts, or after what had started is stopped again), and
    SpecRefused for a spec that cannot apply (before anything starts)."""
    lock = hold_state_dir(Path(spec.platform.stateDir))  # noqa: F841 - held until the process ends
    problems = traffic_problems(spec.models, RevisionHistory.of_state_dir(spec.platform.stateDir))
    if problems:  # refused before anything starts, as a reload would refuse it
        raise SpecRefused(problems)
    configure_logging()
    # uvloop: the gateway copies every streamed chunk; on a small machine its CPU is the replicas' CPU.
    uvloop.run(serve(spec, spec_path))
