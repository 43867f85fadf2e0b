"""Loaders for the Alibaba openb GPU traces (cluster-trace-gpu-v2023), as the FGD artifact reads them.

Nodes: ``sn, cpu_milli, memory_mib, gpu, model``. Pods: ``name, cpu_milli, memory_mib, num_gpu,
gpu_milli, gpu_spec, ...``. A pod's ``gpu_milli`` (1000 = one GPU) becomes, per device, memory =
milli/1000 of the device and cores = milli/10; ``gpu_spec`` (``V100M16|V100M32``) becomes the allowed
device types. Called by :mod:`hami_ray.sim.arrival`, :mod:`hami_ray.sim.timeline` (which also reads
``qos`` and the times) and ``hami-ray simulate``.
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass
from pathlib import Path

from hami_ray.core.errors import InvalidRequest
from hami_ray.core.model import Device, Node, SliceRequest

# Device memory per openb model (MiB). G1-G3 are undisclosed; the artifact assumes 20,000 and 30,000
# MiB for G2 and G3 (its G1 entry says 10,000 in a comment).
MODEL_MEMORY_MIB: dict[str, int] = {
    "P100": 16384, "T4": 16384, "V100M16": 16384, "V100M32": 32768, "A10": 24576,
    "G1": 10000, "G2": 20000, "G3": 30000,
}
SIM_SPLIT_COUNT = 1000  # the artifact has no per-GPU task limit; HAMi's 10 would change the protocol


class TraceError(InvalidRequest):
    """A trace file is missing a column or holds a value that cannot be read."""


@dataclass(frozen=True, slots=True)
class TracePod:
    name: str
    request: SliceRequest
    gpu_milli: int  # per device
    num_gpu: int
    gpu_spec: str

    @property
    def total_milli(self) -> int:
        return self.gpu_milli * self.num_gpu


def _rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise TraceError(str(path), f"missing columns {missing}")
            return list(reader)
    except OSError as exc:
        raise TraceError(str(path), f"cannot read: {exc.strerror}") from None


def _int(row: dict[str, str], key: str, path: Path) -> int:
    text = (row.get(key) or "").strip()
    try:
        return int(float(text)) if text else 0
    except ValueError:
        raise TraceError(f"{path.name}:{key}", f"not a number: {text!r}") from None


def load_nodes(path: str | Path, *, split_count: int = SIM_SPLIT_COUNT) -> list[Node]:
    """Nodes with their devices; the row order is kept, devices are indexed 0..gpu-1."""
    path = Path(path)
    nodes = []
    for row in _rows(path, ("sn", "cpu_milli", "memory_mib", "gpu", "model")):
        model = (row["model"] or "").strip()
        gpus = _int(row, "gpu", path)
        if gpus and model not in MODEL_MEMORY_MIB:
            raise TraceError(f"{path.name}:model", f"unknown GPU model {model!r} (known: {sorted(MODEL_MEMORY_MIB)})")
        devices = tuple(
            Device(uuid=f"{row['sn']}-gpu{i}", index=i, model=model, memory_mib=MODEL_MEMORY_MIB[model],
                   split_count=split_count)
            for i in range(gpus)
        )
        nodes.append(Node(name=row["sn"], devices=devices, cpu_milli=_int(row, "cpu_milli", path),
                          memory_mib=_int(row, "memory_mib", path)))
    return nodes


def pod_request(cpu_milli: int, memory_mib: int, num_gpu: int, gpu_milli: int, gpu_spec: str) -> SliceRequest:
    """The slice request of one trace pod."""
    types = tuple(t for t in gpu_spec.split("|") if t) if gpu_spec else ()
    if num_gpu == 0:
        return SliceRequest(count=0, cpu_milli=cpu_milli, host_memory_mib=memory_mib)
    milli = 1000 if num_gpu > 1 else gpu_milli
    return SliceRequest(count=num_gpu, memory_percent=milli / 10, cores=milli // 10, cpu_milli=cpu_milli,
                        host_memory_mib=memory_mib, include_types=types)


def two_dimensional(pods: list[TracePod]) -> list[TracePod]:
    """A two-dimensional variant of a trace: memory and cores of partial-GPU pods stop moving together.

    Each partial-GPU pod (chosen by a stable hash of its name) stays as it is (1/3), becomes
    memory-heavy (half the cores: an inference server holding a large model, 1/3) or compute-heavy
    (half the memory: a small model run hard, 1/3). A pod's size is then the mean of its memory and
    cores shares, so the simulator's "allocated GPU" counts both dimensions equally.
    """
    out = []
    for pod in pods:
        r = pod.request
        if pod.num_gpu != 1 or pod.gpu_milli >= 1000:
            out.append(pod)
            continue
        kind = zlib.crc32(pod.name.encode()) % 3
        mem_milli, core_milli = pod.gpu_milli, pod.gpu_milli
        if kind == 1:
            core_milli = max(10, pod.gpu_milli // 2)
        elif kind == 2:
            mem_milli = max(10, pod.gpu_milli // 2)
        request = r.model_copy(update={"memory_percent": mem_milli / 10, "cores": core_milli // 10})
        out.append(TracePod(pod.name, request, (mem_milli + core_milli) // 2, pod.num_gpu, pod.gpu_spec))
    return out


def _trace_pod(row: dict[str, str], path: Path) -> TracePod:
    num = _int(row, "num_gpu", path)
    milli = _int(row, "gpu_milli", path) if num else 0
    if num < 0 or milli < 0 or milli > 1000 or (num == 1 and milli == 0):
        raise TraceError(f"{path.name}:{row['name']}", f"bad GPU request num_gpu={num} gpu_milli={milli}")
    if num > 1:
        milli = 1000
    spec = (row.get("gpu_spec") or "").strip()
    request = pod_request(_int(row, "cpu_milli", path), _int(row, "memory_mib", path), num, milli, spec)
    return TracePod(row["name"], request, milli, num, spec)


def load_pods(path: str | Path) -> list[TracePod]:
    """Pods sorted by name (the artifact's ``SetWorkloadPods`` order)."""
    path = Path(path)
    pods = [_trace_pod(row, path) for row in _rows(path, ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"))]
    pods.sort(key=lambda p: p.name)
    return pods


QOS_CLASSES = ("LS", "BE", "Burstable", "Guaranteed")  # the openb traces' qos column
TIMED_COLUMNS = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli", "qos", "creation_time",
                 "deletion_time", "scheduled_time")


@dataclass(frozen=True, slots=True)
class TimedPod:
    """A trace pod with its times, for the time-driven replay (:mod:`hami_ray.sim.timeline`).

    ``duration_s`` is how long it ran in the trace: ``deletion_time - scheduled_time``; a pod the trace
    never scheduled (``scheduled_time`` empty, phase Pending) gets ``deletion_time - creation_time``, the
    time it was wanted, and ``scheduled=False``.
    """

    pod: TracePod
    qos: str
    creation_s: int
    duration_s: int
    scheduled: bool

    @property
    def name(self) -> str:
        return self.pod.name


def load_timed_pods(path: str | Path) -> list[TimedPod]:
    """Pods with qos and times, sorted by (creation time, name).

    Example: ``load_timed_pods(".../openb_pod_list_default.csv")[0].duration_s == 12537496``.

    Raises:
        TraceError: a column is missing; a time is missing or not a number; a pod was scheduled before it
            was created or deleted before it started; the qos is not one of :data:`QOS_CLASSES`.
    """
    path = Path(path)
    out = []
    for row in _rows(path, TIMED_COLUMNS):
        pod = _trace_pod(row, path)
        where = f"{path.name}:{pod.name}"
        for key in ("creation_time", "deletion_time"):
            if not (row.get(key) or "").strip():
                raise TraceError(where, f"no {key}")
        created, deleted = _int(row, "creation_time", path), _int(row, "deletion_time", path)
        scheduled = bool((row.get("scheduled_time") or "").strip())
        start = _int(row, "scheduled_time", path) if scheduled else created
        if created < 0 or start < created:
            raise TraceError(where, f"scheduled at {start} before created at {created}")
        if deleted < start:
            raise TraceError(where, f"deleted at {deleted} before it started at {start}")
        qos = (row.get("qos") or "").strip()
        if qos not in QOS_CLASSES:
            raise TraceError(where, f"unknown qos {qos!r} (known: {', '.join(QOS_CLASSES)})")
        out.append(TimedPod(pod, qos, created, deleted - start, scheduled))
    out.sort(key=lambda p: (p.creation_s, p.name))
    return out
