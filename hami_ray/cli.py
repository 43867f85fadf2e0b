"""The ``hami-ray`` command line (Typer): ``simulate``, ``demo``, ``status`` and ``metrics serve``;
``k8s`` joins with the bridge."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from hami_ray.core.errors import HamiRayError
from hami_ray.core.names import DevicePolicyName
from hami_ray.core.scheduler import DEFAULT_DEVICE_POLICY
from hami_ray.observe.metrics import DEFAULT_PORT, StatusCollector, serve
from hami_ray.observe.model import ClusterStatus, status_json
from hami_ray.observe.view import render
from hami_ray.sim.arrival import REPORT_POINTS, RunResult
from hami_ray.sim.timeline import DEFAULT_GRACE_S, DEFAULT_NODE_FRACTION

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="hami-ray: isolated fractional GPU slices for Ray tasks and Kubernetes pods.")
console = Console()

# the project's shared/ folder sits beside the repository (a source checkout)
TRACE_DIR = Path(__file__).resolve().parents[2] / "shared" / "traces" / "openb-v2023"
PAPER_POLICIES = "random,dotprod,clustering,packing,bestfit,fgd"
# The FGD artifact's medians of unallocated GPU % at 100 % arrival on the default trace (reference/fgd.md)
ARTIFACT_AT_100 = {"random": 13.75, "dotprod": 9.44, "clustering": 8.42, "packing": 8.19, "bestfit": 7.09,
                   "fgd": 4.77}


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise typer.BadParameter("give at least one policy")
    for name in names:
        if name != "default":
            try:
                DevicePolicyName(name)
            except ValueError:
                choices = ", ".join([p.value for p in DevicePolicyName] + ["default"])
                raise typer.BadParameter(f"unknown policy {name!r} (choose from {choices})") from None
    return names


def _spread_cell(value: float | None, spread: dict[str, float] | None) -> str:
    """``median [min, max]`` over the seeds; the value alone where the seeds agree (or there is one)."""
    if value is None:
        return "-"
    if not spread or spread["min"] == spread["max"]:
        return f"{value:.2f}"
    return f"{value:.2f} [{spread['min']:.2f}, {spread['max']:.2f}]"


def results_table(results: dict[str, object], title: str, *, artifact: bool = True) -> Table:
    """Per policy and report point the median over the seeds and, in brackets, their min and max; the
    artifact's one-dimensional medians beside them unless ``artifact`` is False (``--two-dim``)."""
    table = Table(title=title, title_justify="left")
    table.add_column("policy")
    for point in REPORT_POINTS:
        table.add_column(f"@{point}%", justify="right")
    table.add_column("artifact @100%", justify="right")
    table.add_column("runtime s", justify="right")
    for policy, data in results.items():
        if not isinstance(data, dict) or "unallocated_pct_at" not in data:
            continue
        at = data["unallocated_pct_at"]
        spread = data.get("seed_spread_at", {})
        label = f"{policy} ({DEFAULT_DEVICE_POLICY})" if policy == "default" else policy
        paper = ARTIFACT_AT_100.get(policy) if artifact else None
        table.add_row(label, *[_spread_cell(at.get(p), spread.get(p)) for p in REPORT_POINTS],
                      f"{paper:.2f}" if paper is not None else "", f"{data['runtime_s']:.1f}")
    return table


def paired_table(results: dict[str, object], baseline: str) -> Table:
    """Every policy minus the baseline, seed by seed: median [min, max] of the differences and on how many
    seeds it left fewer / as many / more GPUs unallocated (``lower/tie/higher``)."""
    table = Table(title=f"Against {baseline}, seed by seed (points of unallocated GPU %; below 0 = fewer idle)",
                  title_justify="left")
    table.add_column("policy")
    for point in REPORT_POINTS:
        table.add_column(f"@{point}%", justify="right")
        table.add_column("lower/tie/higher", justify="right")
    for policy, data in results.items():
        if not isinstance(data, dict) or "vs_baseline" not in data:
            continue
        cells: list[str] = []
        for point in REPORT_POINTS:
            d = data["vs_baseline"]["diff_at"].get(point)
            cells += ["-", ""] if d is None else [
                f"{d['median']:+.2f} [{d['min']:+.2f}, {d['max']:+.2f}]", f"{d['below']}/{d['tie']}/{d['above']}"]
        table.add_row(policy, *cells)
    return table


TIMELINE_SEEDS = 5


