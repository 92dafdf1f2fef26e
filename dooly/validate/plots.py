"""Predicted-vs-measured PNGs of one validated workload."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def write_plot(v, path: Path) -> Path:
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
    for t, g in v.steps.groupby("type"):
        a1.scatter(1e3 * g["measured_s"], 1e3 * g["predicted_s"], s=8, label=t)
    if len(v.steps):
        hi = 1e3 * max(v.steps["measured_s"].max(), v.steps["predicted_s"].max())
        a1.plot([0, hi], [0, hi], "k--", lw=0.8)
    a1.set(xlabel="measured step (ms)", ylabel="predicted step (ms)", title="steps (the engine's batches)")
    a1.legend()
    for ax, col in ((a2, "ttft_s"), (a3, "tpot_s")):
        for k, (reqs, _) in enumerate(v.measured):
            x = np.sort(reqs[col].dropna().to_numpy() * 1e3)
            ax.plot(x, np.arange(1, len(x) + 1) / max(len(x), 1), color="tab:blue", alpha=0.5,
                    label="measured" if k == 0 else None)
        x = np.sort(v.predicted.requests[col].dropna().to_numpy() * 1e3)
        ax.plot(x, np.arange(1, len(x) + 1) / max(len(x), 1), color="tab:red", label="predicted")
        ax.set(xlabel=f"{col.removesuffix('_s').upper()} (ms)", ylabel="fraction of requests")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(v.workload, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
