"""Team queues for pods without a cluster (issue 14): a namespace's queue, a pod's priority and opt-out, the
queue file reloaded (an invalid one keeps the old definitions), the bridge's cycle over pods fed to it by
hand (the order between queues, a limit as the reason, best-effort FIFO behind a head, a reclaim plan and
its messages), and the webhook's check of a pod against its queue."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.model import Lease
from hami_ray.core.queues import Preemption, QueueConfigError, QueueTree
from hami_ray.k8s.preemption import EVICTION_RETRY_S, Preemptions, refusal
from hami_ray.k8s.queueing import QueueFile, namespace_queue, pod_terms
from hami_ray.k8s.quota import QueueQuota
from hami_ray.k8s.scheduler import PodScheduler
from hami_ray.k8s.webhook import mutate

REGISTER = "hami.io/node-nvidia-register"
QUEUES = """
queues:
  - name: team-a
    guaranteed: {memory: 16GiB}
  - name: team-b
    limit: {memory: 20GiB}
"""


def _ns(name: str, annotation: str | None = None, label: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"ns-{name}",
                         "annotations": {"hami.io/queue": annotation} if annotation else {},
                         "labels": {"hami.io/queue": label} if label else {}}}


def _pod(name: str, namespace: str, mib: int, *, node: str | None = None, priority: int | None = None,
         second: int = 0, annotations: dict[str, str] | None = None, selector: dict[str, str] | None = None,
         scheduler: str = "hami-scheduler") -> dict[str, Any]:
    spec: dict[str, Any] = {"schedulerName": scheduler, "containers": [
        {"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": str(mib)}}}]}
    if node:
        spec["nodeName"] = node
    if priority is not None:
        spec["priority"] = priority
    if selector:
        spec["nodeSelector"] = selector
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "annotations": annotations or {},
                         "creationTimestamp": f"2026-01-01T00:00:{second:02d}Z"},
            "spec": spec, "status": {"phase": "Running" if node else "Pending"}}


def test_a_namespace_names_its_queue_by_annotation_then_label() -> None:
    assert namespace_queue(_ns("a", annotation="org/team-a", label="team-c")) == "org/team-a"
    assert namespace_queue(_ns("b", label="team-c")) == "team-c"
    assert namespace_queue(_ns("c")) == "default"
    assert namespace_queue(_ns("d", annotation="  ")) == "default"
    assert namespace_queue(None) == "default"


def test_a_pods_priority_and_opt_out() -> None:
    assert pod_terms(_pod("p", "ns", 1, priority=1000)) == (1000, True)
    assert pod_terms(_pod("p", "ns", 1, annotations={"hami.io/preemptible": "False"})) == (0, False)
    assert pod_terms(_pod("p", "ns", 1, annotations={"hami.io/preemptible": "true"})) == (0, True)
    with pytest.raises(InvalidRequest, match="hami.io/preemptible must be \"true\" or \"false\", got 'no'"):
        pod_terms(_pod("p", "ns", 1, annotations={"hami.io/preemptible": "no"}))


def test_the_queue_file_is_read_again_and_an_invalid_one_keeps_the_old(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "queues.yaml"
    with pytest.raises(QueueConfigError, match="cannot read"):
        QueueFile(path)
    path.write_text(QUEUES)
    source = QueueFile(path)
    assert source.poll() is None  # unchanged
    assert list(source.tree.specs) == ["team-a", "team-b", "default"]
    path.write_text(QUEUES.replace("limit: {memory: 20GiB}", "limit: {memory: 8GiB}"))
    tree = source.poll()
    assert tree is not None and tree.limit("team-b").memory_mib == 8192 and source.tree is tree
    with caplog.at_level(logging.ERROR, logger="hami_ray.k8s.queueing"):
        path.write_text(QUEUES.replace("guaranteed: {memory: 16GiB}", "guaranteed: {memory: 16GiB}\n    limit: "
                                       "{memory: 8GiB}"))
        assert source.poll() is None
    assert source.tree is tree  # the previous definitions stay
    assert source.error == "queue team-a: guaranteed.memory 16 GiB is over limit.memory 8 GiB"
    assert "refused, the previous ones stay: queue team-a: guaranteed.memory 16 GiB" in caplog.text
    assert source.poll() is None  # the same invalid content is not logged again
    path.unlink()
    assert source.poll() is None and source.tree is tree  # a ConfigMap mount between versions
    path.write_text(QUEUES)
    assert source.poll() is not None and source.error is None


def _bridge(tree: str = QUEUES) -> PodScheduler:
    """A bridge fed by hand (``quiet``: it writes nothing; the cycle's API calls are returned, not made)."""
    sched = PodScheduler(client.ApiClient(), quiet=True)
    assert sched.podqueue.apply(QueueTree.parse(tree))
    sched._on_node("ADDED", {"metadata": {"name": "n1", "annotations": {  # noqa: SLF001 - fed by hand
        REGISTER: "GPU-0,10,32768,100,NVIDIA-A100,0,true:"}}})
    sched._on_namespace("ADDED", _ns("ns-a", annotation="team-a"))  # noqa: SLF001
    sched._on_namespace("ADDED", _ns("ns-b", label="team-b"))  # noqa: SLF001
    return sched


def _cycle(sched: PodScheduler) -> tuple[list[str], list[str]]:
    """One cycle: the pods it binds and those it evicts, by name (nothing is sent)."""
    with sched.lock:
        calls = sched.podqueue.cycle()
    bound = [c.args[0]["metadata"]["name"] for c in calls if getattr(c.func, "__name__", "") == "bind"]
    evicted = [c.args[1]["metadata"]["name"] for c in calls if getattr(c.func, "__name__", "") == "_evict"]
    return bound, evicted


def test_a_queue_under_its_guarantee_is_served_first_and_reclaims() -> None:
    """One 32 GiB GPU. team-b (no guarantee, limit 20 GiB) holds 17000 MiB and waits for more; team-a (owed
    16 GiB) arrives later and is served first; once the GPU is full, a team-a pod gets a reclaim plan that
    evicts the youngest borrower, and is bound (before team-b's waiting pod) only once it is gone."""
    sched = _bridge()
    for name, mib, bound_at in (("b-old", 6000, 100), ("b-mid", 5000, 150), ("b-young", 6000, 200)):
        sched._on_pod("ADDED", _pod(name, "ns-b", mib, node="n1", annotations={  # noqa: SLF001 - fed by hand
            "hami.io/vgpu-devices-allocated": f"GPU-0,NVIDIA,{mib},0:;", "hami.io/bind-time": f"1700000{bound_at}"}))
    sched._on_pod("ADDED", _pod("b-next", "ns-b", 3400, second=1))  # noqa: SLF001
    sched._on_pod("ADDED", _pod("a-first", "ns-a", 14000, second=2))  # noqa: SLF001
    assert _cycle(sched) == (["a-first"], [])  # 1768 MiB left: b-next, in line first, no longer fits
    assert sched.podqueue.told["uid-b-next"] == "0/1 nodes are available: 1 insufficient device memory"
    sched._on_pod("ADDED", _pod("a-second", "ns-a", 2000, second=4))  # noqa: SLF001 - team-a: 16000 <= 16 GiB
    assert _cycle(sched) == ([], ["b-young"])  # the youngest borrower whose going is enough
    assert sched.podqueue.told["uid-a-second"] == ("reclaim for queue team-a in progress: evicting ns-b/b-young on "
                                                   "node n1; bound once it is gone")
    with sched.lock:
        assert sched.inventory.holds("uid-b-young")  # held until the pod is gone: nothing double-booked
    assert _cycle(sched) == ([], [])  # under way: no second plan
    sched._on_pod("DELETED", _pod("b-young", "ns-b", 6000, node="n1"))  # noqa: SLF001
    assert _cycle(sched) == (["a-second", "b-next"], [])  # the room goes to the queue it was made for first


def test_a_limit_holds_a_head_and_smaller_pods_behind_a_head_that_does_not_fit_go_first() -> None:
    sched = _bridge()
    sched._on_pod("ADDED", _pod("b-held", "ns-b", 6000, node="n1", annotations={  # noqa: SLF001
        "hami.io/vgpu-devices-allocated": "GPU-0,NVIDIA,16000,0:;"}))
    sched._on_pod("ADDED", _pod("b-over", "ns-b", 8000, second=1))  # noqa: SLF001 - 16000 + 8000 > 20 GiB
    sched._on_pod("ADDED", _pod("b-small", "ns-b", 2000, second=2))  # noqa: SLF001
    sched._on_pod("ADDED", _pod("a-elsewhere", "ns-a", 1000, second=3, selector={"zone": "x"}))  # noqa: SLF001
    sched._on_pod("ADDED", _pod("a-here", "ns-a", 1000, second=4))  # noqa: SLF001
    assert sorted(_cycle(sched)[0]) == ["a-here", "b-small"]
    assert sched.podqueue.told["uid-b-over"] == ("queue team-b at its limit: memory 16000 MiB held + 8000 MiB asked > "
                                                 "limit 20 GiB")
    assert sched.podqueue.told["uid-a-elsewhere"].startswith("0/1 nodes are available: 1 node(s) didn't match")


def test_a_pod_over_its_queues_limit_alone_or_in_an_unknown_queue_is_told_at_once() -> None:
    sched = _bridge()
    sched._on_namespace("ADDED", _ns("ns-z", annotation="team-z"))  # noqa: SLF001
    sched._on_pod("ADDED", _pod("never", "ns-b", 30000))  # noqa: SLF001
    sched._on_pod("ADDED", _pod("lost", "ns-z", 1000))  # noqa: SLF001
    told = sched.podqueue.told
    assert told["uid-never"] == "queue team-b: the request alone needs memory 30000 MiB, over its limit.memory 20 GiB"
    assert told["uid-lost"] == ("namespace ns-z names queue 'team-z' (hami.io/queue), which is not defined "
                                "(known: default, team-a, team-b)")
    assert _cycle(sched) == ([], [])
    with sched.lock:  # the definitions change: served again
        assert sched.podqueue.apply(QueueTree.parse(QUEUES + "  - name: team-z\n"))
    assert _cycle(sched)[0] == ["lost"]


def _victim(name: str) -> Lease:
    from hami_ray.core.model import Allocation, DeviceGrant  # noqa: PLC0415

    return Lease(lease_id=f"pod-{name}", owner=f"ns/{name}", token=name, holder="pod",
                 allocation=Allocation(node="n1", slices=((DeviceGrant(uuid="GPU-0", memory_mib=1, cores=0),),)))


def test_a_refused_eviction_is_the_reason_spared_then_asked_again() -> None:
    book = Preemptions()
    plan = Preemption((_victim("v"),), "n1", "reclaim", "team-a")
    reclaim = book.start("w", plan, {"pod-v"})
    assert book.describe("w") == "reclaim for queue team-a in progress: evicting ns/v on node n1; bound once it is gone"
    body = {"message": "Cannot evict pod as it would violate the pod's disruption budget.",
            "details": {"causes": [{"message": "The disruption budget keep needs 1 healthy pods and has 1 currently"}]}}
    exc = ApiException(status=429, reason="Too Many Requests")
    exc.body = json.dumps(body)
    why = refusal(exc)
    assert why == ("a PodDisruptionBudget forbids it now (The disruption budget keep needs 1 healthy pods and has 1 "
                   "currently)")
    book.answered(reclaim, "pod-v", why, now=100.0)
    assert not book.active("w", lambda lease_id: True)
    assert book.describe("w") == (f"reclaim for queue team-a held back: eviction refused (ns/v: {why}); asked again "
                                  f"in {EVICTION_RETRY_S:g} s")
    assert book.spare(100.0) == {"pod-v"}
    retry = book.start("w", plan, {"pod-v"})  # asked again: the refusal stays the reason until the answer
    assert str(book.describe("w")).startswith("reclaim for queue team-a held back")
    book.answered(retry, "pod-v", None, now=101.0)
    assert book.describe("w") == "reclaim for queue team-a in progress: evicting ns/v on node n1; bound once it is gone"
    assert book.expire(100.0 + EVICTION_RETRY_S) and book.spare(200.0) == {"pod-v"}  # leaving: still not planned on
    book.done("w")
    assert book.spare(200.0) == set()


def _review(namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "r1", "kind": {"kind": "Pod"}, "operation": "CREATE", "namespace": namespace,
                        "object": pod}}


