"""A PNG like the FGD paper's Fig. 9(a): unallocated GPU % against arrived workload %, per policy.

Median line and 25-75 % band over seeds. Called by ``hami-ray simulate --plot``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_unallocated(results: Mapping[str, object], path: str | Path, *, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for policy, data in results.items():
        if not isinstance(data, dict) or "curve" not in data:
            continue
        curve = {int(k): v for k, v in data["curve"].items()}
        band = {int(k): v for k, v in data["band"].items()}
        xs = [x for x in sorted(curve) if x >= 50]
        ax.plot(xs, [curve[x] for x in xs], label=policy, linewidth=1.6)
        ax.fill_between(xs, [band[x][0] for x in xs], [band[x][1] for x in xs], alpha=0.2)
    ax.set_xlabel("Arrived workload (% of GPU capacity)")
    ax.set_ylabel("Unallocated GPU (%)")
    ax.set_xlim(50, 130)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
