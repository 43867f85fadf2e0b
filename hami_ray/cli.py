"""The ``hami-ray`` command line (Typer): ``simulate`` and ``demo`` today; ``status``, ``k8s`` and
``metrics`` join as observability and the bridge land."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hami_ray.core.errors import HamiRayError
from hami_ray.core.names import DevicePolicyName
from hami_ray.core.scheduler import DEFAULT_DEVICE_POLICY
from hami_ray.sim.arrival import REPORT_POINTS, RunResult

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


def results_table(results: dict[str, object], title: str) -> Table:
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
        label = f"{policy} ({DEFAULT_DEVICE_POLICY})" if policy == "default" else policy
        paper = ARTIFACT_AT_100.get(policy)
        table.add_row(label, *[f"{at[p]:.2f}" if at.get(p) is not None else "-" for p in REPORT_POINTS],
                      f"{paper:.2f}" if paper is not None else "", f"{data['runtime_s']:.1f}")
    return table


@app.command()
def simulate(
    nodes: Path = typer.Option(TRACE_DIR / "openb_node_list_gpu_node.csv", help="openb node list CSV"),
    pods: Path = typer.Option(TRACE_DIR / "openb_pod_list_default.csv", help="openb pod list CSV"),
    policies: str = typer.Option(PAPER_POLICIES, help="comma list of device policies; 'default' = ours"),
    seeds: int = typer.Option(10, min=1, help="seeds per policy (42, 43, ...)"),
    json_out: Path | None = typer.Option(None, "--json", help="write results here"),
    plot: Path | None = typer.Option(None, help="write a Fig. 9(a)-style PNG here"),
    workers: int = typer.Option(0, help="worker processes (0 = one per CPU)"),
    two_dim: bool = typer.Option(False, "--two-dim", help="decouple memory and cores of partial-GPU pods"),
) -> None:
    """Replay an openb trace with the FGD artifact's protocol and compare policies."""
    from hami_ray.sim.experiment import run_experiment
    from hami_ray.sim.plot import plot_unallocated

    names = _policies(policies)
    for path in (nodes, pods):
        if not path.is_file():
            raise typer.BadParameter(f"no such file: {path}")
    with Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress:
        task = progress.add_task("", total=len(names) * seeds)

        def done(r: RunResult) -> None:
            at100 = r.curve().get(100)
            progress.update(task, advance=1, description=f"{r.policy} seed {r.seed}: "
                            f"{at100:.2f} % unallocated @100 % ({r.runtime_s:.1f} s)")

        try:
            results = run_experiment(nodes, pods, names, seeds, workers=workers or None, on_done=done,
                                     two_dim=two_dim)
        except HamiRayError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
    console.print(results_table(results, f"Unallocated GPU % (median of {seeds} seeds) - {pods.name}"))
    console.print(f"total runtime {results['runtime_s']} s")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=1))
        console.print(f"wrote {json_out}")
    if plot:
        plot_unallocated(results, plot, title=f"{pods.name}, {seeds} seeds")
        console.print(f"wrote {plot}")


DEMO_SIMULATE = "2xA100-80GB,1xT4-16GB"


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

    from hami_ray.runtime import api  # noqa: PLC0415
    from hami_ray.runtime.loopback import LOOPBACK, pin_ray_to_loopback  # noqa: PLC0415

    pin_ray_to_loopback()
    repo = str(Path(__file__).resolve().parents[1])  # examples/ sits beside hami_ray/ in a checkout
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from examples import burst, overrun, shared_inference  # noqa: PLC0415

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address=LOOPBACK,
             log_to_driver=False, configure_logging=False)
    try:
        api.init(simulate=DEMO_SIMULATE, state_root=tempfile.mkdtemp(prefix="hami-demo-"), agent={"grace_s": 1.0})
        snap = api.status()
        kinds = {d.vendor for n in snap.nodes for d in n.devices}
        console.print(f"\n[bold]Ray part[/]: a local Ray on 127.0.0.1; devices: "
                      f"{'simulated ' + DEMO_SIMULATE if snap.nodes and _simulated(snap) else ', '.join(kinds)}")
        results = {}
        for name, run in (("shared_inference", shared_inference.main), ("burst", burst.main),
                          ("overrun", overrun.main)):
            results[name] = run()
            console.print(f"[green]examples/{name}.py[/]: {results[name]}")
        if api._lanes is not None:
            api._lanes.drain()  # lanes give their slices back once idle: show the cluster after that
        deadline = time.monotonic() + 5
        while api.status().leases and time.monotonic() < deadline:
            time.sleep(0.1)
        _status_table(api.status())
        out.mkdir(parents=True, exist_ok=True)
        (out / "examples.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        api.shutdown()
        ray.shutdown()


def _simulated(snap: object) -> bool:
    return all(d.uuid.startswith("GPU-sim-") for n in snap.nodes for d in n.devices)  # type: ignore[attr-defined]


def _status_table(snap: object) -> None:
    table = Table(title="devices after the examples")
    for col in ("node", "device", "model", "memory MiB", "allocated MiB", "cores", "slices"):
        table.add_column(col)
    for node in snap.nodes:  # type: ignore[attr-defined]
        for d in node.devices:
            held = [g for lease in snap.leases for g in lease.allocation.devices if g.uuid == d.uuid]  # type: ignore[attr-defined]
            table.add_row(node.name[:12], f"#{d.index}", d.model, str(d.memory_mib), str(sum(g.memory_mib for g in held)),
                          str(sum(g.cores for g in held)), str(len(held)))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
