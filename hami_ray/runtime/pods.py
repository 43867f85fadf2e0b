"""The placement actor's part for Kubernetes pods (the bridge's :class:`~hami_ray.k8s.inventory.RayInventory`):
pods and Ray tasks on one ledger.

A pod's lease (id ``pod-<uid>``, token its uid) is held as ``holder="pod"``: reserved on the node actor of
the Ray node that runs on the pod's Kubernetes node (its ``hami-ray.io/k8s-node`` label, from
``$HAMI_RAY_K8S_NODE``), never reaped there nor taken for an orphan here, freed when the bridge says the
pod is gone or finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hami_ray.core.errors import ReservationRefused, Unschedulable
from hami_ray.core.model import DEFAULT_QUEUE, K8S_NODE_LABEL, Allocation, DeviceGrant, Lease, SliceRequest
from hami_ray.core.queues import Preemption
from hami_ray.runtime.service import PlacementService, Plan


class PodLeases:
    """Mixed into the placement actor's body (:class:`~hami_ray.runtime.placement.PlacementShell`), which
    provides the ledger (``svc``), the reservation with node actors and the release."""

    svc: PlacementService
    changes: int
    incarnation: str

    # provided by the placement actor's body
    async def _ensure_started(self) -> None:
        raise NotImplementedError

    def _request(self, request: dict[str, Any]) -> SliceRequest:
        raise NotImplementedError

    async def _reserve_planned(self, planner: Callable[[frozenset[str]], Plan]) -> tuple[Lease, dict[str, str]] | None:
        raise NotImplementedError

    async def _release(self, lease: Lease, told: bool = False) -> None:
        raise NotImplementedError

    async def place_pod(self, requests: list[dict[str, Any]], owner: str, lease_id: str, token: str,
                        k8s_nodes: list[str] | None = None) -> dict[str, Any]:
        """Hold a pod's containers' slices on one node that runs in Kubernetes, now, never ahead of a
        Ray request that waits; returns the lease and the Kubernetes node to bind the pod to.

        Raises:
            Unschedulable: nothing fits now (kube-scheduler's ``0/N nodes`` wording), or requests wait.
            InvalidRequest: a request this cluster can never hold.
        """
        await self._ensure_started()
        reqs = [self._request(r) for r in requests]
        for req in reqs:
            self.svc.scheduler.validate(req)
        if reqs and self.svc.line_busy(reqs[0].queue):  # never ahead of Ray requests waiting in its own queue
            nodes = len(self.svc.pod_nodes(k8s_nodes))
            raise Unschedulable(nodes, {f"kept for Ray requests waiting in queue {reqs[0].queue}": nodes})
        placed = await self._reserve_planned(
            lambda avoid: self.svc.plan_pod(reqs, owner, lease_id, token, k8s_nodes, avoid=avoid))
        if placed is None:
            self.svc.scheduler.place(reqs, nodes=self.svc.pod_nodes(k8s_nodes))  # raises why it did not fit
            raise ReservationRefused(f"the node actor refused {owner}'s slices again and again; tried later")
        lease = placed[0]
        return {"lease": lease.model_dump(mode="json"), "k8s_node": self._k8s_name(lease.allocation.node)}

    async def adopt_pod(self, lease_id: str, token: str, owner: str, k8s_node: str,
                        slices: list[list[dict[str, Any]]], queue: str = DEFAULT_QUEUE, priority: int = 0,
                        preemptible: bool = True) -> bool:
        """Hold the slices a pod was given before (its allocation annotation: a restarted bridge, or a pod
        placed by HAMi's scheduler); False if that Kubernetes node has no node actor here.

        Raises:
            HamiRayError: the slices do not fit there (unknown devices, over capacity).
        """
        await self._ensure_started()
        if lease_id in self.svc.ledger.leases:
            return True
        node_id = self.svc.k8s_nodes().get(k8s_node)
        if node_id is None:
            return False
        allocation = Allocation(node=node_id, slices=tuple(tuple(DeviceGrant.model_validate(g) for g in c)
                                                           for c in slices))
        lease = Lease(lease_id=lease_id, owner=owner, allocation=allocation, token=token, holder="pod",
                      created_at=time.time(), queue=queue if queue in self.svc.book.tree else DEFAULT_QUEUE,
                      priority=priority, preemptible=preemptible)

        def planner(_avoid: frozenset[str]) -> Plan:  # adopted where it already runs
            return Plan(self.svc.adopt(lease), node_id)

        if await self._reserve_planned(planner) is None:
            raise ReservationRefused(f"node {k8s_node} refused the slices of {owner}")
        return True

    async def release_pod(self, lease_id: str) -> bool:
        """Free a pod's lease (deleted, Succeeded or Failed); False if it was not held."""
        await self._ensure_started()
        lease = self.svc.ledger.leases.get(lease_id)
        if lease is None or lease.holder != "pod":
            return False
        await self._release(lease, told=True)  # answered once the node actor knows: a restart cannot bring it back
        return True

    async def pod_leases(self) -> dict[str, Any]:
        """The pods' leases held (lease id -> Kubernetes node), the Kubernetes nodes with a node actor,
        :attr:`changes` (it moves whenever a slice is freed) and :attr:`incarnation`."""
        await self._ensure_started()
        return {"leases": {x.lease_id: self._k8s_name(x.allocation.node) for x in self.svc.ledger.leases.values()
                           if x.holder == "pod"},
                "nodes": sorted(self.svc.k8s_nodes()), "changes": self.changes, "incarnation": self.incarnation}

    async def preempt_for_pod(self, lease_id: str, requests: list[dict[str, Any]], k8s_nodes: list[str],
                              spare: list[str]) -> dict[str, Any] | None:
        """Plan and start the preemption that lets a waiting pod fit on one of ``k8s_nodes`` (reclaim for its
        queue, else a lower priority of its queue), never taking the leases in ``spare``: Ray victims get
        their notice from their node actors now; the pod victims are the bridge's to evict (returned as
        ``pods``). Every victim stays in the ledger until it is gone. None: no plan.

        Returns:
            ``{"plan": {"victims": [...], "node", "reason", "for_queue"}, "pods": [pod uids]}``.
        """
        await self._ensure_started()
        reqs = [self._request(r) for r in requests]
        if not reqs:
            return None
        queue = self.svc.admit(reqs)
        if any(r.waiter == lease_id for r in self.svc.reclaims.values()):
            return None
        with self.svc.others_nominated(lease_id):
            plan = self.svc.book.plan_preemption(self.svc.scheduler, reqs, queue, max(r.priority for r in reqs),
                                                 nodes=self.svc.pod_nodes(k8s_nodes), spare={*spare, *self.svc.reclaims})
        if plan is None:
            return None
        self.svc.start_reclaim(plan, lease_id, reqs)
        self._tell_victims(plan)
        return {"plan": {"victims": [v.model_dump(mode="json") for v in plan.victims], "node": plan.node,
                         "reason": plan.reason, "for_queue": plan.for_queue},
                "pods": [v.lease_id.removeprefix("pod-") for v in plan.victims if v.holder == "pod"]}

    def _tell_victims(self, plan: Preemption) -> None:
        raise NotImplementedError

    async def pod_changes(self) -> dict[str, Any]:
        """:attr:`changes` and :attr:`incarnation` (the bridge asks every second whether slices were freed,
        and whether this actor restarted: a restarted one rebuilds its ledger from the node actors, which
        may still hold a pod's slice an earlier incarnation freed and had not told them of yet)."""
        return {"changes": self.changes, "incarnation": self.incarnation}

    def _k8s_name(self, node_id: str) -> str:
        return self.svc.ledger.node(node_id).labels.get(K8S_NODE_LABEL, node_id)
