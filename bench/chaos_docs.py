"""Rewrite docs/chaos.md and README's "Reliability" section from docs/chaos.json (what bench/chaos.py wrote).

    python bench/chaos_docs.py
"""
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1]) + "/"
import json, re
d=json.load(open(REPO+'docs/chaos.json'))
F=d['faults']; n=sum(r['count'] for r in F.values())
rows="\n".join(f"| {k} | {r['count']} | {r['recovered']} | {r['recover_p50_s']} | {r['recover_max_s']} |" for k,r in F.items())
tp=d['throughput']; done=d['done']; fb=d['failed_by_error']
rf=d['meta'].get('state_disk_full_journal_refused', [])
refused=f"{sum(rf)} of {len(rf)} here"
fails=', '.join(f'{k} {v}' for k,v in fb.items()) or 'none'
hbn=d['meta'].get('held_by_nothing_max_s') or {}
held=(f"- Longest a lease was held by nothing before it was freed, per holder: "
      f"{', '.join(f'{k} {v} s' for k, v in sorted(hbn.items()))} (the bound: {d['meta']['bounds_s']['orphan']} s).\n"
      if hbn else "")
doc=f"""# Chaos: mixed load, injected faults, invariants checked all the time

`bench/chaos.py` runs one long mixed load on a local multi-node Ray with simulated devices and the Go
test cluster (etcd, the real kube-apiserver, kube-controller-manager, kwok; each a process of its own
under a supervisor that restarts it), injects faults on a seeded schedule while it goes, and has an
independent auditor check the invariants every second: what load was held, which faults were
survived, how long recovery took, and that nothing was lost or double-booked.

```bash
python bench/chaos.py --minutes 10 --json docs/chaos.json      # --no-k8s: Ray only
```

That command wrote `docs/chaos.json` (seed {d['meta']['seed']}, each fault {d['meta']['rounds']} times, {d['meta']['in_flight']} slice tasks in flight) on
this shared 2-core machine. The
suite runs the short form (`tests/test_chaos.py`: two minutes, seed 11, each fault once, marked `slow`;
`make test` runs it).

## Results ({d['run_s']:.0f} s, seed {d['meta']['seed']}, {n} faults)

| fault | injected | recovered | recovery p50 (s) | recovery max (s) |
| --- | ---: | ---: | ---: | ---: |
{rows}

- Invariant violations: **{d['invariant_violations']}** ({d['audits']} audits). Lost work: **{d['lost']}**.
{held}- Done: {done.get('tasks',0):,} tasks, {done.get('actors',0)} actors (3 calls each), {done.get('leases',0)} driver leases of the
  bench's own driver, {done.get('pods',0)} pods bound and deleted, {done.get('drivers',0)} second drivers killed and replaced,
  {done.get('stopped_over_slice',0)} processes over their slice stopped with `SliceQuotaExceeded`, {done.get('preemptors',0)} high-priority
  requests served by preemption ({done.get('pods_withdrawn',0)} pods still waiting at the end withdrawn).
- Failed with a typed error: {fails} (actors whose node was removed or whose process or node actor was
  killed: Ray's own typed error).
- Throughput: {tp['tasks_per_s_during_faults']} tasks/s during faults (from each injection until it recovered,
  {tp['fault_s']} s in all) against {tp['tasks_per_s_quiet']} tasks/s otherwise ({tp['quiet_s']} s): **{tp['ratio']}x**.
- Not injected (nothing to hit at that moment): {', '.join(f'{k} {v} time(s): no worker could be removed without removing the last one' for k, v in d['not_injected'].items()) or 'none'}.

## The load

All in one ledger: Ray tasks with slices ({d['meta']['in_flight']} in flight, 0.2-1.5 s each, 1-16 GiB and 10-50 % of the
cores; through lanes), actors with slices (4 GiB, created, called three times, killed), driver leases of
the bench's own driver, a second driver process (lanes off, so its tasks take the placement actor's
queue) that holds a lease and runs three tasks in a loop, and pods through the bridge (`hami-ray k8s
scheduler --inventory ray`, a process of its own) on a kwok node that a Ray node says it runs on
(`$HAMI_RAY_K8S_NODE`): up to three pods at a time, each deleted two seconds after it is bound. Nodes: a
head (2x A100-80GB), two workers (2x V100-32GB each) and the pods' node (1x L4-24GB).

## The faults

Each kind `--rounds` times, shuffled with the seed, spaced evenly after a quiet first tenth of the run.
Recovery is the time from the injection until the fault's own condition holds *and* a probe slice task
completes; for faults that last a while, while they last (the fast path, the full disk, the slow API
server: work must go on around them) or from their end (NVML, NotReady).

| fault | what is done | recovered when |
| --- | --- | --- |
| kill_placement_actor | SIGKILL its process (Ray restarts it; it rebuilds its ledger from the node actors) | it answers from a new process |
| kill_node_actor | SIGKILL a random node's node actor (restarted from its journal) | it answers from a new process |
| kill_task_process | SIGKILL the worker of a running task of the second driver (placement queue) | its lease is gone from the ledger |
| kill_lane_worker | SIGKILL a lane's slice worker (`ray::SliceWorker`) while it holds a slice | its lease is gone from the ledger |
| kill_driver | SIGKILL the second driver (a new one starts) | no lease of its is left |
| remove_node | `Cluster.remove_node` of a worker (never the last one) | the placement actor no longer lists it |
| add_node | a new worker joins | the placement actor lists it |
| blackhole_fast_path | nftables drops every packet to the node actors' fast-path ports on the loopback, for 8 s (a table of its own, deleted after) | a probe task completes meanwhile |
| nvml_error | the simulated stand-in raises `DeviceError` as NVML would, for 5 s | the node's enforcement is `ok` again |
| process_over_slice | a task reports 3000 MiB in a 2 GiB slice | it failed with `SliceQuotaExceeded` |
| priority_preemption | a priority-10 request for a whole A100 while lower priorities hold parts of both | it ran |
| state_disk_full | a node actor's state directory (a 32 MiB tmpfs of its own; the head's and the first two workers') is filled until the kernel answers ENOSPC, for 8 s | a probe task completes meanwhile (placement goes around a node actor that refuses slices it cannot journal); after the disk is freed, its journal must write what was pending (else a violation) |
| kill_bridge | SIGKILL the bridge; a new one starts | a probe pod is bound |
| restart_apiserver | SIGKILL the kube-apiserver process (the supervisor restarts it on the same port and state) | a probe pod is bound through the new one |
| slow_apiserver | a TCP proxy between the bridge and the API server (TLS passed through) delays every piece of every response by {d['meta'].get('slow_api_delay_s', 0.5)} s, for 10 s | a probe pod is bound meanwhile |
| node_not_ready | stop the pods' node's heartbeat (its kwok Lease taken) until kube-controller-manager marks it NotReady and taints it (about 20 s), then 3 s more, then resume | Ready, untainted, and a probe pod is bound to it (from the resume) |

## The invariants

The auditor reads the node actors (`info`: their leases with holders and pids; `audit`: the ledger
recounted, each device's high-water mark), the placement actor's ledger and the API server, never the
load's own bookkeeping:

- **over_capacity**: no device ever held more memory, cores or slices than it has (each node actor's
  high-water mark counts every holder: tasks, actors, drivers, pods), and every recount is clean;
- **orphan**: no lease held by nothing for more than {d['meta']['bounds_s']['orphan']:.0f} s: a process lease whose processes are
  all dead (or whose pids now name other processes: start times from `/proc`), a reservation no process
  claimed within the node actors' reservation grace (set to 15 s here), a driver lease whose Ray job
  ended, a pod lease whose pod is gone;
- **diverged**: no lease in the placement ledger that its node actor does not hold, or the reverse, for
  more than {d['meta']['bounds_s']['diverge']:.0f} s (so the ledger equals the node actors' truth after each recovery);
- **pod_rebound** / **pod_unannotated**: no pod bound to a second node, none bound without HAMi's
  `hami.io/vgpu-devices-to-allocate` and bind-phase annotations;
- **lost**: every task, actor call, lease and pod either completes or fails with a typed error (a
  hami-ray error or one of Ray's own error types) within {d['meta']['bounds_s']['task']:.0f} s; anything else is lost work;
- a fault not recovered within {d['meta']['bounds_s']['recover']:.0f} s is a violation too.

## What it found

Bugs, fixed, each with a regression test that fails without the fix:

- **A full state disk left half-done state** (found writing the `state_disk_full` fault): a journal write
  that failed after the in-memory ledger changed left a reservation held that no one had, or a release
  half done, and raised an untyped SQLite error. Now a reservation is refused with `JournalUnwritable`
  and holds nothing, ends happen in memory and are written late, and placement goes around that node
  (`tests/node_actors/test_full_disk.py`).
- **A task whose slice was taken back before its worker started ran outside any slice** (a flaky queue
  test under load): its worker now confirms the slice first and fails with `LeaseGone` (retried) when
  it is gone (`tests/runtime/test_queues.py`).

- **A lease dropped from the placement ledger while its node actor held it** (room that could be handed
  out twice): the node sync freed a lease confirmed over the fast path while the node actor's answer to
  the sync (a Ray call) was travelling. Seen first as a flaky Serve example (3 replicas counted of 4). The
  sync now frees only leases whose reservation was answered before it asked
  (`tests/runtime/test_service.py`).
- **Pods deleted while the bridge was down kept their slices for ever** (two `orphan` violations in the
  first run with `kill_bridge`): a restarted bridge gets no event for them. It now frees, once its first
  lists are in, every pod slice whose pod is gone or finished (`PodScheduler.free_gone`,
  `tests/runtime/test_k8s_bridge.py`).
- **A reservation taken over by a restarted placement actor stayed in its ledger after the node actor
  let it expire** (a `diverged` violation after two placement actor kills in a row): the sync freed only
  active leases. It now frees any lease the node actor no longer holds, except one still being reserved
  (`tests/runtime/test_service.py`).
- **A pod slice held by nothing for 98 s after a placement actor kill** (an `orphan` violation in the
  short test, unloaded, at `0ec1df4`; the pod was deleted 0.4 s before the kill): the placement actor
  frees a pod's slice in its ledger, answers the bridge, and tells the node actor a moment later. Killed
  in between, its next incarnation rebuilt the ledger from the node actor and held the slice again, for a
  pod the bridge had freed and forgotten; only the next bridge restart freed it. The placement actor now
  has an incarnation id that the bridge sees each second; after a new one, a failed release, or a release
  the actor did not hold, the bridge reads the pods' leases again for 30 s and frees those of pods that are
  gone (and otherwise every 5 minutes). A release that fails keeps the slice held in the bridge's view
  until it is made (`tests/runtime/test_k8s_bridge.py`, `tests/k8s/test_ray_inventory.py`).

## Not covered yet

Whether a full state disk bit depends on the node actor having something to write while it lasted (a
reservation placed there, a lease ending) and on SQLite needing a new page (a WAL with room left takes
writes on a full disk): `meta.state_disk_full_journal_refused` says, per injection, whether the journal
refused a write ({refused}). The unit tests (`tests/node_actors/test_full_disk.py`) make it refuse every
time. The Ray side runs on one
machine: "hosts" here are Ray nodes of one `ray.cluster_utils.Cluster`, not the network-namespace hosts
of `tests/multihost`. Simulated devices only: nothing here ran on a GPU. The blackhole's recovery is
short where the probe went down an already open lane (no placement round trip).
"""
open(REPO+'docs/chaos.md','w').write(doc)
hog = ""
try:  # bench/suite_under_hog.py's runs: the whole suite next to a CPU hog
    H = json.load(open(REPO+'docs/suite_under_hog.json'))
    runs = H['runs']
    mins = [round(r['seconds'] / 60) for r in runs]
    streak = H['passed_in_a_row']
    bar = "" if streak >= 5 else " (issue 15 asks for 5: not there yet)"
    span = f"{min(mins)}-{max(mins)}" if min(mins) != max(mins) else f"{mins[0]}"
    failed = [f for r in runs for f in r.get('failed', [])]
    if failed:
        bar += f"; failed: `{'`, `'.join(failed)}`"
    hog = f"""
The whole suite (the two-minute chaos run included) next to a CPU hog, a busy loop on each of the
{H['meta']['hogs']} cores, from a fresh clone (`{H['meta']['command']}`): **{streak} run(s) in a row
passed**{bar}, at `{', '.join(sorted({str(r['commit']) for r in runs}))}`, {span} minutes each
(clone, set-up and suite); the last one: `{runs[-1]['pytest']}`. Every failure so far, its cause and its fix:
[docs/suite_under_hog.md](docs/suite_under_hog.md).
"""
except FileNotFoundError:
    pass
