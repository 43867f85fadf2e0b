"""The bridge's view of the placement actor's pod leases (:class:`~hami_ray.k8s.inventory.RayInventory`)
when the actor restarts or a release fails: what it still holds, and when it reads the leases again. The
placement actor is a stand-in here (its answers, in the shapes :mod:`hami_ray.runtime.pods` gives); the
real one is in tests/runtime/test_k8s_bridge.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError

from hami_ray.k8s import inventory as inventory_module
from hami_ray.k8s.inventory import RayInventory


class _Call:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)  # the "ref" is the answer itself (ray.get is the identity here)


class _Placement:
    """The placement actor's pod calls: a ledger of pod lease ids, an incarnation, releases that may fail."""

    def __init__(self) -> None:
        self.leases: dict[str, str] = {}  # lease id -> Kubernetes node
        self.incarnation = "first"
        self.changes = 0
        self.fail_releases = 0  # the next N releases die with the actor
        self.pod_leases = _Call(lambda: {"leases": dict(self.leases), "nodes": ["k8s-a"], "changes": self.changes,
                                         "incarnation": self.incarnation})
        self.pod_changes = _Call(lambda: {"changes": self.changes, "incarnation": self.incarnation})
        self.release_pod = _Call(self._release)

    def _release(self, lease_id: str) -> bool:
        if self.fail_releases:
            self.fail_releases -= 1
            raise RayActorError()
        return self.leases.pop(lease_id, None) is not None


@pytest.fixture
def placement(monkeypatch: pytest.MonkeyPatch) -> _Placement:
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    return _Placement()


def test_a_release_that_fails_keeps_the_slice_held_and_the_leases_are_read_again(placement: _Placement) -> None:
    placement.leases["pod-u1"] = "k8s-a"
    inv = RayInventory(placement)
    assert inv.holds("u1") and not inv.recheck()  # just read: nothing due
    placement.fail_releases = 1
    with pytest.raises(RayActorError):
        inv.release("u1")
    assert inv.holds("u1")  # not forgotten: the bridge frees it again
    assert inv.recheck()  # due now, and again at each recheck for a while
    assert inv.release("u1") and not inv.holds("u1") and "pod-u1" not in placement.leases


def test_a_new_incarnation_of_the_placement_actor_makes_the_leases_read_again(placement: _Placement) -> None:
    inv = RayInventory(placement)
    inv.changes()
    assert not inv.recheck()
    placement.incarnation, placement.changes = "second", 0
    placement.leases["pod-u2"] = "k8s-a"  # rebuilt from a node actor: a slice an earlier incarnation freed
    inv.changes()
    assert inv.recheck() and inv.held() == {"u2"}


def test_a_release_the_placement_actor_did_not_hold_makes_the_leases_read_again(placement: _Placement) -> None:
    placement.leases["pod-u3"] = "k8s-a"
    inv = RayInventory(placement)
    del placement.leases["pod-u3"]  # a restarted actor that has not heard from that node actor yet
    assert not inv.release("u3") and not inv.holds("u3")
    assert inv.recheck()


def test_without_doubt_the_leases_are_read_again_only_every_recheck_period(placement: _Placement,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(inventory_module.time, "monotonic", lambda: now[0])
    inv = RayInventory(placement)
    now[0] += inventory_module.RECHECK_EVERY_S - 1
    assert not inv.recheck()
    now[0] += 1
    assert inv.recheck() and not inv.recheck()
