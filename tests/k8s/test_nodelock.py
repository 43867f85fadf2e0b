"""HAMi's node lock as placement sees it (hami_ray.k8s.nodelock), no cluster: the value's format, the
``auto`` rule, and which nodes count as having a bind in flight."""

from __future__ import annotations

import datetime

import pytest

from hami_ray.k8s.nodelock import (LOCK_ANNOTATION, LOCK_TIMEOUT_S, PLUGIN_ANNOTATION, BindMode, NodeLock,
                                   NodeLocks, holder, lock_needed)

REGISTER = "hami.io/node-nvidia-register"
NOW = datetime.datetime(2026, 11, 29, 2, 0, 0, tzinfo=datetime.timezone.utc)


def _ago(seconds: float, namespace: str = "ns", name: str = "p") -> str:
    return NodeLock(NOW - datetime.timedelta(seconds=seconds), namespace, name).value()


@pytest.mark.parametrize(("annotations", "mode", "locks"), [
    ({REGISTER: "[]"}, BindMode.AUTO, True),  # registered by HAMi's device plugin
    ({"hami.io/node-register-Ascend910B3": "[]"}, BindMode.AUTO, True),  # another vendor's HAMi plugin
    ({REGISTER: "[]", PLUGIN_ANNOTATION: "nvidia.com/gpu"}, BindMode.AUTO, False),  # hami-ray's plugin
    ({}, BindMode.AUTO, False),  # no device plugin seen
    ({}, BindMode.HAMI_LOCK, True),
    ({REGISTER: "[]"}, BindMode.DIRECT, False),
])
def test_which_nodes_take_the_lock(annotations: dict[str, str], mode: BindMode, locks: bool) -> None:
    assert lock_needed(annotations, mode) is locks


def test_the_value_is_hamis() -> None:
    assert NodeLock(NOW, "ns", "p").value() == "2026-11-29T02:00:00Z,ns,p"
    assert NodeLock.parse("2026-11-29T10:00:00+08:00,ns,p") == NodeLock(NOW, "ns", "p")  # Go's local RFC 3339
    assert NodeLock.parse("2026-11-29T02:00:00Z") == NodeLock(NOW)  # legacy: a bare time
    for bad in ("2026-11-29T02:00:00Z,ns", "a,b,c", "2026-11-29 02:00:00,ns,p", "2026-11-29T02:00:00,ns,p", ""):
        with pytest.raises(ValueError):
            NodeLock.parse(bad)


def test_who_holds_a_lock() -> None:
    alive = lambda ns, name: name != "gone"  # noqa: E731
    assert holder(None, now=NOW, exists=alive) is None
    assert holder(_ago(10), now=NOW, exists=alive) == "ns/p"
    assert holder(_ago(LOCK_TIMEOUT_S + 1), now=NOW, exists=alive) is None  # expired
    assert holder(_ago(10, name="gone"), now=NOW, exists=alive) is None  # its pod is gone
    assert holder(_ago(10), now=NOW, exists=alive, pod=("ns", "p")) is None  # the pod's own
    assert "legacy" in str(holder(NodeLock(NOW).value(), now=NOW, exists=alive))
    assert "nobody it can name" in str(holder("garbage,x", now=NOW, exists=alive))


