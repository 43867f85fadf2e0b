"""The Prometheus exporter: its exposition passes ``promtool check metrics``, HAMi's metric names carry
HAMi's label names (with owner kinds, not owners or leases, as values), a real Prometheus server scrapes it
and answers ``rate()`` and ``histogram_quantile()`` over the decision-latency histogram (the dashboard's own
queries among them), and the Grafana dashboard asks only for metrics it serves. Loopback only.
Counters only growing and series not growing with leases: ``test_metric_series.py``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hami_ray.observe.metrics import OWNER_KINDS, DecisionLatency, StatusCollector, registry, serve
from hami_ray.observe.model import ClusterStatus, build_status
from tests.observe.test_view import _busy

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "hami-ray.json"
HAMI_LABELS = {  # hami.md 4.1 and 4.2, plus the const label zone="vGPU"
    "hami_gpu_memory_limit_bytes": {"node", "device_uuid", "device_index", "device_type"},
    "hami_gpu_core_limit_ratio": {"node", "device_uuid", "device_index", "device_type"},
    "hami_gpu_memory_allocated_bytes": {"node", "device_uuid", "device_index", "device_cores", "device_type"},
    "hami_gpu_shared_count": {"node", "device_uuid", "device_index", "device_type"},
    "hami_gpu_core_allocated_ratio": {"node", "device_uuid", "device_index", "device_type"},
    "hami_node_gpu_overview": {"node", "device_uuid", "device_index", "device_cores", "device_memory_limit",
                               "device_type"},
    "hami_node_gpu_memory_allocated_ratio": {"node", "device_uuid", "device_index", "device_type"},
    "hami_vgpu_memory_allocated_bytes": {"namespace", "node", "pod", "container_index", "device_uuid"},
    "hami_vgpu_core_allocated_ratio": {"namespace", "node", "pod", "container_index", "device_uuid"},
    "hami_host_gpu_memory_used_bytes": {"node", "device_index", "device_uuid", "device_type"},
    "hami_host_gpu_utilization_ratio": {"node", "device_index", "device_uuid", "device_type"},
    "hami_vgpu_memory_used_bytes": {"namespace", "pod", "container", "vdevice_index", "device_uuid"},
    "hami_vgpu_memory_limit_bytes": {"namespace", "pod", "container", "vdevice_index", "device_uuid"},
}


def _exposition() -> bytes:
    svc, usage = _busy()
    status = build_status(svc.snapshot(), usage=usage, fragments=svc.fragments(), queue_depth=2,
                          enforcement={"interrupted": 1})
    return generate_latest(registry(StatusCollector(lambda: status, _decided(0.0003, 0.0008, 0.004))))


def _decided(*seconds: float) -> DecisionLatency:
    latency = DecisionLatency()
    for s in seconds:
        latency.observe(s)
    return latency


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("HAMI_RAY_SKIP_PROMTOOL") == "1":
            pytest.skip("promtool not installed and HAMI_RAY_SKIP_PROMTOOL=1")
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus package")
    return found


def test_promtool_accepts_the_exposition() -> None:
    """It parses; the only lint note is on HAMi's own name ``hami_gpu_shared_count`` (promtool wants no
    ``_count`` suffix outside histograms), kept as HAMi spells it so its dashboards keep working."""
    run = subprocess.run([_promtool(), "check", "metrics"], input=_exposition(), capture_output=True, timeout=60)
    notes = [line for line in (run.stdout + run.stderr).decode().splitlines() if line.strip()]
    assert run.returncode in (0, 3), notes  # 3: lint notes only, no parse error
    assert all(line.startswith("hami_gpu_shared_count ") for line in notes), notes


def test_hami_names_carry_hami_labels() -> None:
    families = {f.name: f for f in text_string_to_metric_families(_exposition().decode())}
    for name, labels in HAMI_LABELS.items():
        family = families.get(name)
        assert family is not None and family.samples, name
        for sample in family.samples:
            assert set(sample.labels) == labels | {"zone"}, (name, sample.labels)
            assert sample.labels["zone"] == "vGPU"
    for name in ("hami_vgpu_memory_allocated_bytes", "hami_vgpu_memory_used_bytes"):  # a pod: an owner kind
        assert {s.labels["pod"] for s in families[name].samples} <= {*OWNER_KINDS, "other"}, name
    allocated = {s.labels["pod"]: s.value for s in families["hami_vgpu_memory_allocated_bytes"].samples}
    assert allocated == {"task": (20480 + 8192) * 2**20, "actor": 40960 * 2**20}  # task:infer + task:train
    limits = {s.labels["device_type"]: s.value for s in families["hami_gpu_memory_limit_bytes"].samples}
    assert limits["Tesla T4"] == 16 * 1024**3
    assert families["hami_ray_queue_depth"].samples[0].value == 2
    assert {s.labels["action"]: s.value for s in families["hami_ray_enforcement_actions"].samples}["interrupted"] == 1


def test_a_real_prometheus_scrapes_it(tmp_path: Path) -> None:
    """Prometheus scrapes every second; each scrape finds ten more decisions of 3 ms, so the histogram's
    ``rate()`` is positive and every quantile lies in the (2.5 ms, 5 ms] bucket: Prometheus answers that,
    for a query of ours and for each of the dashboard's decision-latency queries."""
    binary = shutil.which("prometheus")
    if binary is None:
        _promtool()  # same package: fails (or skips) with the same message
        pytest.skip("prometheus server binary not installed")
    svc, usage = _busy()
    status = build_status(svc.snapshot(), usage=usage)
    latency = DecisionLatency()

    def deciding() -> ClusterStatus:
        for _ in range(10):
            latency.observe(0.003)
        return status

    server, port = serve(StatusCollector(deciding, latency), port=0, addr="127.0.0.1")
    web = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: hami-ray
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
""")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = _answer(web, 'hami_gpu_memory_limit_bytes{zone="vGPU"}', lambda r: len(r) == 3)
        assert len(result) == 3  # three devices, scraped
        t4 = [r for r in result if r["metric"]["device_type"] == "Tesla T4"]  # type: ignore[index]
        assert float(t4[0]["value"][1]) == 16 * 1024**3  # type: ignore[index]

        rate = _value(_answer(web, "rate(hami_ray_placement_decision_seconds_count[5s])", _positive))
        assert rate > 0  # counted between scrapes: the count grows
        p50 = _value(_answer(web, "histogram_quantile(0.5, sum by (le) "
                                  "(rate(hami_ray_placement_decision_seconds_bucket[5s])))", _positive))
        assert 0.0025 < p50 <= 0.005  # 3 ms decisions: the (2.5 ms, 5 ms] bucket
        dashboard = json.loads(DASHBOARD.read_text())
        asked = [t for panel in dashboard["panels"] for t in panel.get("targets", [])
                 if "hami_ray_placement_decision_seconds" in t["expr"]]
        assert {t["legendFormat"] for t in asked} == {"p50", "p99", "mean", "decisions/s"}
        for target in asked:
            answer = _value(_answer(web, target["expr"].replace("$__rate_interval", "5s"), _positive))
            if target["legendFormat"] == "decisions/s":
                assert answer > 0, target
            else:
                assert 0.0025 < answer <= 0.005, target
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]


def _answer(port: int, expr: str, done: Callable[[list[dict[str, object]]], bool],
            timeout: float = 90.0) -> list[dict[str, object]]:
    """What Prometheus answers ``expr``, once ``done(result)`` (polled; scrapes come every second)."""
    deadline = time.monotonic() + timeout
    result: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        try:
            result = _query(port, expr)
        except OSError:  # not listening yet
            result = []
        if done(result):
            return result
        time.sleep(0.5)
    return result


def _positive(result: list[dict[str, object]]) -> bool:
    return len(result) == 1 and _value(result) > 0  # NaN (no rate yet) is not


def _value(result: list[dict[str, object]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])  # type: ignore[index]


def _query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        body = json.loads(response.read())
    return list(body["data"]["result"])


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_dashboard_query_names_a_served_metric() -> None:
    served = {f.name for f in text_string_to_metric_families(_exposition().decode())}
    served |= {f"{name}_bucket" for name in served} | {f"{name}_sum" for name in served} | \
        {f"{name}_count" for name in served} | {f"{name}_total" for name in served}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    for expr in exprs:
        names = set(re.findall(r"\b(hami_[a-z0-9_]+)", expr))
        assert names, expr
        assert names <= served, (expr, names - served)
        assert not re.search(r"\b(lease_id|owner|container_index)\b", expr), expr  # no per-lease series
        if "hami_ray_placement_decision_seconds" in expr:  # cumulative: only its rate over a range means anything
            assert re.search(r"rate\(hami_ray_placement_decision_seconds_(bucket|count|sum)\[", expr), expr


def test_isolation_metrics_per_node() -> None:
    svc, usage = _busy()
    iso = {"node-a": {"enforcement": "degraded", "reason": "sample failed"}, "node-b": {"enforcement": "ok"}}
    status = build_status(svc.snapshot(), usage=usage, isolation=iso)
    text = generate_latest(registry(StatusCollector(lambda: status))).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    zone = ("zone", "vGPU")
    assert samples[("hami_ray_node_enforcement_degraded", (("node", "node-a"), zone))] == 1
    assert samples[("hami_ray_node_enforcement_degraded", (("node", "node-b"), zone))] == 0
    assert samples[("hami_ray_node_isolation", (("isolation", "none"), ("node", "node-a"), zone))] == 1
    held = sum(v for (name, labels), v in samples.items() if name == "hami_ray_slices")
    assert held == len(svc.snapshot().leases) == 3  # every slice counted once, by its grade


def test_queue_metrics_follow_the_queues() -> None:
    from tests.observe.test_view import queued  # noqa: PLC0415
    from hami_ray.observe.model import status_from  # noqa: PLC0415

    svc, _ = queued()
    status = status_from({"snapshot": svc.snapshot().model_dump(mode="json"), "queue_depth": svc.queue_depth,
                          "waiting": svc.waiting(), "queues": svc.queue_rows()})
    text = generate_latest(registry(StatusCollector(lambda: status))).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({**labels, "zone": "vGPU"}.items())))]

    assert value("hami_ray_queue_used", queue="org/b", resource="memory") == 61440 * 2**20
    assert value("hami_ray_queue_borrowed", queue="org/b", resource="memory") == 61440 * 2**20
    assert value("hami_ray_queue_guaranteed", queue="org/a", resource="devices") == 1
    assert value("hami_ray_queue_limit", queue="org", resource="memory") == 160 * 2**30
    assert ("hami_ray_queue_limit", (("queue", "org/a"), ("resource", "memory"), ("zone", "vGPU"))) not in samples
    assert value("hami_ray_queue_waiting", queue="org") == 1
    assert value("hami_ray_queue_preempted_total", queue="org/b") == 0
