"""Weights from safetensors files into a model's parameters, near the copy floor.

vLLM's loader maps each file and copies tensor by tensor from the mapping: 4 KiB page faults and pageable
copies, 2.2-2.8 s for 16 GB already in the page cache. Here reader threads `pread` large chunks into a
small ring of pinned host buffers (the page cache -> pinned copy runs in the kernel, without the GIL) while
the GPU copies the previous chunks asynchronously; each tensor is yielded as soon as its bytes are on the
device, for the model's own `load_weights` to place (so vLLM's name mapping and fused layers stay vLLM's).

It serves two rungs (functions/worker_ext.py): a start from zero, where the engine initialises with dummy
weights (so compiling and capturing need no weights) and the real ones stream in afterwards, and a wake
from hibernation (sleep level 2), which reloads the weights into the same parameters.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

CHUNK_BYTES = 64 << 20  # one pread and one host -> device copy
RING_SLOTS = 8  # pinned chunks in flight: 512 MiB of host memory, kept by the worker between loads

# safetensors dtype names -> torch dtype attribute names
DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: where its bytes lie in which file."""

    path: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


def read_index(model_dir: str | Path) -> list[Entry]:
    """Every tensor of the checkpoint's safetensors files, in file order (sequential reads)."""
    entries = []
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        base = 8 + size
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            entries.append(Entry(str(path), name, meta["dtype"], tuple(meta["shape"]), base + start, base + end))
    return sorted(entries, key=lambda e: (e.path, e.start))


def fast_load_problem(model_dir: str | Path) -> str | None:
    """Why this checkpoint is left to vLLM's own loader, or None when it can stream. Quantized checkpoints
    are left to vLLM (their parameters are processed after loading, and a reload would have to undo it)."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"no readable config.json ({exc})"
    if config.get("quantization_config"):
        return "a quantized checkpoint"
    if not any(model_dir.glob("*.safetensors")):
        return "no safetensors files"
    try:
        unknown = {e.dtype for e in read_index(model_dir)} - DTYPES.keys()
    except (OSError, ValueError, KeyError, struct.error) as exc:
        return f"an unreadable safetensors header ({exc})"
    return f"tensor dtypes {sorted(unknown)}" if unknown else None


class PinnedRing:
    """A few pinned host buffers, reused for every load of the process (pinning fresh memory is slow)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, slots: int = RING_SLOTS, pinned: bool = True):
        import torch

        self.chunk_bytes = chunk_bytes
        self.slots = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(slots)]


def _pread_into(fd: int, buf, offset: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"the file ends {len(view) - done} bytes short of a tensor")
        done += got


def stream_weights(entries: list[Entry], device: str, ring: PinnedRing) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, tensor on `device`) for each entry, in order. Up to len(ring.slots) chunk reads run at once;
    a slot is reused only once the device copy out of it has finished (an event per slot)."""
    import torch

    on_gpu = device != "cpu"
    chunks = deque()  # (entry index, offset in tensor, length)
    for i, e in enumerate(entries):
        size = e.end - e.start
        for off in range(0, size or 1, ring.chunk_bytes):  # an empty tensor is one empty chunk
            chunks.append((i, off, min(ring.chunk_bytes, size - off)))
    fds = {path: os.open(path, os.O_RDONLY) for path in {e.path for e in entries}}
    free = deque((slot, None) for slot in ring.slots)  # (buffer, event of its last device copy)
    inflight: deque = deque()

    def read(slot, event, chunk):
        if event is not None:
            event.synchronize()
        i, off, n = chunk
        e = entries[i]
        _pread_into(fds[e.path], slot[:n].numpy(), e.start + off)
        return slot

    pool = ThreadPoolExecutor(max_workers=len(ring.slots), thread_name_prefix="weights-read")
    try:
        def refill():
            while free and chunks:
                slot, event = free.popleft()
                chunk = chunks.popleft()
                inflight.append((chunk, pool.submit(read, slot, event, chunk)))

        refill()
        current, out = None, None
        while inflight:
            (i, off, n), future = inflight.popleft()
            if i != current:
                e = entries[i]
                current, out = i, torch.empty(e.end - e.start, dtype=torch.uint8, device=device)
            slot = future.result()
            out[off:off + n].copy_(slot[:n], non_blocking=on_gpu)
            event = None
            if on_gpu:
                event = torch.cuda.Event()
                event.record()
            free.append((slot, event))
            refill()
            e = entries[i]
            if off + n == e.end - e.start:
                tensor = out.view(getattr(torch, DTYPES[e.dtype])).view(e.shape)
                yield e.name, tensor
                out = None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
            os.close(fd)
