"""Weights from safetensors files into a model's parameters, near the copy floor.

vLLM's loader maps each file and copies tensor by tensor from the mapping: 4 KiB page faults and pageable
copies, 2.2-2.8 s for 16 GB already in the page cache. Here reader threads `pread` large chunks into a
small ring of pinned host buffers (the page cache -> pinned copy runs in the kernel, without the GIL) while
the GPU copies the previous chunks asynchronously; each tensor is yielded as soon as its bytes are on the
device, for the model's own `load_weights` to place (so vLLM's name mapping and fused layers stay vLLM's).

It serves the rungs (functions/worker_ext.py): a start from zero, where the engine initialises with dummy
weights (so compiling and capturing need no weights) and the real ones stream in afterwards, and every wake,
which reloads the weights into the same parameters: from a `HostCopy` (the checkpoint's bytes already in
pinned host RAM: a parked replica; only the host -> device copy is left) or from the files (hibernated).
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch is imported only where a GPU copy runs
    import torch

# Measured on the GPU host (16 cores, H100, 16 GB of an 8B's weights in the page cache; `thaw bench gpu --parts
# stream`, docs/gpu.md): 12 readers into 24 slots of 16 MiB stream at 33.9 GB/s, 8 into 8 x 64 MiB at 19.6.
CHUNK_BYTES = 16 << 20  # one pread and one host -> device copy
RING_SLOTS = 24  # pinned chunks in flight: 384 MiB of host memory, kept by the worker between loads
READERS = 12  # threads reading chunks at once (each pread copies page cache -> pinned in the kernel)
# The same three for a node whose measurements call for others (`thaw bench gpu --parts stream` compares
# settings on the node itself): THAW_WEIGHTS_READERS, THAW_WEIGHTS_SLOTS, THAW_WEIGHTS_CHUNK_MIB.

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


PIECE_BYTES = 256 << 20  # a host copy is pinned and read this much at a time: what a request may wait for


def piece_cuts(start: int, length: int, piece_bytes: int) -> list[tuple[int, int]]:
    """[start, start + length) cut at the multiples of `piece_bytes`: (lo, hi) ranges, each inside one piece."""
    cuts, lo, end = [], start, start + length
    while lo < end:
        hi = min(end, (lo // piece_bytes + 1) * piece_bytes)
        cuts.append((lo, hi))
        lo = hi
    return cuts


class HostCopy:
    """A checkpoint's tensor bytes in host RAM, pinned, laid out file after file (each file's data section):
    a parked replica's weights. One anonymous mapping of the exact size, registered with CUDA (pinned) and
    read a piece at a time (`fill_next`), so an engine builds it in small steps while idle; `release` gives
    it back to the system at once (torch's pinned cache would keep it, rounded up to powers of two)."""

    def __init__(self, entries: list[Entry], pinned: bool = True, piece_bytes: int = PIECE_BYTES):
        import mmap

        self.pinned = pinned
        self.files: dict[str, tuple[int, int, int]] = {}  # path -> (offset in the copy, of its data in the file, length)
        size = 0
        for path in sorted({e.path for e in entries}):
            first = min(e.start for e in entries if e.path == path)
            length = max(e.end for e in entries if e.path == path) - first
            self.files[path] = (size, first, length)
            size += length
        self.size = size
        self._map = mmap.mmap(-1, max(size, 1))
        self.piece_bytes = piece_bytes
        self._pieces = [(off, min(piece_bytes, size - off)) for off in range(0, size, piece_bytes)]
        self._registered: list[int] = []  # addresses registered with CUDA
        self.filled = 0  # bytes of the copy read in, from its start

    @property
    def complete(self) -> bool:
        return self.filled >= self.size

    def fill_next(self) -> int:
        """Pin and read the next piece; the bytes still to read after it."""
        if self.complete:
            return 0
        off, n = next(p for p in self._pieces if p[0] == self.filled)
        if self.pinned:
            import ctypes

            import torch

            address = ctypes.addressof(ctypes.c_char.from_buffer(self._map, off))
            err = torch.cuda.cudart().cudaHostRegister(address, n, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {n} bytes failed ({err})")
            self._registered.append(address)
        view = memoryview(self._map)
        try:
            for path, (start, data, length) in self.files.items():  # the files this piece overlaps
                lo, hi = max(off, start), min(off + n, start + length)
                if lo < hi:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        pread_into(fd, view[lo:hi], data + lo - start)
                    finally:
                        os.close(fd)
        finally:
            view.release()
        self.filled = off + n
        return self.size - self.filled

    def has(self, e: Entry) -> bool:
        start, data, _ = self.files.get(e.path, (None, 0, 0))
        return start is not None and start + e.end - data <= self.filled

    def segments(self, e: Entry) -> list[tuple[int, "torch.Tensor"]]:
        """The entry's bytes in the copy as (offset in the tensor, uint8 tensor over the mapping, no copy), cut
        where pieces meet: each piece is registered with CUDA on its own, and CUDA refuses a copy out of a range
        that spans two registrations (cudaErrorInvalidValue)."""
        import torch

        start, data, _ = self.files[e.path]
        first = start + e.start - data
        return [(lo - first, torch.frombuffer(self._map, dtype=torch.uint8, count=hi - lo, offset=lo))
                for lo, hi in piece_cuts(first, e.end - e.start, self.piece_bytes)]

    def release(self) -> int:
        """Unpin and unmap; the bytes given back. Tensors from `tensor` must be gone by now."""
        if self.pinned:
            import torch

            for address in self._registered:
                torch.cuda.cudart().cudaHostUnregister(address)
        self._registered = []
        self._map.close()
        released, self.filled = self.size, 0
        return released


class PinnedRing:
    """A few pinned host buffers, reused for every load of the process (pinning fresh memory is slow), and how
    many threads read into them at once (at most one per buffer)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, slots: int = RING_SLOTS, pinned: bool = True,
                 readers: int | None = None):
        import torch

        self.chunk_bytes = chunk_bytes
        self.slots = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(slots)]
        self.readers = max(1, min(readers or slots, slots))

    @classmethod
    def configured(cls, pinned: bool = True, environ=os.environ) -> "PinnedRing":
        """The ring this node is set up for: the defaults above, or the THAW_WEIGHTS_* variables."""
        return cls(chunk_bytes=ring_setting(environ, "THAW_WEIGHTS_CHUNK_MIB", CHUNK_BYTES >> 20) << 20,
                   slots=ring_setting(environ, "THAW_WEIGHTS_SLOTS", RING_SLOTS), pinned=pinned,
                   readers=ring_setting(environ, "THAW_WEIGHTS_READERS", READERS))


def ring_setting(environ, name: str, default: int) -> int:
    """A positive whole number from the environment, or the default; anything else is refused by name (a replica
    that would silently stream at another rate than the node was tuned for is worse than one that says why)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r}: a positive whole number is expected")
    return int(raw)


def pread_into(fd: int, buf, offset: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"the file ends {len(view) - done} bytes short of a tensor")
        done += got


def stream_weights(entries: list[Entry], device: str, ring: PinnedRing,
                   copy: HostCopy | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor on `device`) for each entry, in order. An entry in the host copy goes to the device in
    one asynchronous copy from it; the others are read from their files by `ring.readers` threads, up to one
    chunk per slot ahead of the device copy, and a slot is reused only once the device copy out of it has
    finished (an event per slot)."""
    import torch

    on_gpu = device != "cpu"
    chunks = deque()  # (entry index, offset in tensor, length)
    for i, e in enumerate(entries):
        if copy is not None and copy.has(e):
            continue
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
        pread_into(fds[e.path], slot[:n].numpy(), e.start + off)
        return slot

    pool = ThreadPoolExecutor(max_workers=ring.readers, thread_name_prefix="weights-read")
    try:
        def refill():
            while free and chunks:
                slot, event = free.popleft()
                chunk = chunks.popleft()
                inflight.append((chunk, pool.submit(read, slot, event, chunk)))

        refill()
        for i, e in enumerate(entries):
            out = torch.empty(e.end - e.start, dtype=torch.uint8, device=device)
            if copy is not None and copy.has(e):
                for off, part in copy.segments(e):
                    out[off:off + part.numel()].copy_(part, non_blocking=on_gpu)
            else:
                while True:
                    (_, off, n), future = inflight.popleft()
                    slot = future.result()
                    out[off:off + n].copy_(slot[:n], non_blocking=on_gpu)
                    event = None
                    if on_gpu:
                        event = torch.cuda.Event()
                        event.record()
                    free.append((slot, event))
                    refill()
                    if off + n == e.end - e.start:
                        break
            yield e.name, out.view(getattr(torch, DTYPES[e.dtype])).view(e.shape)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
            os.close(fd)
