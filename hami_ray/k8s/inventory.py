"""Where the Kubernetes bridge's devices and leases live: one engine, two sources.

- :class:`AnnotationInventory` (``--inventory annotations``): HAMi's node register annotations
  (``hami.io/node-nvidia-register`` and the other vendors' keys) fill a ledger in this process; the pods'
  allocation annotations are its leases. hami-ray replaces hami-scheduler in a cluster that runs HAMi's
  device plugins.
- :class:`RayInventory` (``--ray-address``): the placement actor's ledger, shared with Ray tasks. Node
  actors say which Kubernetes node they run on (``$HAMI_RAY_K8S_NODE``); a pod's lease is held there as
  ``holder="pod"`` until the bridge frees it.

A pod's lease id is ``pod-<uid>``, its token the pod's uid.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from hami_ray.core.codec import devices_from_register
from hami_ray.core.errors import HamiRayError
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import Allocation, ClusterSnapshot, DeviceGrant, Lease, LeaseState, Node, SliceRequest
from hami_ray.core.scheduler import Scheduler
from hami_ray.core.vendors import NVIDIA_SCORE_ANNOTATION, NVIDIA_VENDOR, VENDORS, Vendor

log = logging.getLogger(__name__)


def lease_id_of(uid: str) -> str:
    return f"pod-{uid}"


class Inventory(Protocol):
    """What the bridge needs of a ledger. Allocations name Kubernetes nodes."""

    def set_node(self, name: str, annotations: dict[str, str]) -> bool:
        """A Kubernetes node and its annotations (added or changed); True if its devices changed. Raises
        HamiRayError on a register annotation that does not parse (the node is then left out)."""

    def remove_node(self, name: str) -> None: ...

    def place(self, uid: str, owner: str, requests: Sequence[SliceRequest], nodes: Collection[str]) -> Allocation:
        """Hold the slices of a pod's containers on one of ``nodes``. Raises Unschedulable/InvalidRequest."""

    def adopt(self, uid: str, owner: str, node: str, slices: Sequence[Sequence[DeviceGrant]]) -> bool:
        """Hold what a pod was given before (its allocation annotation); False if ``node`` is unknown here.
        Raises HamiRayError when the slices cannot be held there."""

    def release(self, uid: str) -> bool: ...

    def holds(self, uid: str) -> bool: ...

    def held(self) -> set[str]:
        """The uids of the pods holding leases."""

    def changes(self) -> int:
        """Moves when capacity was freed by somebody else (Ray tasks): waiting pods are tried again."""

    def snapshot(self) -> ClusterSnapshot: ...


class AnnotationInventory:
    """A ledger in this process, its nodes from HAMi's register annotations (every vendor's key)."""

    def __init__(self, vendors: Sequence[Vendor] = VENDORS) -> None:
        self.ledger = Ledger()
        self.scheduler = Scheduler(self.ledger)
        self.vendors = tuple(v for v in vendors if v.register)
        self._seen: dict[str, tuple[str | None, ...]] = {}  # node -> the annotations it was built from

    def set_node(self, name: str, annotations: dict[str, str]) -> bool:
        key = (annotations.get(NVIDIA_SCORE_ANNOTATION), *(annotations.get(v.register or "") for v in self.vendors))
        if self._seen.get(name) == key and name in self.ledger.nodes:
            return False  # a heartbeat: nothing that matters here changed
        devices: list[Any] = []
        for vendor in self.vendors:
            value = annotations.get(vendor.register or "")
            if value is None:
                continue
            score = annotations.get(NVIDIA_SCORE_ANNOTATION) if vendor is NVIDIA_VENDOR else None
            try:
                devices.extend(devices_from_register(value, score, vendor=vendor.type_word))
            except HamiRayError:
                self._seen.pop(name, None)
                if name in self.ledger.nodes:
                    self.ledger.remove_node(name)
                raise
        self._seen[name] = key
        new = Node(name=name, devices=tuple(devices))
        if name in self.ledger.nodes and self.ledger.node(name) == new:
            return False
        self.ledger.add_node(new)
        return True

    def remove_node(self, name: str) -> None:
        self._seen.pop(name, None)
        if name in self.ledger.nodes:
            self.ledger.remove_node(name)

    def place(self, uid: str, owner: str, requests: Sequence[SliceRequest], nodes: Collection[str]) -> Allocation:
        allocation = self.scheduler.place(requests, nodes=nodes)
        self.ledger.allocate(Lease(lease_id=lease_id_of(uid), owner=owner, token=uid, allocation=allocation,
                                   state=LeaseState.ACTIVE, holder="pod"))
        return allocation

    def adopt(self, uid: str, owner: str, node: str, slices: Sequence[Sequence[DeviceGrant]]) -> bool:
        if node not in self.ledger.nodes:
            return False
        if lease_id_of(uid) not in self.ledger.leases:
            self.ledger.allocate(Lease(lease_id=lease_id_of(uid), owner=owner, token=uid, state=LeaseState.ACTIVE,
                                       allocation=Allocation(node=node, slices=tuple(tuple(c) for c in slices)),
                                       holder="pod"))
        return True

    def release(self, uid: str) -> bool:
        return self.ledger.release(lease_id_of(uid)) is not None if self.holds(uid) else False

    def holds(self, uid: str) -> bool:
        return lease_id_of(uid) in self.ledger.leases

    def held(self) -> set[str]:
        return {lid.removeprefix("pod-") for lid in self.ledger.leases if lid.startswith("pod-")}

    def changes(self) -> int:
        return 0  # nobody else frees slices here

    def snapshot(self) -> ClusterSnapshot:
        return self.ledger.snapshot()


