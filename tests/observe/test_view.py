"""The status view rendered to a string console at 80 and 140 columns, for an empty cluster, a busy
one and one of 1,000 nodes; the figures shown are checked against the ledger they came from."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from hami_ray.core.model import SliceRequest
from hami_ray.observe.model import build_status, status_json
from hami_ray.observe.view import render, short_owner
from hami_ray.runtime.service import PlacementService
from tests.core.builders import NodeBuilder


def _text(renderable: object, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _busy() -> tuple[PlacementService, dict[str, object]]:
    svc = PlacementService()
    svc.register_node(NodeBuilder("node-a").gpus(2, "80GiB", "NVIDIA A100-SXM4-80GB").build(), "a")
    svc.register_node(NodeBuilder("node-b").gpus(1, "16GiB", "Tesla T4").build(), "b")
    for owner, mem, cores in (("task:infer", 20480, 25), ("actor:Model", 40960, 50), ("task:train", 8192, 0)):
        plan = svc.plan(SliceRequest(memory_mib=mem, cores=cores), owner, 1.0)
        svc.confirm(plan.lease)
    infer = next(x for x in svc.snapshot().leases if x.owner == "task:infer")
    first = infer.allocation.devices[0]
    usage = {"node-a": {"devices": [{"uuid": first.uuid, "used_mib": 30000, "utilization": 40}],
                        "slices": [{"lease_id": infer.lease_id, "uuid": first.uuid, "used_mib": 25000}]}}
    return svc, usage


@pytest.mark.parametrize("width", [80, 140])
def test_an_empty_cluster(width: int) -> None:
    out = _text(render(build_status(PlacementService().snapshot()), width=width), width)
    assert "0 nodes · 0 devices · 0 leases · queue 0" in out
    assert "no nodes yet" in out
    assert max(len(line) for line in out.splitlines()) <= width


@pytest.mark.parametrize("width", [80, 140])
def test_a_busy_cluster_shows_what_the_ledger_holds(width: int) -> None:
    svc, usage = _busy()
    snap = svc.snapshot()
    status = build_status(snap, usage=usage, fragments=svc.fragments(), queue_depth=0)
    out = _text(render(status, width=width), width)
    assert max(len(line) for line in out.splitlines()) <= width
    assert "2 nodes · 3 devices · 3 leases · queue 0" in out
    for lease in snap.leases:
        assert lease.owner in out and lease.lease_id[-6:] in out
    allocated = sum(g.memory_mib for x in snap.leases for g in x.allocation.devices)
    capacity = sum(d.memory_capacity_mib for n in snap.nodes for d in n.devices)
    assert re.search(rf"allocated \S+ {round(100 * allocated / capacity)}%", out)
    assert status.summary.memory_allocated_mib == allocated
    assert status.summary.memory_used_mib == 30000 and status.summary.sampled_devices == 1
    assert "20/24" in out  # the sampled slice: 20 GiB allocated, 24 GiB (25000 MiB) used
    for node in snap.nodes:
        for d in node.devices:
            held = [g for x in snap.leases for g in x.allocation.devices if g.uuid == d.uuid]
            assert status.device(d.uuid).memory_allocated_mib == sum(g.memory_mib for g in held)
            assert status.device(d.uuid).slice_count == len(held)
            assert f"{len(held)}/{d.split_count}" in out


def test_a_thousand_nodes_are_summarised_and_paged() -> None:
    svc = PlacementService()
    for i in range(1000):
        svc.register_node(NodeBuilder(f"n{i:04d}").gpus(8, "80GiB", "NVIDIA A100-SXM4-80GB").build(), f"a{i}")
    for _ in range(50):
        svc.confirm(svc.plan(SliceRequest(count=2, memory_mib=40960), "task:big", 1.0).lease)
    status = build_status(svc.snapshot(), fragments=svc.fragments())
    for width in (80, 140):
        out = _text(render(status, width=width), width)
        lines = out.splitlines()
        assert len(lines) < 300 and max(len(line) for line in lines) <= width
        assert "1000 nodes · 8000 devices · 50 leases" in out
        assert "by model" in out and "page 1/50 of 1000 nodes" in out
        busiest = max(status.nodes, key=lambda n: sum(d.memory_allocated_mib for d in n.devices))
        assert f"node {busiest.name}" in out
    one = _text(render(status, width=80, node="n0999"), 80)
    assert "node n0999" in one and "page" not in one


def test_json_has_what_scripts_need() -> None:
    svc, usage = _busy()
    data = status_json(build_status(svc.snapshot(), usage=usage))
    node = data["nodes"][0]
    device = node["devices"][0]
    for key in ("uuid", "model", "memory_mib", "memory_allocated_mib", "memory_used_mib", "cores_allocated", "slices"):
        assert key in device
    assert {"lease_id", "owner", "memory_mib", "cores"} <= set(device["slices"][0])
    assert "token" not in str(data)
    assert data["summary"]["devices"] == 3


def test_isolation_grades_and_degraded_enforcement_are_shown() -> None:
    """Each slice's grade, the node's best grade and a degraded node's reason, in the view and the JSON."""
    svc = PlacementService()
    svc.register_node(NodeBuilder("node-m").gpus(1, "80GiB", "NVIDIA H100", isolation="mps",
                                                 whole_isolation="watchdog").build(), "m")
    plan = svc.plan(SliceRequest(memory_mib=8192, cores=30, isolation="mps"), "task:infer", 1.0)
    svc.confirm(plan.lease)
    iso = {"node-m": {"isolation": "mps", "enforcement": "degraded",
                      "reason": "sample: DeviceError: NVML failed while sampling usage: GPU is lost",
                      "mps": {"running": True, "pid": 42, "restarts": 1, "reason": None},
                      "marks": {plan.lease.lease_id: "the MPS daemon died and was restarted at 12:00:00"},
                      "devices": {}}}
    status = build_status(svc.snapshot(), isolation=iso)
    out = _text(render(status, width=100), 100)
    assert "isolation mps" in out and "enforcement degraded" in out
    assert "GPU is lost" in " ".join(out.split())  # the reason is never silent (wrapped to the width)
    assert " mps!" in out and "active" not in out  # the grade, marked (daemon restarted); "active" goes unsaid
    data = status_json(status)
    (node,) = data["nodes"]
    assert (node["isolation"], node["enforcement"]) == ("mps", "degraded")
    (slice_,) = node["devices"][0]["slices"]
    assert slice_["isolation"] == "mps" and "restarted" in slice_["note"]


