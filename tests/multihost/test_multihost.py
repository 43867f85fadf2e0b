"""hami-ray on a real multi-host cluster: three Ray hosts and a drivers' host, each its own network and
PID namespace (tests/multihost/conftest.py; where the machine refuses those, the closest thing that works:
own loopback addresses). Placement, queueing, enforcement and faults run here as a user runs them, from a
driver on a host of its own (issue 13). Marked ``multihost`` (and ``slow``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.multihost.conftest import SPECS, Cluster

pytestmark = [pytest.mark.multihost, pytest.mark.slow]


def test_every_host_joins_with_its_own_devices(multihost: Cluster) -> None:
    nodes = {n["ip"]: n["models"] for n in multihost.nodes}
    ips = {name: h.ip for name, h in multihost.by_name.items()}
    assert nodes[ips["h1"]] == ["A100-80GB", "A100-80GB"]
    assert nodes[ips["h2"]] == ["T4-16GB", "T4-16GB"]
    assert nodes[ips["h3"]] == ["V100-32GB", "V100-32GB"]
    assert nodes[ips["h0"]] == []  # the drivers' host: no devices, a node actor all the same


def test_tasks_run_on_the_host_of_their_slice_and_wait_their_turn(multihost: Cluster) -> None:
    run = multihost.driver("place")
    try:
        got = run.line()
    finally:
        run.finish()
    ips = {name: h.ip for name, h in multihost.by_name.items()}
    hosts = {}
    for row in got["spread"]:  # type: ignore[union-attr]
        assert row["slice_node"] == row["ran_on"]  # the task ran where its slice is
        assert row["visible"] == row["uuid"]  # and saw exactly its device
        hosts.setdefault(row["host"], set()).add(row["uuid"].split("-")[-1])
    assert set(hosts) == {ips["h1"], ips["h2"], ips["h3"]}
    # 10 slices of 40 GiB on two A100s: never more than 4 held at once, all ran
    spans = got["spans"]  # type: ignore[assignment]
    assert len(spans) == 10
    for _, start, _ in spans:
        assert sum(1 for _, s, e in spans if s <= start < e) <= 4


def test_a_drivers_lease_is_not_reaped_by_a_pid_on_another_host(multihost: Cluster) -> None:
    """Regression (issue 13): the driver's pid was looked for on the slice's host, found missing (or naming
    another process), and the lease freed within seconds while the driver still used it."""
    holder = multihost.driver("hold")
    try:
        held = holder.line()
        assert str(held["lease_id"]) in _leases(multihost), "freed at once while its driver held it"
        work = multihost.driver("place")  # meanwhile: work on every host, and many reap rounds (0.5 s)
        try:
            work.line()
        finally:
            work.finish()
        alive = _leases(multihost)
        assert alive.get(str(held["lease_id"])) == "driver", f"freed while its driver held it: {alive}"
    finally:
        holder.stop()  # the driver dies: its Ray job ends
    assert _wait_gone(multihost, str(held["lease_id"])), "the dead driver's lease was never freed"


def _leases(multihost: Cluster) -> dict[str, str]:
    run = multihost.driver("status")
    try:
        got = run.line()
    finally:
        run.finish()
    return got["leases"]  # type: ignore[return-value]


def _wait_gone(multihost: Cluster, lease_id: str) -> bool:
    from tests.helpers import wait_for  # noqa: PLC0415

    return wait_for(lambda: lease_id not in _leases(multihost), timeout=120, step=1.0)


def test_a_slice_over_its_memory_on_another_host_is_stopped(multihost: Cluster) -> None:
    run = multihost.driver("enforce")
    try:
        got = run.line()
    finally:
        run.finish()
    assert got.get("error") == "SliceQuotaExceeded", got


def test_a_blackholed_fast_path_costs_one_short_timeout(multihost: Cluster, tmp_path: Path) -> None:
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    if not multihost.isolation.netns:  # never add rules to this machine's own network namespace
        pytest.skip(f"needs the drivers' host in a network namespace of its own, to drop packets there without "
                    f"touching this machine's network; hosts here: {multihost.isolation.describe()}")
    if shutil.which("nft") is None:
        pytest.fail("nft is missing: `make test` installs Debian's nftables package (make tools)")
    netns = multihost.by_name["h0"].netns
    assert netns is not None
    go = tmp_path / "go"
    run = multihost.driver("blackhole", str(go))
    try:
        host, port = run.line()["fastpath"]  # type: ignore[misc]
        table = ["ip", "netns", "exec", netns, "nft"]
        for rule in (["add", "table", "inet", "hrtest"],
                     ["add", "chain", "inet", "hrtest", "out", "{ type filter hook output priority 0; }"],
                     ["add", "rule", "inet", "hrtest", "out", "ip", "daddr", str(host), "tcp", "dport", str(port),
                      "drop"]):
            done = subprocess.run(table + rule, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"nft refused: {done.stderr}")
                pytest.skip(f"nftables refused in the test's namespace: {done.stderr.strip()}")
        go.write_text("go")
        got = run.line()
    finally:
        run.stop()
        subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", "hrtest"],
                       capture_output=True, check=False)
    times = got["lease_s"]  # type: ignore[assignment]
    print(f"leases with the fast path blackholed: {[round(t, 3) for t in times]} s; breaker: {got['breaker']}")
    assert all(t < 10 for t in got["baseline_s"])  # type: ignore[union-attr]
    # the first lease gave up on the socket (its request unacknowledged, or no connection), then the breaker held
    assert "acknowledge" in str(got["breaker"]) or "connect" in str(got["breaker"]), got
    assert all(t < 10 for t in times), times  # no kernel-long hang (minutes without timeouts)


def test_a_killed_host_loses_its_leases_and_work_runs_elsewhere(multihost: Cluster) -> None:
    """Last: it kills h2 (the T4 host) while a driver holds a slice there."""
    holder = multihost.driver("hold")
    try:
        held = holder.line()
        multihost.by_name["h2"].kill()
        after = multihost.driver("after_kill", str(held["lease_id"]))
        try:
            got = after.line()
        finally:
            after.finish()
    finally:
        holder.stop()
    assert held["lease_id"] in got["lost"], got
    ips = {name: h.ip for name, h in multihost.by_name.items()}
    assert ips["h2"] not in got["ran_on"] and set(got["ran_on"]) <= {ips["h1"], ips["h3"]}, got
    assert SPECS  # the specs name the hosts' devices
