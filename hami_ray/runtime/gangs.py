"""Gangs on the placement actor: a set of slices reserved all or none, like Ray's placement-group bundles
(DESIGN, Ray runtime). The ledger holds the whole gang in one step (:meth:`PlacementService.plan_group`),
then every node actor confirms its part; one refusal undoes all of it. A gang waits in the queue as one
request and never holds part of itself while it waits.

A mixin of :class:`hami_ray.runtime.placement.PlacementShell` (it uses the shell's queue, node calls and
release outbox); the driver side is :func:`hami_ray.runtime.api.slice_group`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray.exceptions import RayError

from hami_ray.core.errors import HamiRayError, JournalUnwritable, ReservationRefused, Unschedulable
from hami_ray.core.model import Lease, SliceRequest

log = logging.getLogger(__name__)
RESERVE_TRIES = 3


def cannot_hold_now(exc: BaseException) -> bool:
    """Whether a node actor's answer to a reservation means it cannot hold slices now (a full state disk, or
    it is (re)starting): plan again without that node. A plain refusal (a release not told yet) may pick it
    again."""
    return isinstance(exc, (RayError, HamiRayError)) and (isinstance(exc, JournalUnwritable)
                                                          or not isinstance(exc, ReservationRefused))


class GangCalls:
    """``acquire_group`` for the placement actor (whose queue, node calls and outbox it uses)."""


    async def acquire_group(self, requests: list[dict[str, Any]], strategy: str, owner: str,
                            holder: str = "driver", job: str = "", submitted: float | None = None) -> list[dict[str, Any]]:
        """Reserve a gang of slices, all or none (as a placement group): waits in the queue as one request,
        by the first bundle's priority; never holds part of it while it waits. Returns a grant per bundle.

        Raises:
            InvalidRequest: a malformed bundle or an unknown strategy.
            Unschedulable: the gang could not fit even an empty cluster (at once).
        """
        shell: Any = self  # the placement actor this is mixed into
        await shell._ensure_started()
        reqs = [shell._request(r) for r in requests]
        shell.svc.check_group(reqs, strategy)
        placed = await shell._wait_turn(
            reqs[0], owner, time.time() if submitted is None else submitted,
            lambda: self._reserve_group(reqs, strategy, owner, holder, job), lambda: None, reqs, strategy)
        return [shell._grant(lease, env) for lease, env in placed]

    async def _reserve_group(self, reqs: list[SliceRequest], strategy: str, owner: str, holder: str,
                             job: str) -> list[tuple[Lease, dict[str, str]]] | None:
        """Plan the whole gang in the ledger, then have every node actor confirm its part; one refusal undoes
        all of it (and plans again, without the nodes whose actor cannot hold slices now: a full state disk,
        or (re)starting; as :meth:`PlacementShell._reserve_planned`). None: it does not fit now."""
        shell: Any = self
        avoid: frozenset[str] = frozenset()
        for _ in range(RESERVE_TRIES):
            try:
                plans = shell.svc.plan_group(reqs, strategy, owner, time.time(), holder, job, avoid=avoid)
            except Unschedulable as exc:
                if exc.never:
                    raise
                return None
            shell._reserving.update(p.lease.lease_id for p in plans)  # the node sync leaves them alone meanwhile
            try:
                for node in {p.node_id for p in plans}:  # releases not told yet would refuse a reservation there
                    box = shell._outbox.pop(node, [])
                    if box:
                        await shell._send_releases(node, box)
                answers = await asyncio.gather(*(shell._node_call(p.node_id, "reserve",
                                                                 lease=p.lease.model_dump(mode="json"), releases=[])
                                                 for p in plans), return_exceptions=True)
            finally:
                shell._reserving.difference_update(p.lease.lease_id for p in plans)
            if not any(isinstance(a, BaseException) for a in answers):
                shell._mine.update(p.lease.lease_id for p in plans)
                return [(shell.svc.confirm(p.lease), dict(env)) for p, env in zip(plans, answers)]  # type: ignore[arg-type]
            for plan, answer in zip(plans, answers):  # all or none: undo the parts that were confirmed
                shell.svc.abort(plan.lease.lease_id)
                if cannot_hold_now(answer):
                    avoid |= {plan.node_id}
                if not isinstance(answer, BaseException):
                    shell._outbox.setdefault(plan.node_id, []).append((plan.lease.lease_id, plan.lease.token))
                    shell._flush(plan.node_id)
            log.info("gang reservation refused on %s: plans again",
                     [str(a) for a in answers if isinstance(a, BaseException)])
        return None
