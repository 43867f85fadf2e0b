"""Small helpers the Kubernetes tests share (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kubernetes import client


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, step: float = 0.1) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def sa_kubeconfig(api: client.ApiClient, path: Path) -> Path:
    """A kubeconfig file for ``api``'s bearer token (a ServiceAccount's), for a command run as it."""
    token = api.configuration.api_key["authorization"].removeprefix("Bearer ")
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{api.configuration.host}", certificate-authority: "{api.configuration.ssl_ca_cert}"}}}}]
users: [{{name: u, user: {{token: "{token}"}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    return path


def tls_files(directory: Path, host: str = "127.0.0.1") -> tuple[bytes, Path, Path]:
    """A CA made for the test and a server certificate it signed for ``host`` (an IP address): the CA's
    PEM (for a caBundle), the certificate and key files."""
    import datetime  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hami-ray test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca.public_bytes(serialization.Encoding.PEM), cert_path, key_path


def service_account_client(admin: client.ApiClient, name: str, namespace: str) -> client.ApiClient:
    """A client with a fresh token of the ServiceAccount ``namespace/name`` (TokenRequest API): exactly
    the rights deploy/ gives it."""
    token = client.CoreV1Api(admin).create_namespaced_service_account_token(
        name, namespace, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=["https://kubernetes.default.svc"], expiration_seconds=3600)))
    conf = client.Configuration()
    conf.host = admin.configuration.host
    conf.ssl_ca_cert = admin.configuration.ssl_ca_cert
    conf.api_key = {"authorization": f"Bearer {token.status.token}"}
    return client.ApiClient(conf)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM a process this test started (by its pid), SIGKILL it if it lingers."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def register_webhook(registrations: client.AdmissionregistrationV1Api, name: str, port: int, ca: bytes,
                     label: str) -> None:
    """A MutatingWebhookConfiguration ``name`` sending pod CREATEs in namespaces labelled ``label`` to
    the webhook at 127.0.0.1:``port`` (HTTPS, ``ca``), failurePolicy Fail."""
    registrations.create_mutating_webhook_configuration(client.V1MutatingWebhookConfiguration(
        metadata=client.V1ObjectMeta(name=name),
        webhooks=[client.V1MutatingWebhook(
            name="vgpu.hami-ray.io", admission_review_versions=["v1"], side_effects="None", failure_policy="Fail",
            timeout_seconds=10, reinvocation_policy="Never",
            client_config=client.AdmissionregistrationV1WebhookClientConfig(
                url=f"https://127.0.0.1:{port}/mutate", ca_bundle=base64.b64encode(ca).decode()),
            rules=[client.V1RuleWithOperations(operations=["CREATE"], api_groups=[""], api_versions=["v1"],
                                               resources=["pods"])],
            namespace_selector=client.V1LabelSelector(match_labels={label: "on"}))]))
