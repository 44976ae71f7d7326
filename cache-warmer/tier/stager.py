"""The stager: a model version from its origin into the tier's staging folder, fast and resumable.

Files are split into parts fetched in parallel with ranged reads and written in place (pwrite). Each
finished part is fsynced and then recorded in the file's journal with the digest of the bytes the origin
sent, so after a crash (even SIGKILL) a rerun fetches only what is missing. A part that fails (5xx, reset,
timeout, a body cut short) is retried with exponential backoff and jitter (tenacity). The space is
allocated before the first byte is fetched, and every write is checked, so a full disk is one clear error.
Every file is verified at the end by reading it back: each part against the digest of what the origin
sent, its MD5 against a plain S3 ETag; only then does its sha256 go to the manifest, so a version is never
published with bytes the origin did not send. An optional bandwidth limit reproduces a shared link.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tenacity

from .origins import ObjectInfo, Origin
from .cache import CacheError, safe_name

MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")  # a multipart upload's ETag has a "-N" suffix and is no MD5


@dataclass(frozen=True)
class StageSettings:
    parallel: int = 8
    part_size: int = 8 << 20
    attempts: int = 6
    backoff: float = 0.2  # seconds: retry n waits a random time up to backoff x 2^n (at most 30 s)
    bandwidth: float | None = None  # bytes per second for the whole stage, None for no limit


def link_rate(mbps: float | None) -> float | None:
    """A link of `mbps` megabits per second as StageSettings.bandwidth (bytes per second; None: no cap)."""
    return mbps * 1e6 / 8 if mbps else None


class RateLimiter:
    """A token bucket shared by all parts: at most `rate` bytes per second on average."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.allowance = 0.0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.allowance = min(self.rate * 0.25, self.allowance + (now - self.last) * self.rate)
            self.last = now
            self.allowance -= n
            wait = -self.allowance / self.rate if self.allowance < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class Truncated(IOError):
    """The origin sent fewer bytes than the range asked for."""


def _retryable(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        BotoCoreError = ClientError = ()  # noqa: N806
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status in (408, 429)
    return isinstance(exc, (BotoCoreError, OSError, ConnectionError, Truncated))


def part_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _disk_error(exc: OSError, path: Path, what: str) -> Exception:
    """A full disk (or quota) as an error that says what to do; any other OSError as it is."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheError(f"the cache tier's disk is full ({path.parent}): {what}; free space there or give "
                          "the tier a smaller capacity")
    return exc


class _FileState:
    """One file being staged: its preallocated target, its journal of finished parts and their digests."""

    def __init__(self, staging: Path, info: ObjectInfo):
        self.info = info
        self.path = staging / safe_name(info.name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.journal = staging / ".parts" / (hashlib.sha256(info.name.encode()).hexdigest()[:24] + ".done")
        self.journal.parent.mkdir(exist_ok=True)
        self.lock = threading.Lock()
        if not self.path.exists() or self.path.stat().st_size != info.size:
            self.journal.unlink(missing_ok=True)
            with open(self.path, "wb") as f:
                try:  # the whole file's blocks now: a disk without room says so before any download
                    if info.size:
                        os.posix_fallocate(f.fileno(), 0, info.size)
                    else:
                        f.truncate(0)
                except OSError as exc:
                    self.path.unlink(missing_ok=True)
                    raise _disk_error(exc, self.path, f"{info.name} needs {info.size} bytes") from exc
        self.done = self._read_journal()

    def _read_journal(self) -> dict[tuple[int, int], str]:
        if not self.journal.exists():
            return {}
        done = {}
        for line in self.journal.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:  # a torn last line (crash mid-append), or an old one without a digest: refetched
                done[(int(parts[0]), int(parts[1]))] = parts[2]
        return done

    def parts(self, size: int) -> list[tuple[int, int]]:
        ranges = [(s, min(s + size, self.info.size)) for s in range(0, self.info.size, size)]
        return [r for r in ranges if r not in self.done]

    def write(self, start: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view, done = memoryview(data), 0
            while done < len(view):  # pwrite may write less than asked: the rest goes again
                done += os.pwrite(fd, view[done:], start + done)
            os.fsync(fd)
        except OSError as exc:
            raise _disk_error(exc, self.path, f"writing {self.info.name} at byte {start + done}") from exc
        finally:
            os.close(fd)
        digest = part_digest(data)
        with self.lock:
            self.done[(start, start + len(data))] = digest
            try:
                with open(self.journal, "a") as j:
                    j.write(f"{start} {start + len(data)} {digest}\n")
                    j.flush()
                    os.fsync(j.fileno())
            except OSError as exc:
                raise _disk_error(exc, self.journal, "recording a finished part") from exc

    def check(self) -> tuple[str, str] | None:
        """Read the file back: its (sha256, md5) if every part holds what the origin sent and the parts
        cover the file; None otherwise."""
        sha, md5 = hashlib.sha256(), hashlib.md5()
        expected_start = 0
        with open(self.path, "rb") as f:
            for (start, end), digest in sorted(self.done.items()):
                if start != expected_start:
                    return None
                data = f.read(end - start)
                if len(data) != end - start or part_digest(data) != digest:
                    return None
                sha.update(data)
                md5.update(data)
                expected_start = end
            if expected_start != self.info.size or f.read(1):
                return None
        return sha.hexdigest(), md5.hexdigest()

    def reset(self) -> None:
        self.journal.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def _fetch(origin: Origin, name: str, start: int, end: int, limiter: RateLimiter) -> bytes:
    buf = bytearray()
    for chunk in origin.read_range(name, start, end):
        limiter.take(len(chunk))
        buf += chunk
    if len(buf) != end - start:
        raise Truncated(f"{name}: got {len(buf)} of {end - start} bytes at {start}")
    return bytes(buf)


def _fetch_with_retries(origin, name, start, end, limiter, settings: StageSettings,
                        on_retry: Callable[[str], None]) -> bytes:
    """A range, retried on what a retry can cure (5xx, 408, 429, connection errors, a short read) with
    exponential backoff and full jitter, so many parallel ranges do not retry in step."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(settings.attempts),
        wait=tenacity.wait_random_exponential(multiplier=settings.backoff, max=30),
        retry=tenacity.retry_if_exception(_retryable),
        before_sleep=lambda state: on_retry(f"{type(state.outcome.exception()).__name__}: "
                                            f"{state.outcome.exception()}"),
        reraise=True)
    try:
        return retrying(_fetch, origin, name, start, end, limiter)
    except Exception as exc:  # noqa: BLE001 - the last error, or one no retry can cure
        raise CacheError(f"{name} bytes {start}-{end}: {type(exc).__name__}: {exc}") from exc