def _simulate_timeline(nodes: Path, pods: Path, seeds: int, json_out: Path | None, plot: Path | None,
                       workers: int, grace: float, node_fraction: float) -> None:
    """``simulate --timeline``: every mode x seed, a table of the medians, the JSON and the plot."""
    from hami_ray.sim.plot import plot_timeline
    from hami_ray.sim.timeline import MODES
    from hami_ray.sim.timeline_report import KEYS, run_timeline

    with Progress(TextColumn("[bold]timeline"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress:
        task = progress.add_task("", total=len(MODES) * seeds)

        def done(mode: str, seed: int, run: dict[str, Any]) -> None:
            progress.update(task, advance=1, description=f"{mode} seed {seed}: LS p99 {run['ls_wait_p99_s']:.0f} s, "
                            f"{run['gpus']} GPUs ({run['runtime_s']:.1f} s)")

        try:
            results = run_timeline(nodes, pods, seeds=seeds, grace_s=grace, node_fraction=node_fraction,
                                   workers=workers or None, on_done=done)
        except HamiRayError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
    table = Table(title=f"Timeline replay, median of {seeds} seeds - {pods.name}, {node_fraction:g} of the GPUs",
                  title_justify="left")
    heads = {"ls_wait_p99_s": "LS p99 s", "ls_wait_p50_s": "LS p50 s", "be_wait_p99_s": "BE p99 s",
             "allocation_rate": "GPU alloc", "jain": "Jain", "preemptions": "preempted"}
    table.add_column("mode")
    for key in KEYS:
        table.add_column(heads.get(key, key), justify="right")
    for mode, row in results["modes"].items():
        table.add_row(mode, *[f"{row[k]:,.0f}" if k.endswith("_s") or k == "preemptions" else f"{row[k]:.3f}"
                              for k in KEYS])
    console.print(table)
    _write_results(results, json_out)
    if plot:
        plot_timeline(results, plot, title=f"{pods.name}, {node_fraction:g} of the GPUs, {seeds} seeds")
        console.print(f"wrote {plot}")


def _write_results(results: dict[str, Any], json_out: Path | None) -> None:
    """Say the run's runtime and write its JSON where asked."""
    console.print(f"total runtime {results['runtime_s']} s")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=1))
        console.print(f"wrote {json_out}")


@app.command()
def simulate(
    nodes: Path = typer.Option(TRACE_DIR / "openb_node_list_gpu_node.csv", help="openb node list CSV"),
    pods: Path = typer.Option(TRACE_DIR / "openb_pod_list_default.csv", help="openb pod list CSV"),
    policies: str = typer.Option(PAPER_POLICIES, help="comma list of device policies; 'default' = ours"),
    seeds: int | None = typer.Option(None, min=1, help="seeds per policy (42, 43, ...; default 10, --timeline 5)"),
    json_out: Path | None = typer.Option(None, "--json", help="write results here"),
    plot: Path | None = typer.Option(None, help="write a Fig. 9(a)-style PNG here (--timeline: over time)"),
    workers: int = typer.Option(0, help="worker processes (0 = one per CPU)"),
    two_dim: bool = typer.Option(False, "--two-dim", help="decouple memory and cores of partial-GPU pods"),
    timeline: Annotated[bool, typer.Option(
        "--timeline", help="replay with the trace's times: fifo vs priority vs team queues (docs/timeline.md)")] = False,
    grace: Annotated[float, typer.Option(
        min=0, help="--timeline: simulated seconds a preempted slice is held before it is freed")] = DEFAULT_GRACE_S,
    node_fraction: Annotated[float, typer.Option(
        min=0.0001, max=1.0, help="--timeline: replay on a seeded subset of nodes with this share of the GPUs "
        "(the whole cluster never makes the trace wait)")] = DEFAULT_NODE_FRACTION,
    baseline: Annotated[str | None, typer.Option(
        help="compare every policy with this one seed by seed (default: fgd when it is among several policies)")]
        = None,
) -> None:
    """Replay an openb trace with the FGD artifact's protocol and compare policies; with ``--timeline``,
    replay it on its own times and compare fifo, priority and team queues."""
    from hami_ray.sim.experiment import run_experiment
    from hami_ray.sim.plot import plot_unallocated

    for path in (nodes, pods):
        if not path.is_file():
            raise typer.BadParameter(f"no such file: {path}")
    if timeline:
        _simulate_timeline(nodes, pods, seeds or TIMELINE_SEEDS, json_out, plot, workers, grace, node_fraction)
        return
    seeds = seeds or 10
    names = _policies(policies)
    if baseline is None and "fgd" in names and len(names) > 1:
        baseline = "fgd"
    if baseline is not None and baseline not in names:
        raise typer.BadParameter(f"--baseline {baseline!r} is not among --policies")
    with Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress:
        task = progress.add_task("", total=len(names) * seeds)

        def done(r: RunResult) -> None:
            at100 = r.curve().get(100)
            progress.update(task, advance=1, description=f"{r.policy} seed {r.seed}: "
                            f"{at100:.2f} % unallocated @100 % ({r.runtime_s:.1f} s)")

        try:
            results = run_experiment(nodes, pods, names, seeds, workers=workers or None, on_done=done,
                                     two_dim=two_dim, baseline=baseline)
        except HamiRayError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
    spread = r" \[min, max]" if seeds > 1 else ""  # rich markup: \[ is a bracket
    console.print(results_table(results, f"Unallocated GPU %, median{spread} of {seeds} seeds - {pods.name}",
                                artifact=not two_dim))
    if baseline is not None and seeds > 1:
        console.print(paired_table(results, baseline))
    _write_results(results, json_out)
    if plot:
        plot_unallocated(results, plot, title=f"{pods.name}, {seeds} seeds")
        console.print(f"wrote {plot}")


