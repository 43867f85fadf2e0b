"""The time-driven replay (hami_ray.sim.timeline, issue 14): order, preemption after the grace, no double
booking, the figures' definitions, the JSON keys and bad trace rows, on small synthetic traces."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hami_ray.cli import app
from hami_ray.core.model import Device, Node
from hami_ray.sim.timeline import PodRecord, Replay, ReplayResult, select_nodes, team_of
from hami_ray.sim.timeline_report import KEYS, jain, jain_rows, run_timeline, summarize_run
from hami_ray.sim.trace import TimedPod, TraceError, load_nodes, load_timed_pods

POD_COLUMNS = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time," \
              "scheduled_time"


def write_trace(tmp_path: Path, nodes: list[str], pods: list[tuple[str, int, int, str, int, int]]) -> tuple[Path, Path]:
    """Node rows ``"sn,cpu_milli,memory_mib,gpu,model"``; pods ``(name, num_gpu, gpu_milli, qos, created,
    duration)``, each scheduled at once (so it runs ``duration`` seconds)."""
    node_csv = tmp_path / "nodes.csv"
    node_csv.write_text("sn,cpu_milli,memory_mib,gpu,model\n" + "\n".join(nodes) + "\n")
    pod_csv = tmp_path / "pods.csv"
    rows = [f"{name},1000,1024,{num},{milli},,{qos},Running,{created},{created + duration},{created}"
            for name, num, milli, qos, created, duration in pods]
    pod_csv.write_text(POD_COLUMNS + "\n" + "\n".join(rows) + "\n")
    return node_csv, pod_csv


def replay(tmp_path: Path, nodes: list[str], pods: list[tuple[str, int, int, str, int, int]], mode: str,
           seed: int = 42, grace_s: float = 30.0) -> tuple[ReplayResult, dict[str, PodRecord]]:
    node_csv, pod_csv = write_trace(tmp_path, nodes, pods)
    result = Replay(load_nodes(node_csv), load_timed_pods(pod_csv), mode, seed=seed,  # type: ignore[arg-type]
                    grace_s=grace_s, check=True).run()  # check: the ledger's invariants after every event
    return result, {p.name: p for p in result.pods}


def names_in(team: str, seed: int, count: int, prefix: str = "p") -> list[str]:
    """Pod names the seed's hash puts in ``team``."""
    return [n for n in (f"{prefix}{i}" for i in range(1000)) if team_of(n, seed) == team][:count]


ONE_GPU = ["n1,8000,65536,1,T4"]


def test_fifo_serves_in_arrival_order_and_its_head_blocks_smaller_pods(tmp_path: Path) -> None:
    pods = [("a", 1, 1000, "BE", 0, 100), ("b", 1, 1000, "BE", 10, 10), ("c", 1, 500, "LS", 20, 10),
            ("d", 1, 300, "LS", 30, 1000)]  # d's end (1030) is the trace's end
    _, rec = replay(tmp_path, ONE_GPU, pods, "fifo")
    # a holds the GPU until 100; b (whole GPU) then runs 100-110; c and d, though smaller, wait behind b
    assert [rec[n].waited_s for n in "abcd"] == [0, 90, 90, 80]
    assert all(r.runs == 1 and r.preempted == 0 for r in rec.values())
    assert [rec[n].done for n in "abcd"] == [True, True, True, False]  # d runs past the end (110 + 1000)


def test_priority_serves_the_higher_priority_first_without_preempting_an_equal(tmp_path: Path) -> None:
    pods = [("a", 1, 1000, "LS", 0, 100), ("b", 1, 1000, "BE", 10, 1000), ("c", 1, 1000, "LS", 20, 10)]
    result, rec = replay(tmp_path, ONE_GPU, pods, "priority")
    # c (LS) arrives after b (BE) but starts first, at 100 when a ends; LS never preempts LS
    assert (rec["c"].waited_s, rec["b"].waited_s) == (80, 100)
    assert result.preemptions == {"reclaim": 0, "priority": 0}


def test_a_preempted_slice_is_freed_only_after_the_grace_and_its_pod_runs_again(tmp_path: Path) -> None:
    pods = [("be", 1, 1000, "BE", 0, 1000), ("ls", 1, 1000, "LS", 100, 50)]
    result, rec = replay(tmp_path, ONE_GPU, pods, "priority", grace_s=30)
    ls, be = rec["ls"], rec["be"]
    assert result.preemptions["priority"] == 1 and be.preempted == 1
    assert result.outcomes == {"placed": 1, "placed_before": 0, "placed_later": 0, "lost_room": 0}
    assert ls.waited_s == 30  # the notice at 100, the slice free at 130: ls starts then, not before
    assert be.lost_s == 100  # it had run 100 s; it starts again from the beginning
    assert be.waited_s == 180 - 100  # interrupted at 100, back on the GPU when ls ends at 180
    assert be.runs == 2 and be.done is False  # 180 + 1000 is past the trace's end (1000): still running
    # the GPU is never held twice: at most one whole-GPU pod's share at any time
    assert max(result.alloc) == 1000
    rows = dict(zip(result.t, result.alloc))
    assert rows[100] == 1000 and rows[130] == 1000  # during the grace the victim still holds it