def stage_files(origin: Origin, files: list[ObjectInfo], staging: Path, settings: StageSettings = StageSettings(),
                on_bytes: Callable[[int], None] = lambda n: None,
                on_retry: Callable[[str], None] = lambda m: None) -> list[dict]:
    """Fetch every file into `staging`; return the manifest entries (name, size, sha256, etag)."""
    staging.mkdir(parents=True, exist_ok=True)
    states = [_FileState(staging, f) for f in files]
    limiter = RateLimiter(settings.bandwidth)
    for state in states:
        on_bytes(sum(e - s for s, e in state.done))  # resumed bytes count as done

    def run_part(state: _FileState, start: int, end: int) -> None:
        state.write(start, _fetch_with_retries(origin, state.info.name, start, end, limiter, settings, on_retry))
        on_bytes(end - start)

    entries = []
    with ThreadPoolExecutor(max_workers=settings.parallel, thread_name_prefix="stage") as pool:
        for _round in range(2):  # a file that fails verification is fetched once more from scratch
            jobs = [pool.submit(run_part, st, s, e) for st in states for s, e in st.parts(settings.part_size)]
            for job in jobs:
                job.result()
            failed = []
            for state in states:
                digests = state.check()
                etag = state.info.etag
                if digests is None or (MD5_ETAG.match(etag) and digests[1] != etag):
                    failed.append(state)
                    continue
                sha, _ = digests
                entries.append({"name": state.info.name, "size": state.info.size, "sha256": sha, "etag": etag})
            if not failed:
                break
            if _round == 1:
                raise CacheError(f"checksum mismatch after refetch: {', '.join(s.info.name for s in failed)}")
            for state in failed:
                on_retry(f"{state.info.name}: checksum mismatch, fetching it again")
                state.reset()
            states = [_FileState(staging, s.info) for s in failed]
    shutil.rmtree(staging / ".parts", ignore_errors=True)  # the journals: not part of the version
    return sorted(entries, key=lambda e: e["name"])
