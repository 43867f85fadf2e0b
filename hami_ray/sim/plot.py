"""PNGs of the simulations. :func:`plot_unallocated`: like the FGD paper's Fig. 9(a), unallocated GPU %
against arrived workload %, per policy (median line and 25-75 % band over seeds). :func:`plot_timeline`:
the time-driven replay's allocation and queue shares over time.

Called by ``hami-ray simulate --plot`` (and ``--timeline --plot``).
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


def plot_timeline(results: Mapping[str, object], path: str | Path, *, title: str = "") -> Path:
    """The time-driven replay (``hami-ray simulate --timeline --plot``): allocated GPU share of capacity
    per mode over the trace's days (top), and each team's held GPUs over its guarantee in the ``queues``
    mode (bottom; 1 = its guarantee). Medians over seeds of 4-hour time-weighted means."""
    series = results.get("series")
    if not isinstance(series, Mapping):
        raise ValueError("results have no 'series' (not a timeline result)")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=120, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for mode, data in series.items():
        days = data["t_day"]
        top.plot(days, [100 * v for v in data["allocation_rate"]], label=mode, linewidth=1.2)
    top.set_ylabel("Allocated GPU (% of capacity)")
    top.set_ylim(0, 105)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="lower left")
    queues = series.get("queues")
    if isinstance(queues, Mapping):
        for team, shares in queues["queue_share"].items():
            bottom.plot(queues["t_day"][:len(shares)], shares, label=team, linewidth=1.0)
        bottom.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        bottom.legend(fontsize=8, ncol=4, loc="upper left")
    bottom.set_ylabel("queues: held / guarantee")
    bottom.set_xlabel("Trace time (days)")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    if title:
        top.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
