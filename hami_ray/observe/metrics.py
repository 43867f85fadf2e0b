"""Prometheus metrics of a hami-ray cluster, with HAMi's names and labels where they mean the same thing.

HAMi's scheduler (hami.md 4.1; const label ``zone="vGPU"``): ``hami_gpu_memory_limit_bytes``,
``hami_gpu_core_limit_ratio``, ``hami_gpu_memory_allocated_bytes``, ``hami_gpu_shared_count``,
``hami_gpu_core_allocated_ratio``, ``hami_node_gpu_overview``, ``hami_node_gpu_memory_allocated_ratio``,
``hami_vgpu_memory_allocated_bytes``, ``hami_vgpu_core_allocated_ratio``. Its monitor (4.2):
``hami_host_gpu_memory_used_bytes``, ``hami_host_gpu_utilization_ratio``, ``hami_vgpu_memory_used_bytes``,
``hami_vgpu_memory_limit_bytes``. Ours, ``hami_ray_*``: slice memory allocated vs used, fragmentation, queue
depth, leases by state, enforcement actions, lost leases, and the placement decision latency histogram.

No label takes a new value per lease (DESIGN, Observability; issue 15): a lease id, a driver's pid or a pod's
name would make a new series per lease, which Prometheus keeps for its whole retention. Per-slice detail is
``hami-ray status --json``'s; here slices are summed per device and :func:`owner_kind`. HAMi's per-container
families keep HAMi's label names with bounded values: every slice of one owner kind on one device reads as
one pod (``pod=<owner kind>``, ``container_index="0"``, ``container=<owner kind>``) in namespace ``ray`` (a
Kubernetes pod's slices: the pod's namespace).

:class:`StatusCollector` reads whatever ``source()`` returns at scrape time (the placement actor's latest
view, or one fetched over Ray by ``hami-ray metrics serve``) and the cumulative :class:`DecisionLatency` the
placement actor observes into; :func:`serve` starts the HTTP endpoint.
"""

from __future__ import annotations

import logging
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hami_ray.observe.model import ClusterStatus, SliceStatus

log = logging.getLogger(__name__)

DEFAULT_PORT = 9395  # HAMi's scheduler metrics port
ZONE = {"zone": "vGPU"}
MIB = 1024 * 1024
# Placement decisions take sub-millisecond (binpack, 1,000 nodes) to a few ms (FGD's p99 6.4 ms at 1,000
# nodes, docs/simulation.md); 100 ms and over is a stall worth its own buckets. Seconds, as Prometheus has it.
DECISION_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DECISION_METRIC = "hami_ray_placement_decision_seconds"
OWNER_KINDS = ("task", "actor", "driver", "gang", "serve", "data", "pod")  # and "other"

DEVICE_LABELS = ("node", "device_uuid", "device_index", "device_type")
SLICE_LABELS = ("namespace", "node", "pod", "container_index", "device_uuid")
MONITOR_SLICE_LABELS = ("namespace", "pod", "container", "vdevice_index", "device_uuid")


def _gauge(name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=[*labels, *ZONE])


def owner_kind(owner: str) -> str:
    """The kind of a slice's owner: a label value from :data:`OWNER_KINDS` or ``"other"``, never the name.

    Owners are named ``task:<function>``, ``actor:<class>``, ``driver:<pid>``, ``gang:<name>[<i>]``
    (:mod:`hami_ray.runtime.api`), ``serve:<app>/<deployment>#<replica>`` and ``data:<class>``
    (``hami_ray.runtime.replicas._owner``), and ``<namespace>/<pod>`` for a Kubernetes pod (no colon: a pod
    name is a DNS name).

    Example: ``owner_kind("serve:app/Model#r3x9") == "serve"``, ``owner_kind("team-a/train-0") == "pod"``.
    """
    kind, colon, _ = owner.partition(":")
    if colon:
        return kind if kind in OWNER_KINDS else "other"
    return "pod" if "/" in owner else "other"


def _owner_namespace(owner: str) -> str:
    """HAMi's ``namespace`` label: a pod's own namespace (operators define those: bounded), else ``ray``."""
    return owner.split("/", 1)[0] if owner_kind(owner) == "pod" else "ray"


