"""Team queues for pods against the real API server, kwok nodes and deploy/k8s/rbac.yaml's rights (issue 14):
a namespace's annotation or label puts its pods in a queue; a queue under its guarantee reclaims a
borrower's slice by evicting its pod (a ``Preempted`` event names the queue, the waiter is bound only after
the victim is gone); a PodDisruptionBudget is honoured; a higher priority preempts within its queue, never a
pod that opted out; the webhook refuses pods of unknown queues and over their queue's limit."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from hami_ray.k8s.queueing import PREEMPTIBLE_ANNOTATION, QUEUE_KEY, QueueFile
from hami_ray.k8s.quota import QueueQuota
from hami_ray.k8s.scheduler import PodScheduler
from hami_ray.k8s.webhook import WebhookServer
from tests.helpers import register_webhook, service_account_client, tls_files, wait_for

pytestmark = pytest.mark.k8s
SCHED = "queue-sched"
REGISTER = "hami.io/node-nvidia-register"
GPU = "GPU-q-0,10,16384,100,NVIDIA-Tesla T4,0,true:"  # one 16 GiB device: every test fills it
QUEUES = """
queues:
  - name: org
  - name: org/team-a
    guaranteed: {memory: 12GiB}
  - name: org/team-b          # borrows: no guarantee
    limit: {memory: 14GiB}
  - name: team-c
"""
WEBHOOK_LABEL = "hami-ray-queues-webhook"
_seq = itertools.count()


@pytest.fixture
def cluster(admin: client.ApiClient) -> Iterator[list[str]]:
    """The only node: a kwok node with one 16 GiB GPU. Yields a list the test adds namespaces to; their
    pods are deleted at the end (the test cluster runs no namespace controller)."""
    core = client.CoreV1Api(admin)
    for node in core.list_node().items:
        core.delete_node(node.metadata.name)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(
        name="queue-node", annotations={"kwok.x-k8s.io/node": "fake", REGISTER: GPU})))
    made: list[str] = []
    yield made
    for ns in made:
        core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
    core.delete_node("queue-node")


def _namespace(admin: client.ApiClient, made: list[str], annotation: str | None = None, label: str | None = None,
               labels: dict[str, str] | None = None) -> str:
    name = f"q-{next(_seq)}-{int(time.time() * 1000) % 100000}"
    meta = client.V1ObjectMeta(name=name, annotations={QUEUE_KEY: annotation} if annotation else None,
                               labels={**({QUEUE_KEY: label} if label else {}), **(labels or {})} or None)
    core = client.CoreV1Api(admin)
    core.create_namespace(client.V1Namespace(metadata=meta))
    made.append(name)
    try:  # the controller-manager's serviceaccount controller makes it too: whoever comes first
        core.create_namespaced_service_account(name, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default")))
    except client.ApiException as exc:
        assert exc.status == 409
    return name


def _pod(admin: client.ApiClient, namespace: str, name: str, mib: int, *, scheduler: str | None = SCHED,
         labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
         priority_class: str | None = None) -> None:
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"q-test": "on", **(labels or {})}, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {
            "limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": str(mib)}}}]}}
    if scheduler:
        body["spec"]["schedulerName"] = scheduler
    if priority_class:
        body["spec"]["priorityClassName"] = priority_class
    client.CoreV1Api(admin).create_namespaced_pod(namespace, body)


def _read(admin: client.ApiClient, namespace: str, name: str) -> client.V1Pod | None:
    try:
        return client.CoreV1Api(admin).read_namespaced_pod(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _bound(admin: client.ApiClient, namespace: str, name: str) -> bool:
    pod = _read(admin, namespace, name)
    return pod is not None and bool(pod.spec.node_name)


def _running(admin: client.ApiClient, namespace: str, name: str) -> bool:
    pod = _read(admin, namespace, name)
    return pod is not None and pod.status.phase == "Running"


def _events(admin: client.ApiClient, namespace: str, pod: str, reason: str) -> list[str]:
    items = client.EventsV1Api(admin).list_namespaced_event(namespace).items
    return [e.note for e in items if e.regarding.name == pod and e.reason == reason]


@pytest.fixture
def bridge(api: client.ApiClient, tmp_path: Path) -> Iterator[tuple[PodScheduler, Path]]:
    """The bridge in watch mode as deploy/k8s/rbac.yaml's ServiceAccount, with QUEUES from a file."""
    path = tmp_path / "queues.yaml"
    path.write_text(QUEUES)
    sched = PodScheduler(api, scheduler_name=SCHED, queues=QueueFile(path))
    stop = threading.Event()
    runner = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    runner.start()
    yield sched, path
    stop.set()
    runner.join(timeout=30)