def test_placement_passes_over_claims_and_held_locks() -> None:
    locks = NodeLocks(BindMode.AUTO)
    pods = {("ns", "p"), ("ns", "q")}
    exists = lambda ns, name: (ns, name) in pods  # noqa: E731
    for node in ("a", "b", "c"):
        locks.observe(node, {"resourceVersion": "1", "annotations": {REGISTER: "[]"}})
    locks.observe("direct", {"resourceVersion": "1", "annotations": {LOCK_ANNOTATION: _ago(1)}})
    assert locks.split(["a", "b", "c", "direct"], exists) == (["a", "b", "c", "direct"], [])
    locks.claim("a", "uid-1")  # placed there this cycle
    assert locks.split(["a", "b", "c"], exists) == (["b", "c"], ["a"])
    value = NodeLock(datetime.datetime.now(datetime.timezone.utc), "ns", "p").value()
    locks.mine("a", "uid-1", value)
    assert locks.busy(exists) == {"a"}  # written, not yet seen in the watch
    assert locks.observe("a", {"resourceVersion": "2", "annotations": {REGISTER: "[]", LOCK_ANNOTATION: value}})
    assert locks.busy(exists) == {"a"}  # the watch speaks for it now: held while ns/p exists
    assert locks.known("a") == {"metadata": {"resourceVersion": "2", "annotations": {LOCK_ANNOTATION: value}}}
    assert locks.busy(exists, pod=("ns", "p")) == set()  # its own lock does not hold it back
    pods.discard(("ns", "p"))
    assert locks.busy(exists) == set() and locks.names("ns", "p")
    pods.add(("ns", "p"))
    assert locks.observe("a", {"resourceVersion": "3", "annotations": {REGISTER: "[]"}})  # released
    assert locks.busy(exists) == set()
    locks.observe("b", {"resourceVersion": "4", "annotations": {REGISTER: "[]", LOCK_ANNOTATION: "garbage"}})
    assert locks.busy(exists) == {"b"}  # unreadable: left alone, as HAMi leaves it


def test_an_expiring_lock_is_noticed_once() -> None:
    locks = NodeLocks(BindMode.HAMI_LOCK, timeout_s=60)
    now = datetime.datetime.now(datetime.timezone.utc)
    locks.observe("a", {"resourceVersion": "1", "annotations": {
        LOCK_ANNOTATION: NodeLock(now - datetime.timedelta(seconds=59), "ns", "p").value()}})
    assert locks.busy(lambda ns, n: True, now=now) == {"a"}
    assert not locks.expired(now)  # the first look
    later = now + datetime.timedelta(seconds=2)
    assert locks.expired(later) and not locks.expired(later + datetime.timedelta(seconds=1))
    assert locks.busy(lambda ns, n: True, now=later) == set()


def test_a_waiting_bind_sees_what_placement_sees() -> None:
    """``free_for`` (a bind held on a node waits until it is free) answers as ``busy`` does, except that a
    claim of the same pod's own bind never holds it back."""
    locks = NodeLocks(BindMode.AUTO)
    pods = {("ns", "p"), ("ns", "q")}
    exists = lambda ns, name: (ns, name) in pods  # noqa: E731
    nodes = ("a", "b", "c", "direct")
    for node in nodes[:3]:
        locks.observe(node, {"resourceVersion": "1", "annotations": {REGISTER: "[]"}})
    locks.observe("direct", {"resourceVersion": "1", "annotations": {LOCK_ANNOTATION: _ago(1)}})

    def agree(pod: tuple[str, str], uid: str) -> None:
        busy = locks.busy(exists, pod=pod)
        for node in nodes:
            claim = locks._claims.get(node)
            own = claim is not None and claim.uid == uid
            assert locks.free_for(node, uid, exists, pod) is (own or node not in busy), (node, pod, uid, busy)

    agree(("ns", "q"), "uid-q")
    locks.claim("a", "uid-p")
    agree(("ns", "q"), "uid-q")  # another pod's bind in flight on a
    agree(("ns", "p"), "uid-p")  # its own
    now = datetime.datetime.now(datetime.timezone.utc)
    value = NodeLock(now, "ns", "p").value()
    locks.mine("a", "uid-p", value)
    locks.observe("a", {"resourceVersion": "2", "annotations": {REGISTER: "[]", LOCK_ANNOTATION: value}})
    agree(("ns", "q"), "uid-q")  # held by ns/p, which exists
    agree(("ns", "p"), "uid-p")
    pods.discard(("ns", "p"))
    agree(("ns", "q"), "uid-q")  # its holder is gone
    locks.observe("b", {"resourceVersion": "3", "annotations": {REGISTER: "[]", LOCK_ANNOTATION: "garbage"}})
    locks.observe("c", {"resourceVersion": "3", "annotations": {REGISTER: "[]", LOCK_ANNOTATION: _ago(
        LOCK_TIMEOUT_S + (now - NOW).total_seconds() + 1, name="q")}})
    agree(("ns", "q"), "uid-q")  # b unreadable, c expired
    assert not locks.free_for("b", "uid-q", exists, ("ns", "q")) and locks.free_for("c", "uid-q", exists, ("ns", "q"))
