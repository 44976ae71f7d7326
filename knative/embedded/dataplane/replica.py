"""A replica (one function process) and its states: one explicit state machine.

    starting -> ready <-> unready            (a restarted gunicorn worker loads its engine again)
                ready -> draining            (leaves rotation, in-flight requests finish, then stopped)
                ready -> parking -> parked -> waking -> ready     (vLLM sleep mode, on CUDA; `sleep_level`
                                                                   1 parked: with a host copy of its weights,
                                                                   2 hibernated: without one)
                         parked -> starting       (its engine back to the engine pool: starting, for
                                                   the model that adopts it next)
    starting, unready -> draining            (the autoscaler wants fewer)
    any -> stopped                           (a stop: SIGTERM, then SIGKILL after the grace period)
    any but stopped -> dead                  (its process died, or it refused a connection)

A move the table does not allow is a bug in the plane and raises.
"""

from __future__ import annotations

import enum
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


class State(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    UNREADY = "unready"
    DRAINING = "draining"
    PARKING = "parking"
    PARKED = "parked"
    WAKING = "waking"
    STOPPED = "stopped"
    DEAD = "dead"

    def __str__(self) -> str:
        return self.value


MOVES: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.READY, State.DRAINING}),
    State.READY: frozenset({State.UNREADY, State.DRAINING, State.PARKING}),
    State.UNREADY: frozenset({State.READY, State.DRAINING}),
    State.DRAINING: frozenset(),
    State.PARKING: frozenset({State.PARKED}),
    State.PARKED: frozenset({State.WAKING, State.STARTING}),  # starting: back to the engine pool, to be adopted
    State.WAKING: frozenset({State.READY}),
    State.STOPPED: frozenset(),
    State.DEAD: frozenset(),
}

RUNNING = (State.STARTING, State.READY, State.UNREADY, State.WAKING)  # what counts towards the desired scale


class IllegalMove(RuntimeError):
    pass


def can_move(src: State, dst: State) -> bool:
    if dst == src or dst == State.STOPPED:
        return True
    if dst == State.DEAD:
        return src != State.STOPPED
    return dst in MOVES[src]


@dataclass(eq=False)
class Replica:
    id: str
    revision: str
    port: int
    pid: int
    via_standby: bool
    log_path: Path
    state: State = State.STARTING
    in_flight: int = 0
    last_used: float = field(default_factory=time.time)
    sleep_level: int = 0  # asleep: 1 parked (a host copy of its weights), 2 hibernated (none)
    copy_bytes: int = 0  # its host copy of the weights in pinned RAM (granted, being built or built); 0: none
    copy_ready: bool = False  # the host copy is built
    no_copy: bool = False  # its engine cannot hold one (its checkpoint loads through vLLM's own loader)
    park_seconds: float | None = None  # how long its last sleep took
    error: str | None = None  # why it never became ready, or why it died
    gpu_bytes: int = 0  # GPU memory it holds (NVML), last read: awake, what its wake will need again
    gpus: tuple[int, ...] = ()  # the devices it was placed on (nvidia.com/gpu); () shares the first by memory
    engine_pid: int | None = None  # the process whose death is its engine's (its engine core), once ready
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    phases: dict = field(default_factory=dict)
    # its start's events -> wall-clock time: the plane's (asked, placed, room, launched, seen_ready, serving)
    # around the replica's own (its engine's marks, from /readyz)
    marks: dict = field(default_factory=dict)
    popen: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.state = State(self.state)

    def move(self, to: State) -> None:
        if not can_move(self.state, to):
            raise IllegalMove(f"replica {self.id}: {self.state} -> {to} is not a move the plane makes")
        self.state = to

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