class _Order:
    """The order in which the API server reports changes to the test's pods (one watch over every
    namespace: its events come in etcd revision order)."""

    def __init__(self, admin: client.ApiClient) -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # (type, name, nodeName)
        self._watch = watch.Watch()
        self._stopped = False
        core = client.CoreV1Api(admin)
        version = core.list_pod_for_all_namespaces(label_selector="q-test=on").metadata.resource_version
        self._thread = threading.Thread(target=self._run, args=(core, version), daemon=True)
        self._thread.start()

    def _run(self, core: client.CoreV1Api, version: str) -> None:
        try:
            for event in self._watch.stream(core.list_pod_for_all_namespaces, label_selector="q-test=on",
                                            resource_version=version, timeout_seconds=120):
                pod = event["object"]
                self.seen.append((event["type"], pod.metadata.name, pod.spec.node_name))
        except Exception:  # noqa: BLE001 - stop() cuts the stream short
            if not self._stopped:
                raise

    def first(self, kind: str | None, name: str, bound: bool = False) -> int:
        """The index of the first change of ``name`` (of ``kind``; ``bound``: with a node)."""
        return next(i for i, (t, n, node) in enumerate(self.seen)
                    if n == name and (kind is None or t == kind) and (node or not bound))

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def test_a_queue_under_its_guarantee_reclaims_a_borrowers_pod(admin: client.ApiClient, cluster: list[str],
                                                              bridge: tuple[PodScheduler, Path]) -> None:
    sched, _ = bridge
    team_b = _namespace(admin, cluster, annotation="org/team-b")
    team_a = _namespace(admin, cluster, annotation="org/team-a")
    order = _Order(admin)
    try:
        _pod(admin, team_b, "borrower", 12000)  # org/team-b has no guarantee: all of it is borrowed
        assert wait_for(lambda: _running(admin, team_b, "borrower"), timeout=30)
        _pod(admin, team_a, "waiter", 8000)  # 4384 MiB free; org/team-a is owed 12 GiB
        assert wait_for(lambda: _bound(admin, team_a, "waiter"), timeout=60)
        assert _read(admin, team_b, "borrower") is None
        # the test's own watch lags the GETs above on a loaded machine: wait until it has shown both changes
        assert wait_for(lambda: any(t == "DELETED" and n == "borrower" for t, n, _ in order.seen) and
                        any(n == "waiter" and node for _, n, node in order.seen), timeout=30), order.seen
        # the victim was gone before the waiter was bound: never two slices on the room of one
        assert order.first("DELETED", "borrower") < order.first(None, "waiter", bound=True), order.seen
    finally:
        order.stop()
    # (events are written off the binding path: wait for them)
    assert wait_for(lambda: _events(admin, team_b, "borrower", "Preempted"), timeout=10)
    (note,) = _events(admin, team_b, "borrower", "Preempted")
    assert note.startswith("Preempted by queue org/team-a (reclaim)") and "org/team-b" in note, note
    reclaiming = f"reclaim for queue org/team-a in progress: evicting {team_b}/borrower on node queue-node"
    assert wait_for(lambda: any(n.startswith(reclaiming) for n in _events(admin, team_a, "waiter", "FailedScheduling")),
                    timeout=10), _events(admin, team_a, "waiter", "FailedScheduling")
    with sched.lock:
        (lease,) = sched.ledger.leases.values()
        assert (lease.owner, lease.queue) == (f"{team_a}/waiter", "org/team-a")
        sched.ledger.check_invariants()


