"""The cache tier: complete, verified model versions on fast local storage, under keys no user can steer.

Layout under the root:
    versions/<key>/          published versions: the files, then manifest.json (written last)
    staging/<key>/           a version being staged (kept across crashes: the stager resumes from it)
    locks/<key>.lock         one flock per key: concurrent stagers make one download, the rest wait
    leases/<key>/<pid>       in use by a live process (a lease dies with its process)
    pins/<key>               never evicted
    compile/<arch>/<engine>/ vLLM's compile cache for an architecture and engine configuration (VLLM_CACHE_ROOT):
                             shared by every weights version of that architecture, kept when a version goes
    views/<arch>/            an architecture's config files, the model path a GPU engine starts from
A key is a hash of the source URI and the origin's file names, sizes and ETags, so a changed object makes
a new version and a name never becomes a path. Publishing is a rename, so readers see only whole
versions; eviction (least recently used first) never takes a pinned version or one with a live lease.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import psutil

from .origins import ObjectInfo

KEY = re.compile(r"^[0-9a-f]{32}$")
MANIFEST = "manifest.json"


class CacheError(Exception):
    pass


def version_key(source: str, files: Iterable[ObjectInfo]) -> str:
    digest = hashlib.sha256(source.encode())
    for f in sorted(files, key=lambda f: f.name):
        digest.update(f"\n{f.name}\0{f.size}\0{f.etag}".encode())
    return digest.hexdigest()[:32]


def check_key(key: str) -> str:
    if not KEY.match(key):
        raise CacheError(f"{key!r} is not a cache key (32 hex digits)")
    return key


def safe_name(name: str) -> str:
    """A file name from an origin, as a relative path that stays inside the version folder."""
    path = PurePosixPath(name)
    if (not name or "\\" in name or "\0" in name or path.is_absolute()
            or any(part in ("", ".", "..") for part in name.split("/")) or name == MANIFEST):
        raise CacheError(f"refusing the file name {name!r}: it would leave the version folder")
    return name


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    last_used: float
    pinned: bool
    in_use: bool


def plan_evictions(entries: list[Entry], capacity: int, incoming: int) -> list[str]:
    """Keys to evict, least recently used first, so `incoming` bytes fit; raises if they cannot."""
    total = sum(e.size for e in entries)
    if total + incoming <= capacity:
        return []
    victims = []
    for entry in sorted(entries, key=lambda e: e.last_used):
        if entry.pinned or entry.in_use:
            continue
        victims.append(entry.key)
        total -= entry.size
        if total + incoming <= capacity:
            return victims
    raise CacheError(f"the cache tier cannot fit {incoming} more bytes within {capacity}: "
                     "what is left is pinned or in use (raise the capacity or unpin a version)")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CacheTier:
    def __init__(self, root: str | Path, capacity: int):
        self.root = Path(root).resolve()
        self.capacity = capacity
        for sub in ("versions", "staging", "locks", "leases", "pins", "compile"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- paths -----------------------------------------------------------------------------------

    def version_dir(self, key: str) -> Path:
        return self.root / "versions" / check_key(key)

    def staging_dir(self, key: str) -> Path:
        return self.root / "staging" / check_key(key)

    def compile_dir(self, arch: str, engine_config: str) -> Path:
        """VLLM_CACHE_ROOT for one engine configuration of an architecture (functions/engine_plan.arch_id):
        torch.compile's artifacts (inductor
        and Triton kernels included) outlive the replica, so the next start from zero loads them instead of
        compiling. vLLM's `modelinfos` (its inspection of model classes, keyed by vLLM's own code, the same
        for every version) is shared: without it each new version's first start spends seconds inspecting
        the model class again in a subprocess."""
        if not re.match(r"^[0-9a-f]{16}$", engine_config):
            raise CacheError(f"{engine_config!r} is not an engine configuration id (16 hex digits)")
        path = self.root / "compile" / check_key(arch) / engine_config
        path.mkdir(parents=True, exist_ok=True)
        shared = self.root / "compile" / "shared-modelinfos"
        if not shared.exists():
            shared.mkdir(exist_ok=True)
            # Seeded from this machine's default vLLM cache, when vLLM has run here before.
            default = Path(os.environ.get("VLLM_CACHE_ROOT") or Path.home() / ".cache" / "vllm") / "modelinfos"
            for info in default.glob("*.json") if default.is_dir() else []:
                shutil.copy2(info, shared / info.name)
        link = path / "modelinfos"
        if not link.exists() and not link.is_symlink():
            try:
                link.symlink_to(shared, target_is_directory=True)
            except FileExistsError:
                pass
        return path

    def is_published(self, key: str) -> bool:
        return (self.version_dir(key) / MANIFEST).exists()

    def manifest(self, key: str) -> dict:
        return json.loads((self.version_dir(key) / MANIFEST).read_text())

    def keys(self) -> list[str]:
        return sorted(p.name for p in (self.root / "versions").iterdir() if KEY.match(p.name)
                      and (p / MANIFEST).exists())

    def latest_for(self, source: str) -> str | None:
        """The newest published version of a source (used when its origin cannot be reached)."""
        manifests = [self.manifest(k) for k in self.keys()]
        found = [(m["created"], m["key"]) for m in manifests if m["source"] == source]
        return max(found)[1] if found else None

    # ---- locks, leases, pins ---------------------------------------------------------------------

    @contextmanager
    def lock(self, key: str) -> Iterator[float]:
        """Hold the key's lock; yields the seconds spent waiting for it."""
        start = time.perf_counter()
        with open(self.root / "locks" / f"{check_key(key)}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield time.perf_counter() - start
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def lease(self, key: str, pid: int) -> None:
        folder = self.root / "leases" / check_key(key)
        folder.mkdir(exist_ok=True)
        (folder / str(int(pid))).touch()

    def in_use(self, key: str) -> bool:
        folder = self.root / "leases" / check_key(key)
        alive = False
        for lease in folder.glob("*") if folder.exists() else []:
            try:
                live = psutil.Process(int(lease.name)).status() != psutil.STATUS_ZOMBIE
            except (psutil.NoSuchProcess, ValueError):
                live = False
            if live:
                alive = True
            else:
                lease.unlink(missing_ok=True)  # its process is gone
        return alive

    def pin(self, key: str, pinned: bool = True) -> None:
        marker = self.root / "pins" / check_key(key)
        if pinned:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def pinned(self, key: str) -> bool:
        return (self.root / "pins" / check_key(key)).exists()

    def touch(self, key: str) -> None:
        os.utime(self.version_dir(key) / MANIFEST)

    # ---- capacity --------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        out = []
        for key in self.keys():
            manifest_path = self.version_dir(key) / MANIFEST
            out.append(Entry(key, self.manifest(key)["bytes"], manifest_path.stat().st_mtime, self.pinned(key),
                             self.in_use(key)))
        return out

    def make_room(self, incoming: int) -> list[str]:
        victims = plan_evictions(self.entries(), self.capacity, incoming)
        for key in victims:
            self.evict(key)
        return victims

    def evict(self, key: str, force: bool = False) -> None:
        """Remove a version (not a pinned or leased one unless forced); rename first, so no reader
        ever sees it half-deleted."""
        with self.lock(key):  # a booting replica leases under this lock: checked inside it
            if not force and (self.pinned(key) or self.in_use(key)):
                raise CacheError(f"{key} is pinned or in use")
            src = self.version_dir(key)
            if not src.exists():
                return
            trash = self.root / "staging" / f".evicting-{key}-{os.getpid()}"
            os.rename(src, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # ---- publishing ------------------------------------------------------------------------------

    def publish(self, key: str, source: str, files: list[dict]) -> Path:
        """Write the manifest last, fsync, and rename the staged folder into place."""
        staging = self.staging_dir(key)
        manifest = {"key": key, "source": source, "created": time.time(), "files": files,
                    "bytes": sum(f["size"] for f in files)}
        tmp = staging / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, staging / MANIFEST)
        fsync_dir(staging)
        os.rename(staging, self.version_dir(key))
        fsync_dir(self.root / "versions")
        return self.version_dir(key)

    def verify(self, key: str) -> list[str]:
        """Files whose size or sha256 no longer match the manifest, or whose MD5 differs from the origin's
        own (a plain S3 ETag, kept in the manifest): empty when the version is intact. The manifest's sha256
        was taken from bytes checked against what the origin sent (stager.py)."""
        bad = []
        folder = self.version_dir(key)
        for f in self.manifest(key)["files"]:
            path = folder / safe_name(f["name"])
            if not path.exists() or path.stat().st_size != f["size"]:
                bad.append(f["name"])
                continue
            sha, md5 = file_digests(path)
            etag = f.get("etag", "")
            if sha != f["sha256"] or (re.match(r"^[0-9a-f]{32}$", etag) and md5 != etag):
                bad.append(f["name"])
        return bad


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()