class RayInventory:
    """The placement actor's ledger (Ray tasks and pods in one). Calls are Ray calls, answered in
    milliseconds; Ray nodes without a Kubernetes node name never get pods."""

    def __init__(self, placement: Any) -> None:
        import ray  # noqa: PLC0415 - only this inventory needs Ray

        self._ray = ray
        self._task_error = ray.exceptions.RayTaskError
        self.placement = placement
        self._held: dict[str, str] = {}  # uid -> Kubernetes node
        self.sync()

    def _get(self, ref: Any) -> Any:
        """``ray.get``, with the placement actor's own errors (Unschedulable, InvalidRequest) raised as
        themselves, their message intact (it becomes the pod's FailedScheduling event)."""
        try:
            return self._ray.get(ref)
        except self._task_error as exc:
            if isinstance(exc.cause, HamiRayError):
                raise exc.cause from None
            raise

    def sync(self) -> dict[str, Any]:
        """What the placement actor holds for pods (after a restart of either side)."""
        state: dict[str, Any] = self._ray.get(self.placement.pod_leases.remote())
        self._held = {lid.removeprefix("pod-"): node for lid, node in state["leases"].items()}
        return state

    def set_node(self, name: str, annotations: dict[str, str]) -> bool:
        """Nothing to read: the node actors report the devices."""
        return False

    def remove_node(self, name: str) -> None:
        """The node actor's Ray node leaving is what removes its devices."""

    def place(self, uid: str, owner: str, requests: Sequence[SliceRequest], nodes: Collection[str]) -> Allocation:
        grant = self._get(self.placement.place_pod.remote(
            [r.model_dump(mode="json") for r in requests], owner, lease_id_of(uid), uid, sorted(nodes)))
        lease = Lease.model_validate(grant["lease"])
        self._held[uid] = grant["k8s_node"]
        return lease.allocation.model_copy(update={"node": grant["k8s_node"]})

    def adopt(self, uid: str, owner: str, node: str, slices: Sequence[Sequence[DeviceGrant]]) -> bool:
        ok = bool(self._get(self.placement.adopt_pod.remote(
            lease_id_of(uid), uid, owner, node, [[g.model_dump(mode="json") for g in c] for c in slices])))
        if ok:
            self._held[uid] = node
        return ok

    def release(self, uid: str) -> bool:
        if self._held.pop(uid, None) is None:
            return False
        return bool(self._ray.get(self.placement.release_pod.remote(lease_id_of(uid))))

    def holds(self, uid: str) -> bool:
        return uid in self._held

    def held(self) -> set[str]:
        return set(self._held)

    def changes(self) -> int:
        return int(self._ray.get(self.placement.pod_changes.remote()))

    def snapshot(self) -> ClusterSnapshot:
        snap = ClusterSnapshot.model_validate(self._ray.get(self.placement.status.remote())["snapshot"])
        return snap