class DecisionLatency:
    """How long the placement actor takes to place one request, as a cumulative Prometheus histogram:
    its bucket counts, count and sum only grow (until the actor restarts; ``rate()`` handles that reset),
    so ``rate()`` and ``histogram_quantile()`` work over any range.

    The placement actor (``PlacementShell._reserve_planned``) calls :meth:`observe` after each plan;
    :class:`StatusCollector` exposes it. Not in prometheus_client's global registry: each placement actor
    (and each test) has its own.

    Example: ``latency.observe(0.0004)`` counts one decision in the ``le="0.0005"`` bucket and above.
    """

    def __init__(self) -> None:
        self._histogram = Histogram(DECISION_METRIC, "Time to place one request.", labelnames=list(ZONE),
                                    buckets=DECISION_BUCKETS_S, registry=None)
        self._zone = self._histogram.labels(**ZONE)

    def observe(self, seconds: float) -> None:
        self._zone.observe(seconds)

    def collect(self) -> Iterable[Metric]:
        return self._histogram.collect()


class StatusCollector(Collector):
    """Collects from ``source()``: a ClusterStatus, or None (nothing is exported but the build info), and
    from ``decisions`` where given (the placement actor's; ``hami-ray metrics serve`` has none)."""

    def __init__(self, source: Callable[[], ClusterStatus | None], decisions: DecisionLatency | None = None) -> None:
        self.source = source
        self.decisions = decisions

    def collect(self) -> Iterator[Metric]:
        build = _gauge("hami_build_info", "hami-ray build information.", ("version",))
        build.add_metric([_version(), *ZONE.values()], 1)
        yield build
        try:
            status = self.source()
        except Exception:  # noqa: BLE001 - a scrape never fails on one bad fetch; it shows less
            log.exception("metrics source failed")
            status = None
        if status is not None:
            yield from self._cluster(status)
        if self.decisions is not None:
            yield from self.decisions.collect()

    def _cluster(self, status: ClusterStatus) -> Iterator[Metric]:
        z = list(ZONE.values())
        mem_limit = _gauge("hami_gpu_memory_limit_bytes", "Device memory of a GPU.", DEVICE_LABELS)
        core_limit = _gauge("hami_gpu_core_limit_ratio", "Compute of a GPU (percent units).", DEVICE_LABELS)
        mem_alloc = GaugeMetricFamily("hami_gpu_memory_allocated_bytes", "Device memory allocated to slices.",
                                      labels=["node", "device_uuid", "device_index", "device_cores", "device_type",
                                              *ZONE])
        shared = _gauge("hami_gpu_shared_count", "Slices on a GPU.", DEVICE_LABELS)
        core_alloc = _gauge("hami_gpu_core_allocated_ratio", "Compute allocated to slices (percent units).",
                            DEVICE_LABELS)
        overview = GaugeMetricFamily("hami_node_gpu_overview", "Device memory allocated, with the device's limits.",
                                     labels=["node", "device_uuid", "device_index", "device_cores",
                                             "device_memory_limit", "device_type", *ZONE])
        alloc_ratio = _gauge("hami_node_gpu_memory_allocated_ratio", "Allocated over total device memory (0-1).",
                             DEVICE_LABELS)
        used = _gauge("hami_host_gpu_memory_used_bytes", "Device memory in use, as the device reports it.",
                      DEVICE_LABELS)
        util = _gauge("hami_host_gpu_utilization_ratio", "Device compute utilisation (0-100).", DEVICE_LABELS)
        healthy = _gauge("hami_ray_device_healthy", "1 when the device is healthy.", DEVICE_LABELS)
        split = _gauge("hami_ray_device_split_slices", "Slices a GPU may hold at once.", DEVICE_LABELS)
        vmem = _gauge("hami_vgpu_memory_allocated_bytes", "Device memory allocated to the slices of one owner kind "
                      "(pod) on a device.", SLICE_LABELS)
        vcore = _gauge("hami_vgpu_core_allocated_ratio", "Compute allocated to the slices of one owner kind (pod) on "
                       "a device (percent).", SLICE_LABELS)
        vused = _gauge("hami_vgpu_memory_used_bytes", "Device memory the sampled slices of one owner kind (pod) on "
                       "a device use.", MONITOR_SLICE_LABELS)
        vlimit = _gauge("hami_vgpu_memory_limit_bytes", "Device memory limit of the slices of one owner kind (pod) "
                        "on a device.", MONITOR_SLICE_LABELS)
        slice_alloc = _gauge("hami_ray_slice_memory_allocated_bytes", "Device memory allocated to the slices of "
                             "one owner kind and state on a device.", ("node", "device_uuid", "owner_kind", "state"))
        slice_used = _gauge("hami_ray_slice_memory_used_bytes", "Device memory the sampled slices of one owner kind "
                            "and state on a device use.", ("node", "device_uuid", "owner_kind", "state"))
        frag = _gauge("hami_ray_node_fragment_milli", "FGD's fragment amount of a node, milli-GPU.", ("node",))
        states: Counter[str] = Counter()
        for node in status.nodes:
            frag.add_metric([node.name, *z], node.fragment_milli)
            for d in node.devices:
                dl = [node.name, d.uuid, str(d.index), d.model]
                mem_limit.add_metric([*dl, *z], d.memory_mib * MIB)
                core_limit.add_metric([*dl, *z], 100)
                mem_alloc.add_metric([node.name, d.uuid, str(d.index), str(d.cores_allocated), d.model, *z],
                                     d.memory_allocated_mib * MIB)
                shared.add_metric([*dl, *z], d.slice_count)
                core_alloc.add_metric([*dl, *z], d.cores_allocated)
                overview.add_metric([node.name, d.uuid, str(d.index), str(d.cores_allocated),
                                     str(d.memory_mib * MIB), d.model, *z], d.memory_allocated_mib * MIB)
                alloc_ratio.add_metric([*dl, *z], d.memory_allocated_mib / d.memory_mib if d.memory_mib else 0.0)
                healthy.add_metric([*dl, *z], 1 if d.healthy else 0)
                split.add_metric([*dl, *z], d.split_count)
                if d.memory_used_mib is not None:
                    used.add_metric([*dl, *z], d.memory_used_mib * MIB)
                if d.utilization is not None:
                    util.add_metric([*dl, *z], d.utilization)
                for (namespace, kind), group in _held_by(d.slices, _pod_of).items():
                    sl = [namespace, node.name, kind, "0", d.uuid]
                    ml = [namespace, kind, kind, str(d.index), d.uuid]
                    vmem.add_metric([*sl, *z], group.memory_mib * MIB)
                    vcore.add_metric([*sl, *z], group.cores)
                    vlimit.add_metric([*ml, *z], group.memory_mib * MIB)
                    if group.used_mib is not None:
                        vused.add_metric([*ml, *z], group.used_mib * MIB)
                for (kind, state), group in _held_by(d.slices, _kind_state).items():
                    own = [node.name, d.uuid, kind, state]
                    slice_alloc.add_metric([*own, *z], group.memory_mib * MIB)
                    if group.used_mib is not None:
                        slice_used.add_metric([*own, *z], group.used_mib * MIB)
        for lease in status.leases:
            states[str(lease.state.value)] += 1
        yield from (mem_limit, core_limit, mem_alloc, shared, core_alloc, overview, alloc_ratio, used, util,
                    healthy, split, vmem, vcore, vused, vlimit, slice_alloc, slice_used, frag)
        total = status.summary
        fragmentation = _gauge("hami_ray_cluster_fragmentation_ratio",
                               "Fragmented idle GPU share over idle GPU share (FGD), 0-1.", ())
        fragmentation.add_metric(z, total.fragmentation)
        queue = _gauge("hami_ray_queue_depth", "Requests waiting for a slice.", ())
        queue.add_metric(z, total.queue_depth)
        leases = _gauge("hami_ray_leases", "Live leases by state.", ("state",))
        for state in ("reserved", "active"):
            leases.add_metric([state, *z], states.get(state, 0))
        lost = _gauge("hami_ray_leases_lost", "Leases lost with their node (the last 100 kept).", ())
        lost.add_metric(z, len(status.lost))
        enforced = CounterMetricFamily("hami_ray_enforcement_actions", "Slices stopped for overrunning memory.",
                                       labels=["action", *ZONE])
        for action in ("interrupted", "killed"):
            enforced.add_metric([action, *z], status.enforcement.get(action, 0))
        cluster = _gauge("hami_ray_cluster_memory_bytes", "Device memory of the cluster by kind.", ("kind",))
        cluster.add_metric(["capacity", *z], total.memory_mib * MIB)
        cluster.add_metric(["allocated", *z], total.memory_allocated_mib * MIB)
        cluster.add_metric(["used", *z], total.memory_used_mib * MIB)
        grade = _gauge("hami_ray_node_isolation", "1 for the node's best isolation grade (mig > mps > hami-core > "
                       "watchdog > none).", ("node", "isolation"))
        degraded = _gauge("hami_ray_node_enforcement_degraded", "1 while the node actor's enforcement cannot run "
                          "or cannot see processes (see hami-ray status).", ("node",))
        by_grade = _gauge("hami_ray_slices", "Slices by the isolation grade they hold.", ("node", "isolation"))
        for node in status.nodes:
            grade.add_metric([node.name, node.isolation, *z], 1)
            degraded.add_metric([node.name, *z], 0 if node.enforcement == "ok" else 1)
            counts: Counter[str] = Counter()
            seen: set[str] = set()
            for dev in node.devices:
                for held in dev.slices:
                    if held.lease_id not in seen:
                        seen.add(held.lease_id)
                        counts[held.isolation] += 1
            for word, n in sorted(counts.items()):
                by_grade.add_metric([node.name, word, *z], n)
        yield from (fragmentation, queue, leases, lost, enforced, cluster, grade, degraded, by_grade)
        yield from _queues(status, z)


