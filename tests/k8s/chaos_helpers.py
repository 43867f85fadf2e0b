"""Faults for the Go test cluster (``tests/k8s/cluster``, ``make k8s-bin``), for issue 15's chaos run
(``bench/chaos.py``) and ``tests/k8s/test_cluster_faults.py``: a control-plane process killed and waited
back, and a kwok node whose heartbeat stops (NotReady, tainted) and resumes.

**Processes.** ``hami-k8s-cluster -dir STATE`` runs etcd, the API server, the controller-manager and kwok as
child processes and writes each one's pid to ``STATE/pids/<name>.pid``; a child that dies is started again
on the same port, data and certificates (0.1 s after a child that lived 10 s, backing off to 5 s after one
that keeps dying), so ``STATE/kubeconfig`` stays valid. :func:`kill_apiserver` SIGKILLs the API server,
:func:`wait_restarted` waits for the new pid, :func:`wait_apiserver_ready` for ``/readyz``.

**A node's heartbeat.** kwok renews each node's Lease (``kube-node-lease/<node>``) every 5 s and acts for a
node only while it holds that Lease (kwok's rule for sharing nodes between kwok replicas: a node whose Lease
another holder keeps is "managed elsewhere", and kwok writes neither its Lease, its status nor its pods).
:func:`stop_heartbeat` takes the Lease for :data:`CHAOS_HOLDER` without renewing it (same ``renewTime``, a
day's duration so that kwok does not take it back), which is what a kubelet cut off from the API server
looks like: after the controller-manager's ``--node-monitor-grace-period`` (20 s; it polls every 2 s) the
node lifecycle controller sets Ready (and the pressure conditions) to ``Unknown`` and taints the node
``node.kubernetes.io/unreachable:NoSchedule``, then ``:NoExecute`` (at 0.1 nodes/s, and only while the
zone is not fully or mostly disrupted: a cluster whose every node is NotReady gets no NoExecute taint,
as upstream). :func:`resume_heartbeat` lets the Lease go (no holder): kwok takes it at its next renewal
(at most 5 s), manages the node again and reports it Ready; the controller lifts the taints. Measured:
NotReady 18-20 s after the stop, both taints within 0.2 s of it; Ready 0.2-5 s after the resume, the
taints gone 2-6 s after it. Removing the ``kwok.x-k8s.io/node`` annotation would not do: kwok keeps
renewing the Leases it holds.

kwok also posts the node's status on its own about every 10 minutes (its ``node-heartbeat-with-lease``
stage), a job queued for the node when kwok last saw it change. :func:`stop_heartbeat` changes the node
(an annotation, :data:`HEARTBEAT_ANNOTATION`) and gives kwok :data:`SETTLE_S` to see it before taking the
Lease, so that job is 10 minutes away: a stop of less than 10 minutes sees no stray Ready; a longer one
sees the node Ready once for the grace period, then Unknown again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from kubernetes import client, config
from kubernetes.client import ApiException

CHILDREN = ("etcd", "apiserver", "controller-manager", "kwok")
NODE_LEASE_NAMESPACE = "kube-node-lease"
CHAOS_HOLDER = "hami-ray-chaos"
HEARTBEAT_ANNOTATION = "chaos.hami-ray.io/heartbeat"
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"
HELD_LEASE_S = 86_400  # kwok takes a Lease back only once renewTime + this has passed
SETTLE_S = 1.0  # kwok handles a node update in milliseconds; this leaves room on a loaded machine


def pid_of(state_dir: Path, name: str) -> int:
    """The pid of the cluster's child ``name`` (one of :data:`CHILDREN`) now.

    Example: ``pid_of(kubeconfig.parent, "apiserver")``. Raises FileNotFoundError before it first started."""
    return int((Path(state_dir) / "pids" / f"{name}.pid").read_text())


def kill_child(state_dir: Path, name: str, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to the child ``name``; its pid (the supervisor starts a new one: :func:`wait_restarted`)."""
    pid = pid_of(state_dir, name)
    os.kill(pid, sig)
    return pid


def kill_apiserver(state_dir: Path) -> int:
    """SIGKILL the API server (clients see refused connections until it is back); its pid."""
    return kill_child(state_dir, "apiserver")