def test_the_webhook_counts_bound_pods_per_queue_and_refuses_over_the_limit() -> None:
    quota = QueueQuota(None, tree=QueueTree.parse(QUEUES))
    quota.on_node("ADDED", {"metadata": {"name": "n1", "annotations": {REGISTER: "GPU-0,10,32768,100,NVIDIA-A100,0,true:"}}})
    quota.on_namespace("ADDED", _ns("ns-b", label="team-b"))
    quota.on_namespace("ADDED", _ns("ns-z", annotation="team-z"))
    quota.on_pod("ADDED", _pod("held", "ns-b", 0, node="n1", annotations={
        "hami.io/vgpu-devices-allocated": "GPU-0,NVIDIA,16000,0:;"}))
    assert quota.book.usage("team-b").memory_mib == 16000
    new = _pod("new", "ns-b", 0)
    new["spec"]["containers"][0]["resources"]["limits"] = {"nvidia.com/gpumem": "8000"}  # the webhook adds gpu: 1
    answer = mutate(_review("ns-b", new), quota=quota)["response"]
    assert answer["allowed"] is False and answer["status"]["message"] == (
        "hami-ray: queue team-b at its limit: memory 16000 MiB held + 8000 MiB asked > limit 20 GiB; the pods of "
        "namespace ns-b are in queue team-b")
    new["spec"]["containers"][0]["resources"]["limits"] = {"nvidia.com/gpumem": "4000"}
    assert mutate(_review("ns-b", new), quota=quota)["response"]["allowed"] is True
    other = _pod("other", "ns-b", 8000, scheduler="someone-else")  # not ours to check
    assert mutate(_review("ns-b", other), quota=quota)["response"]["allowed"] is True
    lost = mutate(_review("ns-z", _pod("lost", "ns-z", 1000)), quota=quota)["response"]
    assert "names queue 'team-z' (hami.io/queue), which is not defined" in lost["status"]["message"]
    quota.on_namespace("MODIFIED", _ns("ns-b", label="team-a"))  # its bound pods count where it is now
    assert (quota.book.usage("team-b").memory_mib, quota.book.usage("team-a").memory_mib) == (0, 16000)
    quota.on_pod("DELETED", _pod("held", "ns-b", 0, node="n1"))
    assert quota.book.usage("team-a").memory_mib == 0