def test_nodes_read_by_host_and_owners_fit_their_column() -> None:
    """Nodes by their host (Ray's node name) with the start of the Ray id; a Serve replica's owner without
    its application, cut to the column."""
    svc = PlacementService()
    node_id = "3f9c1d2e" + "a" * 48
    svc.register_node(NodeBuilder(node_id).gpus(1, "80GiB", "NVIDIA A100").build(), "a")
    plan = svc.plan(SliceRequest(memory_mib=8192, cores=20), "serve:models/TinyModel#zgqda4co", 1.0)
    svc.confirm(plan.lease)
    status = build_status(svc.snapshot(), isolation={node_id: {"host": "gpu-host-a", "devices": {}}})
    out = _text(render(status, width=80), 80)
    assert "node gpu-host-a (3f9c1d2e)" in out and node_id not in out
    assert "serve:TinyModel#zgq" in out and "models/" not in out
    assert status_json(status)["nodes"][0]["host"] == "gpu-host-a"
    assert short_owner("gang:trainer") == "gang:trainer"
    assert short_owner("data:" + "E" * 40, 12) == "data:EEEEEE…"
    filtered = _text(render(status, width=80, node="gpu-host-a"), 80)
    assert "gpu-host-a" in filtered


TEAMS = """
queues:
  - name: org
    limit: {memory: 160GiB}
  - name: org/a
    guaranteed: {memory: 80GiB, cores: 100, devices: 1}
  - name: org/b
"""


def queued() -> tuple[PlacementService, dict[str, object]]:
    """Two team queues: org/b borrows 60 GiB of the A100s, org/a holds 20 GiB, one request of org/a waits."""
    from hami_ray.core.queues import QueueTree  # noqa: PLC0415

    svc = PlacementService(queues=QueueTree.parse(TEAMS))
    svc.register_node(NodeBuilder("node-a").gpus(2, "80GiB", "NVIDIA A100-SXM4-80GB").build(), "a")
    for owner, mem, queue in (("task:b1", 40960, "org/b"), ("task:b2", 20480, "org/b"), ("task:a1", 20480, "org/a")):
        svc.confirm(svc.plan(SliceRequest(memory_mib=mem, queue=queue), owner, 1.0).lease)
    svc.enqueue(SliceRequest(memory_mib=81920, queue="org/a"), "task:a2", 2.0)
    return svc, {}


@pytest.mark.parametrize("width", [80, 140])
def test_queues_show_guarantee_use_borrowing_and_why_work_waits(width: int) -> None:
    svc, _ = queued()
    data = {"snapshot": svc.snapshot().model_dump(mode="json"), "queue_depth": svc.queue_depth,
            "waiting": svc.waiting(), "queues": svc.queue_rows()}
    from hami_ray.observe.model import status_from  # noqa: PLC0415

    status = status_from(data)
    out = _text(render(status, width=width), width)
    assert max(len(line) for line in out.splitlines()) <= width
    rows = {q.queue: q for q in status.queues}
    assert rows["org/b"].used == {"memory_mib": 61440, "cores": 0, "devices": 0}
    assert rows["org/b"].borrowed["memory_mib"] == 61440 and rows["org/a"].borrowed["memory_mib"] == 0
    assert rows["org"].waiting == 1 and rows["org/a"].waiting == 1
    assert rows["org"].limit == {"memory_mib": 163840}
    assert "queues" in out and "60 GiB" in out  # org/b's use, shown under org
    assert status.waiting[0].queue == "org/a" and "[org/a]" in out
    # org's limit (160 GiB) holds the 80 GiB request back: 80 GiB held + 80 GiB asked is at it, not over
    assert status.waiting[0].reason
    assert status_json(status)["queues"][0]["queue"] == "org"
