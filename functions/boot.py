"""A replica's boot: where its weights come from (ensured in the cache tier, or read where they are) and
where vLLM's compile cache lives. The engine runs it on a thread of its own while its own thread imports vLLM
(functions/engine.py): reading weights is I/O, the imports are CPU."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from thaw.cache_warmer.tier.prewarm import read_into_page_cache
from thaw.launch import ReplicaBoot
from thaw.spec import EngineArgs, S3Origin, quantity_bytes
from thaw.vllm_platform import detect

from .engine_plan import arch_id
from .payload_log import PAYLOAD_LOG_TOKEN_ENV, LoggerSettings

log = logging.getLogger("thaw.function")


@dataclass(frozen=True)
class CacheSettings:
    """Where a replica finds its weights when it boots from a source rather than a folder."""

    root: Path
    capacity: int
    s3: S3Origin = S3Origin()
    prewarm: bool = True
    dram_root: Path | None = None


@dataclass(frozen=True)
class FunctionConfig:
    model_dir: Path | None
    served_name: str
    engine: EngineArgs = EngineArgs()
    source: str | None = None  # s3://... or a folder, staged through the cache tier at boot
    cache: CacheSettings | None = None
    max_body_bytes: int = 32 << 20  # a larger request body is a 413
    logger: LoggerSettings | None = None  # payload logging (functions/payload_log.py)
    pool: bool = False  # the engine waits, without weights, for a model to adopt it (functions/pool.py)


def function_config(boot: ReplicaBoot, served_name: str, engine: EngineArgs) -> FunctionConfig:
    """A replica's configuration from its boot settings: the one way both a new process (`thaw function
    serve`, from its flags) and a replica forked from the standby (from the typed settings) get theirs."""
    if (boot.model_dir is None) == (boot.source is None):
        raise ValueError("give exactly one of a model folder (--model-dir) and a source (--source)")
    cache_root = Path(boot.cache_root) if boot.cache_root else (Path(".thaw/cache") if boot.source else None)
    cache = CacheSettings(cache_root.resolve(), quantity_bytes(boot.cache_capacity),
                          S3Origin(endpointUrl=boot.s3_endpoint, region=boot.s3_region,
                                   bandwidthMbps=boot.bandwidth_mbps), boot.prewarm,
                          Path(boot.dram_root) if boot.dram_root else None) if cache_root else None
    logger = LoggerSettings(boot.log_url, boot.log_mode, quantity_bytes(boot.log_max_body),
                            boot.log_service or served_name, boot.log_namespace,
                            metadata_headers=tuple(boot.log_metadata_headers),
                            token=os.environ.get(PAYLOAD_LOG_TOKEN_ENV)) if boot.log_url else None
    return FunctionConfig(model_dir=Path(boot.model_dir).resolve() if boot.model_dir else None,
                          served_name=served_name, engine=engine, source=boot.source, cache=cache,
                          max_body_bytes=quantity_bytes(boot.max_body_size), logger=logger, pool=boot.pool)


def weights_fetcher(config: FunctionConfig, read_ahead: bool = True):
    """The boot step of a replica: its weights (ensured in the cache tier when it has a source: instant when
    pre-staged, leased for this process's life; otherwise read into the page cache where they are, unless not
    `read_ahead`: an adoption streams them at once, and a second reader would only compete with it) and,
    with a cache tier, vLLM's compile cache in the tier, per architecture and engine configuration: compiled
    artifacts depend on those, not on weight values, so a new weights version finds them (on a GPU the
    engine starts from the architecture's view, functions/engine_plan.py, so vLLM's own key agrees)."""

    def fetch() -> tuple[Path, dict[str, float]]:
        from thaw.cache_warmer.tier.cache import CacheTier

        timings: dict[str, float] = {}
        if config.source:
            from thaw.cache_warmer.tier.ensure import ensure
            from thaw.cache_warmer.tier.origins import origin_for
            from thaw.cache_warmer.tier.stager import StageSettings, link_rate

            tier = CacheTier(config.cache.root, config.cache.capacity)
            result = ensure(tier, origin_for(config.source, config.cache.s3), lease_pid=os.getpid(),
                            prewarm=config.cache.prewarm and read_ahead, dram_root=config.cache.dram_root,
                            settings=StageSettings(bandwidth=link_rate(config.cache.s3.bandwidthMbps)))
            log.info("weights of %s at %s (%s)", config.source, result.path,
                     "staged now" if result.staged else "already staged")
            path, timings = result.path, result.timings
        else:
            path = config.model_dir
            if read_ahead and detect().gpu:  # read on in the background: the engine initialises meanwhile
                threading.Thread(target=read_into_page_cache, args=(path,), daemon=True).start()
            elif read_ahead:
                read_into_page_cache(path)
            if config.cache is None:
                return path, timings
            tier = CacheTier(config.cache.root, config.cache.capacity)
        platform = detect()
        compile_dir = tier.compile_dir(arch_id(path), platform.resolve(config.engine).config_id(platform.vllm))
        # vLLM points Inductor and Triton at its cache only on the paths where it compiles; kernels JIT-compiled
        # elsewhere (the sampler's, attention's) would land in the home folder and be lost with the node.
        os.environ.update({"VLLM_CACHE_ROOT": str(compile_dir), "TRITON_CACHE_DIR": str(compile_dir / "triton"),
                           "TORCHINDUCTOR_CACHE_DIR": str(compile_dir / "inductor")})
        log.info("vLLM's compile cache at %s", compile_dir)
        return path, timings

    return fetch
