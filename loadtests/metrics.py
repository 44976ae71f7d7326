"""Serving metrics with the definitions of vLLM's `vllm bench serve` (benchmarks/serve.py), as pure
functions over one record per request; the locust users and `thaw bench` both report through them.

- TTFT: from sending the request to its first streamed content chunk.
- E2EL: from sending it to its last chunk.
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request (requests of one token have none).
- ITL: every gap between consecutive content chunks, all requests pooled.
- Goodput: requests per second that met every SLO given (`ttft:MS tpot:MS e2el:MS`, vLLM's --goodput).
- Cold TTFT: the TTFT of requests that found their revision at zero or parked (the gateway's
  `X-Thaw-Cold-Start` header), beside the warm TTFT of the rest.
Percentiles interpolate linearly between order statistics (numpy's default, which vLLM uses).
docs/benchmarks.md maps each name to AIPerf's, GuideLLM's and LLMPerf's.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    sent: float  # perf_counter() when the request went out
    chunks: list[float] = field(default_factory=list)  # perf_counter() of each content chunk
    output_tokens: int = 0
    cold: str | None = None  # "zero" or "parked": found its revision with no replica ready
    ok: bool = True

    def read_line(self, line: str | bytes) -> str | None:
        """One line of a streamed (SSE) completion: content chunks are timed, usage counted. Returns the
        message of an error chunk (the stream failed), else None. The one SSE reader of the load tools."""
        if isinstance(line, bytes):
            line = line.decode()
        line = line.strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            return None
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return chunk["error"].get("message", "error")
        if chunk.get("usage"):
            self.output_tokens = chunk["usage"]["completion_tokens"]
        if any(c.get("delta", {}).get("content") or c.get("text") for c in chunk.get("choices", [])):
            self.chunks.append(time.perf_counter())
        return None

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def e2el(self) -> float:
        return self.chunks[-1] - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]), linearly interpolated; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    if q <= 0:
        return min(values)
    if q >= 100:
        return max(values)
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if float(q).is_integer() \
        else statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1]


def summary(values: list[float]) -> dict[str, float]:
    """count, mean, and the p50/p90/p99 of a list of values."""
    out = {"count": len(values), "mean": statistics.fmean(values) if values else float("nan")}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return out


def parse_goodput(text: str) -> dict[str, float]:
    """`ttft:500 tpot:50` (milliseconds, vLLM's --goodput) -> {"ttft": 0.5, "tpot": 0.05}."""
    slos = {}
    for item in text.split():
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not ms:
            raise ValueError(f"a goodput SLO is ttft:MS, tpot:MS or e2el:MS, not {item!r}")
        slos[name] = float(ms) / 1000
    return slos


def meets(record: RequestRecord, slos: dict[str, float]) -> bool:
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.e2el}
    return all(values[name] <= limit for name, limit in slos.items())


def report(records: list[RequestRecord], duration: float, slos: dict[str, float] | None = None) -> dict:
    """What `vllm bench serve` prints, per metric in seconds; cold and warm TTFT apart; goodput with SLOs."""
    done = [r for r in records if r.ok and r.chunks]
    out = {
        "requests": len(records), "completed": len(done), "duration_s": duration,
        "request_throughput": len(done) / duration if duration else float("nan"),
        "output_throughput": sum(r.output_tokens for r in done) / duration if duration else float("nan"),
        "ttft": summary([r.ttft for r in done]),
        "tpot": summary([r.tpot for r in done if r.tpot is not None]),
        "itl": summary([g for r in done for g in r.itls]),
        "e2el": summary([r.e2el for r in done]),
        "cold_ttft": summary([r.ttft for r in done if r.cold]),
        "warm_ttft": summary([r.ttft for r in done if not r.cold]),
        "ttft_samples": {"cold": sorted(r.ttft for r in done if r.cold),
                         "warm": sorted(r.ttft for r in done if not r.cold)},
    }
    if slos:
        good = sum(1 for r in done if meets(r, slos))
        out["goodput"] = {"slos_s": slos, "good": good,
                          "request_goodput": good / duration if duration else float("nan")}
    return out


def report_table(result: dict) -> str:
    """The report as text lines (milliseconds), for a terminal."""
    lines = [f"requests {result['completed']}/{result['requests']} in {result['duration_s']:.1f}s: "
             f"{result['request_throughput']:.2f} req/s, {result['output_throughput']:.1f} output tokens/s"]
    for key, name in (("ttft", "TTFT"), ("cold_ttft", "cold TTFT"), ("warm_ttft", "warm TTFT"), ("tpot", "TPOT"),
                      ("itl", "ITL"), ("e2el", "E2EL")):
        s = result[key]
        if s["count"]:
            lines.append(f"{name:>10} (ms)  n={s['count']:<5} mean {s['mean'] * 1000:9.1f}  " +
                         "  ".join(f"p{q} {s[f'p{q}'] * 1000:9.1f}" for q in PERCENTILES))
    if "goodput" in result:
        g = result["goodput"]
        lines.append(f"goodput {g['request_goodput']:.2f} req/s ({g['good']} met "
                     + ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in g["slos_s"].items()) + ")")
    return "\n".join(lines)