def test_fifo_never_preempts(tmp_path: Path) -> None:
    pods = [("be", 1, 1000, "BE", 0, 1000), ("ls", 1, 1000, "LS", 100, 50)]
    result, rec = replay(tmp_path, ONE_GPU, pods, "fifo")
    assert result.preemptions == {"reclaim": 0, "priority": 0}
    assert rec["ls"].waited_s == 900 and rec["ls"].started_s == 1000  # it waits for be's end, at the trace's end


def test_queues_reclaim_from_a_team_borrowing_beyond_its_guarantee(tmp_path: Path) -> None:
    seed = 7
    borrower, owner = names_in("team-0", seed, 4, "b"), names_in("team-1", seed, 1, "o")
    pods = [(n, 1, 1000, "LS", i, 10_000) for i, n in enumerate(borrower)]  # team-0 takes all 4 GPUs
    pods.append((owner[0], 1, 1000, "BE", 100, 50))  # team-1, under its 1-GPU guarantee, even at low priority
    result, rec = replay(tmp_path, ["n1,64000,262144,4,T4"], pods, "queues", seed=seed, grace_s=30)
    assert result.preemptions == {"reclaim": 1, "priority": 0}
    assert rec[owner[0]].waited_s == 30
    victim = max(borrower, key=lambda n: rec[n].preempted)
    assert victim == borrower[-1] and rec[victim].lost_s == 100 - 3  # the youngest of team-0's slices
    assert result.guarantee_milli == 1000  # 4 GPUs over 4 teams


def test_room_a_reclaim_frees_goes_to_the_pod_it_was_for_not_to_another_team(tmp_path: Path) -> None:
    seed = 7
    borrower = names_in("team-0", seed, 6, "a")  # team-0: 6 of the 8 GPUs, 4 beyond its guarantee of 2
    (held, owner), (other,), (third,) = names_in("team-1", seed, 2, "o"), names_in("team-2", seed, 1, "x"), \
        names_in("team-3", seed, 1, "d")
    pods = [(n, 1, 1000, "LS", i, 10_000) for i, n in enumerate(borrower)]
    pods += [(held, 1, 1000, "LS", 6, 10_000), (third, 1, 1000, "LS", 7, 10_000)]  # the node is full
    # team-1 (1 GPU held) reclaims at 100; team-2 (none held, so ahead of team-1 by share) reclaims at 110
    pods += [(owner, 1, 1000, "BE", 100, 500), (other, 1, 1000, "BE", 110, 500)]
    nodes = ["n1,64000,262144,8,T4"]
    result, rec = replay(tmp_path, nodes, pods, "queues", seed=seed, grace_s=30)
    # each gets the GPU its own reclaim freed, when it is freed: 130 and 140
    assert (rec[owner].waited_s, rec[other].waited_s) == (30, 30)  # arrived at 100 and 110
    assert result.preemptions == {"reclaim": 2, "priority": 0}
    assert result.outcomes == {"placed": 2, "placed_before": 0, "placed_later": 0, "lost_room": 0}
    # without nomination, team-2's pod (first by share) takes the GPU freed at 130 for team-1's, which
    # then reclaims a second time, in vain: it is placed at 140 on the GPU team-2's reclaim freed
    node_csv, pod_csv = tmp_path / "nodes.csv", tmp_path / "pods.csv"
    bare = Replay(load_nodes(node_csv), load_timed_pods(pod_csv), "queues", seed=seed, grace_s=30,
                  nomination_s=None, check=True).run()
    rec = {p.name: p for p in bare.pods}
    assert (rec[other].waited_s, rec[owner].waited_s) == (20, 40)
    assert bare.preemptions == {"reclaim": 3, "priority": 0}
    assert bare.outcomes["lost_room"] == 1


