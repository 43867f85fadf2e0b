"""Test-only reference: the scheduler as it was before the per-shape row caches (commit e9656e3), verbatim
but for this docstring, the class name and ``TieBreak`` (imported, so that both take the same values).

It filters by scanning every device of the cluster on every decision and explains a failure by another
full scan: slow, and obviously what the placement rules say. tests/core/test_scheduler_index.py checks
that :class:`hami_ray.core.scheduler.Scheduler` decides exactly as this does (same node, devices and
grants; same ``Unschedulable`` text, counts and ``never``; same verdicts) on random clusters and runs.
Never import it outside tests.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import FULL_CORES, Allocation, DeviceGrant, SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.policies import registry as default_registry
from hami_ray.core.policies.framework import (
    BoolArray,
    ClusterView,
    CycleState,
    DeviceChoice,
    DevicePolicy,
    FloatArray,
    IntArray,
    NodePolicy,
    Registry,
)
from hami_ray.core.scheduler import TieBreak
from hami_ray.core.verdict import Reason, unschedulable

DEFAULT_NODE_POLICY = NodePolicyName.BINPACK
DEFAULT_DEVICE_POLICY = DevicePolicyName.BINPACK  # fast at 10,000 nodes; fgd is opt-in (docs/simulation.md)
MEMO_LIMIT = 500_000


@dataclass
class _ScoreRows:
    """Cached joint-policy results for one request shape, one entry per ledger row."""

    score: FloatArray
    version: IntArray
    choice: list[DeviceChoice | None] = field(default_factory=list)


class ReferenceScheduler:
    """The pre-index scheduler (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        node_policy: NodePolicyName = DEFAULT_NODE_POLICY,
        device_policy: DevicePolicyName = DEFAULT_DEVICE_POLICY,
        seed: int = 0,
        tie_break: TieBreak = TieBreak.NODE_POLICY,
        registry: Registry | None = None,
    ) -> None:
        self.ledger = ledger
        self.registry = registry or default_registry()
        self.node_policy = node_policy
        self.device_policy = device_policy
        self.tie_break = tie_break
        self.rng = np.random.default_rng(seed)
        self.view = ClusterView(ledger.index, ledger.where, ledger.pair_score)
        self._node_policies: dict[NodePolicyName, NodePolicy] = {}
        self._device_policies: dict[DevicePolicyName, DevicePolicy] = {}
        self._rows: dict[tuple[object, ...], _ScoreRows] = {}
        self._memo: dict[tuple[object, ...], DeviceChoice | None] = {}
        self._rank: IntArray = np.zeros(0, dtype=np.int64)

    # --- policies ----------------------------------------------------------------------------
    def node_policy_for(self, name: NodePolicyName) -> NodePolicy:
        policy = self._node_policies.get(name)
        if policy is None:
            policy = self._node_policies[name] = self.registry.node[name]()
        return policy

    def device_policy_for(self, name: DevicePolicyName) -> DevicePolicy:
        policy = self._device_policies.get(name)
        if policy is None:
            policy = self._device_policies[name] = self.registry.device[name]()
        return policy

    def observe(self, request: SliceRequest) -> None:
        """Let learning policies (FGD's target workload) see a request."""
        name = request.device_policy or self.device_policy
        policy = self.device_policy_for(name)
        observe = getattr(policy, "observe", None)
        if observe is not None:
            observe(request)

    # --- validation --------------------------------------------------------------------------
    def validate(self, request: SliceRequest) -> None:
        """Refuse requests no device or node of the cluster could ever hold, whatever its load.

        Raises:
            InvalidRequest: memory above every device of the vendor, or more devices than any node has.
        """
        idx = self.ledger.index
        vendor = self.view.vendor_ok(request)
        if not vendor.any():
            return  # an empty cluster, or a vendor with no devices yet: the queue may wait for nodes
        if request.memory_mib is not None:
            largest = int((idx.mem_cap * vendor).max())
            if request.memory_mib > largest:
                raise InvalidRequest("gpu_memory", f"{request.memory_mib} MiB is more than any "
                                     f"{request.vendor} device has (largest: {largest} MiB)")
        most = int(vendor.sum(axis=1).max())
        if request.count > most:
            raise InvalidRequest("gpus", f"{request.count} devices is more than any node has (most: {most})")

    # --- placement ---------------------------------------------------------------------------
    def place(self, requests: SliceRequest | Sequence[SliceRequest], nodes: Collection[str] | None = None) -> Allocation:
        """Choose a node and devices for one slice, or for several that share a node (a pod).

        Example: ``Scheduler(ledger).place(SliceRequest(memory_mib=4096, cores=25))``.
        ``nodes``: only these may be chosen (a Kubernetes pod: the schedulable nodes); the others are
        left out of the ``0/N nodes`` count too.

        Raises:
            Unschedulable: no node fits now (``never=True`` when none could even empty).
            InvalidRequest: the request can never be held by this cluster (see :meth:`validate`).
        """
        reqs = [requests] if isinstance(requests, SliceRequest) else list(requests)
        if not reqs:
            raise InvalidRequest("requests", "nothing to place")
        first = reqs[0]
        device_reqs = [r for r in reqs if r.count > 0]
        fits = [self.view.device_fit(r) for r in device_reqs]
        ok = self.view.host_fit(self._host_total(reqs))
        for r, fit in zip(device_reqs, fits):
            ok &= self._numa_ok(fit, r.count) if r.numa_bind else fit.sum(axis=1) >= r.count
        mask = None if nodes is None else self._node_mask(nodes)
        if mask is not None:
            ok &= mask
        rows = ok.nonzero()[0]
        if rows.size == 0:
            raise self._explain(reqs, mask)
        state = CycleState(first, self.rng)
        lead = device_reqs[0] if device_reqs else first
        dp = self.device_policy_for(lead.device_policy or self.device_policy)
        np_ = self.node_policy_for(first.node_policy or self.node_policy)
        lead_fit = fits[0] if fits else np.zeros_like(self.ledger.index.exists)
        state.request = lead
        for row in self._row_order(rows, dp, np_, lead_fit, state):
            alloc = self._fit_row(int(row), reqs, dp, state)
            if alloc is not None:
                return alloc
        raise self._explain(reqs, mask)

    def verdicts(self, requests: SliceRequest | Sequence[SliceRequest], nodes: Sequence[str]) -> dict[str, str | None]:
        """Per node of ``nodes`` the ledger knows: None if ``requests`` fit there now, else why not (a
        :class:`Reason` value). Holds nothing. One pass over the cluster's columns answers every node; the
        exact device-by-device fit runs only where that pass cannot decide (several containers with
        devices, NUMA binding): what a scheduler extender's filter needs, for hundreds of nodes per pod.

        Raises:
            InvalidRequest: as :meth:`place`.
        """
        reqs = [requests] if isinstance(requests, SliceRequest) else list(requests)
        if not reqs:
            raise InvalidRequest("requests", "nothing to place")
        for r in reqs:
            self.validate(r)
        idx = self.ledger.index
        mask = self._node_mask(nodes) & idx.alive
        device_reqs = [r for r in reqs if r.count > 0]
        ok = self.view.host_fit(self._host_total(reqs)) & mask
        for r in device_reqs:
            fit = self.view.device_fit(r)
            ok &= self._numa_ok(fit, r.count) if r.numa_bind else fit.sum(axis=1) >= r.count
        reasons = self._row_reasons(reqs, mask & ~ok)
        codes = list(Reason)
        exact = len(device_reqs) <= 1 and not any(r.numa_bind for r in device_reqs)
        state: CycleState | None = None
        dp: DevicePolicy | None = None
        out: dict[str, str | None] = {}
        for name in nodes:
            row = idx.rows.get(name)
            if row is None or not mask[row]:
                continue
            if not ok[row]:
                out[name] = codes[int(reasons[row])].value
            elif exact:
                out[name] = None
            else:
                if state is None or dp is None:
                    lead = device_reqs[0] if device_reqs else reqs[0]
                    state = CycleState(reqs[0], self.rng)
                    state.request = lead
                    dp = self.device_policy_for(lead.device_policy or self.device_policy)
                fitted = self._fit_row(row, reqs, dp, state) is not None
                out[name] = None if fitted else Reason.TOO_FEW_DEVICES.value
        return out

    def _row_order(self, rows: IntArray, dp: DevicePolicy, np_: NodePolicy, fit: BoolArray,
                   state: CycleState) -> Iterator[int]:
        """Candidate rows, best first. Lazy: the first is nearly always the answer, and ordering every
        row of a 10,000-node cluster for nothing would cost more than the decision itself."""
        if not dp.joint:
            scores = np_.score(self.view, rows, state)
            best = int(rows[int(np.argmax(scores))])
        elif (pick := getattr(dp, "pick_row", None)) is not None:  # random-fit: no scoring at all
            best = int(pick(self.view, rows, state))
            scores = np.zeros(rows.size)
        else:
            scores = self._joint_scores(rows, dp, fit, state)
            normalize = getattr(dp, "normalize", None)
            if normalize is not None:
                scores = normalize(scores)
            finite = np.isfinite(scores)
            if not finite.any():
                return
            tied = rows[scores == scores[finite].max()]
            if tied.size == 1:
                best = int(tied[0])
            elif self.tie_break is TieBreak.RANDOM:
                best = int(tied[int(np.argmin(self._priority(tied)))])
            else:
                best = int(tied[int(np.argmax(np_.score(self.view, tied, state)))])
        yield best
        order = np.argsort(-scores, kind="stable")
        for i in order[np.isfinite(scores[order])]:
            if rows[i] != best:
                yield int(rows[i])

    def _priority(self, rows: IntArray) -> IntArray:
        """A random but fixed rank per row (the artifact's random node-name prefixes)."""
        size = self.ledger.index.version.shape[0]
        if self._rank.shape[0] < size:
            extra = self.rng.permutation(size - self._rank.shape[0]) + self._rank.shape[0]
            self._rank = np.concatenate([self._rank, extra])
        ranks: IntArray = self._rank[rows]
        return ranks

    def _joint_scores(self, rows: IntArray, dp: DevicePolicy, fit: BoolArray, state: CycleState) -> FloatArray:
        """The joint policy's score for every candidate row, recomputing only rows that changed."""
        request = state.request
        generation = getattr(dp, "generation", 0)
        idx = self.ledger.index
        if not dp.cacheable:
            out = np.full(rows.size, -np.inf)
            for i, row in enumerate(rows):
                choice = dp.select(self.view, int(row), fit[row], state)
                if choice is not None:
                    out[i] = choice.score
            return out
        key = (dp.name, generation, request.shape())
        cache = self._rows.get(key)
        size = idx.version.shape[0]
        if cache is None or cache.score.shape[0] < size:
            cache = _ScoreRows(np.full(size, -np.inf), np.full(size, -1, dtype=np.int64), [None] * size)
            if len(self._rows) > 512:
                self._rows.clear()
            self._rows[key] = cache
        stale = rows[cache.version[rows] != idx.version[rows]]
        if stale.size:
            self._refresh(cache, key, stale, dp, fit, state)
        state.data["joint_cache"] = cache
        result: FloatArray = cache.score[rows]
        return result

    def _refresh(self, cache: _ScoreRows, key: tuple[object, ...], stale: IntArray, dp: DevicePolicy,
                 fit: BoolArray, state: CycleState) -> None:
        """Recompute the cached choices of rows whose state changed: in one batch where the policy can."""
        batch = getattr(dp, "select_rows", None)
        if batch is not None:
            cols, scores = batch(self.view, stale, fit[stale], state)
            choices = [None if c is None else DeviceChoice(c, float(v)) for c, v in zip(cols, scores)]
        else:
            request = state.request
            memo = (getattr(dp, "memo_across_rows", True) and not request.include_uuids
                    and not request.exclude_uuids)
            choices = [self._select_memo(key, int(row), dp, fit, state, memo) for row in stale]
        for row, choice in zip(stale.tolist(), choices):
            cache.choice[row] = choice
            cache.score[row] = -np.inf if choice is None else choice.score
        cache.version[stale] = self.ledger.index.version[stale]

    def _select_memo(self, key: tuple[object, ...], row: int, dp: DevicePolicy, fit: BoolArray,
                     state: CycleState, memo: bool) -> DeviceChoice | None:
        """``dp.select`` on one row, shared across rows in the same state (idle nodes of one model)."""
        if not memo:
            return dp.select(self.view, row, fit[row], state)
        mkey = (key, self.ledger.index.state_key(row))
        if mkey not in self._memo:
            if len(self._memo) > MEMO_LIMIT:
                self._memo.clear()
            self._memo[mkey] = dp.select(self.view, row, fit[row], state)
        return self._memo[mkey]

    def _fit_row(self, row: int, reqs: list[SliceRequest], dp: DevicePolicy,
                 state: CycleState) -> Allocation | None:
        """Exact placement of every request on one row, each slice seeing the previous ones."""
        idx = self.ledger.index
        node = idx.names[row]
        extra_mem = np.zeros(idx.width, dtype=np.int64)
        extra_cores = np.zeros(idx.width, dtype=np.int64)
        extra_slots = np.zeros(idx.width, dtype=np.int64)
        extra_excl = np.zeros(idx.width, dtype=bool)  # taken whole by an earlier container of the pod
        slices: list[tuple[DeviceGrant, ...]] = []
        cached = state.data.get("joint_cache")
        lead = True  # the first request with devices: the one the policy scored the rows for
        for request in reqs:
            if request.count == 0:
                slices.append(())
                continue
            choice: DeviceChoice | None = None
            if lead and isinstance(cached, _ScoreRows) and cached.version[row] == idx.version[row]:
                choice = cached.choice[row]
            lead = False
            if choice is not None and request.numa_bind and not self._one_numa(row, choice.cols):
                choice = None
            if choice is None:
                fit = self._row_fit(row, request, extra_mem, extra_cores, extra_slots) & ~extra_excl
                if int(fit.sum()) < request.count:
                    return None
                # numa_bind is a must whatever the device policy (HAMi's nvidia.com/numa-bind)
                policy = self.device_policy_for(DevicePolicyName.NUMA) if request.numa_bind else dp
                choice = policy.select(self.view, row, fit, CycleState(request, state.rng, state.data))
                if choice is None:
                    return None
            grants = []
            for col in choice.cols:
                mem = request.memory_on(int(idx.mem_cap[row, col]))
                cores = request.cores
                if idx.whole[row, col]:  # a MIG instance is handed out whole (its cores: its share of SMs)
                    mem, cores = int(idx.mem_cap[row, col]), int(idx.core_cap[row, col])
                grants.append(DeviceGrant(uuid=self.ledger.uuid_at(row, col), memory_mib=mem, cores=cores))
                extra_mem[col] += mem
                extra_cores[col] += cores
                extra_slots[col] += 1
                extra_excl[col] |= request.exclusive
            slices.append(tuple(grants))
        host = self._host_total(reqs)
        return Allocation(node=node, slices=tuple(slices), cpu_milli=host.cpu_milli,
                          host_memory_mib=host.host_memory_mib)

    def _one_numa(self, row: int, cols: tuple[int, ...]) -> bool:
        return len({int(self.ledger.index.numa[row, c]) for c in cols}) <= 1

    def _numa_ok(self, devices: BoolArray, count: int) -> BoolArray:
        """Per node: some NUMA node has ``count`` of the marked devices."""
        idx = self.ledger.index
        ok = np.zeros(devices.shape[0], dtype=bool)
        for numa in np.unique(idx.numa[idx.exists]):
            ok |= (devices & (idx.numa == numa)).sum(axis=1) >= count
        return ok

    def _row_fit(self, row: int, request: SliceRequest, mem: IntArray, cores: IntArray,
                 slots: IntArray) -> BoolArray:
        idx = self.ledger.index
        need = self.view.memory_need(request)[row]
        fit = (self.view.type_ok(request)[row] & idx.healthy[row] & ~idx.excl[row]
               & (idx.slot_used[row] + slots < idx.slot_cap[row])
               & (idx.mem_cap[row] - idx.mem_used[row] - mem >= need)
               & (idx.core_cap[row] - idx.core_used[row] - cores >= request.cores))
        if request.cores >= FULL_CORES:
            fit &= (idx.slot_used[row] + slots) == 0
        elif request.cores == 0:
            fit &= idx.core_used[row] + cores < idx.core_cap[row]
        uuid = self.view.uuid_ok(request)
        if uuid is not None:
            fit &= uuid[row]
        result: BoolArray = fit
        return result

    @staticmethod
    def _host_total(reqs: list[SliceRequest]) -> SliceRequest:
        cpu = sum(r.cpu_milli for r in reqs)
        mem = sum(r.host_memory_mib for r in reqs)
        return reqs[0] if len(reqs) == 1 else reqs[0].model_copy(update={"cpu_milli": cpu, "host_memory_mib": mem})

    # --- explanation -------------------------------------------------------------------------
    def _node_mask(self, nodes: Collection[str]) -> BoolArray:
        idx = self.ledger.index
        mask = np.zeros(idx.alive.shape[0], dtype=bool)
        rows = [idx.rows[n] for n in nodes if n in idx.rows]
        mask[rows] = True
        return mask

    def _explain(self, reqs: list[SliceRequest], mask: BoolArray | None = None) -> Unschedulable:
        """One reason per alive node, in kube-scheduler's style; ``never`` if no empty node fits."""
        for r in reqs:
            self.validate(r)
        idx = self.ledger.index
        alive = idx.alive if mask is None else idx.alive & mask
        reasons = self._row_reasons(reqs, alive)
        codes = list(Reason)
        never = not self._could_ever_fit(reqs)
        counts = np.bincount(reasons[alive], minlength=len(codes))
        named: dict[str, int] = {}
        floor = next((r.isolation for r in reqs if r.isolation is not None), None)
        for i, n in enumerate(counts):
            if n:
                text = codes[i].value
                if codes[i] is Reason.ISOLATION_BELOW and floor is not None:
                    text = f"isolation below {floor.value}"  # the grade the request asked for
                named[text] = int(n)
        return unschedulable(int(alive.sum()), named, never=never)

    def _row_reasons(self, reqs: list[SliceRequest], rows: BoolArray) -> IntArray:
        """For each row of ``rows``, the index in :class:`Reason` of the first reason its node cannot hold
        ``reqs`` now (static reasons first); -1 elsewhere."""
        idx = self.ledger.index
        view = self.view
        codes = list(Reason)
        reasons = np.full(idx.alive.shape[0], -1, dtype=np.int64)
        alive = rows
        unset = alive.copy()

        def mark(failed: BoolArray, reason: Reason) -> None:
            hit = unset & failed
            reasons[hit] = codes.index(reason)
            unset[hit] = False

        host = self._host_total(reqs)
        device_reqs = [r for r in reqs if r.count > 0]
        typed_of = []
        for request in device_reqs:  # static reasons first: they hold whatever the load
            vendor = view.vendor_ok(request).sum(axis=1)
            typed = view.model_mask(request)[idx.model_id] & idx.exists
            mark(vendor == 0, Reason.VENDOR_MISMATCH)
            mark(vendor < request.count, Reason.TOO_FEW_DEVICES)
            mark(typed.sum(axis=1) < request.count, Reason.TYPE_MISMATCH)
            if request.isolation is not None:
                typed = typed & view.grade_ok(request)
                mark(typed.sum(axis=1) < request.count, Reason.ISOLATION_BELOW)
            uuid = view.uuid_ok(request)
            if uuid is not None:
                typed = typed & uuid
                mark(typed.sum(axis=1) < request.count, Reason.UUID_MISMATCH)
            typed_of.append(typed)
        if host.cpu_milli:
            mark((idx.cpu_cap > 0) & (idx.cpu_cap - idx.cpu_used < host.cpu_milli), Reason.INSUFFICIENT_CPU)
        if host.host_memory_mib:
            mark((idx.hmem_cap > 0) & (idx.hmem_cap - idx.hmem_used < host.host_memory_mib),
                 Reason.INSUFFICIENT_HOST_MEMORY)
        for request, typed in zip(device_reqs, typed_of):
            need = request.count
            healthy = typed & idx.healthy
            mark(healthy.sum(axis=1) < need, Reason.UNHEALTHY)
            step = healthy & (idx.slot_used < idx.slot_cap)
            mark(step.sum(axis=1) < need, Reason.SLICES_EXHAUSTED)
            step &= ~idx.excl
            if request.cores >= FULL_CORES:
                step &= idx.slot_used == 0
            mark(step.sum(axis=1) < need, Reason.EXCLUSIVE_CONFLICT)
            step &= (idx.mem_cap - idx.mem_used) >= view.memory_need(request)
            mark(step.sum(axis=1) < need, Reason.INSUFFICIENT_MEMORY)
            step &= (idx.core_cap - idx.core_used) >= max(request.cores, 1)
            mark(step.sum(axis=1) < need, Reason.INSUFFICIENT_CORES)
            if request.numa_bind:
                mark(~self._numa_ok(step, need), Reason.NUMA_MISMATCH)
        mark(alive, Reason.TOO_FEW_DEVICES)
        return reasons

    def _could_ever_fit(self, reqs: list[SliceRequest]) -> bool:
        """Would some node hold every request if it were empty? (Yes while no node is known: nodes may join.)"""
        idx = self.ledger.index
        if not idx.alive.any():
            return True
        view = self.view
        host = self._host_total(reqs)
        ok = idx.alive.copy()
        if host.cpu_milli:
            ok &= (idx.cpu_cap == 0) | (idx.cpu_cap >= host.cpu_milli)
        if host.host_memory_mib:
            ok &= (idx.hmem_cap == 0) | (idx.hmem_cap >= host.host_memory_mib)
        exclusive = np.zeros_like(idx.exists)  # devices some whole-device container could take
        exclusive_need = 0
        for request in reqs:
            if request.count == 0:
                continue
            dev = view.type_ok(request) & (idx.mem_cap >= view.memory_need(request)) & (idx.core_cap >= request.cores)
            uuid = view.uuid_ok(request)
            if uuid is not None:
                dev &= uuid
            # each container on its own must fit an empty node ...
            ok &= self._numa_ok(dev, request.count) if request.numa_bind else dev.sum(axis=1) >= request.count
            if request.exclusive:
                exclusive |= dev
                exclusive_need += request.count
        # ... and whole-device containers cannot share their devices
        if exclusive_need:
            ok &= exclusive.sum(axis=1) >= exclusive_need
        return bool(ok.any())
