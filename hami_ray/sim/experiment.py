"""Policies x seeds experiments over a trace, in parallel worker processes, with the artifact's medians
and their spread over the seeds.

Called by ``hami-ray simulate`` and ``make demo``. Results are plain dicts ready for JSON:

    {POLICY: {"unallocated_pct_at": {"90": m, "100": m, "110": m, "130": m},   # median over seeds
              "seed_spread_at": {"90": {"min": v, "median": m, "max": v}, ...},  # over the seeds
              "per_seed": {"42": {"90": v, ...}, ...},
              "curve": {"0": m, ..., "130": m},          # median over seeds, each arrived %
              "band": {"0": [p25, p75], ...},
              "failed_pods": {"42": n, ...}, "runtime_s": s,
              # every policy but the baseline: POLICY minus BASELINE seed by seed (the same seed is the
              # same shuffled workload and node order), in points of unallocated GPU %; below = fewer
              "vs_baseline": {"baseline": name,
                              "diff_at": {"100": {"min": d, "median": d, "max": d,
                                                  "below": n, "tie": n, "above": n}, ...}}},
     "runtime_s": total wall seconds,
     "meta": {"nodes": path, "pods": path, "seeds": [...], "gpus": n, "default_policy": name,
              "baseline": name or None, "spread": what the intervals are}}

The intervals are the plain range over the seeds (min, max) with the median: no resampling, so with 10
seeds they say what those 10 seeds did, not a confidence level.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from hami_ray.core.scheduler import DEFAULT_DEVICE_POLICY
from hami_ray.sim.arrival import REPORT_POINTS, RunResult, run
from hami_ray.sim.trace import TracePod, load_nodes, load_pods, two_dimensional

FIRST_SEED = 42  # the artifact's tuneseed 42..51
SPREAD = "min and max over the seeds, with the median (no resampling)"
TIE_PP = 0.005  # per-seed differences under this (points of unallocated GPU %) count as ties: they print as 0.00
_WORKER: dict[str, object] = {}


def _init_worker(nodes_path: str, pods_path: str, two_dim: bool = False) -> None:
    _WORKER["nodes"] = load_nodes(nodes_path)
    pods = load_pods(pods_path)
    _WORKER["pods"] = two_dimensional(pods) if two_dim else pods


def _run_job(policy: str, seed: int) -> RunResult:
    nodes = _WORKER["nodes"]
    pods = _WORKER["pods"]
    assert isinstance(nodes, list) and isinstance(pods, list)
    return run(nodes, pods, policy, seed)


def _cost(policy: str) -> int:
    return {"fgd": 0, "fgd-plus": 0, "default": 0}.get(policy, 1)


def run_experiment(nodes_path: str | Path, pods_path: str | Path, policies: Sequence[str], seeds: int = 10,
                   *, first_seed: int = FIRST_SEED, workers: int | None = None, two_dim: bool = False,
                   baseline: str | None = None,
                   on_done: Callable[[RunResult], None] | None = None) -> dict[str, object]:
    """Run every policy with ``seeds`` seeds and aggregate; ``on_done`` is called per finished run.
    With ``baseline`` (one of ``policies``) every other policy is also compared with it seed by seed."""
    if baseline is not None and baseline not in policies:
        raise ValueError(f"baseline {baseline!r} is not among the policies {list(policies)}")
    started = time.perf_counter()
    nodes_path, pods_path = str(nodes_path), str(pods_path)
    load_pods(pods_path)  # fail fast, in this process, on a bad file
    gpus = sum(len(n.devices) for n in load_nodes(nodes_path))
    jobs = sorted(((p, first_seed + i) for p in policies for i in range(seeds)), key=lambda j: _cost(j[0]))
    workers = workers or min(os.cpu_count() or 1, len(jobs))
    results: dict[str, list[RunResult]] = {p: [] for p in policies}
    if workers <= 1:
        _init_worker(nodes_path, pods_path, two_dim)
        for policy, seed in jobs:
            result = _run_job(policy, seed)
            results[policy].append(result)
            if on_done:
                on_done(result)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(nodes_path, pods_path, two_dim)) as pool:
            futures = [pool.submit(_run_job, p, s) for p, s in jobs]
            for future in as_completed(futures):
                result = future.result()
                results[result.policy].append(result)
                if on_done:
                    on_done(result)
    out: dict[str, object] = {p: summarize(rs) for p, rs in results.items()}
    if baseline is not None:
        for policy, runs in results.items():
            if policy != baseline:
                summary = out[policy]
                assert isinstance(summary, dict)
                summary["vs_baseline"] = {"baseline": baseline, "diff_at": paired_diff(runs, results[baseline])}
    out["runtime_s"] = round(time.perf_counter() - started, 2)
    # file names only: results are shared and committed, the machine's paths mean nothing elsewhere
    out["meta"] = {"nodes": Path(nodes_path).name, "pods": Path(pods_path).name, "gpus": gpus, "first_seed": first_seed,
                   "seeds": [first_seed + i for i in range(seeds)], "default_policy": str(DEFAULT_DEVICE_POLICY),
                   "two_dimensional": two_dim, "baseline": baseline, "spread": SPREAD}
    return out


def summarize(runs: Sequence[RunResult]) -> dict[str, object]:
    """Medians over seeds, as the artifact's plot (median line, 25-75 % band)."""
    runs = sorted(runs, key=lambda r: r.seed)
    curves = {r.seed: r.curve() for r in runs}
    points = sorted({x for c in curves.values() for x in c})
    curve: dict[str, float] = {}
    band: dict[str, list[float]] = {}
    for x in points:
        values = [c[x] for c in curves.values() if x in c]
        curve[str(x)] = round(statistics.median(values), 4)
        band[str(x)] = [round(float(np.percentile(values, 25)), 4), round(float(np.percentile(values, 75)), 4)]
    per_seed = {str(s): {k: c.get(int(k)) for k in REPORT_POINTS} for s, c in curves.items()}
    at = {k: curve.get(k) for k in REPORT_POINTS}
    spread = {k: seed_spread([v[k] for v in per_seed.values() if v[k] is not None]) for k in REPORT_POINTS}
    return {
        "unallocated_pct_at": at,
        "seed_spread_at": spread,
        "per_seed": per_seed,
        "curve": curve,
        "band": band,
        "failed_pods": {str(r.seed): r.failed for r in runs},
        "pods": {str(r.seed): r.pods for r in runs},
        "runtime_s": round(sum(r.runtime_s for r in runs), 2),
    }


