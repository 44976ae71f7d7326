"""The broker's durable store: SQLite in WAL mode with synchronous=FULL, written by one thread.

Writes from many concurrent requests are grouped into one transaction (group commit), so a 202 still
means "fsynced" while throughput stays in the thousands of events per second. An event is kept with
one row per pending delivery; it disappears with its last delivery.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, broker TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
    pending INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY, event INTEGER NOT NULL REFERENCES events(id), trigger TEXT NOT NULL,
    target TEXT NOT NULL, kind TEXT NOT NULL, attempt INTEGER NOT NULL, due REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}');
"""
BATCH = 512


class StoreError(Exception):
    """The store could not write (a full disk, say): nothing of that write was kept."""


@dataclass
class Delivery:
    id: int
    event: int
    broker: str  # the broker its event came into (a reply goes back there)
    trigger: str
    target: str
    kind: str  # "subscriber" or "dead-letter"
    attempt: int  # attempts made so far
    due: float
    headers: dict[str, str]
    body: bytes
    extra: dict[str, str]  # extensions added for this delivery (the dead-letter ones)


@dataclass
class NewEvent:
    broker: str
    headers: dict[str, str]
    body: bytes
    deliveries: list[tuple[str, str]]  # (trigger, target URL)
    due: float


class EventStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue = queue.Queue()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._thread = threading.Thread(target=self._write_loop, name="broker-store", daemon=True)
        self._thread.start()

    # ---- reads (startup only) ----------------------------------------------------------------------

    def pending(self) -> list[Delivery]:
        """Every delivery not yet done: what a restarted broker sends again."""
        rows = self._db.execute(
            "SELECT d.id, d.event, e.broker, d.trigger, d.target, d.kind, d.attempt, d.due, e.headers, e.body, d.extra "
            "FROM deliveries d JOIN events e ON e.id = d.event ORDER BY d.due").fetchall()
        return [Delivery(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8]), bytes(r[9]),
                         json.loads(r[10])) for r in rows]

    # ---- writes (queued, group-committed) -----------------------------------------------------------

    def add(self, event: NewEvent) -> Future:
        """Store an event and its deliveries; the future gives the Delivery rows once committed."""
        return self._submit(lambda db: self._add(db, event))

    def finish(self, delivery: Delivery, reply: NewEvent | None = None) -> Future:
        """A delivery is over (done, dropped or dead-lettered); a reply event is stored in the same commit."""
        def op(db):
            self._finish(db, delivery)
            return self._add(db, reply) if reply is not None else []
        return self._submit(op)

    def reschedule(self, delivery: Delivery) -> Future:
        """Persist a delivery's new attempt count, due time, target, kind and extensions."""
        return self._submit(lambda db: db.execute(
            "UPDATE deliveries SET attempt=?, due=?, target=?, kind=?, extra=? WHERE id=?",
            (delivery.attempt, delivery.due, delivery.target, delivery.kind, json.dumps(delivery.extra),
             delivery.id)))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)
        self._db.close()

    def _submit(self, op: Callable[[sqlite3.Connection], Any]) -> Future:
        future: Future = Future()
        self._queue.put((op, future))
        return future

    @staticmethod
    def _add(db: sqlite3.Connection, event: NewEvent) -> list[Delivery]:
        if not event.deliveries:
            return []
        headers = json.dumps(event.headers)
        cur = db.execute("INSERT INTO events (broker, headers, body, pending) VALUES (?, ?, ?, ?)",
                         (event.broker, headers, event.body, len(event.deliveries)))
        event_id = cur.lastrowid
        out = []
        for trigger, target in event.deliveries:
            cur = db.execute("INSERT INTO deliveries (event, trigger, target, kind, attempt, due) VALUES (?, ?, ?, ?, 0, ?)",
                             (event_id, trigger, target, "subscriber", event.due))
            out.append(Delivery(cur.lastrowid, event_id, event.broker, trigger, target, "subscriber", 0, event.due,
                                event.headers, event.body, {}))
        return out

    @staticmethod
    def _finish(db: sqlite3.Connection, delivery: Delivery) -> None:
        db.execute("DELETE FROM deliveries WHERE id=?", (delivery.id,))
        db.execute("UPDATE events SET pending = pending - 1 WHERE id=?", (delivery.event,))
        db.execute("DELETE FROM events WHERE id=? AND pending <= 0", (delivery.event,))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            # A caller that gave up (its request was cancelled) is skipped; the rest can no longer be
            # cancelled, so their results are always delivered.
            batch = [(op, future) for op, future in batch if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            results = []
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for op, _ in batch:
                    results.append(op(self._db))
                self._db.execute("COMMIT")
            except Exception as exc:  # the whole group failed: nothing was acknowledged
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                failure = StoreError(f"the event store could not write: {exc}") if isinstance(exc, sqlite3.Error) \
                    else exc
                for _, future in batch:
                    future.set_exception(failure)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)
