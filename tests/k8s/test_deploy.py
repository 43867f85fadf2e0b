"""deploy/k8s against the real API server: every object of every manifest passes the server's own
validation (a server-side dry run: defaulting, schema, admission), including the RayCluster and the
ServiceMonitor against the real CRDs of KubeRay and prometheus-operator (pinned in tests/k8s/crds,
installed here). The components themselves run under these ServiceAccounts in their own tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError

from tests.helpers import wait_for

pytestmark = pytest.mark.k8s
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "k8s"
CRDS = REPO / ".k8s" / "crds"


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def _install_crds(admin: client.ApiClient) -> None:
    extensions = client.ApiextensionsV1Api(admin)
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        try:
            extensions.create_custom_resource_definition(crd)
        except client.ApiException as exc:
            if exc.status != 409:
                raise

        def established(name: str = crd["metadata"]["name"]) -> bool:
            conditions = extensions.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        assert wait_for(established, timeout=30), path.name


def test_every_manifest_passes_the_api_servers_validation(admin: client.ApiClient, api: client.ApiClient) -> None:
    """(``api`` has applied rbac.yaml for real: the namespace hami-ray exists.)"""
    assert CRDS.is_dir(), "make k8s-bin copies the pinned CRDs to .k8s/crds"
    _install_crds(admin)
    dynamic = DynamicClient(admin)
    docs = _docs()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "MutatingWebhookConfiguration", "RayCluster", "ServiceMonitor", "ClusterRole",
            "ServiceAccount"} <= kinds, kinds
    checked = []
    for name, doc in docs:
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        namespace = doc["metadata"].get("namespace")
        try:
            resource.create(body=doc, namespace=namespace, query_params=[("dryRun", "All")])
        except ConflictError:
            pass  # applied for real already (rbac.yaml, by the fixture): validated then
        checked.append(f"{name}:{doc['kind']}/{doc['metadata']['name']}")
    assert len(checked) == len(docs)
    assert client.AppsV1Api(admin).list_namespaced_deployment("hami-ray").items == []  # a dry run: nothing made


def test_a_broken_manifest_is_refused(admin: client.ApiClient) -> None:
    """The check above can fail: the same dry run refuses a RayCluster with a wrong field type."""
    _install_crds(admin)
    dynamic = DynamicClient(admin)
    (cluster,) = [doc for _, doc in _docs() if doc["kind"] == "RayCluster"]
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    resource = dynamic.resources.get(api_version="ray.io/v1", kind="RayCluster")
    with pytest.raises(Exception) as refused:
        resource.create(body=cluster, namespace="hami-ray", query_params=[("dryRun", "All")])
    assert "replicas" in str(refused.value)
