"""Extender mode against the real kube-scheduler (built from the same Kubernetes module as the API server,
into the test cluster's binary: ``hami-k8s-cluster kube-scheduler``): its KubeSchedulerConfiguration is
deploy/k8s/extender.yaml's, with a unique profile, this test's extender URL and leader election off. The
extender runs with the rights of deploy/k8s/rbac.yaml's ServiceAccount: in this process
(``nodeCacheCapable: true``, HTTP) or as the ``hami-ray k8s extender`` command (``nodeCacheCapable:
false``, HTTPS with the test's CA). HAMi's own chart configuration (filter and bind only,
``nodeCacheCapable: true``) is run too: every request carries node names, never Node objects, and the
extender answers from its own watch of the nodes.

kube-scheduler, not hami-ray, decides when a pod is scheduled: a pod with HAMi resources is bound
through the extender with HAMi's annotations to the node that fits, never to the one with too little
device memory; a pod too big for what is left stays Pending with kube-scheduler's FailedScheduling
carrying the extender's reasons, and is bound once the others are deleted; a pod without HAMi resources
is bound by kube-scheduler alone. The verbs' wire shapes and bad input are checked over HTTP."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from hami_ray.core.codec import ALLOCATED_ANNOTATION, RegisteredDevice, decode_pod_devices, encode_node_register
from hami_ray.k8s.annotations import NODE_ANNOTATION, NODE_LABEL, TO_ALLOCATE_ANNOTATION
from hami_ray.k8s.extender import RETRY_ANNOTATION, Extender, ExtenderServer, FilterAnswers, make_server, start
from hami_ray.k8s.nodelock import LOCK_ANNOTATION, PLUGIN_ANNOTATION
from hami_ray.k8s.scheduler import PodScheduler
from tests.helpers import sa_kubeconfig, stop_process, tls_files, wait_for
from tests.k8s.hami_plugin import Kubelet, wait_admitted

pytestmark = pytest.mark.k8s
REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / ".k8s" / "bin" / "hami-k8s-cluster"  # `hami-k8s-cluster kube-scheduler ARGS`: kube-scheduler
DEPLOY = REPO / "deploy" / "k8s" / "extender.yaml"
REGISTER = "hami.io/node-nvidia-register"
HAMI_POD = {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000", "nvidia.com/gpucores": "30"}


def _deployed_config() -> dict[str, Any]:
    """The KubeSchedulerConfiguration of deploy/k8s/extender.yaml's ConfigMap."""
    (configmap,) = [d for d in yaml.safe_load_all(DEPLOY.read_text()) if d and d["kind"] == "ConfigMap"]
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    (ext,) = config["extenders"]
    assert (ext["filterVerb"], ext["prioritizeVerb"], ext["bindVerb"], ext["weight"]) == ("filter", "prioritize",
                                                                                          "bind", 1)
    managed = {m["name"]: m["ignoredByScheduler"] for m in ext["managedResources"]}
    assert all(managed[r] is True for r in HAMI_POD), managed
    return config


def _gpu(prefix: str, mib: int) -> str:
    return f"{prefix}-0,10,{mib},100,NVIDIA-Tesla T4,0,true:"


@pytest.fixture
def nodes(admin: client.ApiClient, namespace: str) -> Iterator[dict[str, str]]:
    """Two kwok nodes with one GPU each: ``big`` (16384 MiB) and ``small`` (2048 MiB), named after the
    namespace (other tests delete every node at their start: these are made here), Ready (kube-scheduler
    needs their allocatable pods), deleted after. The test cluster creates nodes without the not-ready
    taint (TaintNodesByCondition stays off on its API server: nodes start schedulable)."""
    core = client.CoreV1Api(admin)
    made = {"big": f"ext-big-{namespace}", "small": f"ext-small-{namespace}"}
    for size, name in made.items():  # registered by hami-ray's device plugin: `--bind-mode auto` takes no lock
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, annotations={
            "kwok.x-k8s.io/node": "fake", REGISTER: _gpu(f"GPU-{name}", 16384 if size == "big" else 2048),
            PLUGIN_ANNOTATION: "nvidia.com/gpu"})))

    def ready(name: str) -> bool:
        status = core.read_node(name).status
        return bool(status.allocatable and "pods" in status.allocatable and any(
            c.type == "Ready" and c.status == "True" for c in status.conditions or []))

    assert wait_for(lambda: all(ready(n) for n in made.values()), timeout=30), "kwok did not make the nodes Ready"
    yield made
    for name in made.values():
        try:
            core.delete_node(name)
        except client.ApiException:
            pass


