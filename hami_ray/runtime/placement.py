"""The placement actor: an async Ray actor over :class:`~hami_ray.runtime.service.PlacementService`.

Named ``hami-ray-placement`` in namespace ``hami-ray``, detached, restarted on failure (it then rebuilds
its ledger from the node actors). It decides; the node actor on the chosen node confirms (two phases,
retried on refusal). Requests that do not fit wait here as coroutines, in priority then FIFO order, so
ten thousand waiting tasks are ten thousand small futures, not processes. A background loop follows
nodes joining and leaving (starting node actors for new nodes) and syncs the ledger with the node
actors' truth (leases freed there, by dead processes or enforcement, are freed here).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import ray
import ray._private.state as ray_state
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put
from ray.exceptions import RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hami_ray.core.errors import (
    HamiRayError,
    InvalidRequest,
    SlicePreempted,
    SliceQuotaExceeded,
    Unschedulable,
)
from hami_ray.core.ids import is_lease_id
from hami_ray.core.model import Lease, Node, SliceRequest
from hami_ray.core.queues import Preemption, QueueTree
from hami_ray.observe.metrics import DecisionLatency, StatusCollector
from hami_ray.observe.metrics import serve as serve_metrics
from hami_ray.observe.model import ClusterStatus, status_from
from hami_ray.runtime import fastpath
from hami_ray.wire import AsyncClient, AsyncServer, WireError
from hami_ray.runtime.gangs import GangCalls, cannot_hold_now
from hami_ray.runtime.pods import PodLeases
from hami_ray.runtime.service import PlacementService, Plan, Waiter
from node_actors.actor import NAMESPACE, NodeActor, node_actor_name, node_state_dir

log = logging.getLogger(__name__)
PLACEMENT_NAME = "hami-ray-placement"
T = TypeVar("T")
SYNC_S = 1.0
RESERVE_TRIES = 3
INFO_TIMEOUT_S = 10.0  # a node actor that does not answer is skipped this round, never waited on forever
ORPHAN_S = 15.0  # a reservation of an earlier incarnation of this actor that no process claimed
QUEUES_KEY = "queues"  # Ray's GCS key-value store, namespace hami-ray: the queue definitions last applied
DEFAULT_TASK_RETRIES = 3  # Ray's default max_retries for tasks
PREEMPT_GRACE_S = 10.0  # a preempted slice's tasks are interrupted at once and its processes stopped after this


class PlacementShell(GangCalls, PodLeases):
    """The actor's body; ``PlacementActor`` below is this class made remote (its pods' part:
    :class:`~hami_ray.runtime.pods.PodLeases`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.svc = PlacementService()
        self._futures: dict[int, asyncio.Future[None]] = {}
        self._actors: dict[str, Any] = {}
        self._start_env: dict[str, dict[str, str]] = {}  # per node: what a slice worker starts with
        self._outbox: dict[str, list[tuple[str, str]]] = {}  # per node: releases not told yet
        self._usage: dict[str, Any] = {}  # per node: its node actor's last usage sample
        self._actions: dict[str, dict[str, int]] = {}  # per node: enforcement action -> count
        self._isolation: dict[str, Any] = {}  # per node: its isolation status (grade, enforcement, notes)
        self._requests: dict[str, SliceRequest] = {}  # parsed requests by their JSON (they repeat)
        self._ready: asyncio.Task[None] | None = None
        self._mine: set[str] = set()  # leases this incarnation reserved
        self._reserving: set[str] = set()  # planned here, their node actor's answer not in yet
        self._nominee: str | None = None  # the waiter whose place() runs now (room nominated for it is its own)
        self.decisions = DecisionLatency()  # every plan's time, cumulative (Prometheus histogram)
        self.bound_retries = 0  # tasks resubmitted to a process of their own (WorkerBound)
        self.metrics_port: int | None = None  # where /metrics is served, once it is
        self.changes = 0  # slices freed so far: the Kubernetes bridge retries waiting pods when it moves
        self.incarnation = uuid.uuid4().hex  # new at each restart: the bridge then checks the pods' leases again
        self._host = ""
        self._loop: asyncio.AbstractEventLoop | None = None  # this actor's loop (scrapes run their reads there)
        self._fast = AsyncServer({"acquire": self.acquire, "release": self.release, "ping": self.ping})
        self._wire: dict[str, AsyncClient] = {}  # per node: its node actor's fast path

    # --- membership --------------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        """The first call syncs the nodes (a restarted actor rebuilds its ledger there); every
        concurrent call waits for that, not just the first (retried calls arrive all at once)."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> None:
        self.svc.grace_s = float(self.config.get("preempt_grace_s", PREEMPT_GRACE_S))
        self._load_queues()
        await self._sync_nodes()
        asyncio.get_running_loop().create_task(self._sync_forever())
        host = self._host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        try:
            await fastpath.serve(self._fast, host)
        except OSError as exc:  # no fast path: drivers fall back to Ray calls
            log.warning("placement fast path not started: %s", exc)
        port = self.config.get("metrics_port")
        if port is not None:
            try:
                self._loop = asyncio.get_running_loop()
                _, self.metrics_port = serve_metrics(StatusCollector(self._scraped, self.decisions),
                                                     port=int(port), addr=self.config.get("metrics_bind") or host)
            except OSError as exc:  # the port is taken: the cluster runs on, `hami-ray metrics serve` still works
                log.warning("placement metrics not served on port %s: %s", port, exc)

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                await self._sync_nodes()
            except Exception:  # noqa: BLE001 - a long-running loop never dies on one bad object
                log.exception("node sync failed")

    def _node_actor(self, node_id: str) -> Any:
        handle = self._actors.get(node_id)
        if handle is None:
            handle = NodeActor.options(
                name=node_actor_name(node_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(node_id, self.config["state_root"], self.config.get("simulate_for", {}).get(node_id),
                     self.config.get("agent", {}), self.config.get("simulate"), self.config.get("node") or None)
            self._actors[node_id] = handle
        return handle

    async def _sync_nodes(self) -> None:
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}  # type: ignore[no-untyped-call]
        for node_id in list(self.svc.node_actor):
            if node_id not in alive:
                lost = self.svc.remove_node(node_id)
                self._actors.pop(node_id, None)
                log.warning("node %s left: %d leases lost", node_id, len(lost))
        for node_id in alive:
            handle = self._node_actor(node_id)
            # Only a lease whose reservation was answered before the node actor was asked can be missing
            # because it freed it: one reserved meanwhile (over the fast path, the question as a Ray call) may
            # not be in the answer yet, and dropping it would free room the node actor still holds. A lease
            # this actor took over from the node actor (still reserved: its worker never came) counts too.
            settled = {x.lease_id for x in self.svc.ledger.leases_on(node_id) if x.lease_id not in self._reserving}
            try:
                info = await asyncio.wait_for(handle.info.remote(), INFO_TIMEOUT_S)
                self._follow_wire(node_id, info.get("wire"))
                self._start_env[node_id] = dict(info.get("start_env", {}))
                self._usage[node_id] = info.get("usage")
                self._actions[node_id] = dict(info.get("enforcement", {}))
                self._isolation[node_id] = info.get("isolation")
                if node_id in self.svc.node_actor and self._regraded(node_id, info["node"]):
                    self.svc.refresh_node(Node.model_validate(info["node"]))  # its grades changed (MPS fell back)
                    self.changes += 1
                if node_id not in self.svc.node_actor:
                    leases = [Lease.model_validate(x) for x in info["leases"]]
                    self.svc.register_node(Node.model_validate(info["node"]), node_actor_name(node_id), leases)
                else:
                    held = {x["lease_id"]: Lease.model_validate(x) for x in info["leases"]}
                    for lease in self.svc.ledger.leases_on(node_id):
                        truth = held.get(lease.lease_id)
                        if truth is None:
                            if lease.lease_id in settled:  # freed there: finished, reaped, enforced, expired
                                self.svc.release(lease.lease_id, None)
                                self.changes += 1
                        elif self._orphaned(truth):
                            self.svc.release(lease.lease_id, None)
                            handle.release.remote(truth.lease_id, truth.token)
            except (RayError, asyncio.TimeoutError):
                continue  # the node actor is (re)starting; next round
        await self._release_dead_drivers()
        self._kick()

    async def _release_dead_drivers(self) -> None:
        """Free the leases of drivers whose Ray job ended (DESIGN: a driver's lease is tracked by its
        liveness through Ray, never by a pid on another host)."""
        held = [lease for lease in self.svc.ledger.leases.values() if lease.holder == "driver" and lease.job]
        if not held:
            return
        try:
            # GCS's job table (ray._private.state: the same source `ray list jobs` reads, without a dashboard)
            dead = {str(j.get("JobID")) for j in ray_state.jobs() if j.get("IsDead")}  # type: ignore[no-untyped-call]
        except Exception as exc:  # noqa: BLE001 - a long-running loop never dies on one bad answer
            log.warning("cannot read Ray's job table: %s", exc)
            return
        for lease in held:
            if lease.job in dead:
                log.info("driver job %s ended: its lease %s is freed", lease.job, lease.lease_id)
                await self._release(lease)

    def _regraded(self, node_id: str, info_node: dict[str, Any]) -> bool:
        """Whether the node actor's devices now hold other isolation grades than the ledger knows."""
        known = {d.uuid: (d.isolation.value, d.whole_isolation) for d in self.svc.ledger.node(node_id).devices}
        now = {d["uuid"]: (d.get("isolation", "none"), d.get("whole_isolation")) for d in info_node.get("devices", ())}
        return {u: (g, None if w is None else str(w)) for u, (g, w) in known.items()} != now

    def _follow_wire(self, node_id: str, wire: dict[str, Any] | None) -> None:
        """Use the node actor's fast path where it has one (a restarted node actor has a new one)."""
        old = self._wire.get(node_id)
        if wire is None:
            self._wire.pop(node_id, None)
        elif old is None or (old.host, old.port, old.secret) != (wire["host"], wire["port"], wire["secret"]):
            if old is not None:
                old.close()
            self._wire[node_id] = AsyncClient(str(wire["host"]), int(wire["port"]), str(wire["secret"]))

    async def _node_call(self, node_id: str, op: str, **args: Any) -> Any:
        """``op`` on the node actor: over its fast path, else (or when that fails) as a Ray call."""
        client = self._wire.get(node_id)
        if client is not None:
            try:
                return await client.call(op, **args)
            except WireError as exc:
                log.info("node %s fast path: %s; using a Ray call", node_id, exc)
        return await getattr(self._node_actor(node_id), op).remote(**args)

    def _existing_node_actor(self, node_id: str) -> Any:
        """``node_id``'s actor if it exists (registered here, or started by an earlier incarnation of this
        actor), never started for a node id that may be wrong or gone; None when there is none."""
        if node_id in self.svc.node_actor:
            return self._node_actor(node_id)
        try:
            return ray.get_actor(node_actor_name(node_id), namespace=NAMESPACE)
        except ValueError:
            return None

    def _orphaned(self, lease: Lease) -> bool:
        """Reserved by an earlier incarnation of this actor (it died between reserving and starting the
        work) and never claimed by a process: nobody will use it."""
        return (lease.holder == "process" and lease.lease_id not in self._mine and lease.state == "reserved"
                and not lease.pids
                and time.time() - lease.created_at > ORPHAN_S)

    # --- queue -------------------------------------------------------------------------------
    def _kick(self) -> None:
        """Wake the waiters that may try now: the head of each line its queue's limit does not hold back,
        in serving order (fair share, then priority, then submission). Each plans before its first await,
        so they plan in that order. A head its limit holds back may start a preemption."""
        for waiter, why in self.svc.heads():
            if why is None:
                fut = self._futures.get(waiter.waiter_id)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif waiter.waiter_id in self._futures:
                # held back by a limit: an ancestor's that a borrowing sibling fills (a reclaim frees it), or its
                # own queue's, full of lower priorities (as hami_ray.core.waitlist.serve does)
                self._preempt_for(waiter)

    async def _acquire(self, request: SliceRequest, owner: str, submitted: float,
                       **who: Any) -> tuple[Lease, dict[str, str]]:
        await self._ensure_started()
        self.svc.scheduler.validate(request)  # InvalidRequest; "never fits" comes from the first try below
        self.svc.admit([request])  # an unknown queue, or one whose limit the request alone is over: at once
        return await self._wait_turn(request, owner, submitted, lambda: self._try_place(request, owner, self._nominee, **who),
                                     lambda: self.svc.check(request))

    async def _wait_turn(self, request: SliceRequest, owner: str, submitted: float,
                         place: Callable[[], Awaitable[T | None]], check: Callable[[], None],
                         group: Sequence[SliceRequest] = (), strategy: str = "") -> T:
        """Place now if nobody waits in this request's line, else join it (priority, then submission) and place
        at our turn. A turn that does not fit starts a preemption where the queues allow one (the waiter keeps
        its place; victims leave after their grace). ``place`` answers None while it does not fit; ``check``
        raises for what could never fit."""
        waiter: Waiter | None = None
        loop = asyncio.get_running_loop()
        queue = (group[0] if group else request).queue
        try:
            while True:
                mine = not self.svc.line_busy(queue) if waiter is None else self.svc.may_try(waiter)
                if mine:
                    self._nominee = None if waiter is None else waiter.key  # read by place() before it awaits
                    placed = await place()
                    if placed is not None:
                        if waiter is not None:  # by identity: others may have queued ahead meanwhile
                            self.svc.remove(waiter)
                            self._futures.pop(waiter.waiter_id, None)
                            waiter = None
                        self._kick()  # the next in line may fit too
                        return placed
                    if waiter is not None:
                        self._preempt_for(waiter)
                if waiter is None:
                    if not mine:
                        check()  # never fits: fail now, not when its turn comes
                    waiter = self.svc.enqueue(request, owner, submitted, group, strategy)
                    if self.svc.may_try(waiter):
                        continue  # first in its line: try now (and preempt), not at the next kick
                fut: asyncio.Future[None] = loop.create_future()
                self._futures[waiter.waiter_id] = fut
                await fut
        except BaseException:  # cancelled, or failed: never leave a dead waiter at the head of the queue
            if waiter is not None:
                self.svc.remove(waiter)
                self._futures.pop(waiter.waiter_id, None)
                self._kick()
            raise

    def _preempt_for(self, waiter: Waiter) -> None:
        """Start the preemption that makes room for ``waiter``, if the queues allow one and none is under
        way: each victim's node actor gets the notice (its tasks are interrupted now, the slice goes after the
        grace); a pod victim is evicted by the Kubernetes bridge (:meth:`evictions`). The victims stay in the
        ledger until their node actors free them, so the waiter never gets a slice somebody still holds."""
        plan = self.svc.plan_preemption(waiter)
        if plan is None:
            return
        log.warning("preempting for %s: %s", waiter.owner, plan.describe())
        self._tell_victims(plan)

    def _tell_victims(self, plan: Preemption) -> None:
        """Each victim's node actor gets the notice; a pod victim is the Kubernetes bridge's to evict."""
        grace = float(self.config.get("preempt_grace_s", PREEMPT_GRACE_S))
        for victim in plan.victims:
            if victim.holder != "pod":
                asyncio.get_running_loop().create_task(self._send_preempt(victim, plan.for_queue, plan.reason, grace))

    async def _send_preempt(self, victim: Lease, for_queue: str, reason: str, grace: float) -> None:
        node = victim.allocation.node
        try:
            answer = await self._node_call(node, "preempt", lease_id=victim.lease_id, for_queue=for_queue,
                                           reason=reason, grace_s=grace)
        except (RayError, HamiRayError) as exc:  # the node actor is restarting: the sync gives it up or not
            log.info("preemption notice for %s on %s not told: %s", victim.lease_id, node, exc)
            self.svc.reclaims.pop(victim.lease_id, None)
            return
        if answer is None and victim.lease_id in self.svc.ledger.leases:  # gone there already
            self.svc.release(victim.lease_id, None)
            self.changes += 1
            self._kick()

    async def _try_place(self, request: SliceRequest, owner: str, nominee: str | None = None,
                         **who: Any) -> tuple[Lease, dict[str, str]] | None:
        return await self._reserve_planned(
            lambda avoid: self.svc.plan(request, owner, time.time(), **who, nominee=nominee, avoid=avoid))

    async def _reserve_planned(self, planner: Callable[[frozenset[str]], Plan]) -> tuple[Lease, dict[str, str]] | None:
        """Plan (``planner``: the ledger holds the slice as reserved), then have the node actor confirm it;
        a refusal (its ledger still holds a release not told yet, or it is restarting) plans again. A node
        actor that cannot write its journal (a full state disk) or did not answer (it is restarting) is left
        out of this request's next plans (``planner``'s argument); a plain refusal (a release not told yet)
        may pick the same node again."""
        avoid: frozenset[str] = frozenset()
        for _ in range(RESERVE_TRIES):
            t0 = time.perf_counter()
            try:
                plan = planner(avoid)
            except Unschedulable as exc:
                if exc.never:
                    raise  # fail fast: waiting would be forever
                return None
            finally:
                self.decisions.observe(time.perf_counter() - t0)
            releases = self._outbox.pop(plan.node_id, [])  # first, so that they never refuse it
            self._reserving.add(plan.lease.lease_id)
            try:
                env = await self._node_call(plan.node_id, "reserve", lease=plan.lease.model_dump(mode="json"),
                                            releases=releases)
            except (RayError, HamiRayError) as exc:  # refused, or the node actor is (re)starting: try again
                if releases:
                    self._outbox.setdefault(plan.node_id, []).extend(releases)
                    self._flush(plan.node_id)
                self.svc.abort(plan.lease.lease_id)
                log.info("reservation refused on %s: %s", plan.node_id, exc)
                if cannot_hold_now(exc):
                    avoid |= {plan.node_id}  # it cannot hold slices now (a full disk, (re)starting): go elsewhere
                continue
            finally:
                self._reserving.discard(plan.lease.lease_id)
            self._mine.add(plan.lease.lease_id)
            return self.svc.confirm(plan.lease), env
        return None

    async def _release(self, lease: Lease, told: bool = False) -> None:
        """Free in the ledger now (the queue moves on at once); tell the node actor without waiting, or,
        ``told``, before returning (a caller's release: were this actor to die between its answer and the
        node actor hearing of it, its next incarnation would hold the slice again, rebuilt from the node
        actor, for a holder that freed it and forgot it). A node actor that cannot be told now hears of it
        with the node's next releases.

        Until the node actor hears of it, its own ledger still holds the slice, so a new reservation
        there may be refused once and retried: safe, never over-committed."""
        self.svc.release(lease.lease_id, lease.token)
        self._mine.discard(lease.lease_id)
        self.changes += 1
        self._kick()
        node = lease.allocation.node
        if told and node in self.svc.node_actor:  # a node actor restarting, or of a node gone, is not waited for
            if await self._send_releases(node, [(lease.lease_id, lease.token)], INFO_TIMEOUT_S):
                return
        box = self._outbox.setdefault(node, [])
        box.append((lease.lease_id, lease.token))
        if len(box) == 1:  # after this call has answered; or sooner, with the node's next reservation
            asyncio.get_running_loop().call_soon(self._flush, node)

    def _flush(self, node: str) -> None:
        """Tell ``node``'s actor of the releases waiting for it, in one call."""
        box = self._outbox.pop(node, None)
        if box and node in self.svc.node_actor:
            asyncio.get_running_loop().create_task(self._send_releases(node, box))

    async def _send_releases(self, node: str, box: list[tuple[str, str]], timeout: float | None = None) -> bool:
        """Tell ``node``'s actor of ``box``'s releases; False when it could not be told (within ``timeout``)."""
        try:
            await asyncio.wait_for(self._node_call(node, "release_many", releases=box), timeout)
        except (RayError, HamiRayError, asyncio.TimeoutError) as exc:
            log.info("releases on %s not told: %s", node, exc)
            return False
        return True

    # --- API ---------------------------------------------------------------------------------
    async def acquire(self, request: dict[str, Any], owner: str, submitted: float | None = None,
                      wait: bool = True, holder: str = "process", job: str = "",
                      process: dict[str, Any] | None = None, ticket: str | None = None) -> dict[str, Any] | None:
        """Wait for a slice; returns the lease, the node actor's name and the isolation environment.
        ``submitted``: the caller's ``time.time()`` when it asked (queue order); default: now.
        ``wait=False``: a slice now, never ahead of anyone waiting (a driver opening a lane), or
        ``{"waiting": n}``: how many requests wait (0: it just does not fit now).
        ``holder="driver"`` with the driver's Ray ``job``: the lease lives as long as that job.
        ``process`` (:func:`hami_ray.runtime.worker.this_process`): the calling process asks for itself;
        a slice granted on its node is bound to it before the answer, so that one granted after the process
        died while it waited (Ray Data ending a pool whose actors were starting) is reaped with it, not held
        by nothing until the reservation's grace ends.
        ``ticket`` (a new lease id, :func:`hami_ray.core.ids.new_lease_id`, one per call): the lease's id. When
        this actor dies after granting and before its answer is in, Ray runs the call again on the restarted
        actor (``max_task_retries``), which then answers with the slice granted before (rebuilt from its node
        actor, already bound to ``process``) instead of a second one that nothing would ever free while the
        process lives (a lane worker goes back to the idle pool).

        Raises:
            InvalidRequest: a malformed request, or a ``ticket`` not of a lease id's form or naming another
                owner's lease.
        """
        req = self._request(request)
        who: dict[str, Any] = {"holder": holder, "job": job} if holder != "process" else {}
        if ticket is not None:
            again = await self._granted_before(ticket, owner, process)
            if isinstance(again, dict):
                return again
            if again:
                who["lease_id"] = ticket
        if not wait:
            await self._ensure_started()
            self.svc.scheduler.validate(req)
            if self.svc.head() is not None or self.svc.line_busy(req.queue):
                return {"waiting": self.svc.queue_depth}
            placed = await self._try_place(req, owner, **who)
            return {"waiting": 0} if placed is None else self._grant(*placed)
        lease, env = await self._acquire(req, owner, time.time() if submitted is None else submitted, **who)
        if process is not None and process.get("node") == lease.allocation.node:
            await self._bind(lease, process)
        return self._grant(lease, env)

    async def _granted_before(self, ticket: str, owner: str, process: dict[str, Any] | None) -> dict[str, Any] | bool:
        """The grant of the lease ``ticket`` names if it is live (an earlier run of this call got it); else
        whether the new lease may take ``ticket`` as its id (not when a lease of that id is being reserved, or
        was freed here just now: its node actor may still hold it)."""
        if not is_lease_id(ticket):
            raise InvalidRequest("ticket", f"{ticket!r} is not a lease id (lease- and 16 hex digits)")
        await self._ensure_started()
        lease = self.svc.ledger.leases.get(ticket)
        if lease is None or ticket in self._reserving:
            return lease is None and ticket not in self._reserving
        if lease.owner != owner:
            raise InvalidRequest("ticket", f"{ticket} names a lease of {lease.owner}, not of {owner}")
        try:
            env = await asyncio.wait_for(self._node_actor(lease.allocation.node).isolation_env.remote(ticket),
                                         INFO_TIMEOUT_S)
        except (RayError, HamiRayError, asyncio.TimeoutError) as exc:  # gone there, or restarting: a new slice
            log.info("lease %s granted before is not readable on its node (%s): it is freed, a new one planned",
                     ticket, exc)
            await self._release(lease)
            return False
        log.info("lease %s granted before this actor restarted goes to %s again", ticket, owner)
        self._mine.add(ticket)  # claimed now: the orphan sweep leaves it alone
        if process is not None and process.get("node") == lease.allocation.node:
            await self._bind(lease, process)
        return self._grant(lease, env)

    async def _bind(self, lease: Lease, process: dict[str, Any]) -> None:
        """``process`` (on the lease's node) holds ``lease`` from now on; if the node actor cannot be told,
        the process claims it itself when it enters the slice, as before."""
        try:
            await self._node_call(lease.allocation.node, "activate", lease_id=lease.lease_id, pid=int(process["pid"]),
                                  pidns=process.get("pidns"), start=process.get("start"))
        except (RayError, HamiRayError, KeyError, TypeError, ValueError) as exc:
            log.info("lease %s not bound to its requester %s: %s", lease.lease_id, process, exc)

    async def lane_nodes(self, request: dict[str, Any]) -> list[tuple[str, list[str], dict[str, str]]]:
        """Where a driver may start a worker for requests of this shape that have to wait: the nodes
        that could hold one once free (most free memory first), their device uuids and the environment
        a slice worker there starts with.

        Raises:
            InvalidRequest, Unschedulable: as :meth:`check`.
        """
        await self._ensure_started()
        return [(node, list(uuids), self._start_env.get(node, {}))
                for node, uuids in self.svc.lane_nodes(self._request(request))]

    async def waiting(self) -> int:
        """How many requests wait in the queue (a lane worker holding a slice asks, to give it back)."""
        return self.svc.queue_depth

    def _request(self, request: dict[str, Any]) -> SliceRequest:
        key = json.dumps(request, sort_keys=True)
        parsed = self._requests.get(key)
        if parsed is None:
            if len(self._requests) > 4096:
                self._requests.clear()
            parsed = self._requests[key] = SliceRequest.model_validate(request)
        return parsed

    def _grant(self, lease: Lease, env: dict[str, str]) -> dict[str, Any]:
        return {"lease": lease.model_dump(mode="json"), "env": env,
                "node_actor": node_actor_name(lease.allocation.node), "state_root": self.config["state_root"]}

    async def release(self, lease_id: str, token: str, node: str | None = None) -> bool:
        """Free a lease. ``node``: where it lives, so that it is freed there even if this (restarted)
        actor's ledger does not hold it (any more, or yet: a node whose actor did not answer this actor's
        first sync is registered later, with the slice)."""
        await self._ensure_started()
        lease = self.svc.ledger.leases.get(lease_id)
        if lease is None:
            handle = self._existing_node_actor(node) if node is not None else None
            if handle is not None:
                await handle.release.remote(lease_id, token)  # raises on a wrong token
            return False
        if lease.token != token:
            self.svc.release(lease_id, token)  # raises LeaseTokenMismatch
        await self._release(lease, told=True)
        return True

    async def run(self, request: dict[str, Any], owner: str, fn_ref: list[Any], args: list[Any],
                  kwargs: list[dict[str, Any]], options: dict[str, Any], submitted: float | None = None) -> Any:
        """Run a task in a slice: wait for the lease, start the task on its node, free it at the end.

        The task goes to the shared pool of slice workers with its environment as an argument; if the
        worker it lands on is bound to another slice (CUDA initialised there), once more to a process
        started with the whole slice environment. A task whose slice is preempted (``SlicePreempted``), or
        was taken back before its worker got to it (``LeaseGone``: it did not run), is run again in a new
        slice, through the queue, as often as its ``max_retries`` allows (Ray's default for tasks, 3; -1:
        always), as Ray retries a task whose worker died."""
        from hami_ray.runtime.worker import LeaseGone  # noqa: PLC0415 - as _run_in imports the worker's names

        retries = int(options.get("max_retries", DEFAULT_TASK_RETRIES))
        options = {k: v for k, v in options.items() if k not in ("max_retries", "retry_exceptions")}
        req = self._request(request)
        attempt = 0
        while True:
            lease, env = await self._acquire(req, owner, time.time() if submitted is None else submitted)
            try:
                return await self._run_in(lease, env, fn_ref, args, kwargs, options)
            except RayError as exc:
                if not isinstance(exc, (SlicePreempted, LeaseGone)) or (0 <= retries <= attempt):
                    raise
                attempt += 1
                log.info("task %s: slice %s %s; retry %d of %s", owner, lease.lease_id,
                         "preempted" if isinstance(exc, SlicePreempted) else "gone before the task started",
                         attempt, "unlimited" if retries < 0 else retries)

    async def _run_in(self, lease: Lease, env: dict[str, str], fn_ref: list[Any], args: list[Any],
                      kwargs: list[dict[str, Any]], options: dict[str, Any]) -> Any:
        """One run of a task in ``lease``'s slice; the slice is freed when it ends, however it ends."""
        from hami_ray.runtime.worker import (  # noqa: PLC0415
            PROCESS_START_KEYS, WORKER_MARK, LeaseGone, WorkerBound, run_in_slice)

        grant = self._grant(lease, env)
        user_env = dict(options.get("runtime_env") or {})
        opts = {k: v for k, v in options.items() if k != "runtime_env"}
        shared = {**user_env.get("env_vars", {}), WORKER_MARK: "1", **{k: env[k] for k in PROCESS_START_KEYS if k in env}}
        meta = slice_meta(grant, self.config["state_root"])
        ref = None

        def submit(env_vars: dict[str, str]) -> Any:
            return run_in_slice.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(lease.allocation.node, soft=False),
                runtime_env={**user_env, "env_vars": env_vars}, max_retries=0, **opts,
            ).remote(fn_ref[0], meta, env, *args[0], **kwargs[0])

        try:
            ref = submit(shared)
            try:
                return await ref
            except RayTaskError as exc:
                if not isinstance(exc, WorkerBound) and not isinstance(exc.cause, WorkerBound):
                    raise
            self.bound_retries += 1
            ref = submit({**shared, **env})
            return await ref
        except RayError as exc:
            if isinstance(exc, (SliceQuotaExceeded, SlicePreempted, LeaseGone)):
                raise  # interrupted by its node actor's verdict, or never started: the task's own error says it all
            record = await self._quota_record(lease)
            if record:
                raise SliceQuotaExceeded(**record) from exc
            raise
        except asyncio.CancelledError:
            if ref is not None:
                ray.cancel(ref, force=True)
            raise
        finally:
            await self._release(lease)

    async def _quota_record(self, lease: Lease) -> dict[str, Any] | None:
        """The node actor's enforcement record for a failed task's lease; None when there is none or
        the node is gone (its tasks fail because the node left, not because of a quota)."""
        if lease.allocation.node not in self.svc.node_actor:
            return None
        try:
            record: dict[str, Any] | None = await self._node_actor(lease.allocation.node).quota_exceeded.remote(
                lease.lease_id)
        except RayError:
            return None
        return record

    async def status(self) -> dict[str, Any]:
        await self._ensure_started()
        return self._status()

    def _scraped(self) -> ClusterStatus:
        """The status for a scrape (on the metrics server's thread): built on the actor's own loop, only
        when somebody scrapes."""
        assert self._loop is not None

        async def build() -> ClusterStatus:
            return status_from(self._status())

        return asyncio.run_coroutine_threadsafe(build(), self._loop).result(timeout=INFO_TIMEOUT_S)

    def _status(self) -> dict[str, Any]:
        snap = self.svc.snapshot()
        actions: dict[str, int] = {}
        for counts in self._actions.values():
            for action, n in counts.items():
                actions[action] = actions.get(action, 0) + n
        alive = set(self.svc.node_actor)
        return {"snapshot": snap.model_dump(mode="json"), "queue_depth": self.svc.queue_depth,
                "lost": [x.model_dump(mode="json") for x in self.svc.lost[-100:]],
                "bound_retries": self.bound_retries, "pid": os.getpid(), "host": self._host,
                "usage": {n: u for n, u in self._usage.items() if n in alive},
                "isolation": {n: x for n, x in self._isolation.items() if n in alive and x},
                "fragments": self.svc.fragments(), "waiting": self.svc.waiting(), "enforcement": actions,
                "queues": self.svc.queue_rows(),
                "metrics_port": self.metrics_port}

    # --- team queues -------------------------------------------------------------------------
    def _load_queues(self) -> None:
        """The definitions last applied (kept in Ray's GCS key-value store, so a restarted placement actor
        serves the same queues); a stored text that no longer parses is logged and ``default`` alone used."""
        try:
            stored = _internal_kv_get(QUEUES_KEY, namespace=NAMESPACE)
        except Exception as exc:  # noqa: BLE001 - the GCS is not reachable: no queues rather than no placement
            log.warning("queue definitions not read: %s", exc)
            return
        if not stored:
            return
        try:
            self.svc.apply_queues(QueueTree.load(json.loads(stored)))
        except (ValueError, HamiRayError) as exc:
            log.error("stored queue definitions refused, using only 'default': %s", exc)

    async def apply_queues(self, text: str) -> list[dict[str, Any]]:
        """Validate and apply queue definitions (YAML, :mod:`hami_ray.core.queues`), keep them for restarts,
        and return the queues as :meth:`queues` does.

        Raises:
            QueueConfigError: the definition is invalid (the queue and field named), or drops a queue that
                holds slices or waiting requests; the old definitions stay.
        """
        await self._ensure_started()
        tree = QueueTree.parse(text)
        self.svc.apply_queues(tree)
        _internal_kv_put(QUEUES_KEY, json.dumps(tree.dump()), overwrite=True, namespace=NAMESPACE)
        self.changes += 1
        self._kick()  # limits and shares moved
        return self.svc.queue_rows()

    async def queues(self) -> list[dict[str, Any]]:
        """Per queue: guaranteed, limit, used, borrowed, share, waiting, preempted (see
        :meth:`PlacementService.queue_rows`)."""
        await self._ensure_started()
        return self.svc.queue_rows()

    async def lease_notice(self, lease_id: str) -> dict[str, Any] | None:
        """The preemption under way for ``lease_id`` (for its holder), or None."""
        reclaim = self.svc.reclaims.get(lease_id)
        if reclaim is None:
            return None
        grace = float(self.config.get("preempt_grace_s", PREEMPT_GRACE_S))
        return {"for_queue": reclaim.plan.for_queue, "reason": reclaim.plan.reason, "grace_s": grace,
                "deadline": reclaim.started + grace}

    async def queue_definitions(self) -> list[dict[str, Any]]:
        """The definitions as applied (YAML-able; ``default`` left out unless defined)."""
        await self._ensure_started()
        return self.svc.book.tree.dump()

    async def check(self, request: dict[str, Any]) -> None:
        """Raise now if the cluster could never hold ``request`` (InvalidRequest / Unschedulable)."""
        await self._ensure_started()
        self.svc.check(SliceRequest.model_validate(request))

    async def ping(self) -> bool:
        await self._ensure_started()
        return True

    async def settings(self) -> dict[str, Any]:
        """The settings this placement actor was started with (a later ``init()`` compares its own)."""
        return dict(self.config)


def slice_meta(grant: dict[str, Any], state_root: str) -> dict[str, Any]:
    """What the worker needs to know about its slice (the lease id travels as an argument, not in env)."""
    lease = grant["lease"]
    node = lease["allocation"]["node"]
    return {"lease_id": lease["lease_id"], "node_actor": grant["node_actor"], "node": node,
            "slices": lease["allocation"]["slices"], "state_dir": node_state_dir(state_root, node)}


PlacementActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,  # type: ignore[call-overload]
                            max_concurrency=100_000)(PlacementShell)
__all__ = ["PLACEMENT_NAME", "PlacementActor", "PlacementShell", "slice_meta"]
