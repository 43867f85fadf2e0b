"""Figures of the time-driven replay (issue 14): per mode, queue and priority, over seeds, as JSON.

Called by ``hami-ray simulate --timeline`` (which writes the JSON and the plot) and the tests. Runs
:class:`hami_ray.sim.timeline.Replay` for every mode and seed, in worker processes as
:mod:`hami_ray.sim.experiment` does, and reduces each run to the figures docs/timeline.md defines:

- queueing delay: per pod, every second it waited (arrival to start, preemption notice to restart; a pod
  still waiting at the end counts its wait until the end), p50/p99 over pods by qos, priority and team;
- allocation rate: GPUs held by leases (victims in their grace included) over the GPUs of the nodes,
  time-weighted over the window (from the arrival of the trace's first 1 % of pods to its end);
- Jain's index: at each moment of the window when some team has GPU work waiting, over the teams with
  GPU work (held or waiting), of x = min(1, held / min(held + waiting, guarantee)); time-weighted mean.

The JSON (other tools read ``modes``)::

    {"modes": {MODE: {"ls_wait_p99_s", "ls_wait_p50_s", "be_wait_p99_s", "allocation_rate", "jain",
                      "preemptions"}},                       # medians over seeds
     "per_seed": {MODE: {SEED: {...those keys and more...}}},
     "detail": {MODE: {"qos": {...}, "priority": {...}, "queue": {...}}},   # medians over seeds
     "series": {MODE: {"t_day": [...], "allocation_rate": [...], "queue_share": {TEAM: [...]}}},
     "runtime_s": s, "meta": {...}}
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from hami_ray.sim.timeline import (DEFAULT_GRACE_S, DEFAULT_NODE_FRACTION, MODES, NOMINATION_S, PRIORITY_NAMES,
                                   PRIORITY_OF_QOS, TEAMS, Replay, ReplayResult, select_nodes)
from hami_ray.sim.trace import QOS_CLASSES, TimedPod, load_nodes, load_timed_pods

__all__ = ["FIRST_SEED", "KEYS", "SEEDS", "run_timeline", "summarize_run", "aggregate"]

FIRST_SEED = 42
SEEDS = 5
KEYS = ("ls_wait_p99_s", "ls_wait_p50_s", "be_wait_p99_s", "allocation_rate", "jain", "preemptions")
WINDOW_START_SHARE = 0.01  # the window opens once this share of the pods has arrived
BIN_S = 4 * 3600.0  # the plot's series: time-weighted means over 4-hour bins
_WORKER: dict[str, Any] = {}
_NOT_PER_SEED = ("detail", "series")


def _pct(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if len(values) else 0.0


def _waits(records: Sequence[Any]) -> dict[str, float]:
    waits = [r.waited_s for r in records]
    return {"pods": len(waits), "wait_p50_s": _pct(waits, 50), "wait_p99_s": _pct(waits, 99),
            "wait_mean_s": round(float(np.mean(waits)), 1) if waits else 0.0,
            "never_started": sum(1 for r in records if r.runs == 0),
            "preempted": sum(r.preempted for r in records),
            "lost_work_s": round(sum(r.lost_s for r in records), 1),
            "lost_gpu_s": round(sum(r.lost_s * r.gpu_milli / 1000 for r in records), 1)}


def window_start(pods: Sequence[TimedPod]) -> float:
    """When :data:`WINDOW_START_SHARE` of the pods have arrived (openb's default trace: day 115 of 149;
    before it a few dozen long-running pods arrive over months, which would only dilute time averages)."""
    times = sorted(p.creation_s for p in pods)
    return float(times[min(len(times) - 1, int(WINDOW_START_SHARE * len(times)))]) if times else 0.0


def _durations(t: np.ndarray, start: float, end: float) -> np.ndarray:
    """How long each row (holding from its t to the next row's) lasts inside [start, end]."""
    lo = np.clip(t, start, end)
    hi = np.clip(np.append(t[1:], end), start, end)
    return np.asarray(hi - lo, dtype=float)


def jain(x: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all are equal, 1/n when one has everything.
    All zero counts as equal (1.0).

    Example: ``jain([1, 1, 0.5, 1]) == 3.5 ** 2 / (4 * 3.25)`` (about 0.94).
    """
    arr = np.asarray(x, dtype=float)
    square = float((arr * arr).sum())
    return 1.0 if not len(arr) or square == 0 else float(arr.sum() ** 2 / (len(arr) * square))


def jain_rows(held: np.ndarray, want: np.ndarray, guarantee: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: Jain's index of the teams' satisfaction, and whether some team waits (``want > held``).

    A team with GPU work (``want > 0``) counts with x = min(1, held / min(want, guarantee)): 1 once it holds
    its guarantee or all it wants, less while it waits below both. Teams without GPU work are left out.
    """
    entitled = np.minimum(want, guarantee)
    active = want > 0
    x = np.where(active, np.minimum(1.0, held / np.where(entitled > 0, entitled, 1.0)), 0.0)
    n = active.sum(axis=1)
    total = x.sum(axis=1)
    square = (x * x).sum(axis=1)
    index = np.where(square > 0, total * total / np.maximum(n, 1) / np.where(square > 0, square, 1.0), 1.0)
    return index, np.asarray((want > held).any(axis=1), dtype=bool)


def summarize_run(result: ReplayResult, start: float) -> dict[str, Any]:
    """One run's figures (see the module); ``start``: the window's opening time."""
    pods = [p for p in result.pods if not p.refused]
    end = result.end_s
    t = np.asarray(result.t, dtype=float)
    dt = _durations(t, start, end)
    span = float(dt.sum())
    capacity = 1000.0 * result.gpus
    alloc = np.asarray(result.alloc, dtype=float)
    held = np.asarray(result.held, dtype=float).reshape(len(t), len(result.teams))
    want = np.asarray(result.want, dtype=float).reshape(len(t), len(result.teams))
    index, contended = jain_rows(held, want, result.guarantee_milli)
    weight = dt * contended
    by_qos = {q: [p for p in pods if p.qos == q] for q in QOS_CLASSES}
    out: dict[str, Any] = {
        "ls_wait_p99_s": _pct([p.waited_s for p in by_qos["LS"]], 99),
        "ls_wait_p50_s": _pct([p.waited_s for p in by_qos["LS"]], 50),
        "be_wait_p99_s": _pct([p.waited_s for p in by_qos["BE"]], 99),
        "allocation_rate": round(float((alloc * dt).sum() / (span * capacity)), 4) if span else 0.0,
        "jain": round(float((index * weight).sum() / weight.sum()), 4) if weight.sum() else 1.0,
        "preemptions": sum(result.preemptions.values()),
        "preemptions_by_reason": dict(result.preemptions),
        "preemption_outcomes": dict(result.outcomes),
        "contended_share": round(float(weight.sum() / span), 4) if span else 0.0,
        "lost_work_s": round(sum(p.lost_s for p in pods), 1),
        "lost_gpu_s": round(sum(p.lost_s * p.gpu_milli / 1000 for p in pods), 1),
        "never_started": sum(1 for p in pods if p.runs == 0),
        "refused": len(result.pods) - len(pods),
        "pods": len(pods), "gpus": result.gpus, "nodes": result.nodes, "runtime_s": round(result.runtime_s, 2),
    }
    by_name = {p.name: p for p in result.pods}
    team_of = {team: i for i, team in enumerate(result.teams)}

    def mean_gpus(values: np.ndarray, lo: float, hi: float) -> float:  # time-weighted, over [lo, hi]
        during = _durations(t, lo, hi)
        return round(float((values * during).sum() / during.sum()) / 1000, 2) if during.sum() else 0.0

    out["longest_head_waits"] = [  # what blocked a line longest, and what the cluster held meanwhile
        {"s": round(s, 1), "line": line or "(the one line)", "pod": key, "qos": by_name[key].qos,
         "gpus": by_name[key].gpu_milli / 1000, "team": by_name[key].team, "from_s": since, "from_day": round(since / 86400, 2),
         "cluster_held_gpus": mean_gpus(alloc, since, since + s),
         "team_held_gpus": mean_gpus(held[:, team_of[by_name[key].team]], since, since + s)}
        for s, line, key, since in result.head_waits]
    shares = held / result.guarantee_milli
    out["detail"] = {
        "qos": {q: _waits(rs) for q, rs in by_qos.items() if rs},
        "priority": {PRIORITY_NAMES[v]: _waits([p for p in pods if p.priority == v])
                     for v in sorted(set(PRIORITY_OF_QOS.values()), reverse=True)},
        "queue": {team: {**_waits([p for p in pods if p.team == team]),
                         "mean_share": round(float((shares[:, i] * dt).sum() / span), 4) if span else 0.0}
                  for i, team in enumerate(result.teams)},
    }
    out["series"] = _series(t, start, end, alloc / capacity, shares)
    return out


def _series(t: np.ndarray, start: float, end: float, rate: np.ndarray, shares: np.ndarray) -> dict[str, Any]:
    """Time-weighted means over :data:`BIN_S` bins of the window (the step functions' exact integrals)."""
    edges = np.append(np.arange(start, end, BIN_S), end)
    if len(edges) < 2 or len(t) == 0:
        return {"t_day": [], "allocation_rate": [], "queue_share": []}

    def binned(values: np.ndarray) -> list[float]:
        dt = _durations(t, t[0], end)
        cum = np.concatenate([[0.0], np.cumsum(values * dt)])
        at = np.append(t, end)
        integral = np.interp(edges, at, cum)  # the integral of a step function is piecewise linear
        width = np.diff(edges)
        return [round(float(v), 4) for v in np.diff(integral) / np.where(width > 0, width, 1.0)]

    return {"t_day": [round(float(x) / 86400, 3) for x in edges[:-1]], "allocation_rate": binned(rate),
            "queue_share": [binned(shares[:, i]) for i in range(shares.shape[1])]}


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians over seeds of every figure a run has, nested as the runs nest them (lists: per position)."""
    first = runs[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [r[key] for r in runs if key in r]
        if isinstance(value, Mapping):
            out[key] = aggregate(values)
        elif isinstance(value, list) and value and isinstance(value[0], list):
            out[key] = [_median_lists([v[i] for v in values]) for i in range(len(value))]
        elif isinstance(value, list) and all(isinstance(x, (int, float)) for x in value):
            out[key] = _median_lists(values)
        elif isinstance(value, (int, float)):
            out[key] = round(float(statistics.median(values)), 4)
    return out


def _median_lists(lists: Sequence[Sequence[float]]) -> list[float]:
    n = min(len(x) for x in lists)
    return [round(float(statistics.median(x[i] for x in lists)), 4) for i in range(n)]


def _init_worker(nodes_path: str, pods_path: str) -> None:
    _WORKER["nodes"] = load_nodes(nodes_path)
    _WORKER["pods"] = load_timed_pods(pods_path)


def _run_job(mode: str, seed: int, grace_s: float, node_fraction: float,
             nomination_s: float | None) -> tuple[str, int, dict[str, Any]]:
    pods = _WORKER["pods"]
    nodes = select_nodes(_WORKER["nodes"], node_fraction, seed)
    result = Replay(nodes, pods, mode, seed=seed, grace_s=grace_s,  # type: ignore[arg-type]
                    nomination_s=nomination_s).run()
    return mode, seed, summarize_run(result, window_start(pods))


def run_timeline(nodes_path: str | Path, pods_path: str | Path, *, modes: Sequence[str] = MODES,
                 seeds: int = SEEDS, first_seed: int = FIRST_SEED, grace_s: float = DEFAULT_GRACE_S,
                 node_fraction: float = DEFAULT_NODE_FRACTION, workers: int | None = None,
                 on_done: Callable[[str, int, dict[str, Any]], None] | None = None,
                 nomination_s: float | None = NOMINATION_S) -> dict[str, Any]:
    """Every mode with ``seeds`` seeds (``first_seed``, +1, ...) on the same node sets; the JSON above.
    ``nomination_s``: see :class:`Replay` (None: freed room is not kept for the pod that preempted).

    Example: ``run_timeline(NODES, PODS, seeds=5)["modes"]["queues"]["ls_wait_p99_s"]``.

    Raises:
        TraceError: a trace file is missing, lacks a column or holds a bad row (read here first, in this
            process, so the error is not lost in a worker).
        InvalidRequest: ``node_fraction`` is not in (0, 1].
    """
    started = time.perf_counter()
    nodes_path, pods_path = str(nodes_path), str(pods_path)
    pods = load_timed_pods(pods_path)
    all_nodes = load_nodes(nodes_path)
    seed_list = [first_seed + i for i in range(seeds)]
    sets = {s: select_nodes(all_nodes, node_fraction, s) for s in seed_list}
    jobs = [(m, s) for s in seed_list for m in modes]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in modes}
    if workers == 1:
        _init_worker(nodes_path, pods_path)
        for m, s in jobs:
            mode, seed, summary = _run_job(m, s, grace_s, node_fraction, nomination_s)
            runs[mode][seed] = summary
            if on_done:
                on_done(mode, seed, summary)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(nodes_path, pods_path)) as pool:
            futures = [pool.submit(_run_job, m, s, grace_s, node_fraction, nomination_s) for m, s in jobs]
            for future in as_completed(futures):
                mode, seed, summary = future.result()
                runs[mode][seed] = summary
                if on_done:
                    on_done(mode, seed, summary)
    out: dict[str, Any] = {"modes": {}, "per_seed": {}, "detail": {}, "series": {}}
    for mode in modes:
        ordered = [runs[mode][s] for s in seed_list]
        medians = aggregate(ordered)
        out["modes"][mode] = {k: medians[k] for k in KEYS}
        out["per_seed"][mode] = {str(s): {k: v for k, v in runs[mode][s].items() if k not in _NOT_PER_SEED}
                                 for s in seed_list}
        out["detail"][mode] = medians["detail"]
        series = medians["series"]
        out["series"][mode] = {"t_day": series["t_day"], "allocation_rate": series["allocation_rate"],
                               "queue_share": {f"team-{i}": v for i, v in enumerate(series["queue_share"])}}
    out["runtime_s"] = round(time.perf_counter() - started, 2)
    out["meta"] = {
        "nodes": Path(nodes_path).name, "pods": Path(pods_path).name, "seeds": seed_list, "modes": list(modes),
        "grace_s": grace_s, "nomination_s": nomination_s, "node_fraction": node_fraction, "teams": TEAMS,
        "workers": workers,
        "node_sets": {str(s): {"nodes": len(ns), "gpus": sum(len(n.devices) for n in ns)} for s, ns in sets.items()},
        "window_start_day": round(window_start(pods) / 86400, 3),
        "end_day": round(max((p.creation_s + p.duration_s for p in pods), default=0) / 86400, 3),
        "priority_of_qos": dict(PRIORITY_OF_QOS), "bin_s": BIN_S,
    }
    return out