@dataclass
class _Held:
    """What a group of slices on one device holds; ``used_mib`` sums the sampled ones (None: none sampled)."""

    memory_mib: int = 0
    cores: int = 0
    used_mib: int | None = None


def _pod_of(s: SliceStatus) -> tuple[str, str]:
    return _owner_namespace(s.owner), owner_kind(s.owner)


def _kind_state(s: SliceStatus) -> tuple[str, str]:
    return owner_kind(s.owner), s.state


def _held_by(slices: Iterable[SliceStatus],
             key: Callable[[SliceStatus], tuple[str, str]]) -> dict[tuple[str, str], _Held]:
    """The slices of one device summed by ``key`` (bounded label values), in a stable order."""
    groups: dict[tuple[str, str], _Held] = {}
    for s in slices:
        held = groups.setdefault(key(s), _Held())
        held.memory_mib += s.memory_mib
        held.cores += s.cores
        if s.memory_used_mib is not None:
            held.used_mib = (held.used_mib or 0) + s.memory_used_mib
    return dict(sorted(groups.items()))


_QUEUE_AMOUNTS = (("guaranteed", "What the queue gets back by reclaiming when it needs it"),
                  ("limit", "What the queue's subtree never exceeds (absent: unbounded)"),
                  ("used", "What the queue's subtree holds"),
                  ("borrowed", "What the queue holds beyond its guarantee"))
