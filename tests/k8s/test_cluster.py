"""The test cluster is a real API server: objects persist in etcd, and RBAC decides."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.k8s


def test_objects_round_trip_and_rbac_decides(admin: client.ApiClient) -> None:
    # the session's client: one made here and never closed would leave its TLS socket to the garbage
    # collector, and pytest turns that ResourceWarning into some later test's error
    core = client.CoreV1Api(admin)
    rbac = client.RbacAuthorizationV1Api(admin)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="rbac-check")))
    core.create_namespaced_service_account("rbac-check", client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="reader")))
    rbac.create_namespaced_role("rbac-check", client.V1Role(
        metadata=client.V1ObjectMeta(name="pod-reader"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"])]))
    rbac.create_namespaced_role_binding("rbac-check", client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="reader-reads-pods"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace="rbac-check")]))
    review = client.AuthorizationV1Api(admin)

    def allowed(verb: str, resource: str) -> bool:
        spec = client.V1SubjectAccessReviewSpec(
            user="system:serviceaccount:rbac-check:reader",
            groups=["system:serviceaccounts", "system:serviceaccounts:rbac-check", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(namespace="rbac-check", verb=verb, resource=resource))
        return bool(review.create_subject_access_review(client.V1SubjectAccessReview(spec=spec)).status.allowed)

    assert allowed("list", "pods") and not allowed("create", "pods") and not allowed("list", "secrets")
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert {"default", "kube-system", "rbac-check"} <= names
    with pytest.raises(ApiException) as info:
        core.read_namespace("no-such-namespace")
    assert info.value.status == 404