def wait_restarted(state_dir: Path, name: str, old_pid: int, timeout: float = 30.0) -> int:
    """Wait until the supervisor has started ``name`` again (a live pid other than ``old_pid``); the new pid.

    Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = pid_of(state_dir, name)
            if pid != old_pid:
                os.kill(pid, 0)
                return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{name} was not started again in {timeout:.0f} s (old pid {old_pid})")


def wait_apiserver_ready(kubeconfig: Path, timeout: float = 120.0) -> float:
    """Wait until the API server of ``kubeconfig`` answers ``/readyz`` with 200; the seconds waited.

    A fresh client per try, as a new process would have (one made before the restart recovers too: its
    broken connections are dropped and dialled again). Raises TimeoutError."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < timeout:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        try:
            method, url, headers, _, _ = api.param_serialize("GET", "/readyz", auth_settings=["BearerToken"])
            resp = api.call_api(method, url, header_params=headers, _request_timeout=2)
            if resp.status == 200:
                return time.monotonic() - start
            last = f"{resp.status} {resp.read()[-300:]!r}"
        except Exception as exc:  # noqa: BLE001 - refused, reset, 500 while it starts: all mean "not yet"
            last = exc
        finally:
            api.close()
        time.sleep(0.1)
    raise TimeoutError(f"the API server was not ready in {timeout:.0f} s: {last}")


def _leases(core_api: client.CoreV1Api) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(core_api.api_client)


def stop_heartbeat(core_api: client.CoreV1Api, node: str) -> None:
    """Stop the heartbeat of kwok node ``node`` (its Lease and status) until :func:`resume_heartbeat`.

    Example: ``stop_heartbeat(core, "n1"); wait_node_ready(core, "n1", False, timeout=60)``.
    Raises ApiException (404: the node has no Lease yet, kwok has not taken it up)."""
    core_api.patch_node(node, {"metadata": {"annotations": {HEARTBEAT_ANNOTATION: "stopped"}}})
    time.sleep(SETTLE_S)
    leases = _leases(core_api)
    while True:
        lease = leases.read_namespaced_lease(node, NODE_LEASE_NAMESPACE)
        lease.spec.holder_identity = CHAOS_HOLDER
        lease.spec.lease_duration_seconds = HELD_LEASE_S
        try:  # renew_time unchanged: the node lifecycle controller sees no renewal
            leases.replace_namespaced_lease(node, NODE_LEASE_NAMESPACE, lease)
            return
        except ApiException as exc:
            if exc.status != 409:  # 409: kwok renewed it meanwhile, take the new one
                raise


def resume_heartbeat(core_api: client.CoreV1Api, node: str) -> None:
    """Give ``node``'s Lease back to kwok (no holder): kwok takes it within 5 s and reports the node Ready.

    Example: ``resume_heartbeat(core, "n1"); wait_node_ready(core, "n1", True, timeout=60)``."""
    leases = _leases(core_api)
    while True:
        lease = leases.read_namespaced_lease(node, NODE_LEASE_NAMESPACE)
        if lease.spec.holder_identity != CHAOS_HOLDER:
            break
        lease.spec.holder_identity = None
        try:
            leases.replace_namespaced_lease(node, NODE_LEASE_NAMESPACE, lease)
            break
        except ApiException as exc:
            if exc.status != 409:
                raise
    core_api.patch_node(node, {"metadata": {"annotations": {HEARTBEAT_ANNOTATION: None}}})


def node_ready(core_api: client.CoreV1Api, node: str) -> bool:
    """Whether ``node``'s Ready condition is True (False, Unknown and none are not)."""
    conditions = core_api.read_node(node).status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def node_taints(core_api: client.CoreV1Api, node: str) -> set[tuple[str, str]]:
    """``node``'s taints as (key, effect) pairs."""
    return {(t.key, t.effect) for t in core_api.read_node(node).spec.taints or []}


def wait_node_ready(core_api: client.CoreV1Api, node: str, ready: bool, timeout: float = 60.0) -> float:
    """Wait until ``node`` is Ready (``ready``) or not; the seconds waited. Raises TimeoutError.

    Example: ``wait_node_ready(core, "n1", False, timeout=60)`` after :func:`stop_heartbeat` returns about 20."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if node_ready(core_api, node) == ready:
            return time.monotonic() - start
        time.sleep(0.2)
    raise TimeoutError(f"node {node} was not {'Ready' if ready else 'NotReady'} in {timeout:.0f} s")


def wait_node_taint(core_api: client.CoreV1Api, node: str, taint: tuple[str, str], present: bool,
                    timeout: float = 30.0) -> float:
    """Wait until ``node`` has the (key, effect) ``taint`` (``present``) or not; the seconds waited.

    Raises TimeoutError."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if (taint in node_taints(core_api, node)) == present:
            return time.monotonic() - start
        time.sleep(0.2)
    raise TimeoutError(f"node {node} {'never got' if present else 'kept'} the taint {taint} in {timeout:.0f} s")