def test_a_pod_disruption_budget_is_honoured(admin: client.ApiClient, cluster: list[str],
                                            bridge: tuple[PodScheduler, Path]) -> None:
    """No disruption controller runs here, so the test writes the PDB's status as it would: first no
    disruption allowed (the eviction is refused with 429: the victim stays, the waiter waits and says why),
    then one allowed (as when another replica became healthy): the eviction asked again goes through."""
    team_b = _namespace(admin, cluster, annotation="org/team-b")
    team_a = _namespace(admin, cluster, annotation="org/team-a")
    _pod(admin, team_b, "guarded", 12000, labels={"app": "guarded"})
    assert wait_for(lambda: _running(admin, team_b, "guarded"), timeout=30)
    policy = client.PolicyV1Api(admin)
    policy.create_namespaced_pod_disruption_budget(team_b, client.V1PodDisruptionBudget(
        metadata=client.V1ObjectMeta(name="keep-one"),
        spec=client.V1PodDisruptionBudgetSpec(min_available=1,
                                              selector=client.V1LabelSelector(match_labels={"app": "guarded"}))))

    def budget(allowed: int) -> None:
        generation = policy.read_namespaced_pod_disruption_budget("keep-one", team_b).metadata.generation
        policy.patch_namespaced_pod_disruption_budget_status("keep-one", team_b, {"status": {
            "observedGeneration": generation, "disruptionsAllowed": allowed, "currentHealthy": 1 + allowed,
            "desiredHealthy": 1, "expectedPods": 1 + allowed}})

    budget(0)
    _pod(admin, team_a, "waiter", 8000)

    def refused() -> list[str]:
        return [n for n in _events(admin, team_a, "waiter", "FailedScheduling") if "PodDisruptionBudget" in n]

    assert wait_for(refused, timeout=30)
    note = refused()[0]
    assert note.startswith("reclaim for queue org/team-a held back: eviction refused") and "keep-one" in note, note
    victim = _read(admin, team_b, "guarded")
    assert victim is not None and victim.metadata.deletion_timestamp is None
    assert not _events(admin, team_b, "guarded", "Preempted")
    assert not _bound(admin, team_a, "waiter")
    condition = {c.type: c for c in _read(admin, team_a, "waiter").status.conditions or []}["PodScheduled"]
    assert condition.status == "False" and "PodDisruptionBudget" in condition.message

    budget(1)
    assert wait_for(lambda: _bound(admin, team_a, "waiter"), timeout=60)
    assert _read(admin, team_b, "guarded") is None
    assert wait_for(lambda: _events(admin, team_b, "guarded", "Preempted"), timeout=10)


def test_priority_preempts_within_a_queue_but_never_an_opted_out_pod(admin: client.ApiClient, cluster: list[str],
                                                                    bridge: tuple[PodScheduler, Path]) -> None:
    scheduling = client.SchedulingV1Api(admin)
    try:
        scheduling.create_priority_class(client.V1PriorityClass(metadata=client.V1ObjectMeta(name="q-high"),
                                                                value=1000))
    except client.ApiException as exc:
        assert exc.status == 409
    team_c = _namespace(admin, cluster, label="team-c")
    _pod(admin, team_c, "kept", 6000, annotations={PREEMPTIBLE_ANNOTATION: "false"})
    _pod(admin, team_c, "low", 6000)
    assert wait_for(lambda: _running(admin, team_c, "kept") and _running(admin, team_c, "low"), timeout=30)
    _pod(admin, team_c, "high", 8000, priority_class="q-high")  # 4384 MiB free: one of them must go
    assert wait_for(lambda: _bound(admin, team_c, "high"), timeout=60)
    assert _read(admin, team_c, "low") is None
    assert _running(admin, team_c, "kept")
    assert wait_for(lambda: _events(admin, team_c, "low", "Preempted"), timeout=10)
    (note,) = _events(admin, team_c, "low", "Preempted")
    assert note.startswith("Preempted in queue team-c (priority)") and f"{team_c}/high of priority 1000" in note
    assert not _events(admin, team_c, "kept", "Preempted")
    sched, _ = bridge
    with sched.lock:
        leases = {lease.owner.split("/")[1]: lease for lease in sched.ledger.leases.values()}
    assert (leases["kept"].queue, leases["kept"].preemptible, leases["kept"].priority) == ("team-c", False, 0)
    assert (leases["high"].queue, leases["high"].preemptible, leases["high"].priority) == ("team-c", True, 1000)


