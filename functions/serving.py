"""Engine output to response bytes: pure, no I/O (the request's thread feeds it what the engine buffered).

vLLM's own server merges the deltas of a stream that fell behind (`RequestOutputCollector`); so does this:
each take of a generation's buffer becomes at most one chunk per choice, written at once.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from . import protocol as p
from .generations import Delta, EngineFailed


class ClientGone(Exception):
    """The client closed its connection; its generation is aborted."""


def merge(deltas: list[Delta]) -> list[Delta]:
    """Deltas of several engine steps as one per choice, in the order the choices first appear."""
    if len(deltas) < 2:
        return deltas
    merged: dict[int, list[Delta]] = {}
    for d in deltas:
        merged.setdefault(d.index, []).append(d)
    out = []
    for index, ds in merged.items():
        if len(ds) == 1:
            out.append(ds[0])
            continue
        lps = [lp for d in ds for lp in d.logprobs] if ds[0].logprobs is not None else None
        out.append(Delta(index, "".join(d.text for d in ds), sum(d.token_count for d in ds),
                         tuple(lps) if lps is not None else None, ds[-1].finish_reason))
    return out


def stream_bytes(encoder: p.ChunkEncoder, choices: int, takes: Iterable[list[Delta]],
                 prompt_tokens: int) -> Iterator[bytes]:
    """A stream's bytes, one piece per take: its chunks, then usage if asked, then [DONE]. A failure of the
    engine after the first chunk ends the stream with an error chunk (the status is already sent); a client
    gone ends it silently."""
    chat = encoder.chat
    completion_tokens = 0
    try:
        first = b"".join(encoder.role(i) for i in range(choices)) if chat else b""  # sent with the first take
        for take in takes:
            out = [first] if first else []
            first = b""
            for d in merge(take):
                completion_tokens += d.token_count
                lps = p.logprobs_json(chat, d.logprobs) if d.logprobs is not None else None
                text = d.text if d.text or d.finish_reason is None or not chat else None
                out.append(encoder.delta(d.index, text, d.finish_reason, lps))
            yield b"".join(out)
        tail = encoder.usage(prompt_tokens, completion_tokens) if encoder.include_usage else b""
    except ClientGone:
        return
    except (EngineFailed, p.APIError) as exc:
        message = f"The engine failed: {exc}" if isinstance(exc, EngineFailed) else exc.message
        tail = p.sse(p.error_body(message, "server_error", None, "engine_failed"))
    yield tail + p.DONE