def test_a_nomination_expires_and_never_idles_room_behind_a_line_head(tmp_path: Path) -> None:
    # one line (priority): mid-priority "o" preempts "be"; "x" (LS, nothing lower left to preempt) arrives
    # during the grace and heads the line when the GPU is freed at 130: it takes it there and then (o's room
    # is not held from the head of its own line), as it would without nomination
    pods = [("ls0", 1, 1000, "LS", 0, 10_000), ("be", 1, 1000, "BE", 1, 10_000),
            ("o", 1, 1000, "Burstable", 100, 500), ("x", 1, 1000, "LS", 110, 500)]
    nodes = ["n1,64000,262144,2,T4"]
    result, rec = replay(tmp_path, nodes, pods, "priority", grace_s=30)
    assert rec["x"].waited_s == 20 and rec["o"].waited_s > 30
    assert result.outcomes["lost_room"] == 1  # the nomination expired (at 130 + 30) unused
    replay_ = Replay(load_nodes(tmp_path / "nodes.csv"), load_timed_pods(tmp_path / "pods.csv"), "priority",
                     seed=42, grace_s=30)
    replay_.run()
    assert len(replay_.nominations) == 0


def test_a_pod_no_node_could_ever_hold_is_refused_and_blocks_nothing(tmp_path: Path) -> None:
    pods = [("huge", 2, 1000, "LS", 0, 10), ("small", 1, 500, "LS", 1, 10)]
    _, rec = replay(tmp_path, ONE_GPU, pods, "fifo")
    assert "more than any node has" in rec["huge"].refused
    assert rec["small"].waited_s == 0 and rec["small"].done


@pytest.mark.parametrize("mode", ["fifo", "priority", "queues"])
def test_a_random_busy_trace_keeps_the_ledger_consistent(tmp_path: Path, mode: str) -> None:
    rng = random.Random(3)
    pods = []
    for i in range(150):
        num = rng.choice([0, 1, 1, 1, 2])
        milli = 1000 if num != 1 else rng.choice([250, 500, 1000])
        pods.append((f"p{i}", num, milli, rng.choice(["LS", "BE", "Burstable"]), rng.randrange(0, 2000),
                     rng.randrange(1, 600)))
    nodes = ["n1,64000,262144,2,T4", "n2,64000,262144,4,V100M16", "n3,64000,262144,1,T4"]
    result, rec = replay(tmp_path, nodes, pods, mode, grace_s=20)  # check=True: invariants after every event
    assert max(result.alloc) <= 7000 and min(result.alloc) >= 0
    for row_held, row_want in zip(result.held, result.want):
        assert all(0 <= h <= w for h, w in zip(row_held, row_want))
    assert all(r.waited_s >= 0 and r.lost_s >= 0 for r in rec.values())
    assert sum(r.waited_s for r in rec.values()) > 0  # busy enough to make pods wait
    if mode == "fifo":
        assert result.preemptions == {"reclaim": 0, "priority": 0}


def test_team_of_is_stable_salted_and_spreads_names() -> None:
    names = [f"openb-pod-{i:04d}" for i in range(2000)]
    teams = [team_of(n, 42) for n in names]
    assert teams == [team_of(n, 42) for n in names]
    assert all(0.2 < teams.count(f"team-{i}") / len(names) < 0.3 for i in range(4))
    assert sum(a != team_of(n, 43) for a, n in zip(teams, names)) > len(names) / 2  # the seed is the salt


def test_select_nodes_takes_a_seeded_share_of_the_gpus() -> None:
    nodes = [Node(name=f"n{i}") for i in range(3)] + two_gpu_nodes(40)  # CPU-only nodes are never taken
    picked = select_nodes(nodes, 0.25, 5)
    assert sum(len(n.devices) for n in picked) >= 0.25 * 80 and all(n.devices for n in picked)
    assert [n.name for n in picked] == [n.name for n in select_nodes(nodes, 0.25, 5)]
    assert [n.name for n in select_nodes(nodes, 0.5, 5)][:len(picked)] == [n.name for n in picked]
    assert len(select_nodes(nodes, 1.0, 5)) == 40


def two_gpu_nodes(count: int) -> list[Node]:
    return [Node(name=f"g{i}", devices=tuple(Device(uuid=f"g{i}-{j}", index=j, model="T4", memory_mib=16384)
                                             for j in range(2))) for i in range(count)]


def test_jain_and_the_satisfaction_it_is_taken_of() -> None:
    assert jain([1, 1, 1, 1]) == 1.0 and jain([1, 0, 0, 0]) == 0.25
    assert jain([1, 1, 0.5, 1]) == pytest.approx(3.5 ** 2 / (4 * 3.25))
    # guarantee 2 GPUs each; team 0 holds 1 and wants 3 (x = 1/2); team 1 holds 3 of 3 (x = 1); team 2 idle
    index, contended = jain_rows(np.array([[1000, 3000, 0]]), np.array([[3000, 3000, 0]]), 2000)
    assert contended.tolist() == [True] and index[0] == pytest.approx(jain([0.5, 1.0]))