def test_a_pod_seen_before_its_namespace_is_served_in_the_namespace_queue(admin: client.ApiClient, cluster: list[str],
                                                                          bridge: tuple[PodScheduler, Path]) -> None:
    """A namespace and its pod created together reach the bridge by two watches; here the namespace's comes
    5 s late (a CPU hog once made it late enough that a labelled namespace's pods were held in ``default``).
    The bridge reads the namespace it has not seen, and the pod's slice is held in the namespace's queue."""
    sched, _ = bridge
    informer = sched.namespace_informer
    handler = informer.handler
    informer.handler = lambda kind, ns: threading.Timer(5.0, handler, args=(kind, ns)).start()
    try:
        team_c = _namespace(admin, cluster, label="team-c")
        _pod(admin, team_c, "early", 1000)
        assert wait_for(lambda: _bound(admin, team_c, "early"), timeout=30)
        with sched.lock:
            queues = [lease.queue for lease in sched.ledger.leases.values() if lease.owner == f"{team_c}/early"]
        assert queues == ["team-c"]
    finally:
        informer.handler = handler


def test_namespaces_name_queues_and_the_definitions_reload(admin: client.ApiClient, cluster: list[str],
                                                           bridge: tuple[PodScheduler, Path]) -> None:
    """The annotation wins over the label; neither: ``default``. A queue not defined, or a request alone
    over its queue's limit, is told at once; the pod is served once the definitions file allows it, and an
    invalid file changes nothing."""
    sched, path = bridge
    both = _namespace(admin, cluster, annotation="org/team-a", label="team-c")
    labelled = _namespace(admin, cluster, label="team-c")
    plain = _namespace(admin, cluster)
    unknown = _namespace(admin, cluster, annotation="org/team-z")
    team_b = _namespace(admin, cluster, annotation="org/team-b")
    for ns, name in ((both, "in-a"), (labelled, "in-c"), (plain, "in-default")):
        _pod(admin, ns, name, 2000)
    _pod(admin, unknown, "in-z", 2000)
    _pod(admin, team_b, "too-big-for-b", 15000)  # the device holds it; org/team-b's limit (14 GiB) never will
    assert wait_for(lambda: all(_bound(admin, ns, n) for ns, n in ((both, "in-a"), (labelled, "in-c"),
                                                                    (plain, "in-default"))), timeout=30)
    with sched.lock:
        queues = {lease.owner.split("/")[1]: lease.queue for lease in sched.ledger.leases.values()}
    assert queues == {"in-a": "org/team-a", "in-c": "team-c", "in-default": "default"}
    assert wait_for(lambda: _events(admin, unknown, "in-z", "FailedScheduling"), timeout=20)
    (note,) = _events(admin, unknown, "in-z", "FailedScheduling")
    assert note.startswith(f"namespace {unknown} names queue 'org/team-z' (hami.io/queue), which is not defined")
    assert wait_for(lambda: _events(admin, team_b, "too-big-for-b", "FailedScheduling"), timeout=20)
    (note,) = _events(admin, team_b, "too-big-for-b", "FailedScheduling")
    assert "queue org/team-b: the request alone needs memory 15000 MiB, over its limit.memory 14 GiB" in note

    path.write_text(QUEUES + "  - name: org/team-z\n")
    assert wait_for(lambda: _bound(admin, unknown, "in-z"), timeout=30)
    path.write_text(QUEUES.replace("limit: {memory: 14GiB}", "limit: {memory: 14GB}"))  # decimal GB: refused
    assert wait_for(lambda: sched.podqueue.file is not None and sched.podqueue.file.error is not None, timeout=10)
    assert "unknown unit 'GB'" in str(sched.podqueue.file.error)
    with sched.lock:
        assert "org/team-z" in sched.inventory.queue_book().tree  # the definitions in use stay
    assert not _bound(admin, team_b, "too-big-for-b")