@pytest.mark.parametrize("command", [["k8s", "scheduler", "--once"],
                                     ["k8s", "webhook", "--tls-cert", "c.pem", "--tls-key", "k.pem"]])
def test_an_invalid_queue_file_stops_the_command_with_the_queue_and_field(tmp_path: Path, command: list[str]) -> None:
    from typer.testing import CliRunner  # noqa: PLC0415

    from hami_ray.cli import app  # noqa: PLC0415

    path = tmp_path / "queues.yaml"
    path.write_text("queues: [{name: a, guaranteed: {memory: 8GB}}]")
    result = CliRunner().invoke(app, [*command, "--queues", str(path), "--kubeconfig", str(tmp_path / "none")])
    assert result.exit_code == 2, result.output
    assert "queue a: guaranteed.memory: unknown unit 'GB'" in " ".join(result.output.split())


def test_a_plan_takes_victims_only_on_the_pods_nodes_and_never_spared_ones() -> None:
    """``plan_preemption``'s ``nodes`` (a pod's selector and taints) and ``spare`` (victims leaving for
    another plan, or whose eviction was refused lately), through the annotation inventory."""
    from hami_ray.core.model import DeviceGrant, SliceRequest  # noqa: PLC0415
    from hami_ray.k8s.inventory import AnnotationInventory  # noqa: PLC0415

    inventory = AnnotationInventory()
    inventory.set_queues(QueueTree.parse(QUEUES))
    for n in ("n1", "n2"):
        inventory.set_node(n, {REGISTER: f"GPU-{n},10,32768,100,NVIDIA-A100,0,true:"})
        assert inventory.adopt(f"b-{n}", f"ns-b/b-{n}", n, [[DeviceGrant(uuid=f"GPU-{n}", memory_mib=20000, cores=0)]],
                               queue="team-b", created_at=1.0 if n == "n1" else 2.0)
    want = [SliceRequest(memory_mib=16000, queue="team-a")]  # fits on either node once its borrower goes
    plan = inventory.plan_preemption("w", want, ["n1", "n2"], set())
    assert plan is not None and [v.lease_id for v in plan.victims] == ["pod-b-n2"]  # the youngest
    plan = inventory.plan_preemption("w", want, ["n1"], set())
    assert plan is not None and (plan.node, [v.lease_id for v in plan.victims]) == ("n1", ["pod-b-n1"])
    assert inventory.plan_preemption("w", want, ["n1"], {"pod-b-n1"}) is None
    assert inventory.preempt(plan) == ["b-n1"]
