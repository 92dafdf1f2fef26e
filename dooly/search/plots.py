"""The Pareto plot of a search: goodput per device against the SLO's first latency at that rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(points: list[tuple[float, float, int]]) -> list[int]:
    """Indices of the points no other point beats: lower-or-equal latency with higher goodput per
    device, or lower latency with equal goodput. points: (latency, goodput per device, index)."""
    front, best = [], float("-inf")
    for latency, goodput, i in sorted(points, key=lambda p: (p[0], -p[1], p[2])):
        if goodput > best:
            front.append(i)
            best = goodput
    return front


def write_pareto(result, path: Path) -> Path:
    """PNG: every configuration that meets the SLO somewhere (x: its first SLO statistic at its
    goodput, ms; y: goodput per device), the Pareto front joined, the best configuration named."""
    target = result.slo.targets[0]
    col = f"{target.name}_s"
    met = result.met
    fig, ax = plt.subplots(figsize=(8, 5))
    if met.empty:
        ax.text(0.5, 0.5, f"no configuration meets {result.slo}", ha="center", va="center", transform=ax.transAxes)
    else:
        x, y = met[col].to_numpy() * 1e3, met["goodput_per_device_rps"].to_numpy()
        ax.scatter(x, y, s=14, alpha=0.5, label="configurations")
        front = pareto_front([(float(a), float(b), i) for i, (a, b) in enumerate(zip(x, y))])
        ax.plot(x[front], y[front], "o-", color="C3", ms=5, label="Pareto front")
        ax.annotate(met.iloc[0]["config"], (x[0], y[0]), textcoords="offset points", xytext=(6, 6), fontsize=7)
        ax.axvline(target.seconds * 1e3, color="grey", ls="--", lw=1, label=f"target {target}")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"{target.metric.upper()} {target.stat} at the goodput rate (ms)")
    ax.set_ylabel("goodput per device (requests/s)")
    ax.set_title(f"SLO {result.slo}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