@pytest.fixture
def queue_webhook(admin: client.ApiClient, api: client.ApiClient, tmp_path: Path) -> Iterator[QueueQuota]:
    """The webhook with QUEUES (its quota following the cluster as deploy/k8s/webhook.yaml's ServiceAccount,
    with rbac.yaml's hami-ray-webhook-queues), registered for pods in namespaces labelled WEBHOOK_LABEL."""
    core = client.CoreV1Api(admin)
    try:
        core.create_namespaced_service_account("hami-ray", client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(name="hami-webhook")))
    except client.ApiException as exc:
        assert exc.status == 409
    path = tmp_path / "queues.yaml"
    path.write_text(QUEUES)
    quota = QueueQuota(service_account_client(admin, "hami-webhook", "hami-ray"), QueueFile(path))
    stop = threading.Event()
    quota.follow(stop)
    ca, cert, key = tls_files(tmp_path)
    server = WebhookServer("127.0.0.1", 0, str(cert), str(key), scheduler_name=SCHED, quota=quota)
    server.start()
    registrations = client.AdmissionregistrationV1Api(admin)
    name = f"hami-ray-queues-{next(_seq)}"
    register_webhook(registrations, name, server.address[1], ca, WEBHOOK_LABEL)
    try:
        yield quota
    finally:
        registrations.delete_mutating_webhook_configuration(name)
        server.shutdown()
        server.server_close()
        stop.set()


def _message(exc: client.ApiException) -> str:
    """The API server's message: the webhook's denial, after its ``denied the request: ``."""
    return str(json.loads(exc.body)["message"]).split("denied the request: ", 1)[-1]


def test_the_webhook_refuses_pods_over_their_queues_limit_or_of_unknown_queues(
        admin: client.ApiClient, api: client.ApiClient, cluster: list[str], queue_webhook: QueueQuota) -> None:
    team_b = _namespace(admin, cluster, annotation="org/team-b", labels={WEBHOOK_LABEL: "on"})
    unknown = _namespace(admin, cluster, annotation="org/nope", labels={WEBHOOK_LABEL: "on"})
    _pod(admin, team_b, "first", 12000, scheduler=None)  # the webhook gives it SCHED
    assert queue_webhook.file is not None
    assert PodScheduler(api, scheduler_name=SCHED, queues=QueueFile(queue_webhook.file.path)).run_once().bound == 1
    assert wait_for(lambda: queue_webhook.book.usage("org/team-b").memory_mib == 12000, timeout=20)
    with pytest.raises(client.ApiException) as refused:
        _pod(admin, team_b, "over", 4000, scheduler=None)  # 12000 + 4000 MiB > 14 GiB
    assert refused.value.status == 403
    assert _message(refused.value) == ("hami-ray: queue org/team-b at its limit: memory 12000 MiB held + 4000 MiB "
                                       f"asked > limit 14 GiB; the pods of namespace {team_b} are in queue org/team-b")
    with pytest.raises(client.ApiException) as refused:
        _pod(admin, team_b, "never", 15000, scheduler=None)
    assert "the request alone needs memory 15000 MiB, over its limit.memory 14 GiB" in _message(refused.value)
    with pytest.raises(client.ApiException) as refused:
        _pod(admin, unknown, "lost", 1000, scheduler=None)
    assert (f"namespace {unknown} names queue 'org/nope' (hami.io/queue), which is not defined (known: "
            "default, org/team-a, org/team-b, team-c)") in _message(refused.value)
    _pod(admin, team_b, "fits", 2000, scheduler=None)  # within the limit: admitted, with our scheduler
    assert _read(admin, team_b, "fits").spec.scheduler_name == SCHED
