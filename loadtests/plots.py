"""A load-test report as a picture: the TTFT distribution of cold requests beside warm ones (CDF)."""

from __future__ import annotations

from pathlib import Path


def plot_ttft(results: dict[str, dict], path: Path, title: str = "time to first token") -> None:
    """One CDF line per run and kind (cold/warm) with samples; `results` maps a run's label to metrics.report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in results.items():
        for kind, values in result.get("ttft_samples", {}).items():
            if values:
                n = len(values)
                ax.step(values, [(i + 1) / n for i in range(n)], where="post",
                        label=f"{label}: {kind} (n={n}, p50 {result[kind + '_ttft']['p50']:.2f} s, "
                              f"p99 {result[kind + '_ttft']['p99']:.2f} s)")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT, seconds (log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
