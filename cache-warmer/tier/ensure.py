"""`ensure`: a model version's local path, staged first if it is not in the tier yet.

What a booting replica and a warmer both call. Under the key's lock: a published version is leased and
returned at once; otherwise it is staged and published, and whoever else asked meanwhile waited on the
lock and finds it done. Timings of the phases (waiting for the lock, staging, prewarming) come back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .origins import Origin, UnsafeSource
from .prewarm import copy_to_dram, read_into_page_cache
from .stager import StageSettings, stage_files
from .cache import CacheError, CacheTier, safe_name, version_key


@dataclass
class Ensured:
    path: Path
    key: str
    staged: bool  # this call downloaded it
    timings: dict[str, float] = field(default_factory=dict)


def ensure(tier: CacheTier, origin: Origin, *, settings: StageSettings = StageSettings(), pin: bool = False,
           lease_pid: int | None = None, prewarm: bool = False, dram_root: Path | None = None,
           on_bytes: Callable[[int], None] = lambda n: None,
           on_retry: Callable[[str], None] = lambda m: None,
           on_total: Callable[[int], None] = lambda n: None) -> Ensured:
    timings = {"cache_wait": 0.0, "stage": 0.0, "prewarm": 0.0}
    try:
        files = origin.list()
        key = version_key(origin.source, files)
    except UnsafeSource as exc:  # refused, not unreachable: nothing older stands in for it
        raise CacheError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - an unreachable origin still leaves what is staged
        key = tier.latest_for(origin.source)
        if key is None:
            raise CacheError(f"cannot list {origin.source} and nothing of it is staged: {exc}") from exc
        files = None
    staged = False
    with tier.lock(key) as waited:
        timings["cache_wait"] = waited
        if not tier.is_published(key):
            for f in files:
                safe_name(f.name)
            total = sum(f.size for f in files)
            on_total(total)
            start = time.perf_counter()
            tier.make_room(total)
            entries = stage_files(origin, files, tier.staging_dir(key), settings, on_bytes, on_retry)
            tier.publish(key, origin.source, entries)
            timings["stage"] = time.perf_counter() - start
            staged = True
        if lease_pid is not None:
            tier.lease(key, lease_pid)
        if pin:
            tier.pin(key)
        tier.touch(key)
    path = tier.version_dir(key)
    if dram_root is not None:
        path = copy_to_dram(path, dram_root, key)
    if prewarm:
        start = time.perf_counter()
        read_into_page_cache(path)
        timings["prewarm"] = time.perf_counter() - start
    return Ensured(path, key, staged, timings)
