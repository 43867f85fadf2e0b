"""A real Kubernetes control plane for the bridge's tests (tests/k8s, and tests/runtime where Ray tasks
and pods share the ledger): etcd and the real kube-apiserver (built from the Kubernetes Go modules by
``make k8s-bin`` into ``.k8s/bin``) with kwok as the kubelet of nodes annotated
``kwok.x-k8s.io/node=fake``, on 127.0.0.1, RBAC on, state in a temp dir; one per test session, started
when a test first asks for it, stopped by its pid at the end.

- ``kubeconfig``: cluster-admin's kubeconfig; ``admin``: a client with it.
- ``api``: a client with exactly the rights of ``deploy/k8s/rbac.yaml``'s ServiceAccount (the bridge's).
- ``namespace``: a fresh namespace (with its default ServiceAccount) per test."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import itertools

import pytest
from hypothesis import settings
from kubernetes import client, config, utils

from tests.helpers import service_account_client, stop_process

REPO = Path(__file__).resolve().parents[1]
RBAC = REPO / "deploy" / "k8s" / "rbac.yaml"
_ns = itertools.count()
# property tests judge results, not speed: on a loaded machine a first example can pass hypothesis's 200 ms
# deadline (a full-suite run failed test_only_invalid_request_escapes that way), so no deadline
settings.register_profile("hami-ray", deadline=None)
settings.load_profile("hami-ray")
BINARY = REPO / ".k8s" / "bin" / "hami-k8s-cluster"
START_TIMEOUT_S = 240.0


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: `make k8s-bin` builds it (`make test` does it for you)")
    state = tmp_path_factory.mktemp("k8s")
    log = (state / "cluster.log").open("wb")
    proc = subprocess.Popen([str(BINARY), "-dir", str(state)], stdout=log, stderr=subprocess.STDOUT)
    config = state / "kubeconfig"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not config.exists():
            if proc.poll() is not None:
                pytest.fail(f"the test cluster exited ({proc.returncode}): {(state / 'cluster.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the test cluster was not ready in {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        yield config
    finally:
        stop_process(proc, timeout=30)
        log.close()


@pytest.fixture(scope="session")
def admin(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="session")
def api(admin: client.ApiClient) -> client.ApiClient:
    """The scheduler's own identity: the ServiceAccount of deploy/k8s/rbac.yaml, with only its rights."""
    utils.create_from_yaml(admin, str(RBAC))
    return service_account_client(admin, "hami-scheduler", "hami-ray")


@pytest.fixture
def namespace(admin: client.ApiClient) -> Iterator[str]:
    """A fresh namespace; its pods are deleted at the end (the test cluster runs no namespace controller),
    so that no later test's scheduler meets them."""
    core = client.CoreV1Api(admin)
    name = f"t-{next(_ns)}-{int(time.time() * 1000) % 100000}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_service_account(name, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default")))
    yield name
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
