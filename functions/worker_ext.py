"""thaw's extension of vLLM's GPU worker (vLLM's `worker_extension_cls`): the worker-side steps of the
start ladder, called by name through `collective_rpc` with plain arguments (no pickled code crosses to the
engine-core process).

- `thaw_install`: this worker sleeps thaw's way (below), set once after the engine is built.
- `thaw_load_weights`: the real weights into the parameters the engine was built with (dummy at start,
  dropped at every sleep), streamed through a pinned ring from the files or from the host copy
  (functions/weights.py).
- `thaw_copy_plan` / `thaw_copy_piece` / `thaw_copy_drop`: the host copy of the checkpoint in pinned host RAM,
  built a piece at a time (the engine calls for a piece only while it is idle: pinning serialises with the
  process's own CUDA work) and given back at once. A sleeping engine with a complete copy is parked.

A sleep drops the weights and the KV cache from the GPU (vLLM's sleep level 2, its buffers kept on the host)
and never copies the weights out: the host copy, built ahead, is what a wake streams back from. vLLM's own
`sleep` asserts that the whole device's free memory went up, which a neighbour starting or waking at the same
moment breaks although this process released all it held; thaw's checks this process's own allocations.
"""

from __future__ import annotations

import gc
import logging
import time
import types

from thaw.vllm_platform import detect

log = logging.getLogger("thaw.function.worker")

# vLLM imports this module in every worker process it starts, before the model runs there: on the CPU build,
# whose workers are spawned when the engine core has a process of its own, it is the one place to ask the
# kernel for what vLLM's CPU kernels use (thaw/vllm_platform.py).
detect().prepare_engine_process()


def _allocator():
    from vllm.device_allocator.cumem import CuMemAllocator

    return CuMemAllocator.get_instance()


def suspend_level_2(worker) -> None:
    """Level 2 as this vLLM's own worker does it: through its sleep-mode backend (a property since vLLM 0.30, a
    method before), which keeps what must survive (from 0.30 the "runtime" and "cudagraph" pools, copied to
    the host: state the KV cache's set-up made, and what CUDA graphs point at); before the backends, the
    allocator with nothing kept."""
    if isinstance(getattr(type(worker), "sleep_mode_backend", None), property):
        worker.sleep_mode_backend.suspend(2)
    elif hasattr(worker, "_get_sleep_mode_backend"):
        worker._get_sleep_mode_backend().suspend(2)
    else:
        _allocator().sleep(offload_tags=())


def _sleep(worker, level: int = 1) -> None:
    """vLLM's Worker.sleep at level 2 less its device-wide check: what it saves on the host first (the model's
    buffers; parameters the configuration asks to keep, from vLLM 0.30), restored by vLLM's wake_up; then every
    allocation of the pool released (weights and KV cache: nothing of them is offloaded)."""
    import torch

    torch.cuda.synchronize()
    model = worker.model_runner.model
    worker._sleep_saved_buffers = {name: buf.cpu().clone() for name, buf in model.named_buffers()}
    if hasattr(worker, "_save_sleep_parameters"):
        worker._save_sleep_parameters(model)
    allocator = _allocator()
    held = sum(d.handle[1] for d in allocator.pointer_to_data.values() if not getattr(d, "is_asleep", False))
    suspend_level_2(worker)
    torch.cuda.synchronize()
    left = sum(d.handle[1] for d in allocator.pointer_to_data.values() if not getattr(d, "is_asleep", False))
    if left:
        raise RuntimeError(f"{left} bytes of this process's GPU memory were not released by the sleep")
    log.info("asleep: released %.2f GiB of this process's GPU memory", held / 2**30)


def _cpu_gemms_again(model) -> None:
    """vLLM's in-place reload on the CPU build packs its linear layers again, but not the layers that keep their
    weight beside a oneDNN handle made from it at load (the vocabulary's: the embedding and a tied lm_head),
    which would go on computing with the old weights: their handles are made again from the new ones."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


class ThawWorker:
    def thaw_install(self) -> None:
        self.sleep = types.MethodType(_sleep, self)

    def thaw_load_weights(self, model_dir: str) -> dict:
        import torch

        from .weights import PinnedRing, read_index, stream_weights

        t = time.perf_counter()
        on_gpu = torch.cuda.is_available()  # the CPU build loads here only for an adoption (functions/pool.py)
        if getattr(self, "_thaw_ring", None) is None:
            self._thaw_ring = PinnedRing.configured(pinned=on_gpu)
        model = self.model_runner.get_model()
        entries = read_index(model_dir)
        copy = getattr(self, "_thaw_copy", None)
        from_copy = sum(e.end - e.start for e in entries if copy is not None and copy.has(e))
        tensors = stream_weights(entries, "cuda" if on_gpu else "cpu", self._thaw_ring, copy)
        if not on_gpu:
            # The CPU build's kernels repack weights after loading (the parameters left empty): vLLM's in-place
            # reload (0.30+) loads and repacks again.
            self.model_runner.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
            _cpu_gemms_again(model)
            loaded = None
        else:
            with torch.no_grad():
                loaded = model.load_weights(tensors)
        missing = {name for name, _ in model.named_parameters()} - set(loaded or ())
        if loaded is not None and missing:
            raise RuntimeError(f"the checkpoint in {model_dir} lacks {sorted(missing)[:5]}")
        # Dummy initialisation also randomised attention's quantisation scales (persistent buffers): back to
        # the 1.0 an unquantized KV cache reads, as vLLM's loader leaves them.
        for module in model.modules():
            for name in ("_k_scale", "_v_scale", "_q_scale", "_prob_scale"):
                buf = getattr(module, name, None)
                if isinstance(buf, torch.Tensor):
                    buf.fill_(1.0)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the per-tensor staging blocks
        seconds = time.perf_counter() - t
        size = sum(e.end - e.start for e in entries)
        log.info("weights streamed in %.2fs (%.1f GB/s; %.0f%% from the host copy)", seconds, size / seconds / 1e9,
                 100 * from_copy / max(size, 1))
        return {"seconds": seconds, "bytes": size, "from_copy": from_copy}

    def thaw_copy_plan(self, model_dir: str) -> int:
        """A host copy of the checkpoint, to be built; its bytes (one being built or built already stays)."""
        from .weights import HostCopy, read_index

        if getattr(self, "_thaw_copy", None) is None:
            self._thaw_copy = HostCopy(read_index(model_dir))
        return self._thaw_copy.size

    def thaw_copy_piece(self) -> int:
        """Pin and read the next piece of the host copy; the bytes left to read."""
        return self._thaw_copy.fill_next()

    def thaw_copy_drop(self) -> int:
        """Give the host copy back to the system; the bytes released."""
        copy, self._thaw_copy = getattr(self, "_thaw_copy", None), None
        if copy is None:
            return 0
        gc.collect()  # the views a load made of it
        return copy.release()