DEMO_SIMULATE = "2xA100-80GB,1xT4-16GB"
DEMO_WORKER = "2xV100-32GB"
DEMO_WATCH_S = 90.0  # the live view's limit: it stops once it caught Serve, Data and a gang holding slices
DEMO_HOSTS = ("gpu-host-a", "gpu-host-b")


@app.command()
def demo(out: Path = typer.Option(Path("out/demo"), help="where the JSON and the plot go"),
         ray_part: bool = typer.Option(True, "--ray/--no-ray", help="also run examples/ on a local Ray")) -> None:
    """A packing simulation on the openb trace, then the examples/ workloads on a local Ray with
    simulated devices (real NVIDIA GPUs where NVML sees them), then the cluster's status."""
    console.print("[bold]hami-ray demo[/]: simulated devices (no GPU needed): the 1,213-node openb cluster, "
                  "6,212 GPUs, one seed per policy")
    simulate(nodes=TRACE_DIR / "openb_node_list_gpu_node.csv", pods=TRACE_DIR / "openb_pod_list_default.csv",
             policies=PAPER_POLICIES + ",default", seeds=1, json_out=out / "simulate.json",
             plot=out / "unallocated.png", workers=0, two_dim=False)
    if ray_part:
        _ray_demo(out)


def _ray_demo(out: Path) -> None:
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import ray  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    from hami_ray.runtime import api  # noqa: PLC0415
    from hami_ray.runtime.loopback import LOOPBACK, pin_ray_to_loopback  # noqa: PLC0415
    from node_actors.actor import NODE_SIMULATE_ENV  # noqa: PLC0415

    pin_ray_to_loopback()
    repo = str(Path(__file__).resolve().parents[1])  # examples/ sits beside hami_ray/ in a checkout
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from examples import burst, overrun, self_sizing, shared_inference  # noqa: PLC0415

    # two simulated hosts on this machine, named as `ray start --node-name` names them; with real GPUs one
    # node (a second would see the same GPUs)
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": LOOPBACK, "num_cpus": 2, "include_dashboard": False, "node_name": DEMO_HOSTS[0]})
    try:
        if not _has_nvidia():
            cluster.add_node(node_ip_address=LOOPBACK, num_cpus=1, node_name=DEMO_HOSTS[1],
                             env_vars={NODE_SIMULATE_ENV: DEMO_WORKER})
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False, configure_logging=False)
        api.init(simulate=DEMO_SIMULATE, state_root=tempfile.mkdtemp(prefix="hami-demo-"), agent={"grace_s": 1.0})
        deadline = time.monotonic() + 60
        while len(api.status().nodes) < len(cluster.list_all_nodes()) and time.monotonic() < deadline:  # type: ignore[no-untyped-call]
            time.sleep(0.2)
        snap = api.status()
        simulated = bool(snap.nodes) and all(d.uuid.startswith("GPU-sim-") for n in snap.nodes for d in n.devices)
        hosts = ", ".join(f"{n.host} ({', '.join(d.model for d in n.devices)})" for n in snap.nodes)
        console.print(f"\n[bold]Ray part[/]: a local Ray of {len(snap.nodes)} nodes on 127.0.0.1: {hosts}"
                      f"{'; simulated devices' if simulated else '; NVIDIA GPUs (NVML)'}")
        results: dict[str, object] = {}
        for name, module in (("shared_inference", shared_inference), ("burst", burst), ("overrun", overrun),
                             ("self_sizing", self_sizing)):
            results[name] = module.main()
            console.print(f"[green]examples/{name}.py[/]: {module.summary(results[name])}")
        _busy_cluster(api, results)
        if api._lanes is not None:
            api._lanes.drain()  # lanes give their slices back once idle: show the cluster after that
        deadline = time.monotonic() + 15
        while api.status().leases and time.monotonic() < deadline:
            time.sleep(0.1)
        console.print("\n[bold]hami-ray status[/] after the examples:")
        console.print(render(api.status(), width=console.width))
        where = api.metrics_address()
        console.print(f"metrics: http://{where[0]}:{where[1]}/metrics (Prometheus; HAMi's names)" if where
                      else "metrics: not served (port 9395 taken); `hami-ray metrics serve --port N` serves them")
        out.mkdir(parents=True, exist_ok=True)
        (out / "examples.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        api.shutdown()
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]


