"""The placement pipeline: filter (every node, from per-shape caches), score, select, explain failures.

One :class:`Scheduler` serves the simulator, the placement actor and the Kubernetes bridge. It reads and
never writes the ledger: :meth:`Scheduler.place` returns an :class:`Allocation` that the caller turns
into a lease (the placement actor only after the node actor confirms it).

Speed (issue 14: p99 <= 1 ms at 10,000 nodes, <= 5 ms at 100,000): nothing is recomputed for nodes
that did not change. Per request shape, :class:`hami_ray.core.rowfit.RowCache` keeps each node's "fits
now" (and, once a failure was explained, its first reason), refreshed only on the rows the ledger moved
since; binpack/spread keep their node score per row the same way, so choosing a node is an argmax over
one column. Inventory-only answers (``validate``, ``never``) are kept until a node joins, leaves or
changes. Joint policies (FGD family) keep, per request shape, a score per row recomputed where the
version changed, plus a memo across rows in the same state. Decisions are exactly those of a full scan
(tests/core/test_scheduler_index.py compares them with the pre-cache scheduler).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

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
    Rows,
)
from hami_ray.core.rowfit import CODE, FITS, REASONS, UNKNOWN, RowCache, could_ever_fit, row_codes, row_fits
from hami_ray.core.verdict import Reason, unschedulable

DEFAULT_NODE_POLICY = NodePolicyName.BINPACK
DEFAULT_DEVICE_POLICY = DevicePolicyName.BINPACK  # fast at 10,000 nodes; fgd is opt-in (docs/simulation.md)
MEMO_LIMIT = 500_000
FitOf = Callable[[IntArray], BoolArray]  # the lead request's device fit on some rows, one line per row


class TieBreak(StrEnum):
    """How a joint policy chooses among nodes of equal score."""

    NODE_POLICY = "node-policy"  # the node policy's score, then the lowest row: deterministic
    RANDOM = "random"  # uniformly at random (kube-scheduler's selectHost; the FGD artifact)


@dataclass
class _ScoreRows:
    """Cached joint-policy results for one request shape, one entry per ledger row."""

    score: FloatArray
    version: IntArray
    choice: list[DeviceChoice | None] = field(default_factory=list)


class Scheduler:
    """Places slice requests on the ledger's nodes with a node policy and a device policy."""

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
        self._code_cache = RowCache(ledger.index, np.int8)  # per request shape: fits, or why not
        self._score_cache = RowCache(ledger.index, np.float64)  # per row-local node policy
        self._ever: dict[tuple[object, ...], bool] = {}  # could ever fit, per shapes and inventory
        self._limits: dict[tuple[str, int], tuple[bool, int, int]] = {}  # validate's, per vendor and inventory

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
        key = (request.vendor.lower(), idx.inventory)  # the inventory's, whatever the load: kept until it changes
        limits = self._limits.get(key)
        if limits is None:
            vendor = self.view.vendor_ok(request)
            if len(self._limits) > 64:
                self._limits.clear()
            limits = self._limits[key] = (bool(vendor.any()), int((idx.mem_cap * vendor).max(initial=0)),
                                          int(vendor.sum(axis=1).max(initial=0)))
        known, largest, most = limits
        if not known:
            return  # an empty cluster, or a vendor with no devices yet: the queue may wait for nodes
        if request.memory_mib is not None:
            if request.memory_mib > largest:
                raise InvalidRequest("gpu_memory", f"{request.memory_mib} MiB is more than any "
                                     f"{request.vendor} device has (largest: {largest} MiB)")
        if request.count > most:
            raise InvalidRequest("gpus", f"{request.count} devices is more than any node has (most: {most})")

    # --- placement ---------------------------------------------------------------------------
    def place(self, requests: SliceRequest | Sequence[SliceRequest], nodes: Collection[str] | None = None,
              avoid: Collection[str] = ()) -> Allocation:
        """Choose a node and devices for one slice, or for several that share a node (a pod).

        Example: ``Scheduler(ledger).place(SliceRequest(memory_mib=4096, cores=25))``.
        ``nodes``: only these may be chosen (a Kubernetes pod: the schedulable nodes); the others are
        left out of the ``0/N nodes`` count too. ``avoid``: never these (node actors that just refused, e.g.
        with a full state disk); they still count in ``0/N nodes``.

        Raises:
            Unschedulable: no node fits now (``never=True`` when none could even empty).
            InvalidRequest: the request can never be held by this cluster (see :meth:`validate`).
        """
        reqs = [requests] if isinstance(requests, SliceRequest) else list(requests)
        if not reqs:
            raise InvalidRequest("requests", "nothing to place")
        first = reqs[0]
        idx = self.ledger.index
        device_reqs = [r for r in reqs if r.count > 0]
        codes = self._codes(reqs)  # per row: every request fits now, or the first reason it does not
        ok = (codes == FITS) & idx.alive
        mask = None if nodes is None else self._node_mask(nodes)
        if mask is not None:
            ok &= mask
        for name in avoid:
            row = idx.rows.get(name)
            if row is not None:
                ok[row] = False
        if not ok.any():
            raise self._explain(reqs, mask, codes)
        state = CycleState(first, self.rng)
        lead = device_reqs[0] if device_reqs else first
        dp = self.device_policy_for(lead.device_policy or self.device_policy)
        np_ = self.node_policy_for(first.node_policy or self.node_policy)
        state.request = lead

        def lead_fit(sel: IntArray) -> BoolArray:  # the lead's device fit on some rows (joint policies)
            if not device_reqs:
                return np.zeros((sel.size, idx.width), dtype=bool)
            return self.view.device_fit(lead, sel)

        for row in self._row_order(ok, dp, np_, lead_fit, state):
            alloc = self._fit_row(int(row), reqs, dp, state)
            if alloc is not None:
                return alloc
        raise self._explain(reqs, mask, codes)

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
        reasons = self._codes(reqs)
        ok = (reasons == FITS) & mask
        self._reasons(reqs, reasons, mask & ~ok)
        exact = len(device_reqs) <= 1 and not any(r.numa_bind for r in device_reqs)
        state: CycleState | None = None
        dp: DevicePolicy | None = None
        out: dict[str, str | None] = {}
        for name in nodes:
            row = idx.rows.get(name)
            if row is None or not mask[row]:
                continue
            if not ok[row]:
                out[name] = REASONS[int(reasons[row])].value
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

    def _row_order(self, ok: BoolArray, dp: DevicePolicy, np_: NodePolicy, fit: FitOf,
                   state: CycleState) -> Iterator[int]:
        """Candidate rows (``ok``), best first. Lazy: the first is nearly always the answer, and ordering
        every row of a 10,000-node cluster for nothing would cost more than the decision itself."""
        if not dp.joint and getattr(np_, "row_local", False):
            # scores kept per row (binpack, spread): the best is one argmax, without listing the candidates
            masked = np.where(ok, self._row_scores(np_, state), -np.inf)
            best = int(np.argmax(masked))  # the lowest row among equal scores, as over the candidates
            yield best
            for row in np.argsort(-masked, kind="stable")[: int(np.count_nonzero(ok))]:
                if row != best:
                    yield int(row)
            return
        rows = ok.nonzero()[0]
        if not dp.joint:
            scores = self._node_scores(np_, rows, state)
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
                best = int(tied[int(np.argmax(self._node_scores(np_, tied, state)))])
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

    def _node_scores(self, np_: NodePolicy, rows: IntArray, state: CycleState) -> FloatArray:
        """The node policy's scores of ``rows``; kept per row where a row's score depends on that row only."""
        if not getattr(np_, "row_local", False):
            return np_.score(self.view, rows, state)
        scores: FloatArray = self._row_scores(np_, state)[rows]
        return scores

    def _row_scores(self, np_: NodePolicy, state: CycleState) -> FloatArray:
        """A ``row_local`` node policy's score of every row (alive or not), recomputed where rows moved."""
        size = self.ledger.index.version.shape[0]

        def compute(sel: Rows) -> FloatArray:
            return np_.score(self.view, np.arange(size)[sel] if isinstance(sel, slice) else np.asarray(sel), state)

        scores: FloatArray = self._score_cache.get(np_.name, compute)
        return scores

    def _codes(self, reqs: list[SliceRequest]) -> npt.NDArray[np.int8]:
        """Per row (alive or not): :data:`FITS` if each of ``reqs`` fits there now, else :data:`UNKNOWN`
        or the index in :class:`Reason` of the first reason it does not (:meth:`_reasons` fills those in);
        kept per request shape, so the caller may write reasons into it but must not keep it."""
        host = self._host_total(reqs)
        key = tuple(r.shape() for r in reqs)
        codes: npt.NDArray[np.int8] = self._code_cache.get(key, lambda sel: row_fits(self.view, reqs, host, sel))
        return codes

    def _reasons(self, reqs: list[SliceRequest], codes: npt.NDArray[np.int8], where: BoolArray) -> None:
        """Work out, in place, the first reason of each row of ``where`` that :meth:`_codes` left
        :data:`UNKNOWN` (rows explained before keep theirs until their version moves)."""
        unknown = (codes == UNKNOWN) & where
        rows = unknown.nonzero()[0]
        if rows.size * 4 > codes.size:  # most of the cluster: one pass over the whole columns is cheaper
            codes[rows] = row_codes(self.view, reqs, self._host_total(reqs))[rows]
        elif rows.size:
            codes[rows] = row_codes(self.view, reqs, self._host_total(reqs), rows)

    def _joint_scores(self, rows: IntArray, dp: DevicePolicy, fit: FitOf, state: CycleState) -> FloatArray:
        """The joint policy's score for every candidate row, recomputing only rows that changed."""
        request = state.request
        generation = getattr(dp, "generation", 0)
        idx = self.ledger.index
        if not dp.cacheable:
            out = np.full(rows.size, -np.inf)
            fits = fit(rows)
            for i, row in enumerate(rows):
                choice = dp.select(self.view, int(row), fits[i], state)
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
            self._refresh(cache, key, stale, dp, fit(stale), state)
        state.data["joint_cache"] = cache
        result: FloatArray = cache.score[rows]
        return result

    def _refresh(self, cache: _ScoreRows, key: tuple[object, ...], stale: IntArray, dp: DevicePolicy,
                 fit: BoolArray, state: CycleState) -> None:
        """Recompute the cached choices of rows whose state changed: in one batch where the policy can.
        ``fit``: the lead request's device fit, one line per entry of ``stale``."""
        batch = getattr(dp, "select_rows", None)
        if batch is not None:
            cols, scores = batch(self.view, stale, fit, state)
            choices = [None if c is None else DeviceChoice(c, float(v)) for c, v in zip(cols, scores)]
        else:
            request = state.request
            memo = (getattr(dp, "memo_across_rows", True) and not request.include_uuids
                    and not request.exclude_uuids)
            choices = [self._select_memo(key, int(row), dp, fit[i], state, memo) for i, row in enumerate(stale)]
        for row, choice in zip(stale.tolist(), choices):
            cache.choice[row] = choice
            cache.score[row] = -np.inf if choice is None else choice.score
        cache.version[stale] = self.ledger.index.version[stale]

    def _select_memo(self, key: tuple[object, ...], row: int, dp: DevicePolicy, fit: BoolArray,
                     state: CycleState, memo: bool) -> DeviceChoice | None:
        """``dp.select`` on one row (``fit``: its columns), shared across rows in the same state (idle nodes
        of one model)."""
        if not memo:
            return dp.select(self.view, row, fit, state)
        mkey = (key, self.ledger.index.state_key(row))
        if mkey not in self._memo:
            if len(self._memo) > MEMO_LIMIT:
                self._memo.clear()
            self._memo[mkey] = dp.select(self.view, row, fit, state)
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

    def _row_fit(self, row: int, request: SliceRequest, mem: IntArray, cores: IntArray,
                 slots: IntArray) -> BoolArray:
        idx = self.ledger.index
        need = self.view.memory_need(request, row)
        fit = (self.view.type_ok(request, row) & idx.healthy[row] & ~idx.excl[row]
               & (idx.slot_used[row] + slots < idx.slot_cap[row])
               & (idx.mem_cap[row] - idx.mem_used[row] - mem >= need)
               & (idx.core_cap[row] - idx.core_used[row] - cores >= request.cores))
        if request.cores >= FULL_CORES:
            fit &= (idx.slot_used[row] + slots) == 0
        elif request.cores == 0:
            fit &= idx.core_used[row] + cores < idx.core_cap[row]
        uuid = self.view.uuid_ok(request, row)
        if uuid is not None:
            fit &= uuid
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

    def _explain(self, reqs: list[SliceRequest], mask: BoolArray | None,
                 codes: npt.NDArray[np.int8]) -> Unschedulable:
        """One reason per alive node, in kube-scheduler's style; ``never`` if no empty node fits.

        ``codes``: :meth:`_codes` of ``reqs`` for the ledger as it is; a node where each request fits on
        its own but not all together counts as too few devices.
        """
        for r in reqs:
            self.validate(r)
        idx = self.ledger.index
        alive = idx.alive if mask is None else idx.alive & mask
        self._reasons(reqs, codes, alive)
        reasons = codes[alive]
        reasons = np.where(reasons == FITS, CODE[Reason.TOO_FEW_DEVICES], reasons)
        never = not self._could_ever_fit(reqs)
        counts = np.bincount(reasons, minlength=len(REASONS))
        named: dict[str, int] = {}
        floor = next((r.isolation for r in reqs if r.isolation is not None), None)
        for i, n in enumerate(counts):
            if n:
                text = REASONS[i].value
                if REASONS[i] is Reason.ISOLATION_BELOW and floor is not None:
                    text = f"isolation below {floor.value}"  # the grade the request asked for
                named[text] = int(n)
        return unschedulable(int(reasons.size), named, never=never)

    def _could_ever_fit(self, reqs: list[SliceRequest]) -> bool:
        """Would some node hold every request if it were empty? (Yes while no node is known: nodes may join.)

        Depends on the inventory only, so the answer is kept until a node joins, leaves or changes.
        """
        idx = self.ledger.index
        key = (tuple(r.shape() for r in reqs), idx.inventory)
        known = self._ever.get(key)
        if known is None:
            if len(self._ever) > 1024:
                self._ever.clear()
            known = self._ever[key] = could_ever_fit(self.view, reqs, self._host_total(reqs))
        return known
