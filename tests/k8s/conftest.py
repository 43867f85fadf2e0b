"""Fixtures of the Kubernetes component tests (the cluster, ``admin``, ``api`` and ``namespace`` come from
tests/conftest.py): the device plugin's identity, a kwok node, a kubelet stand-in, the webhook registered
with the API server."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, utils

from hami_ray.k8s.webhook import WebhookServer
from tests.helpers import register_webhook, service_account_client, tls_files, wait_for
from tests.k8s.kubelet import Kubelet

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "k8s" / "device-plugin.yaml"
WEBHOOK_LABEL = "hami-ray-webhook-test"
_seq = itertools.count()


@pytest.fixture(scope="module")
def plugin_api(admin: client.ApiClient, api: client.ApiClient) -> client.ApiClient:
    """The device plugin's identity: deploy/k8s/device-plugin.yaml applied (``api`` applied rbac.yaml and its
    namespace), a token of its ServiceAccount."""
    try:
        utils.create_from_yaml(admin, yaml_objects=list(yaml.safe_load_all(MANIFEST.read_text())))
    except utils.FailToCreateError as failure:
        assert all(exc.status == 409 for exc in failure.api_exceptions), failure
    return service_account_client(admin, "hami-device-plugin", "hami-ray")


@pytest.fixture
def node(admin: client.ApiClient) -> Iterator[str]:
    """A kwok node of this test (labelled ``gpu: "on"``), Ready, deleted at the end (tests that count nodes
    delete every node when they start)."""
    name = f"dp-{next(_seq)}-{os.getpid() % 1000}-{int(time.time() * 1000) % 100000}"
    core = client.CoreV1Api(admin)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(
        name=name, labels={"gpu": "on"}, annotations={"kwok.x-k8s.io/node": "fake"})))
    assert wait_for(lambda: any(c.type == "Ready" and c.status == "True"
                                for c in core.read_node(name).status.conditions or []), timeout=30)
    yield name
    try:
        core.delete_node(name)
    except client.ApiException:
        pass


@pytest.fixture
def kubelet() -> Iterator[Kubelet]:
    plugin_dir = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))  # short: a unix socket path is <= 107 bytes
    stand_in = Kubelet(plugin_dir)
    stand_in.start()
    yield stand_in
    stand_in.stop()
    shutil.rmtree(plugin_dir, ignore_errors=True)


@pytest.fixture
def webhook(admin: client.ApiClient, namespace: str, tmp_path: Path) -> Iterator[tuple[WebhookServer, bytes]]:
    """The webhook on 127.0.0.1 over HTTPS, registered for pod CREATE in ``namespace`` only (by a label)
    with failurePolicy Fail, so that a pod there is created only if the webhook answered."""
    ca, cert, key = tls_files(tmp_path)
    server = WebhookServer("127.0.0.1", 0, str(cert), str(key))
    server.start()
    core = client.CoreV1Api(admin)
    core.patch_namespace(namespace, {"metadata": {"labels": {WEBHOOK_LABEL: "on"}}})
    registrations = client.AdmissionregistrationV1Api(admin)
    name = f"hami-ray-{namespace}"
    register_webhook(registrations, name, server.address[1], ca, WEBHOOK_LABEL)
    try:
        yield server, ca
    finally:
        registrations.delete_mutating_webhook_configuration(name)
        server.shutdown()
        server.server_close()


@pytest.fixture
def nodes(admin: client.ApiClient) -> Iterator[list[str]]:
    """Names of nodes a test creates (append each); every one is deleted at the end."""
    made: list[str] = []
    yield made
    for name in made:
        try:
            client.CoreV1Api(admin).delete_node(name)
        except client.ApiException:
            pass
