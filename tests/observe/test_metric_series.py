"""The exporter over the placement actor's own state, as a scrape sees it (issue 15): counters and the
decision-latency histogram only grow between scrapes while placements, releases and enforcement happen, past
the 10,000 decisions the old sliding window kept; and the number of series does not grow with the number of
leases (no label takes a value per lease).

The placement actor's body (:class:`~hami_ray.runtime.placement.PlacementShell`) runs without Ray: its node
actors are fakes that accept every reservation, and a scrape builds the status as its ``_scraped`` does
(``status_from(shell._status())``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hami_ray.core.model import SliceRequest
from hami_ray.observe.metrics import OWNER_KINDS, StatusCollector, owner_kind, registry
from hami_ray.observe.model import status_from
from tests.core.builders import NodeBuilder

Series = tuple[str, tuple[tuple[str, str], ...]]


def shell_with(nodes: dict[str, int], split: int = 10) -> Any:
    """A placement actor body over ``nodes`` (name -> A100 count), whose node actors accept every reservation."""
    from hami_ray.runtime import placement  # noqa: PLC0415 - imports Ray (no cluster is started)

    shell = placement.PlacementShell({"state_root": "/nonexistent"})

    class Reserve:
        @staticmethod
        def remote(**_: Any) -> Any:
            async def accepted() -> dict[str, str]:
                return {}
            return accepted()

    class NodeActor:
        reserve = Reserve

    for name, gpus in nodes.items():
        shell.svc.register_node(NodeBuilder(name).gpus(gpus, "80GiB", "NVIDIA A100-SXM4-80GB", split=split).build(),
                                f"actor-{name}")
        shell._actors[name] = NodeActor()
    return shell


def scrape(shell: Any) -> str:
    collector = StatusCollector(lambda: status_from(shell._status()), shell.decisions)
    return generate_latest(registry(collector)).decode()


def samples(text: str) -> dict[Series, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def cumulative(text: str) -> dict[Series, float]:
    """The samples that may never go down: counters' ``_total`` and histograms' buckets, count and sum."""
    out: dict[Series, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.type in ("counter", "histogram"):
            for s in fam.samples:
                if not s.name.endswith("_created"):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def place(shell: Any, count: int, owner: str = "task:work", memory_mib: int = 8192) -> int:
    """``count`` placement decisions through the actor's own path; how many got a slice."""
    async def run() -> int:
        got = 0
        for _ in range(count):
            got += await shell._try_place(SliceRequest(memory_mib=memory_mib), owner) is not None
        return got
    return asyncio.run(run())


def decision_count(text: str) -> float:
    return samples(text)[("hami_ray_placement_decision_seconds_count", (("zone", "vGPU"),))]


def test_counters_and_the_histogram_only_grow_between_scrapes() -> None:
    shell = shell_with({"node-a": 1, "node-b": 1})
    assert place(shell, 6) == 6
    shell._actions["node-a"] = {"interrupted": 1}
    first = scrape(shell)

    # between the scrapes: slices freed, the cluster filled again, far more decisions than the old window of
    # 10,000 (most find no room), enforcement stopping more slices
    for lease in list(shell.svc.snapshot().leases)[:4]:
        assert shell.svc.release(lease.lease_id, lease.token) is not None
    assert place(shell, 10_500) == 18  # two 80 GiB A100s hold 20 slices of 8 GiB; 2 are still held
    shell._actions["node-a"] = {"interrupted": 2, "killed": 1}
    second = scrape(shell)

    before, after = cumulative(first), cumulative(second)
    assert any(name.endswith("_bucket") for name, _ in before) and any(n.endswith("_total") for n, _ in before)
    went_down = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1.0) < v}
    assert not went_down, went_down
    assert decision_count(first) == 6 and decision_count(second) == 6 + 10_500  # every decision, none dropped
    zone = (("zone", "vGPU"),)
    seconds = ("hami_ray_placement_decision_seconds_sum", zone)
    assert after[seconds] > before[seconds]
    assert after[("hami_ray_enforcement_actions_total", (("action", "killed"), *zone))] == 1
    buckets = sorted(((float(dict(labels)["le"]), v) for (name, labels), v in after.items()
                      if name == "hami_ray_placement_decision_seconds_bucket"))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative over le
    assert buckets[-1] == (float("inf"), 6 + 10_500)
    # the gauges did move with the work (this is not two scrapes of a still cluster)
    active = ("hami_ray_leases", (("state", "active"), *zone))
    assert (samples(first)[active], samples(second)[active]) == (6, 20)


