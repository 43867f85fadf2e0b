"""The openb simulator: trace loading, the artifact's workload protocol, metrics, CLI and JSON keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hami_ray.cli import app
from hami_ray.core.model import Device, Node
from hami_ray.sim.arrival import RunResult, prepare_workload, run
from hami_ray.sim.experiment import paired_diff, run_experiment, seed_spread
from hami_ray.sim.trace import TraceError, load_nodes, load_pods, pod_request

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "openb-v2023"
NODES = TRACES / "openb_node_list_gpu_node.csv"
DEFAULT = TRACES / "openb_pod_list_default.csv"


def test_trace_loads_the_papers_cluster() -> None:
    nodes = load_nodes(NODES)
    assert len(nodes) == 1213
    assert sum(len(n.devices) for n in nodes) == 6212  # reference/fgd.md 4.2
    g2 = next(n for n in nodes if n.devices and n.devices[0].model == "G2")
    assert g2.devices[0].memory_mib == 20000


def test_pod_request_maps_milli_to_memory_and_cores() -> None:
    r = pod_request(8000, 1024, 1, 470, "V100M16|V100M32")
    assert (r.count, r.memory_percent, r.cores, r.cpu_milli) == (1, 47.0, 47, 8000)
    assert r.include_types == ("V100M16", "V100M32")
    whole = pod_request(8000, 0, 4, 1000, "")
    assert (whole.count, whole.cores) == (4, 100)
    assert pod_request(1000, 0, 0, 0, "").count == 0


def test_bad_trace_gets_a_typed_error(tmp_path: Path) -> None:
    bad = tmp_path / "pods.csv"
    bad.write_text("name,cpu_milli,memory_mib,num_gpu,gpu_milli\np1,abc,0,1,500\n")
    with pytest.raises(TraceError, match="cpu_milli"):
        load_pods(bad)
    missing = tmp_path / "nodes.csv"
    missing.write_text("sn,cpu_milli\nn1,1000\n")
    with pytest.raises(TraceError, match="missing columns"):
        load_nodes(missing)
    unknown = tmp_path / "nodes2.csv"
    unknown.write_text("sn,cpu_milli,memory_mib,gpu,model\nn1,1000,1000,2,Z9\n")
    with pytest.raises(TraceError, match="unknown GPU model"):
        load_nodes(unknown)


def test_workload_is_shuffled_then_inflated_to_130_percent() -> None:
    pods = load_pods(DEFAULT)
    capacity = 6212 * 1000
    workload = prepare_workload(pods, capacity, seed=42)
    total = sum(p.total_milli for p in workload)
    assert 1.29 * capacity < total <= 1.3 * capacity
    assert {p.name for p in workload[: len(pods)]} == {p.name for p in pods}  # original pods first
    assert [p.name for p in workload[:20]] != [p.name for p in pods[:20]]  # shuffled
    assert prepare_workload(pods, capacity, seed=42) == workload  # seeded


def tiny_cluster() -> list[Node]:
    return [Node(name=f"n{i}", cpu_milli=32000, memory_mib=65536,
                 devices=tuple(Device(uuid=f"n{i}-g{j}", index=j, model="T4", memory_mib=16384,
                                      split_count=1000) for j in range(2)))
            for i in range(4)]


def test_run_never_overcommits_and_counts_failures() -> None:
    pods = [p for p in load_pods(DEFAULT)[:400]]
    result = run(tiny_cluster(), pods, "fgd", seed=1)
    assert result.pods > 0
    assert max(result.alloc_pct) <= 100.0
    assert result.failed > 0  # 8 GPUs cannot hold 130 % of themselves
    curve = result.curve()
    assert all(0.0 <= v <= 100.0 for v in curve.values())


def test_curve_uses_the_artifacts_discrete_merge() -> None:
    r = RunResult("x", 1, arrived_pct=[99.4, 99.6, 100.4, 100.6], alloc_pct=[90.0, 92.0, 94.0, 96.0])
    # events rounding to 100: 99.6 and 100.4 -> mean alloc 93 -> 7 % unallocated
    assert r.curve()[100] == pytest.approx(7.0)


@pytest.mark.slow
def test_experiment_json_keys_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    plot = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["simulate", "--nodes", str(NODES), "--pods", str(DEFAULT),
                                      "--policies", "random,default", "--seeds", "1", "--json", str(out),
                                      "--plot", str(plot), "--workers", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for policy in ("random", "default"):
        at = data[policy]["unallocated_pct_at"]
        assert set(at) == {"90", "100", "110", "130"}
        assert set(data[policy]["per_seed"]) == {"42"}
        assert "100" in data[policy]["curve"]
        one = data[policy]["seed_spread_at"]["100"]  # one seed: the interval is the value itself
        assert one["min"] == one["median"] == one["max"] == data[policy]["per_seed"]["42"]["100"]
        assert "vs_baseline" not in data[policy]  # no fgd among the policies: no default baseline
    assert data["meta"]["baseline"] is None
    assert data["runtime_s"] > 0
    assert plot.stat().st_size > 10_000
    # the random baseline lands near the artifact's 13.75 % even on one seed
    assert 11.0 < data["random"]["unallocated_pct_at"]["100"] < 16.5


def test_cli_rejects_unknown_policy() -> None:
    result = CliRunner().invoke(app, ["simulate", "--policies", "best-ever"])
    assert result.exit_code != 0
    assert "unknown policy" in result.output


def test_run_experiment_rejects_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.csv"
    bad.write_text("nope\n")
    with pytest.raises(TraceError):
        run_experiment(NODES, bad, ["random"], 1, workers=1)


def _run(seed: int, unallocated_at_100: float) -> RunResult:
    """A run whose curve is ``unallocated_at_100`` at 100 % arrived (and 90 % at 90 %)."""
    return RunResult("p", seed, arrived_pct=[90.0, 100.0], alloc_pct=[10.0, 100.0 - unallocated_at_100])


def test_seed_spread_is_min_median_max() -> None:
    assert seed_spread([4.9, 4.5, 4.7, 5.3]) == {"min": 4.5, "median": 4.8, "max": 5.3}
    assert seed_spread([]) is None


def test_paired_diff_subtracts_the_baseline_seed_by_seed() -> None:
    mine = [_run(42, 4.0), _run(43, 5.0), _run(44, 6.0)]
    base = [_run(44, 5.5), _run(42, 4.0), _run(43, 5.5)]  # order of completion does not matter
    d = paired_diff(mine, base)["100"]
    assert d is not None
    assert (d["min"], d["median"], d["max"]) == (pytest.approx(-0.5), pytest.approx(0.0), pytest.approx(0.5))
    assert (d["below"], d["tie"], d["above"]) == (1, 1, 1)
    assert paired_diff(mine, base)["130"] is None  # no run reached 130 %


def _small_trace(tmp_path: Path) -> tuple[Path, Path]:
    """The first 100 GPU nodes (200 P100) and the first 600 pods of the default trace."""
    nodes, pods = tmp_path / "nodes.csv", tmp_path / "pods.csv"
    nodes.write_text("".join(NODES.read_text().splitlines(keepends=True)[:101]))
    pods.write_text("".join(DEFAULT.read_text().splitlines(keepends=True)[:601]))
    return nodes, pods


def test_experiment_reports_the_spread_and_the_paired_differences(tmp_path: Path) -> None:
    nodes, pods = _small_trace(tmp_path)
    data = run_experiment(nodes, pods, ["random", "fgd"], 4, workers=1, baseline="fgd")
    meta = data["meta"]
    assert isinstance(meta, dict) and meta["baseline"] == "fgd" and "min and max" in meta["spread"]
    runs = {p: data[p] for p in ("random", "fgd")}
    for policy, summary in runs.items():
        assert isinstance(summary, dict)
        for point in ("90", "100"):
            values = [v[point] for v in summary["per_seed"].values()]
            assert None not in values
            spread = summary["seed_spread_at"][point]
            assert (spread["min"], spread["max"]) == (min(values), max(values))
            assert spread["median"] == pytest.approx(summary["unallocated_pct_at"][point], abs=1e-3)
    random, fgd = runs["random"], runs["fgd"]
    assert isinstance(random, dict) and isinstance(fgd, dict)
    assert "vs_baseline" not in fgd
    pair = random["vs_baseline"]
    assert pair["baseline"] == "fgd"
    diffs = [random["per_seed"][s]["100"] - fgd["per_seed"][s]["100"] for s in ("42", "43", "44", "45")]
    d100 = pair["diff_at"]["100"]
    assert (d100["min"], d100["max"]) == (pytest.approx(min(diffs), abs=1e-3), pytest.approx(max(diffs), abs=1e-3))
    assert d100["below"] + d100["tie"] + d100["above"] == 4
    assert d100["below"] == sum(x <= -0.005 for x in diffs)
    with pytest.raises(ValueError, match="baseline"):
        run_experiment(nodes, pods, ["random"], 1, workers=1, baseline="fgd")


def test_cli_prints_intervals_and_the_paired_table(tmp_path: Path) -> None:
    nodes, pods = _small_trace(tmp_path)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["simulate", "--nodes", str(nodes), "--pods", str(pods), "--policies",
                                      "random,fgd", "--seeds", "3", "--workers", "1", "--json", str(out)],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["meta"]["baseline"] == "fgd"  # fgd among several policies: the default baseline
    spread = data["random"]["seed_spread_at"]["100"]
    assert "median [min, max] of 3 seeds" in result.output
    assert f"{spread['median']:.2f} [{spread['min']:.2f}, {spread['max']:.2f}]" in result.output
    d = data["random"]["vs_baseline"]["diff_at"]["100"]
    assert "Against fgd, seed by seed" in result.output
    assert f"{d['below']}/{d['tie']}/{d['above']}" in result.output
    bad = CliRunner().invoke(app, ["simulate", "--nodes", str(nodes), "--pods", str(pods), "--policies",
                                   "random,fgd", "--baseline", "bestfit"])
    assert bad.exit_code != 0
    assert "not among --policies" in bad.output
