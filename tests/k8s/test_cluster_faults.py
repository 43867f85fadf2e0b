"""The test cluster behaves as a real one where issue 15's chaos run needs it (``tests/k8s/chaos_helpers.py``):
kube-controller-manager gives a new namespace its default ServiceAccount, removes a deleted namespace and
collects objects whose owner is gone; the API server, SIGKILLed, is started again by ``hami-k8s-cluster``
and the same kubeconfig (and a ServiceAccount token issued before) works; a kwok node whose heartbeat stops
goes NotReady with the unreachable taint while the others stay Ready, and is Ready again once resumed.

The session shares the cluster: every test here leaves it as it found it (the API server ready, its nodes
deleted, its heartbeats resumed)."""

from __future__ import annotations

import base64
import gc
import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from tests.helpers import wait_for
from tests.k8s.chaos_helpers import (
    UNREACHABLE_TAINT,
    kill_apiserver,
    node_ready,
    node_taints,
    resume_heartbeat,
    stop_heartbeat,
    wait_apiserver_ready,
    wait_node_ready,
    wait_node_taint,
    wait_restarted,
)

pytestmark = pytest.mark.k8s
_seq = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}-{next(_seq)}-{os.getpid() % 1000}-{int(time.time() * 1000) % 100000}"


def _exists(read: Callable[..., object], *args: str) -> bool:
    try:
        read(*args)
        return True
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise


def _default_service_account(core: client.CoreV1Api, namespace: str) -> client.V1ServiceAccount | None:
    try:
        return core.read_namespaced_service_account("default", namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_namespaces_get_their_default_service_account_and_go_when_deleted(admin: client.ApiClient) -> None:
    core = client.CoreV1Api(admin)
    name = _name("sa")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # made by the serviceaccount controller: nothing else makes it (the namespace fixture waits for it)
    assert wait_for(lambda: _default_service_account(core, name), timeout=30)
    # a legacy token Secret is filled by the serviceaccount-token controller, signed with the key the API
    # server verifies with
    core.create_namespaced_secret(name, client.V1Secret(type="kubernetes.io/service-account-token",
        metadata=client.V1ObjectMeta(name="legacy", annotations={"kubernetes.io/service-account.name": "default"})))
    assert wait_for(lambda: (core.read_namespaced_secret("legacy", name).data or {}).get("token"), timeout=30)
    token = base64.b64decode(core.read_namespaced_secret("legacy", name).data["token"]).decode()
    conf = client.Configuration()
    conf.host, conf.ssl_ca_cert = admin.configuration.host, admin.configuration.ssl_ca_cert
    conf.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(conf) as legacy:  # closed: pytest turns a leaked socket into another test's error
        review = client.AuthenticationV1Api(legacy).create_self_subject_review(client.V1SelfSubjectReview())
    assert review.status.user_info.username == f"system:serviceaccount:{name}:default"
    core.delete_namespace(name)
    # the namespace controller empties it, then the API server lets it go
    assert wait_for(lambda: not _exists(core.read_namespace, name), timeout=60)


def test_an_object_whose_owner_is_deleted_is_garbage_collected(admin: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(admin)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="owner")))
    reference = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="dependent", owner_references=[reference])))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="bystander")))
    # background propagation: the API server deletes the owner alone and leaves its dependents to the collector
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
    assert wait_for(lambda: not _exists(core.read_namespaced_config_map, "dependent", namespace), timeout=60)
    assert _exists(core.read_namespaced_config_map, "bystander", namespace)


def test_the_api_server_killed_is_started_again_and_the_same_kubeconfig_works(
        kubeconfig: Path, admin: client.ApiClient, api: client.ApiClient, namespace: str, node: str) -> None:
    """``node`` (a kwok node, tests/k8s/conftest.py) shows that kwok carries on after the restart."""
    try:
        _restart_apiserver(kubeconfig, admin, api, namespace, node)
    finally:
        _collect_dropped_connections()