@contextmanager
def _extender_in_process(api: client.ApiClient) -> Iterator[ExtenderServer]:
    stop = threading.Event()
    server = start(api, stop, bind="127.0.0.1:0")
    try:
        yield server
    finally:
        stop.set()


@contextmanager
def _extender_command(api: client.ApiClient, tmp_path: Path, cert: Path, key: Path, ca: bytes) -> Iterator[str]:
    """``hami-ray k8s extender`` over HTTPS as the ServiceAccount; its URL once it answers /readyz."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = sa_kubeconfig(api, tmp_path / "extender.kubeconfig")
    log = (tmp_path / "extender.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "hami_ray.cli", "k8s", "extender", "--kubeconfig", str(config),
                             "--bind", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cadata=ca.decode())
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "extender.log").read_text()[-3000:]
            try:
                return urllib.request.urlopen(f"{url}/readyz", timeout=2, context=context).status == 200
            except OSError:
                return False

        assert wait_for(ready, timeout=30, step=0.2), (tmp_path / "extender.log").read_text()[-3000:]
        yield url
    finally:
        stop_process(proc, timeout=10)
        log.close()


@contextmanager
def _kube_scheduler(tmp_path: Path, kubeconfig: Path, name: str, url: str, cache_capable: bool,
                    ca: bytes | None = None, extender: dict[str, Any] | None = None) -> Iterator[None]:
    """The real kube-scheduler with deploy/k8s/extender.yaml's configuration (profile ``name``, the
    extender at ``url``, no leader election, no serving port), stopped by its pid. ``extender``: this
    extenders stanza instead of the deployed one (``urlPrefix`` and ``nodeCacheCapable`` still set here)."""
    if not CLUSTER.exists():
        pytest.fail(f"{CLUSTER} is missing: `make k8s-bin` builds it")
    config = _deployed_config()
    config["clientConnection"] = {"kubeconfig": str(kubeconfig)}
    config["leaderElection"] = {"leaderElect": False}
    config["profiles"] = [{"schedulerName": name}]
    if extender is not None:
        config["extenders"] = [dict(extender)]
    ext = config["extenders"][0]
    ext.update(urlPrefix=url, nodeCacheCapable=cache_capable, httpTimeout="10s")
    if ca is not None:
        ext.update(enableHTTPS=True, tlsConfig={"caData": base64.b64encode(ca).decode()})
    path = tmp_path / "kube-scheduler.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "kube-scheduler.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([str(CLUSTER), "kube-scheduler", "--config", str(path), "--secure-port", "0", "-v", "2"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
        assert proc.poll() is None, log_path.read_text()[-3000:]
    finally:
        stop_process(proc)
        log.close()


def _pod(admin: client.ApiClient, namespace: str, name: str, scheduler: str, limits: dict[str, str] | None,
         annotations: dict[str, str] | None = None) -> str:
    resources = client.V1ResourceRequirements(limits=limits) if limits else None
    pod = client.CoreV1Api(admin).create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, annotations=annotations),
        spec=client.V1PodSpec(scheduler_name=scheduler, containers=[
            client.V1Container(name="main", image="busybox", resources=resources)])))
    return str(pod.metadata.uid)


def _failed_scheduling(admin: client.ApiClient, namespace: str, pod: str) -> list[str]:
    return [e.note or "" for e in client.EventsV1Api(admin).list_namespaced_event(namespace).items
            if e.regarding.name == pod and e.reason == "FailedScheduling"]


@pytest.mark.parametrize("cache_capable", [True, False], ids=["NodeNames-http-in-process", "Nodes-https-command"])
def test_kube_scheduler_schedules_through_the_extender(cache_capable: bool, kubeconfig: Path, admin: client.ApiClient,
                                                       api: client.ApiClient, namespace: str, nodes: dict[str, str],
                                                       tmp_path: Path) -> None:
    core = client.CoreV1Api(admin)
    name = f"hami-ext-{namespace}"
    ca: bytes | None = None
    if cache_capable:
        extender = _extender_in_process(api)
    else:
        ca, cert, key = tls_files(tmp_path)
        extender = _extender_command(api, tmp_path, cert, key, ca)
    with extender as served:
        if isinstance(served, ExtenderServer):
            url = "http://127.0.0.1:%d" % served.server_address[1]
            sched = served.extender.sched
        else:
            url, sched = served, None
        with _kube_scheduler(tmp_path, kubeconfig, name, url, cache_capable, ca):
            fits = [f"fits-{i}" for i in range(3)]
            for pod in fits:
                _pod(admin, namespace, pod, name, HAMI_POD)
            _pod(admin, namespace, "plain", name, None)
            bound = lambda pod: core.read_namespaced_pod(pod, namespace).spec.node_name  # noqa: E731
            assert wait_for(lambda: all(bound(p) for p in fits + ["plain"]), timeout=30), (
                [(p, _failed_scheduling(admin, namespace, p)) for p in fits + ["plain"]],
                (tmp_path / "kube-scheduler.log").read_text()[-3000:])
            uuids = []
            for pod in fits:  # 2048 MiB is too little: the small node is never chosen
                got = core.read_namespaced_pod(pod, namespace)
                annotations = got.metadata.annotations
                assert got.spec.node_name == nodes["big"] == annotations[NODE_ANNOTATION]
                assert annotations[TO_ALLOCATE_ANNOTATION] == annotations[ALLOCATED_ANNOTATION]
                [[device]] = decode_pod_devices(annotations[ALLOCATED_ANNOTATION])
                assert (device.uuid, device.type, device.memory_mib, device.cores) == (
                    f"GPU-{nodes['big']}-0", "NVIDIA", 3000, 30)
                uuids.append(device.uuid)
            plain = core.read_namespaced_pod("plain", namespace)  # kube-scheduler's own binding: no HAMi keys
            assert plain.spec.node_name in nodes.values()
            assert NODE_ANNOTATION not in (plain.metadata.annotations or {})
            if sched is not None:  # bound through the extender: held in its ledger
                usage = sched.ledger.usage(uuids[0])
                assert (usage.memory_mib, usage.cores, usage.slices) == (9000, 90, 3)

            # 16384 - 9000 MiB left on the big GPU, 2048 on the small one: nowhere for 12000
            _pod(admin, namespace, "too-big", name, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "12000"})
            assert wait_for(lambda: _failed_scheduling(admin, namespace, "too-big"), timeout=20)
            note = _failed_scheduling(admin, namespace, "too-big")[0]
            assert "nodes are available" in note and "2 insufficient device memory" in note, note
            assert bound("too-big") is None
            for pod in fits:  # room again: kube-scheduler tries it again, the extender binds it
                core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
            assert wait_for(lambda: bound("too-big"), timeout=30), (tmp_path / "kube-scheduler.log").read_text()[-3000:]
            assert bound("too-big") == nodes["big"]
            [[device]] = decode_pod_devices(
                core.read_namespaced_pod("too-big", namespace).metadata.annotations[ALLOCATED_ANNOTATION])
            assert device.memory_mib == 12000
            # both nodes fit 1000 MiB: the filter answers the one binpack ranks first, the busier one
            _pod(admin, namespace, "packed", name, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"})
            assert wait_for(lambda: bound("packed"), timeout=30)
            assert bound("packed") == nodes["big"]
            log = tmp_path / "kube-scheduler.log"
            for pod in fits + ["plain", "too-big", "packed"]:  # kube-scheduler's own word that it bound them
                assert wait_for(lambda: f'"Successfully bound pod to node" pod="{namespace}/{pod}"' in log.read_text(),
                                timeout=10), pod
            if sched is not None:
                assert wait_for(lambda: sched.ledger.usage(uuids[0]).memory_mib == 13000, timeout=10)
                sched.ledger.check_invariants()
                calls = served.extender.calls  # type: ignore[union-attr]
                # one node in each filter's answer: kube-scheduler scores nothing, prioritize is never asked
                assert calls["bind"] == 5 and calls["prioritize"] == 0 and calls["filter"] >= 6, calls
                assert not served.extender._choices  # type: ignore[union-attr]  # every choice was bound


def test_a_refused_pod_is_tried_again_when_room_frees_after_kube_scheduler_asked(
        kubeconfig: Path, admin: client.ApiClient, api: client.ApiClient, namespace: str, nodes: dict[str, str],
        tmp_path: Path) -> None:
    """The extender's watch sees a deletion after kube-scheduler's does (here held back 3 s; a loaded
    machine did the same): kube-scheduler asks again at once, is refused again, and has no further event to
    try the pod on (it would wait for its 5-minute flush). The extender marks the pod once the room is
    free in its own ledger, and kube-scheduler binds it."""
    core = client.CoreV1Api(admin)
    name = f"hami-retry-{namespace}"
    with _extender_in_process(api) as served, _kube_scheduler(tmp_path, kubeconfig, name,
                                                             "http://127.0.0.1:%d" % served.server_address[1], True):
        extender = served.extender
        bound = lambda pod: core.read_namespaced_pod(pod, namespace).spec.node_name  # noqa: E731
        _pod(admin, namespace, "holder", name, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "15000"})
        assert wait_for(lambda: bound("holder"), timeout=30), (tmp_path / "kube-scheduler.log").read_text()[-3000:]
        _pod(admin, namespace, "waiter", name, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "12000"})
        assert wait_for(lambda: _failed_scheduling(admin, namespace, "waiter"), timeout=20)
        pods = extender.sched.pod_informer
        handler, applied = pods.handler, threading.Event()

        def lagging(kind: str, pod: dict[str, Any]) -> None:  # deletions reach the ledger 3 s late
            if kind == "DELETED":
                threading.Timer(3.0, lambda: (handler(kind, pod), applied.set())).start()
            else:
                handler(kind, pod)

        pods.handler = lagging
        core.delete_namespaced_pod("holder", namespace, grace_period_seconds=0)
        assert wait_for(lambda: bound("waiter"), timeout=45), (tmp_path / "kube-scheduler.log").read_text()[-3000:]
        assert applied.is_set() and bound("waiter") == nodes["big"]
        assert extender.calls["retry"] >= 1, extender.calls
        assert RETRY_ANNOTATION in core.read_namespaced_pod("waiter", namespace).metadata.annotations
        assert not extender._refused  # type: ignore[attr-defined]  # bound: forgotten by the next round
        pods.handler = handler


# HAMi's Helm chart (charts/hami/templates/scheduler/configmap.yaml, ../shared/reference/hami.md 2.1): filter
# and bind, no prioritize, node names only; bench/k8s_bind.py's extender mode runs the same
HAMI_CHART_EXTENDER = {"filterVerb": "filter", "bindVerb": "bind", "weight": 1, "nodeCacheCapable": True,
                       "httpTimeout": "30s", "ignorable": False, "managedResources": [
                           {"name": r, "ignoredByScheduler": True} for r in (*HAMI_POD, "nvidia.com/priority")]}


class _RecordingExtender(Extender):
    """The extender, keeping the arguments of every filter request as kube-scheduler sent them."""

    def __init__(self, sched: PodScheduler) -> None:
        super().__init__(sched)
        self.filtered: list[Any] = []

    def filter(self, args: Any) -> dict[str, Any]:
        self.filtered.append(args)
        return super().filter(args)


def test_hami_chart_configuration_sends_node_names_only(kubeconfig: Path, admin: client.ApiClient,
                                                        api: client.ApiClient, namespace: str,
                                                        nodes: dict[str, str], tmp_path: Path) -> None:
    """kube-scheduler configured as HAMi's chart configures HAMi's extender: every filter request is
    ``{"Pod": ..., "Nodes": null, "NodeNames": [...]}``, no Node object ever comes, and the extender places
    from its own watch of the nodes: both pods on the node with room, none on the one without."""
    stop = threading.Event()
    sched = PodScheduler(api, queue=False)
    sched.follow(stop)
    recorder = _RecordingExtender(sched)
    server = make_server(recorder, "127.0.0.1:0")
    threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True).start()
    core = client.CoreV1Api(admin)
    name = f"hami-chart-{namespace}"
    try:
        assert wait_for(recorder.ready, timeout=30)
        url = "http://127.0.0.1:%d" % server.server_address[1]
        with _kube_scheduler(tmp_path, kubeconfig, name, url, True, extender=HAMI_CHART_EXTENDER):
            for pod in ("chart-a", "chart-b"):
                _pod(admin, namespace, pod, name, HAMI_POD)
            bound = lambda pod: core.read_namespaced_pod(pod, namespace).spec.node_name  # noqa: E731
            assert wait_for(lambda: bound("chart-a") and bound("chart-b"), timeout=30), (
                (tmp_path / "kube-scheduler.log").read_text()[-3000:])
            assert bound("chart-a") == bound("chart-b") == nodes["big"]
        assert recorder.filtered, "kube-scheduler never called filter"
        for args in recorder.filtered:
            assert set(args) == {"Pod", "Nodes", "NodeNames"} and args["Nodes"] is None, sorted(args)
            assert isinstance(args["NodeNames"], list) and all(isinstance(n, str) for n in args["NodeNames"])
        assert any(nodes["small"] in args["NodeNames"] for args in recorder.filtered)  # asked about, by name only
        assert recorder.calls["bind"] == 2 and recorder.calls["prioritize"] == 0, recorder.calls
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_beside_hamis_device_plugin_every_allocate_serves_its_pod(kubeconfig: Path, admin: client.ApiClient,
                                                                   api: client.ApiClient, namespace: str,
                                                                   tmp_path: Path) -> None:
    """The swap the issue asks for: HAMi's chart configuration of kube-scheduler, hami-ray's extender in place of
    HAMi's (``--bind-mode auto``), nodes HAMi's device plugin registered (its JSON register, no hami-ray mark:
    the lock is taken). 2 kwok nodes of 8 GPUs, 16 pods of one GPU created at once (exactly 8 per node), a
    kubelet per node admitting through HAMi's emulated plugin (tests/k8s/hami_plugin.py). Every Allocate
    serves the pod the kubelet admitted with that pod's devices; a node never has two pods between binding
    and Allocate; every pod carries the label; no lock is left; kube-scheduler bound them all."""
    core = client.CoreV1Api(admin)
    names = [f"ext-hami-{i}-{namespace}" for i in range(2)]
    for name in names:
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, annotations={
            "kwok.x-k8s.io/node": "fake", REGISTER: encode_node_register([
                RegisteredDevice(f"GPU-{name}-{g}", 10, 16384, 100, "NVIDIA-Tesla T4", index=g) for g in range(8)])})))
    kubelets = [Kubelet(admin, name) for name in names]
    scheduler = f"hami-chart-lock-{namespace}"
    try:
        assert wait_for(lambda: all(any(c.type == "Ready" and c.status == "True" for c in
                                        core.read_node(n).status.conditions or []) for n in names), timeout=30)
        with _extender_in_process(api) as server:
            url = "http://127.0.0.1:%d" % server.server_address[1]
            for kubelet in kubelets:
                kubelet.start()
            with _kube_scheduler(tmp_path, kubeconfig, scheduler, url, True, extender=HAMI_CHART_EXTENDER):
                ours = {"nvidia.com/use-gpuuuid": ",".join(f"GPU-{n}-{g}" for n in names for g in range(8))}
                for i in range(16):
                    _pod(admin, namespace, f"p{i:02d}", scheduler,
                         {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "10000"}, annotations=ours)
                assert wait_admitted(kubelets, 16, timeout=120), (
                    [len(k.admitted) for k in kubelets], (tmp_path / "kube-scheduler.log").read_text()[-3000:])
            assert not server.extender._choices  # every pod the filter chose was bound
        assert wait_for(lambda: all(LOCK_ANNOTATION not in (core.read_node(n).metadata.annotations or {})
                                    for n in names), timeout=30)  # each Allocate released its lock
    finally:
        for kubelet in kubelets:
            kubelet.stop()
        for name in names:
            try:
                core.delete_node(name)
            except client.ApiException:
                pass
    served = [s for k in kubelets for s in k.served]
    wrong = [s for s in served if not s.right]
    assert len(served) == 16 and not wrong, wrong
    assert [len(k.admitted) for k in kubelets] == [8, 8]
    assert max(k.most_waiting for k in kubelets) == 1  # the lock: one bind -> Allocate in flight per node
    pods = core.list_namespaced_pod(namespace).items
    assert len(pods) == 16 and all(p.metadata.labels.get(NODE_LABEL) == p.spec.node_name in names for p in pods)
    assert all(p.metadata.annotations["hami.io/bind-phase"] == "success" for p in pods)


def _call(url: str, verb: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/{verb}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_the_verbs_on_the_wire(admin: client.ApiClient, api: client.ApiClient, namespace: str,
                               nodes: dict[str, str]) -> None:
    """ExtenderArgs with NodeNames or Nodes, HostPriorityList, ExtenderBindingArgs, capitalised as
    k8s.io/kube-scheduler/extender/v1 has them, and bad input answered, never crashing the server."""
    core = client.CoreV1Api(admin)
    big, small = nodes["big"], nodes["small"]
    with _extender_in_process(api) as server:
        url = "http://127.0.0.1:%d" % server.server_address[1]
        assert urllib.request.urlopen(f"{url}/healthz", timeout=5).read() == b"ok"
        assert urllib.request.urlopen(f"{url}/readyz", timeout=5).status == 200
        pod = {"metadata": {"name": "p", "namespace": namespace, "uid": "u-1"},
               "spec": {"containers": [{"name": "c", "resources": {"limits": HAMI_POD}}]}}

        # `best` (the default): the one node, held for the bind; the nodes that are not there at all said so
        extender = server.extender
        status, answer = _call(url, "filter", {"Pod": pod, "NodeNames": [big, small, "ghost"], "Nodes": None})
        assert status == 200 and answer == {
            "Nodes": None, "NodeNames": [big], "FailedNodes": {},
            "FailedAndUnresolvableNodes": {"ghost": "no valid HAMi register annotation"}, "Error": ""}
        assert extender._choices["u-1"].node == big and extender.sched.inventory.holds("u-1")
        items = [admin.sanitize_for_serialization(core.read_node(n)) for n in (big, small)]
        status, answer = _call(url, "filter", {"Pod": pod, "Nodes": {"metadata": {}, "items": items}, "NodeNames": None})
        assert status == 200 and answer["NodeNames"] is None and answer["Nodes"]["items"] == items[:1]
        assert answer["FailedNodes"] == {} and answer["Error"] == ""
        assert extender.sched.ledger.usage(f"GPU-{big}-0").memory_mib == 3000  # filtered again: held once
        # `fitting`: every node that fits, the others with their reasons, nothing held
        fitting = Extender(extender.sched, answers=FilterAnswers.FITTING)
        other = {**pod, "metadata": {**pod["metadata"], "uid": "u-2"}}
        assert fitting.filter({"Pod": other, "NodeNames": [big, small, "ghost"]}) == {
            "Nodes": None, "NodeNames": [big], "FailedNodes": {small: "insufficient device memory"},
            "FailedAndUnresolvableNodes": {"ghost": "no valid HAMi register annotation"}, "Error": ""}
        assert not extender.sched.inventory.holds("u-2")
        no_devices = {"metadata": {"name": "q", "namespace": namespace}, "spec": {"containers": [{"name": "c"}]}}
        assert _call(url, "filter", {"Pod": no_devices, "NodeNames": [big, small]})[1]["NodeNames"] == [big, small]

        # bind: a pod no scheduler serves, through the verb; the ledger holds it, a later filter sees it
        uid = _pod(admin, namespace, "by-verb", "nobody", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "8000"})
        assert wait_for(lambda: uid in server.extender.sched.pods, timeout=10)
        args = {"PodName": "by-verb", "PodNamespace": namespace, "PodUID": uid, "Node": big}
        assert _call(url, "bind", args) == (200, {"Error": ""})
        got = core.read_namespaced_pod("by-verb", namespace)
        assert got.spec.node_name == big
        [[device]] = decode_pod_devices(got.metadata.annotations[ALLOCATED_ANNOTATION])
        assert (device.uuid, device.memory_mib) == (f"GPU-{big}-0", 8000)
        big_pod = {**pod, "spec": {"containers": [{"name": "c", "resources": {"limits": {
            "nvidia.com/gpu": "1", "nvidia.com/gpumem": "10000"}}}]}}
        assert _call(url, "filter", {"Pod": big_pod, "NodeNames": [big]})[1]["FailedNodes"] == {
            big: "insufficient device memory"}
        # prioritize: binpack puts the busier node first; spread (the pod's annotation) the emptier one
        status, scores = _call(url, "prioritize", {"Pod": pod, "NodeNames": [big, small]})
        assert status == 200 and [set(s) for s in scores] == [{"Host", "Score"}] * 2
        by_host = {s["Host"]: s["Score"] for s in scores}
        assert 10 >= by_host[big] > by_host[small] >= 0, by_host
        spread = {**pod, "metadata": {**pod["metadata"], "annotations": {"hami.io/node-scheduler-policy": "spread"}}}
        by_host = {s["Host"]: s["Score"] for s in _call(url, "prioritize", {"Pod": spread, "NodeNames": [big, small]})[1]}
        assert by_host[small] > by_host[big], by_host

        # refused binds hold nothing: too little room on the node, a pod that is not there
        uid2 = _pod(admin, namespace, "no-room", "nobody", {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000"})
        status, answer = _call(url, "bind", {"PodName": "no-room", "PodNamespace": namespace, "PodUID": uid2,
                                             "Node": small})
        assert status == 200 and "0/1 nodes are available: 1 insufficient device memory" in answer["Error"]
        assert core.read_namespaced_pod("no-room", namespace).spec.node_name is None
        assert not server.extender.sched.inventory.holds(uid2)
        missing = _call(url, "bind", {"PodName": "nope", "PodNamespace": namespace, "PodUID": "x", "Node": big})
        assert missing[0] == 200 and "404" in missing[1]["Error"]

        # bad input: answered, and the server goes on
        assert _call(url, "filter", None, raw=b"{not json")[0] == 400
        for body in ({}, [], {"Pod": pod}, {"Pod": "x", "NodeNames": [big]}, {"Pod": pod, "NodeNames": "big"}):
            status, answer = _call(url, "filter", body)
            assert status == 200 and answer["Error"], (body, answer)
        garbage = {**pod, "spec": {"containers": [{"name": "c", "resources": {"limits": {
            "nvidia.com/gpu": "1", "nvidia.com/gpumem": "lots"}}}]}}
        status, answer = _call(url, "filter", {"Pod": garbage, "NodeNames": [big]})
        assert status == 200 and "nvidia.com/gpumem" in answer["Error"] and answer["NodeNames"] is None
        policy = {**pod, "metadata": {**pod["metadata"], "annotations": {"hami.io/gpu-scheduler-policy": "mutex"}}}
        assert "hami.io/gpu-scheduler-policy" in _call(url, "filter", {"Pod": policy, "NodeNames": [big]})[1]["Error"]
        assert _call(url, "prioritize", {"Pod": garbage, "NodeNames": [big]})[0] == 400
        assert _call(url, "bind", {"PodName": 1})[1]["Error"]
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as raw:  # 1 MiB + 1
            raw.sendall(b"POST /filter HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n")
            assert raw.recv(64).startswith(b"HTTP/1.1 413")
        assert _call(url, "preempt", {})[0] == 404
        assert _call(url, "filter", {"Pod": pod, "NodeNames": [big, small]})[1]["NodeNames"] == [big]