def test_figures_of_a_run_follow_their_definitions(tmp_path: Path) -> None:
    pods = [("be", 1, 1000, "BE", 0, 1000), ("ls", 1, 1000, "LS", 100, 50)]
    result, _ = replay(tmp_path, ONE_GPU, pods, "priority", grace_s=30)
    run = summarize_run(result, start=0.0)
    assert run["preemptions"] == 1 and run["lost_work_s"] == 100
    assert run["allocation_rate"] == 1.0  # the GPU is held from 0 to the end (1000)
    assert run["ls_wait_p50_s"] == 30 and run["be_wait_p99_s"] == 80


def test_the_command_writes_the_keys_other_tools_read(tmp_path: Path) -> None:
    pods = [(f"p{i}", 1, 500 if i % 2 else 1000, "LS" if i % 3 else "BE", 10 * i, 100) for i in range(40)]
    node_csv, pod_csv = write_trace(tmp_path, ["n1,64000,262144,2,T4", "n2,64000,262144,2,T4"], pods)
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    result = CliRunner().invoke(app, ["simulate", "--timeline", "--nodes", str(node_csv), "--pods", str(pod_csv),
                                      "--seeds", "2", "--workers", "1", "--node-fraction", "1",
                                      "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"fifo", "priority", "queues"}
    for mode in data["modes"].values():
        assert set(mode) == set(KEYS)
    assert set(data["per_seed"]["queues"]) == {"42", "43"}
    assert set(data["detail"]["queues"]["queue"]) == {"team-0", "team-1", "team-2", "team-3"}
    assert png.stat().st_size > 10_000


def test_medians_over_seeds_are_what_modes_holds(tmp_path: Path) -> None:
    pods = [(f"p{i}", 1, 1000, "LS" if i % 2 else "BE", 5 * i, 60) for i in range(30)]
    node_csv, pod_csv = write_trace(tmp_path, ["n1,64000,262144,2,T4"], pods)
    data = run_timeline(node_csv, pod_csv, seeds=3, node_fraction=1.0, workers=1)
    for mode, row in data["modes"].items():
        for key in KEYS:
            values = sorted(data["per_seed"][mode][s][key] for s in ("42", "43", "44"))
            assert row[key] == pytest.approx(values[1])


@pytest.mark.parametrize(("row", "words"), [
    ("p1,1000,1024,1,500,,LS,Running,100,50,100", "deleted at 50 before it started at 100"),
    ("p1,1000,1024,1,500,,XX,Running,0,50,0", "unknown qos 'XX'"),
    ("p1,1000,1024,1,500,,LS,Running,,50,0", "no creation_time"),
    ("p1,1000,1024,1,abc,,LS,Running,0,50,0", "not a number"),
])
def test_a_bad_trace_row_is_a_typed_error(tmp_path: Path, row: str, words: str) -> None:
    pods = tmp_path / "bad.csv"
    pods.write_text(POD_COLUMNS + "\n" + row + "\n")
    with pytest.raises(TraceError, match=words):
        load_timed_pods(pods)
    nodes = tmp_path / "nodes.csv"
    nodes.write_text("sn,cpu_milli,memory_mib,gpu,model\n" + ONE_GPU[0] + "\n")
    result = CliRunner().invoke(app, ["simulate", "--timeline", "--nodes", str(nodes), "--pods", str(pods),
                                      "--seeds", "1", "--workers", "1", "--node-fraction", "1"])
    assert result.exit_code == 2 and "error:" in result.output and words.split()[0] in result.output


def test_timed_pod_durations_come_from_the_trace(tmp_path: Path) -> None:
    _, pod_csv = write_trace(tmp_path, ONE_GPU, [("a", 1, 1000, "LS", 5, 20)])
    (pod,) = load_timed_pods(pod_csv)
    assert isinstance(pod, TimedPod) and (pod.creation_s, pod.duration_s, pod.scheduled) == (5, 20, True)


def test_a_pod_never_served_counts_its_wait_until_the_end(tmp_path: Path) -> None:
    pods = [("a", 1, 1000, "LS", 0, 100), ("b", 1, 1000, "LS", 10, 100), ("c", 1, 1000, "LS", 20, 100)]
    result, rec = replay(tmp_path, ONE_GPU, pods, "fifo")
    assert result.end_s == 120  # the trace's last deletion (c's)
    assert (rec["b"].waited_s, rec["b"].runs) == (90, 1)
    assert (rec["c"].waited_s, rec["c"].runs) == (100, 0)  # still waiting at the end: 20 -> 120
    run = summarize_run(result, start=0.0)
    assert run["never_started"] == 1
    # b headed the one line from 10 to 100, c from 100 to the end; a held the GPU all that time
    assert [(w["pod"], w["s"], w["from_s"]) for w in run["longest_head_waits"]] == \
        [("b", 90, 10), ("c", 20, 100)]
    assert run["longest_head_waits"][0]["cluster_held_gpus"] == 1.0