def _collect_dropped_connections() -> None:
    """Close now what the restart left to the garbage collector: connections of this process's clients
    that were open when the API server died. Left to the collector, they are closed at some later moment,
    and pytest reports the ResourceWarning ("unclosed <ssl.SSLSocket ... raddr=<the API server>>") as an
    error of whatever test runs then (seen once, in the setup of the next test, in the suite next to a
    CPU hog at b2c3d94; not reproduced with a collection after every test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _restart_apiserver(kubeconfig: Path, admin: client.ApiClient, api: client.ApiClient, namespace: str,
                       node: str) -> None:
    state = kubeconfig.parent
    written = kubeconfig.read_text()
    core = client.CoreV1Api(admin)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="before"), data={"kept": "yes"}))
    old = kill_apiserver(state)
    new = wait_restarted(state, "apiserver", old)
    assert new != old
    wait_apiserver_ready(kubeconfig)  # before anything else: the rest of the session needs it
    assert kubeconfig.read_text() == written
    with config.new_client_from_config(config_file=str(kubeconfig)) as fresh:
        assert client.CoreV1Api(fresh).read_namespaced_config_map("before", namespace).data == {"kept": "yes"}

    def works(api_client: client.ApiClient) -> bool:
        try:
            client.CoreV1Api(api_client).list_node()
            return True
        except Exception:  # noqa: BLE001 - a pooled connection of the old process: the next try dials again
            return False

    # the session's clients: admin's token (tokens.csv) and a ServiceAccount token issued before the restart
    # (signed with sa.key, which the new process reads again)
    assert wait_for(lambda: works(admin), timeout=30)
    assert wait_for(lambda: works(api), timeout=30)
    # the controller-manager and kwok found the new process
    other = _name("after-restart")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        assert wait_for(lambda: _default_service_account(core, other), timeout=60)
    finally:
        core.delete_namespace(other)
    wait_node_ready(core, node, True, timeout=60)


@pytest.fixture
def two_nodes(admin: client.ApiClient) -> Iterator[tuple[str, str]]:
    """Two kwok nodes, Ready; at the end their heartbeats resumed and both deleted."""
    core = client.CoreV1Api(admin)
    names = (_name("victim"), _name("witness"))
    for name in names:
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(
            name=name, annotations={"kwok.x-k8s.io/node": "fake"})))
    try:
        for name in names:
            wait_node_ready(core, name, True, timeout=30)
        assert wait_for(lambda: all(_exists(client.CoordinationV1Api(admin).read_namespaced_lease, n,
                                            "kube-node-lease") for n in names), timeout=30)
        yield names
    finally:
        for name in names:
            try:
                resume_heartbeat(core, name)
            except client.ApiException:
                pass
            try:
                core.delete_node(name)
            except client.ApiException:
                pass


def test_a_node_whose_heartbeat_stops_goes_not_ready_and_tainted_and_comes_back(
        admin: client.ApiClient, two_nodes: tuple[str, str]) -> None:
    core = client.CoreV1Api(admin)
    victim, witness = two_nodes
    leases = client.CoordinationV1Api(admin)
    stop_heartbeat(core, victim)
    renewed = leases.read_namespaced_lease(victim, "kube-node-lease").spec.renew_time
    went = wait_node_ready(core, victim, False, timeout=90)
    # the controller-manager's --node-monitor-grace-period (20 s) counts from the last renewal, at most 5 s
    # (kwok's renew interval) and 1 s (stop_heartbeat's settling) before stop_heartbeat returned
    assert went > 10, f"NotReady after {went:.1f} s: sooner than the grace period allows"
    ready = {c.type: c for c in core.read_node(victim).status.conditions}["Ready"]
    assert (ready.status, ready.reason) == ("Unknown", "NodeStatusUnknown")
    wait_node_taint(core, victim, (UNREACHABLE_TAINT, "NoSchedule"), True, timeout=30)
    # nothing renewed it meanwhile, and the other node's heartbeat went on
    assert leases.read_namespaced_lease(victim, "kube-node-lease").spec.renew_time == renewed
    assert node_ready(core, witness) and not {t for t in node_taints(core, witness) if t[0] == UNREACHABLE_TAINT}

    resume_heartbeat(core, victim)
    back = wait_node_ready(core, victim, True, timeout=60)
    assert back < 30, f"Ready again after {back:.1f} s"
    for effect in ("NoSchedule", "NoExecute"):
        wait_node_taint(core, victim, (UNREACHABLE_TAINT, effect), False, timeout=30)
    assert leases.read_namespaced_lease(victim, "kube-node-lease").spec.renew_time > renewed