rrows="\n".join(f"| {k} | {r['count']} | {r['recover_p50_s']} / {r['recover_max_s']} |" for k,r in F.items())
sec=f"""## Reliability

Ten minutes of mixed load (Ray tasks, actors, driver leases, a second driver, pods through the bridge on
the real API server, one ledger) with {n} faults injected on a seeded schedule, and an independent
auditor checking the invariants every second (`python bench/chaos.py --minutes 10 --json
docs/chaos.json`, this 2-core machine, simulated devices; [docs/chaos.md](docs/chaos.md)):

| fault | times | recovery p50 / max (s) |
|---|---|---|
{rrows}

**{d['invariant_violations']} invariant violations** (no device over capacity, no lease held by nothing, the ledger equal to
the node actors' truth, no pod bound twice or without its annotations) and **{d['lost']} lost work** over
{done.get('tasks',0):,} tasks, {done.get('actors',0)} actors, {done.get('leases',0)} driver leases and {done.get('pods',0)} pods; {sum(fb.values())} actors failed with Ray's typed
`ActorDiedError` (their node removed or process killed). Tasks/s during faults: {tp['ratio']}x of the rest of
the run. `make test` runs a two-minute form
(`tests/test_chaos.py`).
{hog}
"""
t=open(REPO+'README.md').read()
a=t.index("## Reliability"); b=t.index("## How it compares")
t=t[:a]+sec+t[b:]
open(REPO+'README.md','w').write(t)
print("ok", d['invariant_violations'], d['lost'])