def seed_spread(values: Sequence[float]) -> dict[str, float] | None:
    """Min, median and max of one value over the seeds (None without values)."""
    if not values:
        return None
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4),
            "max": round(max(values), 4)}


def paired_diff(runs: Sequence[RunResult], base: Sequence[RunResult]) -> dict[str, dict[str, float] | None]:
    """``runs`` minus ``base`` seed by seed at each report point: the spread of the differences and on
    how many seeds the policy left fewer (below), as many (tie: under :data:`TIE_PP`) or more GPUs idle."""
    mine = {r.seed: r.curve() for r in runs}
    theirs = {r.seed: r.curve() for r in base}
    out: dict[str, dict[str, float] | None] = {}
    for point in REPORT_POINTS:
        x = int(point)
        diffs = [mine[s][x] - theirs[s][x] for s in sorted(mine.keys() & theirs.keys())
                 if x in mine[s] and x in theirs[s]]
        spread = seed_spread(diffs)
        if spread is not None:
            spread.update(below=sum(d <= -TIE_PP for d in diffs), tie=sum(abs(d) < TIE_PP for d in diffs),
                          above=sum(d >= TIE_PP for d in diffs))
        out[point] = spread
    return out


def default_trace_paths(root: Path) -> tuple[Path, Path]:
    return root / "openb_node_list_gpu_node.csv", root / "openb_pod_list_default.csv"


__all__ = ["run_experiment", "summarize", "seed_spread", "paired_diff", "default_trace_paths", "TracePod"]
