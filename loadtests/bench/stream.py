"""`thaw bench gpu --parts stream`: the weights' stream (functions/weights.py) from the page cache to the GPU
under several ring settings, on this node, beside the same reads with no device copy (where a setting's limit
is: the page cache reads, or the copies to the device). A hibernated wake and an adoption stream at the rate of
the ring a replica is given (THAW_WEIGHTS_READERS, _SLOTS, _CHUNK_MIB); the best setting here is what the node
should set, and what `.ci/gpu-ladder.sh` exports for the parts after it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from thaw.functions.weights import PinnedRing, pread_into, read_index, stream_weights

# (readers, slots, chunk MiB): the default first (functions/weights.py); the others keep the ring's pinned memory
# near 512 MiB (a ring stays pinned in every engine's process between loads), except one that doubles it.
SETTINGS = ((12, 24, 16), (8, 8, 64), (16, 16, 32), (16, 32, 16), (8, 16, 32), (16, 16, 64), (4, 8, 64))


def _chunks(entries, chunk_bytes: int) -> list[tuple[str, int, int]]:
    return [(e.path, e.start + off, min(chunk_bytes, e.end - e.start - off))
            for e in entries for off in range(0, e.end - e.start, chunk_bytes)]


def read_only_seconds(entries, readers: int, chunk_bytes: int, pinned: bool) -> float:
    """The same chunks read by `readers` threads into pinned buffers of their own, with no device copy."""
    import torch

    chunks = _chunks(entries, chunk_bytes)
    buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(readers)]
    fds = {path: os.open(path, os.O_RDONLY) for path in {e.path for e in entries}}

    def read(k: int) -> None:
        view = buffers[k].numpy()
        for path, offset, n in chunks[k::readers]:
            pread_into(fds[path], view[:n], offset)

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=readers) as pool:
            list(pool.map(read, range(readers)))
        return time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)


def stream_seconds(entries, ring: PinnedRing, device: str) -> float:
    import torch

    start = time.perf_counter()
    for _, tensor in stream_weights(entries, device, ring):
        del tensor
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_stream(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pinned = device != "cpu"
    entries = read_index(model_dir)
    size = sum(e.end - e.start for e in entries)
    read_only_seconds(entries, 8, 64 << 20, pinned=False)  # the page cache warm: the rung measured is hibernated
    out = {"bytes": size, "device": device, "settings": []}
    for readers, slots, chunk_mib in SETTINGS:
        ring = PinnedRing(chunk_mib << 20, slots, pinned=pinned, readers=readers)
        streamed = [stream_seconds(entries, ring, device) for _ in range(runs)]
        del ring
        read = [read_only_seconds(entries, readers, chunk_mib << 20, pinned) for _ in range(runs)]
        row = {"readers": readers, "slots": slots, "chunk_mib": chunk_mib, "seconds": streamed,
               "read_seconds": read, "gb_per_s": size / min(streamed) / 1e9, "read_gb_per_s": size / min(read) / 1e9}
        out["settings"].append(row)
        save(out)
        console.print(f"(s) {readers} readers, {slots} slots x {chunk_mib} MiB: stream {row['gb_per_s']:.1f} GB/s "
                      f"(best of {runs}), reads alone {row['read_gb_per_s']:.1f} GB/s")
    best = max(out["settings"], key=lambda r: r["gb_per_s"])
    out["best"] = {k: best[k] for k in ("readers", "slots", "chunk_mib", "gb_per_s")}
    return out


def stream_report(stream: dict | None) -> list[str]:
    """The stream part as Markdown: each setting's rate, against the default's."""
    if not stream or not stream.get("settings"):
        return []
    base = stream["settings"][0]["gb_per_s"]
    lines = ["", f"## Weights stream, page cache -> {stream['device']} ({stream['bytes'] / 1e9:.1f} GB, best of each "
                 "setting's runs)", "",
             "| readers | slots x chunk | stream (GB/s) | vs the default | reads alone, no device copy (GB/s) |",
             "|---|---|---|---|---|"]
    for r in stream["settings"]:
        lines.append(f"| {r['readers']} | {r['slots']} x {r['chunk_mib']} MiB | {r['gb_per_s']:.1f} | "
                     f"{r['gb_per_s'] / base:.2f}x | {r['read_gb_per_s']:.1f} |")
    if stream.get("best"):
        b = stream["best"]
        lines.append(f"\nBest: THAW_WEIGHTS_READERS={b['readers']} THAW_WEIGHTS_SLOTS={b['slots']} "
                     f"THAW_WEIGHTS_CHUNK_MIB={b['chunk_mib']} ({b['gb_per_s']:.1f} GB/s).")
    return lines


def plot_stream(stream: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not stream or not stream.get("settings"):
        return
    rows = stream["settings"]
    labels = [f"{r['readers']} readers\n{r['slots']} x {r['chunk_mib']} MiB" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["gb_per_s"] for r in rows], width=0.4, color="#27a", label="page cache -> device")
    ax.bar([i + 0.2 for i in x], [r["read_gb_per_s"] for r in rows], width=0.4, color="#bbb",
           label="reads alone (no device copy)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("GB/s (best of runs)")
    ax.set_title(f"weights stream, {stream['bytes'] / 1e9:.1f} GB from the page cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "stream.png", dpi=120)
    plt.close(fig)
