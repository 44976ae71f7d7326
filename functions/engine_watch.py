"""An engine-core process that dies, noticed at once and told why (awake or asleep): vLLM's sync client marks
a dead engine-core process but leaves step() waiting forever for its output, and a sleeping engine makes no
step at all, so a thread watches the process for the engine's whole life."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

log = logging.getLogger("thaw.function.engine")

WATCH_PERIOD = 0.1
MEMORY_EVENTS = "/sys/fs/cgroup/memory.events"  # cgroup v2: oom_kill counts the kernel's OOM kills in it


def death_cause(exitcode: int | None, oom: bool | None) -> str:
    """What killed an engine-core process, in words (pure)."""
    if exitcode is None:
        return "exited, its status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}" + (" (the kernel's OOM killer: host memory ran out)" if oom else "")
    return f"exited with code {exitcode}"


def oom_kills() -> int | None:
    """The OOM kills of this cgroup so far (None where the kernel does not say)."""
    try:
        with open(MEMORY_EVENTS) as f:
            return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), None)
    except OSError:
        return None


def killed_by_oom(pid: int) -> bool:
    """Whether the kernel's log says its OOM killer killed `pid` (readable by root: /dev/kmsg)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    found = False
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # a record overwritten while read: go on with the next
                continue
            if f"Killed process {pid} " in record or f"pid={pid}," in record and "oom" in record:
                found = True
    finally:
        os.close(fd)
    return found


class EngineCoreWatch:
    """Watches the engine-core process of an engine (vLLM's multiprocess client) until `stop()`."""

    def __init__(self, engine, on_death: Callable[[str], None]):
        resources = getattr(getattr(engine, "engine_core", None), "resources", None)
        self.processes = list(getattr(getattr(resources, "engine_manager", None), "processes", []) or [])
        self.resources = resources
        self.on_death = on_death
        self._stop = threading.Event()
        self._oom_before = oom_kills()

    @property
    def pid(self) -> int | None:
        return self.processes[0].pid if self.processes else None

    def start(self) -> "EngineCoreWatch":
        threading.Thread(target=self._run, name="engine-core-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(WATCH_PERIOD):
            dead = next((p for p in self.processes if not p.is_alive()), None)
            if dead is None and not getattr(self.resources, "engine_dead", False):
                continue
            if self._stop.is_set():  # a shutdown ended it
                return
            exitcode = dead.exitcode if dead is not None else None
            after = oom_kills()
            oom = (after is not None and self._oom_before is not None and after > self._oom_before) or (
                dead is not None and exitcode == -signal.SIGKILL and killed_by_oom(dead.pid))
            cause = death_cause(exitcode, oom)
            log.error("the engine-core process%s %s", f" (pid {dead.pid})" if dead else "", cause)
            self.on_death(f"EngineDeadError: the engine-core process {cause}")
            return