def fill(shell: Any, leases: int) -> list[str]:
    """``leases`` slices, each on the next device, each owned by a name of its own (a new function, pid, pod,
    replica), half of them still reserved, all sampled; every (device, owner kind, state) appears within the
    first 64. Returns the owners' names."""
    uuids = [d.uuid for n in shell.svc.snapshot().nodes for d in n.devices]
    owners = ("task:f{i}", "actor:Model{i}", "driver:{i}", "gang:g{i}[0]", "serve:app/Model#r{i}", "data:Pool{i}",
              "team-a/train-{i}", "probe-{i}")
    names = []
    for i in range(leases):
        owner = owners[(i // len(uuids)) % len(owners)].format(i=i)
        planned = shell.svc.plan(SliceRequest(memory_mib=16, include_uuids=(uuids[i % len(uuids)],)), owner, 1.0)
        if (i // (len(uuids) * len(owners))) % 2:
            shell.svc.confirm(planned.lease)  # the others stay reserved, as before their node actor confirms
        names.append(owner)
    for node in shell.svc.snapshot().nodes:
        shell._usage[node.name] = {"devices": [{"uuid": d.uuid, "used_mib": 1000, "utilization": 10}
                                               for d in node.devices],
                                   "slices": [{"lease_id": x.lease_id, "uuid": x.allocation.devices[0].uuid,
                                               "used_mib": 8} for x in shell.svc.ledger.leases_on(node.name)]}
    return names


def test_series_do_not_grow_with_leases() -> None:
    few_shell = shell_with({"node-a": 2, "node-b": 2}, split=3000)
    many_shell = shell_with({"node-a": 2, "node-b": 2}, split=3000)
    fill(few_shell, 100)
    owners = fill(many_shell, 10_000)
    few, many = samples(scrape(few_shell)), samples(scrape(many_shell))
    leases = {x.lease_id for x in many_shell.svc.snapshot().leases}
    assert len(leases) == 10_000 and len(few_shell.svc.snapshot().leases) == 100

    assert set(many) == set(few)  # the very same series, names and label values, at 100 and 10,000 leases
    values = {v for _, labels in many for _, v in labels}
    assert not values & leases and not values & set(owners)
    kinds = {dict(labels)["owner_kind"] for name, labels in many if name == "hami_ray_slice_memory_allocated_bytes"}
    assert kinds == {*OWNER_KINDS, "other"}
    # summed, not dropped: every slice's memory is in the per-kind series

    def total(metric: str) -> float:
        return sum(v for (name, _), v in many.items() if name == metric)

    assert total("hami_ray_slice_memory_allocated_bytes") == total("hami_vgpu_memory_allocated_bytes") == \
        10_000 * 16 * 2**20
    assert total("hami_ray_slice_memory_used_bytes") == total("hami_vgpu_memory_used_bytes") == 10_000 * 8 * 2**20
    pods = {dict(labels)["namespace"] for name, labels in many
            if name == "hami_vgpu_memory_allocated_bytes" and dict(labels)["pod"] == "pod"}
    assert pods == {"team-a"}  # a pod's slices keep its namespace; its name is no label


@pytest.mark.parametrize(("owner", "kind"), [
    ("task:train", "task"),
    ("actor:Model", "actor"),
    ("driver:4242", "driver"),
    ("gang:ring[3]", "gang"),
    ("serve:app/Model#r3x9", "serve"),
    ("data:Embedder", "data"),
    ("team-a/train-0", "pod"),
    ("probe", "other"),
    ("weird:thing", "other"),  # an unknown prefix is not a new label value either
])
def test_owner_kind(owner: str, kind: str) -> None:
    assert owner_kind(owner) == kind
