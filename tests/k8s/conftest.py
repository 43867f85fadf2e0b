"""A real Kubernetes control plane for the bridge's tests: etcd and the real kube-apiserver (built from
the Kubernetes Go modules by ``make k8s-bin`` into ``.k8s/bin``), on 127.0.0.1, RBAC on, state in a
temp dir; one per test session, stopped by its pid at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()
