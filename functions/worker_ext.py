"""thaw's extension of vLLM's GPU worker (vLLM's `worker_extension_cls`): the worker-side steps of the
start ladder, called by name through `collective_rpc` with plain arguments (no pickled code crosses to the
engine-core process).

- `thaw_load_weights`: the real weights into the parameters the engine was built with (dummy at start,
  discarded in hibernation), streamed through a pinned ring (functions/weights.py).
- `thaw_park_sizes` / `thaw_pin` / `thaw_pinned`: host buffers of the sizes a level-1 sleep copies the
  weights into, pinned a few at a time while the engine is idle (pinning serialises with the engine's own
  CUDA work: 15 GiB pinned in one go stalled a request for 11 s), then left in torch's pinned-memory
  cache: the first park of a replica costs what later ones cost (10-15 s before, 0.37 s after).
- `thaw_keep_buffers` / `thaw_hibernate`: a parked (level 1) engine drops its host copy of the weights and
  becomes hibernated (level 2) without waking: the model's buffers, kept at park time, are restored by
  vLLM's own wake, the weights by `thaw_load_weights`.
"""

from __future__ import annotations

import gc
import logging
import time

from thaw.vllm_platform import detect

log = logging.getLogger("thaw.function.worker")

# vLLM imports this module in every worker process it starts, before the model runs there: on the CPU build,
# whose workers are spawned when the engine core has a process of its own, it is the one place to ask the
# kernel for what vLLM's CPU kernels use (thaw/vllm_platform.py).
detect().prepare_engine_process()


def _weights_allocations():
    from vllm.device_allocator.cumem import CuMemAllocator

    return [d for d in CuMemAllocator.get_instance().pointer_to_data.values() if d.tag == "weights"]


def _empty_host_cache() -> None:
    """Give torch's cached pinned host blocks back to the system (where this torch can)."""
    import torch

    for fn in (getattr(torch._C, "_host_emptyCache", None), getattr(torch.cuda, "empty_host_cache", None)):
        if fn is not None:
            try:
                fn()
            except RuntimeError as exc:  # the memory stays cached for the next park: slower RAM, not wrong
                log.warning("pinned host memory not released: %s", exc)
            return


class ThawWorker:
    def thaw_load_weights(self, model_dir: str) -> dict:
        import torch

        from .weights import PinnedRing, read_index, stream_weights

        t = time.perf_counter()
        if getattr(self, "_thaw_ring", None) is None:
            self._thaw_ring = PinnedRing()
        model = self.model_runner.get_model()
        entries = read_index(model_dir)
        with torch.no_grad():
            loaded = model.load_weights(stream_weights(entries, "cuda", self._thaw_ring))
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
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the per-tensor staging blocks
        seconds = time.perf_counter() - t
        size = sum(e.end - e.start for e in entries)
        log.info("weights streamed in %.2fs (%.1f GB/s)", seconds, size / seconds / 1e9)
        return {"seconds": seconds, "bytes": size}

    def thaw_park_sizes(self) -> list[int]:
        """The sizes of the host copies a level-1 sleep makes (one per weights allocation)."""
        return [d.handle[1] for d in _weights_allocations()]

    def thaw_pin(self, sizes: list[int]) -> None:
        """Pin host buffers of these sizes and hold them (equal sizes must be distinct buffers)."""
        import torch

        held = self.__dict__.setdefault("_thaw_pinned", [])
        held.extend(torch.empty(size, dtype=torch.uint8, pin_memory=True) for size in sizes)

    def thaw_pinned(self) -> int:
        """Hand the held buffers to torch's pinned-memory cache, where the sleep's copies find them."""
        held = self.__dict__.pop("_thaw_pinned", [])
        size = sum(t.numel() for t in held)
        del held
        return size

    def thaw_keep_buffers(self) -> None:
        """Before a level-1 sleep: the model's buffers (rotary caches and the like) on the host, so the
        engine can later hibernate without waking (level 2 saves them the same way). They do not change
        while it serves, so the first park's copy serves every later one."""
        if getattr(self, "_thaw_buffers", None) is None:
            model = self.model_runner.get_model()
            self._thaw_buffers = {name: buf.cpu().clone() for name, buf in model.named_buffers()}

    def thaw_hibernate(self) -> int:
        """A parked engine lets go of its host copy of the weights; the bytes released."""
        released = 0
        for data in _weights_allocations():
            if data.cpu_backup_tensor is not None:
                released += data.cpu_backup_tensor.numel()
                data.cpu_backup_tensor = None
        self._sleep_saved_buffers = getattr(self, "_thaw_buffers", {})  # restored by the worker's wake_up
        self.thaw_release_host()
        return released

    def thaw_release_host(self) -> None:
        """Pinned host memory nothing holds (torch keeps it cached for reuse) back to the system: a
        hibernated engine keeps little host RAM."""
        gc.collect()
        _empty_host_cache()
