"""Small helpers the Kubernetes tests share (fixtures live in tests/conftest.py)."""

from __future__ import annotations

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
