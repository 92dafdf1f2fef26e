"""PNG plots of a simulation: latency CDFs, and per-step batch composition and latency over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def write_plots(res, folder: Path) -> list[Path]:
    folder = Path(folder)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, col in zip(axes, ("ttft_s", "tpot_s", "e2e_s")):
        v = np.sort(res.requests[col].dropna().to_numpy() * 1e3)
        ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1))
        ax.set_xlabel(f"{col.removesuffix('_s').upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(folder / "latency_cdfs.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    st = res.steps
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True)
    a1.bar(st["start_s"], st["prefill_tokens"], width=st["latency_s"], align="edge", label="prefill tokens")
    a1.bar(st["start_s"], st["decode_reqs"], width=st["latency_s"], align="edge", bottom=st["prefill_tokens"],
           label="decode tokens")
    a1.set_ylabel("tokens per step")
    a1.legend()
    a2.plot(st["start_s"], st["latency_s"] * 1e3, ".", ms=3)
    a2.set_ylabel("step latency (ms)")
    a2.set_xlabel("time (s)")
    fig.tight_layout()
    paths.append(folder / "steps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