def _busy_cluster(api: Any, results: dict[str, object]) -> None:
    """Serve replicas, a Ray Data pool, a training gang and a burst of tasks at once; the live view
    until it has caught each kind of owner holding slices, then their results as lines."""
    import logging  # noqa: PLC0415
    import threading  # noqa: PLC0415

    import ray.data  # noqa: PLC0415
    from ray import serve as ray_serve  # noqa: PLC0415

    from examples import burst, data_pipeline, gang, serve_models  # noqa: PLC0415

    console.print("\n[bold]A busy cluster[/]: Ray Serve replicas, a Ray Data actor pool, a training gang and a "
                  "burst of tasks share the GPUs; [bold]hami-ray status --watch[/]:")
    for name in ("ray.data", "ray.serve"):  # their progress lines would scroll the live view away
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    done = threading.Event()
    errors: list[str] = []

    def run(name: str, fn: Callable[[], object]) -> threading.Thread:
        def body() -> None:
            try:
                results[name] = fn()
            except Exception as exc:  # noqa: BLE001 - a failed example is reported, the demo goes on
                errors.append(f"examples/{name}.py failed: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    def busy(status: ClusterStatus) -> bool:
        owners = {lease.owner.split(":")[0] for lease in status.leases}
        return {"serve", "data", "gang"} <= owners

    try:
        results["serve_models"] = serve_models.main(requests=20, keep=True)  # its replicas stay up meanwhile
        threads = [run("gang", lambda: gang.main(until=done)), run("data_pipeline", data_pipeline.main),
                   run("burst_again", lambda: burst.main(tasks=60))]
        watch_status(api.status, seconds=DEMO_WATCH_S, interval=0.5, until=busy)
        done.set()
        for thread in threads:
            thread.join(timeout=DEMO_WATCH_S)
    finally:
        done.set()
        ray_serve.shutdown()  # its replicas give their slices back
    for name, module in (("serve_models", serve_models), ("data_pipeline", data_pipeline), ("gang", gang),
                         ("burst_again", burst)):
        if name in results:
            console.print(f"[green]examples/{name.removesuffix('_again')}.py[/]: {module.summary(results[name])}")
    for line in errors:
        console.print(f"[red]{line}[/]")


def _has_nvidia() -> bool:
    try:
        import pynvml  # type: ignore[import-untyped]  # noqa: PLC0415

        pynvml.nvmlInit()
        try:
            return bool(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library, no device: simulate
        return False


@app.command()
def status(
    address: str = typer.Option("auto", help="Ray address of the cluster hami-ray runs on"),
    json_out: bool = typer.Option(False, "--json", help="print the snapshot as JSON, for scripts"),
    watch: bool = typer.Option(False, "--watch", "-w", help="redraw live until Ctrl-C"),
    seconds: float = typer.Option(0.0, "--for", help="with --watch: stop after this many seconds"),
    interval: float = typer.Option(1.0, help="with --watch: seconds between refreshes"),
    node: str | None = typer.Option(None, help="only nodes whose name starts with this"),
    device: str | None = typer.Option(None, help="only devices whose uuid starts with this"),
    page: int = typer.Option(1, min=1, help="page of nodes on a large cluster (busiest first)"),
    kubeconfig: Path | None = typer.Option(None, help="show a Kubernetes cluster's pods and devices instead "
                                                      "(HAMi's annotations)"),
) -> None:
    """Nodes, devices and slices: allocated vs used memory, cores, owners, fragmentation, the queue."""
    fetch: Callable[[], ClusterStatus]
    if kubeconfig is not None:
        from hami_ray.k8s.operate import cluster_status  # noqa: PLC0415

        k8s = _kube_client(kubeconfig)
        fetch = lambda: cluster_status(k8s)  # noqa: E731
    else:
        fetch = _attached(address).status
    if json_out:
        typer.echo(json.dumps(status_json(fetch()), indent=1))
        return
    if not watch:
        console.print(render(fetch(), width=console.width, node=node, device=device, page=page - 1))
        return
    watch_status(fetch, seconds=seconds, interval=interval, node=node, device=device, page=page - 1)


def _attached(address: str) -> Any:
    """The runtime API, attached to the hami-ray of the Ray cluster at ``address``; exits 1 if none."""
    from hami_ray.runtime import api  # noqa: PLC0415

    try:
        api.attach(address, log_to_driver=False, configure_logging=False)
    except HamiRayError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    except ConnectionError as exc:
        console.print(f"[red]no Ray cluster at {address!r}: {exc}[/]")
        raise typer.Exit(1) from None
    return api


def watch_status(fetch: Callable[[], ClusterStatus], *, seconds: float = 0.0, interval: float = 1.0,
                 node: str | None = None, device: str | None = None, page: int = 0,
                 target: Console | None = None, until: Callable[[ClusterStatus], bool] | None = None) -> None:
    """Redraw the status every ``interval`` seconds until Ctrl-C (or for ``seconds``, when positive; or
    until a status satisfies ``until``)."""
    out = target or console
    seen: list[ClusterStatus] = []

    def view() -> RenderableType:
        taken = fetch()
        seen[:] = [taken]
        stamp = Text(time.strftime("%H:%M:%S", time.localtime(taken.taken_at)) + "  (Ctrl-C to stop)", style="dim")
        return Group(stamp, render(taken, width=out.width, node=node, device=device, page=page))

    def tick() -> bool:
        live.update(view())
        return until is not None and until(seen[0])

    with Live(view(), console=out, refresh_per_second=4, screen=False) as live:
        _every(interval, seconds, tick)


def _every(interval: float, seconds: float, tick: Callable[[], object]) -> None:
    """Call ``tick`` every ``interval`` seconds for ``seconds`` (0: until Ctrl-C) or until it returns
    True, then return."""
    end = time.monotonic() + seconds if seconds > 0 else float("inf")
    try:
        while time.monotonic() < end:
            time.sleep(min(interval, max(0.0, end - time.monotonic())))
            if tick() is True:
                return
    except KeyboardInterrupt:
        pass


queues_app = typer.Typer(help="Team queues: guaranteed and limit quotas, fair share, preemption (issue 14).",
                         invoke_without_command=True)
app.add_typer(queues_app, name="queues")


@queues_app.callback()
def queues_show(
    ctx: typer.Context,
    address: str = typer.Option("auto", help="Ray address of the cluster hami-ray runs on"),
    json_out: bool = typer.Option(False, "--json", help="print the queues as JSON, for scripts"),
) -> None:
    """The queues: guaranteed, limit, used, borrowed, share, waiting and preempted."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _attached(address).queues()
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    from hami_ray.observe.model import QueueStatus  # noqa: PLC0415
    from hami_ray.observe.view import queues_table  # noqa: PLC0415

    console.print(queues_table([QueueStatus(**r) for r in rows]))


@queues_app.command("apply")
def queues_apply(
    file: Path = typer.Argument(..., help="the YAML file of queues (see docs/teams.md)"),
    address: str = typer.Option("auto", help="Ray address of the cluster hami-ray runs on"),
) -> None:
    """Apply the queues defined in FILE; an invalid file changes nothing and says which queue and field."""
    from hami_ray.observe.model import QueueStatus  # noqa: PLC0415
    from hami_ray.observe.view import queues_table  # noqa: PLC0415

    try:
        text = file.read_text()
    except OSError as exc:
        console.print(f"[red]cannot read {file}: {exc.strerror}[/]")
        raise typer.Exit(2) from None
    api = _attached(address)
    try:
        rows = api.apply_queues(text)
    except HamiRayError as exc:
        console.print(f"[red]{exc}[/] (the queues in force are unchanged)")
        raise typer.Exit(1) from None
    console.print(f"applied {sum(1 for r in rows if r['queue'] != 'default')} queue(s) from {file}")
    console.print(queues_table([QueueStatus(**r) for r in rows]))


metrics_app = typer.Typer(help="Prometheus metrics (HAMi's names where they fit).")
app.add_typer(metrics_app, name="metrics")


@metrics_app.command("serve")
def metrics_serve(
    address: str = typer.Option("auto", help="Ray address of the cluster hami-ray runs on"),
    port: int = typer.Option(DEFAULT_PORT, help="port of /metrics (HAMi's scheduler uses 9395)"),
    bind: str = typer.Option("0.0.0.0", help="address to listen on"),  # noqa: S104
    seconds: float = typer.Option(0.0, "--for", help="stop after this many seconds (0: until Ctrl-C)"),
) -> None:
    """Serve the cluster's metrics from here (the placement actor serves them too, on its node)."""
    api = _attached(address)
    _, bound = serve(StatusCollector(api.status), port=port, addr=bind)
    console.print(f"metrics on http://{bind}:{bound}/metrics")
    _every(1.0, seconds, lambda: None)


def _daemon_logging() -> None:
    """What a long-running command logs: INFO and above, with times (an operator reads it afterwards)."""
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _kube_client(kubeconfig: Path | None) -> Any:
    """A Kubernetes client: ``kubeconfig``, else the pod's ServiceAccount (in-cluster), else ~/.kube/config."""
    from kubernetes import client, config  # noqa: PLC0415

    try:
        if kubeconfig is not None:
            return config.new_client_from_config(config_file=str(kubeconfig))
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return client.ApiClient()
    except (OSError, config.ConfigException) as exc:
        console.print(f"[red]no Kubernetes configuration: {exc}[/]")
        raise typer.Exit(1) from None


k8s_app = typer.Typer(help="Kubernetes: hami-ray as hami-scheduler for pods.")
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("scheduler")
def k8s_scheduler(
    kubeconfig: Path | None = typer.Option(None, help="kubeconfig (default: in-cluster, else ~/.kube/config)"),
    scheduler_name: str = typer.Option("hami-scheduler", help="schedule the pods with this schedulerName"),
    inventory: str = typer.Option("annotations", help="'annotations': HAMi's node register annotations; "
                                  "'ray': the placement actor's ledger (with --ray-address)"),
    ray_address: str | None = typer.Option(None, help="share the ledger with this Ray cluster's placement actor"),
    leader_elect: bool = typer.Option(False, "--leader-elect", help="one active replica (a coordination Lease)"),
    lock_namespace: str = typer.Option("hami-ray", help="namespace of the leader election Lease"),
    lease_seconds: float = typer.Option(15.0, help="leader election: a silent leader is replaced after this"),
    once: bool = typer.Option(False, "--once", help="one pass, then exit"),
    queues: Path | None = typer.Option(None, "--queues", help="team queue definitions (YAML), read again when "
                                       "the file changes; pods are in their namespace's hami.io/queue"),
    bind_mode: str = typer.Option("auto", help="'hami-lock': take HAMi's node lock (hami.io/mutex.lock) before "
                                  "binding, for HAMi's device plugin; 'direct': no lock (hami-ray's device plugin); "
                                  "'auto': per node, from its device plugin's annotations (docs/kubernetes.md)"),
) -> None:
    """Place and bind pending pods with HAMi's annotations (RBAC: deploy/k8s/rbac.yaml)."""
    import threading  # noqa: PLC0415

    from hami_ray.core.queues import QueueConfigError  # noqa: PLC0415
    from hami_ray.k8s.inventory import Inventory  # noqa: PLC0415
    from hami_ray.k8s.nodelock import BindMode  # noqa: PLC0415
    from hami_ray.k8s.operate import lead  # noqa: PLC0415
    from hami_ray.k8s.queueing import QueueFile  # noqa: PLC0415
    from hami_ray.k8s.scheduler import PodScheduler  # noqa: PLC0415

    if inventory not in ("annotations", "ray") or (inventory == "ray" and ray_address is None):
        console.print("[red]--inventory is 'annotations' or 'ray' (which needs --ray-address)[/]")
        raise typer.Exit(2)
    if bind_mode not in {m.value for m in BindMode}:
        console.print(f"[red]--bind-mode is one of {', '.join(m.value for m in BindMode)}, not {bind_mode!r}[/]")
        raise typer.Exit(2)
    if queues is not None and ray_address is not None:
        console.print("[red]with --ray-address the placement actor keeps the queues: `hami-ray queues apply FILE`[/]")
        raise typer.Exit(2)
    try:
        queue_file = QueueFile(queues) if queues is not None else None
    except QueueConfigError as exc:
        console.print(f"[red]{queues}: {exc}[/]")
        raise typer.Exit(2) from None
    api = _kube_client(kubeconfig)
    source: Inventory | None = None
    if ray_address is not None:
        import ray  # noqa: PLC0415

        from hami_ray.k8s.inventory import RayInventory  # noqa: PLC0415
        from hami_ray.runtime import api as ray_api  # noqa: PLC0415
        from hami_ray.runtime.placement import PLACEMENT_NAME  # noqa: PLC0415
        from node_actors.actor import NAMESPACE  # noqa: PLC0415

        try:
            ray_api.attach(ray_address)
            source = RayInventory(ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE))
        except ray_api.NotRunning as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
    sched = PodScheduler(api, scheduler_name=scheduler_name, inventory=source, queues=queue_file,
                         bind_mode=BindMode(bind_mode))
    if once:
        stats = sched.run_once()
        console.print(f"bound {stats.bound}, unschedulable {stats.unschedulable}, invalid {stats.invalid}, "
                      f"released {stats.released}, nodes skipped {len(stats.skipped_nodes)}")
        return
    _daemon_logging()
    stop = threading.Event()
    try:
        if leader_elect:
            lead(api, sched, stop, namespace=lock_namespace, name=scheduler_name, lease_s=lease_seconds)
        else:
            sched.run(stop)
    except KeyboardInterrupt:
        stop.set()


@k8s_app.command("webhook")
def k8s_webhook(
    tls_cert: Path = typer.Option(..., help="the serving certificate (PEM); the API server must trust its CA"),
    tls_key: Path = typer.Option(..., help="its private key (PEM)"),
    bind: str = typer.Option("0.0.0.0:9443", help="host:port to serve HTTPS on"),
    scheduler_name: str = typer.Option("hami-scheduler", help="the schedulerName given to pods with devices"),
    force_overwrite_default_scheduler: bool = typer.Option(True, help="replace default-scheduler too (HAMi's default)"),
    queues: Path | None = typer.Option(None, "--queues", help="team queue definitions (YAML): refuse pods of unknown "
                                       "queues or over their queue's limit (reads nodes, namespaces, pods)"),
    kubeconfig: Path | None = typer.Option(None, help="with --queues: kubeconfig (default: in-cluster, else "
                                           "~/.kube/config)"),
) -> None:
    """The mutating admission webhook (POST /mutate): HAMi's pod defaults and refusals (deploy/k8s/webhook.yaml)."""
    import threading  # noqa: PLC0415

    from hami_ray.core.queues import QueueConfigError  # noqa: PLC0415
    from hami_ray.k8s.queueing import QueueFile  # noqa: PLC0415
    from hami_ray.k8s.quota import QueueQuota  # noqa: PLC0415
    from hami_ray.k8s.webhook import WebhookServer  # noqa: PLC0415

    quota = None
    if queues is not None:
        try:
            source = QueueFile(queues)
        except QueueConfigError as exc:
            console.print(f"[red]{queues}: {exc}[/]")
            raise typer.Exit(2) from None
        quota = QueueQuota(_kube_client(kubeconfig), source)
        quota.follow(threading.Event())  # the first lists are in before a pod is admitted
    host, _, port = bind.rpartition(":")
    try:
        server = WebhookServer(host or "0.0.0.0", int(port), str(tls_cert), str(tls_key), scheduler_name,
                               force_overwrite_default_scheduler, quota)
    except (OSError, ValueError) as exc:
        console.print(f"[red]webhook not started: {exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"webhook on https://{server.address[0]}:{server.address[1]}/mutate")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()


@k8s_app.command("device-plugin")
def k8s_device_plugin(
    node: str = typer.Option(..., envvar="NODE_NAME", help="this node's name (the DaemonSet: spec.nodeName)"),
    kubeconfig: Path | None = typer.Option(None, help="kubeconfig (default: in-cluster, else ~/.kube/config)"),
    plugin_dir: Path = typer.Option(Path("/var/lib/kubelet/device-plugins"), help="the kubelet's device plugin dir"),
    resource: str = typer.Option("nvidia.com/gpu", help="the extended resource advertised"),
    split_count: int = typer.Option(10, min=1, help="virtual devices per GPU (HAMi's deviceSplitCount)"),
    simulate: str | None = typer.Option(None, help="simulated devices instead of NVML, e.g. '2xT4-16GB'"),
    libvgpu: Path | None = typer.Option(None, envvar="HAMI_RAY_LIBVGPU",
                                        help="HAMi-core's libvgpu.so on the host: mounted, preloaded (the node "
                                             "actors' setting, $HAMI_RAY_LIBVGPU)"),
) -> None:
    """The kubelet device plugin: HAMi's node annotations, Allocate from the pods the bridge bound
    (RBAC: deploy/k8s/device-plugin.yaml)."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from hami_ray.k8s.deviceplugin import DevicePlugin, discover_devices  # noqa: PLC0415

    _daemon_logging()
    api = _kube_client(kubeconfig)
    try:
        devices, health = discover_devices(node, simulate=simulate, libvgpu=libvgpu)
    except HamiRayError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2 if simulate else 1) from None
    if not devices:
        console.print("[red]no GPU found on this node (NVML); --simulate SPEC for simulated ones[/]")
        raise typer.Exit(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    plugin = DevicePlugin(api, node, devices, health=health, plugin_dir=plugin_dir, resource=resource,
                          split_count=split_count, libvgpu=libvgpu)
    try:
        plugin.run(stop)
    except KeyboardInterrupt:
        stop.set()


@k8s_app.command("extender")
def k8s_extender(
    kubeconfig: Path | None = typer.Option(None, help="kubeconfig (default: in-cluster, else ~/.kube/config)"),
    bind: str = typer.Option("127.0.0.1:8888", help="host:port of the extender (kube-scheduler's urlPrefix)"),
    tls_cert: Path | None = typer.Option(None, help="serve HTTPS with this certificate (with --tls-key)"),
    tls_key: Path | None = typer.Option(None, help="the certificate's key"),
    scheduler_name: str = typer.Option("hami-scheduler", help="the kube-scheduler profile's schedulerName"),
    bind_mode: str = typer.Option("auto", help="'hami-lock': take HAMi's node lock (hami.io/mutex.lock) before "
                                  "binding, for HAMi's device plugin; 'direct': no lock (hami-ray's device plugin); "
                                  "'auto': per node, from its device plugin's annotations (docs/kubernetes.md)"),
    filter_answers: str = typer.Option("best", help="'best': filter answers the one node the policy ranks first "
                                       "and holds it for the bind (as HAMi's extender); 'fitting': every node "
                                       "that fits, for kube-scheduler's scores and prioritize"),
) -> None:
    """A kube-scheduler extender: filter, prioritize and bind with HAMi's annotations
    (deploy/k8s/extender.yaml: kube-scheduler and this side by side)."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from hami_ray.k8s import extender  # noqa: PLC0415
    from hami_ray.k8s.nodelock import BindMode  # noqa: PLC0415

    if (tls_cert is None) != (tls_key is None):
        console.print("[red]--tls-cert and --tls-key go together[/]")
        raise typer.Exit(2)
    if bind_mode not in {m.value for m in BindMode}:
        console.print(f"[red]--bind-mode is one of {', '.join(m.value for m in BindMode)}, not {bind_mode!r}[/]")
        raise typer.Exit(2)
    if filter_answers not in {a.value for a in extender.FilterAnswers}:
        console.print(f"[red]--filter-answers is 'best' or 'fitting', not {filter_answers!r}[/]")
        raise typer.Exit(2)
    _daemon_logging()
    api = _kube_client(kubeconfig)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        extender.run(api, stop, bind=bind, tls_cert=str(tls_cert) if tls_cert else None,
                     tls_key=str(tls_key) if tls_key else None, scheduler_name=scheduler_name,
                     bind_mode=bind_mode, answers=filter_answers)
    except (OSError, ValueError) as exc:  # the address is taken, a certificate that does not load
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        stop.set()

def main() -> None:
    app()


if __name__ == "__main__":
    main()