_RESOURCE_UNITS = (("memory_mib", "memory", MIB), ("cores", "cores", 1), ("devices", "devices", 1))


def _queues(status: ClusterStatus, z: list[str]) -> Iterator[Metric]:
    """Per team queue: guaranteed, limit, used, borrowed (by resource: memory in bytes, cores in percent of a
    device, whole devices), waiting requests, and slices preempted from it (a counter since the placement
    actor started). Labels are queue names, which operators define: bounded."""
    amounts = {kind: _gauge(f"hami_ray_queue_{kind}", f"{doc}, by resource (memory in bytes, cores in percent "
                            "of a device, whole devices).", ("queue", "resource")) for kind, doc in _QUEUE_AMOUNTS}
    waiting = _gauge("hami_ray_queue_waiting", "Requests waiting in the queue's subtree.", ("queue",))
    share = _gauge("hami_ray_queue_share", "Weighted dominant share against the guarantee (waiting work of the "
                   "lowest share is served first; above 1: borrowing).", ("queue",))
    preempted = CounterMetricFamily("hami_ray_queue_preempted", "Slices preempted from the queue.",
                                    labels=["queue", *ZONE])
    for q in status.queues:
        for kind, values in (("guaranteed", q.guaranteed), ("limit", q.limit), ("used", q.used),
                             ("borrowed", q.borrowed)):
            for key, word, unit in _RESOURCE_UNITS:
                if kind == "limit" and key not in values:
                    continue
                amounts[kind].add_metric([q.queue, word, *z], values.get(key, 0) * unit)
        waiting.add_metric([q.queue, *z], q.waiting)
        share.add_metric([q.queue, *z], q.share)
        preempted.add_metric([q.queue, *z], q.preempted)
    yield from (*amounts.values(), waiting, share, preempted)


def _version() -> str:
    try:
        return version("hami-ray")
    except PackageNotFoundError:
        return "unknown"


def registry(collector: StatusCollector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def serve(collector: StatusCollector, port: int = DEFAULT_PORT, addr: str = "0.0.0.0") -> tuple[object, int]:  # noqa: S104
    """Serve ``/metrics`` on ``addr:port`` (port 0: any free one) from a thread; returns (server, port)."""
    server, thread = start_http_server(port, addr=addr, registry=registry(collector))
    del thread
    return server, int(server.server_address[1])
