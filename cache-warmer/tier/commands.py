"""What `thaw warm` and `thaw cache ls|verify|evict` do to the cache tier, shown on a console (cli/__init__.py
parses their arguments)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from thaw.spec import Model, Spec

from .ensure import Ensured, ensure
from .origins import origin_for
from .stager import StageSettings, link_rate
from .cache import CacheError, CacheTier


def stage_settings(spec: Spec) -> StageSettings:
    return StageSettings(bandwidth=link_rate(spec.platform.origin.s3.bandwidthMbps))


def tier_of(spec: Spec) -> CacheTier:
    return CacheTier(spec.platform.cache.path, spec.platform.cache.capacity_bytes)


def warm_model(spec: Spec, model: Model, console: Console, pin: bool = False, settings: StageSettings | None = None,
               prewarm: bool = True) -> Ensured:
    """Stage one model into the tier with a progress bar."""
    tier = tier_of(spec)
    origin = origin_for(model.source, spec.platform.origin.s3)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"staging {model.name}", total=None)
        settings = settings or stage_settings(spec)
        result = ensure(tier, origin, settings=settings, pin=pin, prewarm=prewarm,
                        on_total=lambda n: progress.update(task, total=n),
                        on_bytes=lambda n: progress.advance(task, n),
                        on_retry=lambda m: console.print(f"[yellow]retrying[/yellow] {m}", highlight=False))
        if not result.staged:
            progress.update(task, total=1, completed=1, description=f"{model.name} already staged")
    return result


def list_versions(tier: CacheTier, console: Console) -> None:
    table = Table(title=f"cache tier {tier.root} ({tier.capacity / 2**30:.1f} GiB)")
    for col in ("key", "source", "files", "size", "last used", "pinned", "in use"):
        table.add_column(col, no_wrap=col in ("key", "size"))
    for entry in sorted(tier.entries(), key=lambda e: -e.last_used):
        manifest = tier.manifest(entry.key)
        table.add_row(entry.key, manifest["source"], str(len(manifest["files"])), f"{entry.size / 2**20:.1f} MiB",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used)),
                      "yes" if entry.pinned else "", "yes" if entry.in_use else "")
    console.print(table)


def verify_versions(spec: Spec, console: Console, repair: bool = True) -> int:
    """Check every version against its manifest; re-stage a damaged one from its origin."""
    tier = tier_of(spec)
    damaged = 0
    for key in tier.keys():
        bad = tier.verify(key)
        if not bad:
            console.print(f"{key} ok")
            continue
        damaged += 1
        source = tier.manifest(key)["source"]
        console.print(f"[red]{key} damaged[/red]: {', '.join(bad)}")
        if repair:
            pinned = tier.pinned(key)
            tier.evict(key, force=True)
            result = ensure(tier, origin_for(source, spec.platform.origin.s3), pin=pinned)
            console.print(f"{key} re-staged from {source}" + ("" if result.key == key else f" as {result.key}"))
            damaged -= 1
    return 1 if damaged else 0


def evict_version(tier: CacheTier, key: str, force: bool, console: Console) -> int:
    try:
        tier.evict(key, force=force)
    except CacheError as exc:
        console.print(f"[red]{exc}[/red] (use --force to evict anyway)")
        return 1
    console.print(f"evicted {key}")
    return 0

