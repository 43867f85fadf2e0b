"""HAMi's usage scores as pure functions; binpack and spread are this scorer with a ``reverse`` flag.

Node score (HAMi ``policy/node_policy.go`` ``ComputeDefaultScore``), before placing the request:
    10 x (sum(slices)/sum(split) + sum(cores)/sum(core cap) + sum(memory)/sum(memory cap))
Device score (``policy/gpu_policy.go`` ``ComputeScore``, the documented form that includes the request):
    10 x (w_slot (1 + slices)/split + w_core (req cores + cores)/core cap + w_mem (req mem + mem)/mem cap)
Both range 0-30; binpack prefers the highest, spread the lowest (``reverse``).
"""

from __future__ import annotations

import numpy as np

from hami_ray.core.policies.framework import ClusterView, FloatArray, IntArray, usage_score

MAX_USAGE_SCORE = 30.0


def node_usage_scores(view: ClusterView, rows: IntArray, *, reverse: bool) -> FloatArray:
    """HAMi's node score for each row, mapped to 0-100 (higher wins; ``reverse`` for spread)."""
    idx = view.index

    def ratio(used: IntArray, cap: IntArray) -> FloatArray:
        return usage_score(used[rows].astype(np.float64), cap[rows].astype(np.float64))

    raw = 10 * (ratio(idx.node_slot_used, idx.node_slot_cap) + ratio(idx.node_core_used, idx.node_core_cap)
                + ratio(idx.node_mem_used, idx.node_mem_cap))
    score: FloatArray = raw * (100.0 / MAX_USAGE_SCORE)
    return 100.0 - score if reverse else score


def device_usage_scores(view: ClusterView, row: int, mem_req: IntArray, cores_req: int,
                        weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> FloatArray:
    """HAMi's device score for every column of ``row`` if one more slice were placed on it."""
    idx = view.index
    w_slot, w_core, w_mem = weights
    slots = usage_score((idx.slot_used[row] + 1).astype(np.float64), idx.slot_cap[row].astype(np.float64))
    cores = usage_score((idx.core_used[row] + cores_req).astype(np.float64), idx.core_cap[row].astype(np.float64))
    mem = usage_score((idx.mem_used[row] + mem_req).astype(np.float64), idx.mem_cap[row].astype(np.float64))
    result: FloatArray = 10 * (w_slot * slots + w_core * cores + w_mem * mem)
    return result


def device_order(scores: FloatArray, *, reverse: bool) -> IntArray:
    """Columns in preference order: binpack takes the highest score first, spread the lowest.

    Ties keep the lower column first (a stable sort), so choices are deterministic.
    """
    keys = scores if reverse else -scores
    order: IntArray = np.argsort(keys, kind="stable")
    return order
