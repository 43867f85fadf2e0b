"""Run the GPU conformance suite (``tests/gpu``, issue 12 item 7) on this machine and write what it measured.

    make gpu-check                       # = python3 bench/gpu_check.py
    python3 bench/gpu_check.py --json docs/gpu_verification.json --md docs/gpu-verification.md --out DIR

Without an NVIDIA GPU it prints why, leaves the docs alone and exits 0. With one it runs the suite under
pytest in a subprocess (bounded by ``--timeout``; on expiry pytest is interrupted so that its fixtures stop
the workers and the MPS daemon), then writes every figure, the machine's facts and each test's outcome to
``--json`` and regenerates ``--md`` from that JSON; ``--out DIR`` copies both there too (and the workers'
stderr logs), for fetching results back from a lent GPU machine. Exits 1 when a test failed.

Needs only the interpreter it runs under with pytest, ``nvidia-ml-py`` and PyTorch: no Ray, no pydantic,
no network, no ``.venv``. The whole run stays under 8 minutes on one GPU (each check has a time budget).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.gpu.machine import gpu_absent_reason, nvml_facts, torch_facts  # noqa: E402

COMMAND = "make gpu-check (python3 bench/gpu_check.py)"
DEFAULT_JSON = REPO / "docs" / "gpu_verification.json"
DEFAULT_MD = REPO / "docs" / "gpu-verification.md"
RESULTS_ENV = "HAMI_RAY_GPU_RESULTS"  # tests/gpu/harness.py writes the figures there
# Under 8 minutes in all: facts (at most FACTS_S) + the suite + SIGINT grace + SIGKILL wait = 470 s at worst.
FACTS_S = 60.0
DEFAULT_TIMEOUT_S = 380.0  # the suite (about 3 minutes expected on one H200)
INTERRUPT_S = 20.0  # after SIGINT, for pytest's teardown (workers, MPS daemon) before SIGKILL
TAIL_LINES = 120
NOTE_CHARS = 300  # of a test's message in the page (the JSON has it whole)
COMPUTE_MODES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}
MPS_CONTROL = "nvidia-cuda-mps-control"


# --- running the suite ----------------------------------------------------------------------------------
def _interrupt(proc: subprocess.Popen[str]) -> None:
    """SIGINT pytest's process group (its teardown stops workers and the MPS daemon), then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, INTERRUPT_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _quit_mps(root: Path) -> None:
    """Quit any MPS daemon the suite left under ``root`` (only after pytest had to be killed)."""
    control = os.environ.get("HAMI_RAY_MPS_CONTROL") or MPS_CONTROL
    if shutil.which(control) is None and not os.path.exists(control):
        return
    for pid_file in root.rglob("nvidia-cuda-mps-control.pid"):
        pipe = pid_file.parent
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(pipe.parent / "log")}
        try:
            subprocess.run([control], input="quit\n", text=True, env=env, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"gpu-check: could not quit the MPS daemon of {pipe}: {exc}", file=sys.stderr)


def run_suite(scratch: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``pytest tests/gpu`` in its own process group, streaming its output; its results and status."""
    results_path = scratch / "results.json"
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-p", "no:cacheprovider", "-q", "-rA",
           "--confcutdir", "tests/gpu",  # tests/conftest.py needs the Kubernetes client: not loaded here
           "--basetemp", str(scratch / "t"), "--continue-on-collection-errors",
           "-W", "default"]  # report warnings, do not fail on them: a lent GPU is too scarce to waste
    env = {**os.environ, RESULTS_ENV: str(results_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"gpu-check: the suite ran past {timeout_s:g} s: interrupting it", file=sys.stderr)
        _interrupt(proc)
    except KeyboardInterrupt:
        _interrupt(proc)
        raise
    finally:
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.returncode is None or proc.returncode < 0:
            _quit_mps(scratch)
    results: dict[str, Any]
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError) as exc:
        results = {"checks": {}, "tests": {}, "errors": [{"nodeid": "", "message": f"no results file: {exc}"}]}
    results["suite"] = {"command": cmd, "exit_status": proc.returncode, "timed_out": timed_out,
                        "wall_s": round(time.monotonic() - started, 1), "output_tail": "\n".join(tail)}
    return results


def machine() -> dict[str, Any]:
    try:
        pytest_version = importlib.metadata.version("pytest")
    except importlib.metadata.PackageNotFoundError:
        pytest_version = None
    return {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "executable": sys.executable, "pytest": pytest_version, "nvml": nvml_facts(), "torch": torch_facts(FACTS_S)}


# --- the report ---------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return out + [""]


def _test(report: dict[str, Any], fragment: str) -> dict[str, Any] | None:
    """The outcome of the first test whose node id contains ``fragment``."""
    return next((t for nodeid, t in report.get("tests", {}).items() if fragment in nodeid), None)


def _not_measured(report: dict[str, Any], fragment: str) -> str:
    t = _test(report, fragment)
    if t is None:
        return "Not measured: the test did not run."
    return f"Not measured: {t['outcome']}: {_cell(_short(t.get('message') or ''))}"


def _why(report: dict[str, Any], fragment: str) -> str:
    t = _test(report, fragment)
    if t is None:
        return "did not run"
    return f"{t['outcome']}: {_short(t['message'])}" if t.get("message") else t["outcome"]


def _short(text: str, limit: int = NOTE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _machine_lines(report: dict[str, Any]) -> list[str]:
    m = report.get("machine", {})
    nvml, torch = m.get("nvml", {}), m.get("torch", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_mib']} MiB, compute capability "
                     f"{'.'.join(map(str, g.get('capability') or [])) or '?'}, "
                     f"compute mode {COMPUTE_MODES.get(g.get('compute_mode'), g.get('compute_mode'))})"
                     for g in nvml.get("gpus", [])) or nvml.get("error", "?")
    rows = [["GPU", gpus], ["driver", f"{nvml.get('driver', '?')}, CUDA {nvml.get('cuda_driver', '?')} (driver API)"],
            ["PyTorch", torch.get("error") or f"{torch.get('torch')} (CUDA {torch.get('torch_cuda')}, "
                                              f"cuDNN {torch.get('cudnn')})"],
            ["Python", f"{m.get('python')}, pytest {m.get('pytest')}"],
            ["host", f"{m.get('hostname')}, {m.get('platform')}"]]
    return ["## Machine", "", *_table(["", ""], rows)]


def _grades_lines(report: dict[str, Any]) -> list[str]:
    node = report.get("node") or {}
    grades = node.get("grades") or {}
    if not grades:
        return ["## Isolation grades", "", "Not known: the node fixture did not run (see Tests).", ""]
    rows = [[g, "yes" if grades[g]["available"] else "no", grades[g].get("reason") or ""]
            for g in ("mps", "hami-core", "watchdog") if g in grades]
    wd = grades.get("watchdog", {}).get("enforcement")
    mps = (node.get("isolation_report") or {}).get("mps")
    out = ["## Isolation grades on the sliced GPU", "", f"GPU `{node.get('sliced')}`.", "",
           *_table(["grade", "available", "why not"], rows)]
    if wd:
        out += [f"The watchdog cannot enforce here: {wd}", ""]
    if mps:
        out += [f"MPS daemon: running {mps.get('running')}, pid {mps.get('pid')}, restarts {mps.get('restarts')}.", ""]
    return out


def _discovery_lines(report: dict[str, Any]) -> list[str]:
    a = report.get("checks", {}).get("a_discovery")
    out = ["## a. NVML discovery against nvidia-smi", "",
           "`NvidiaBackend.gpus()` against `nvidia-smi --query-gpu=uuid,name,memory.total`.", ""]
    if not a:
        return out + [_not_measured(report, "test_nvml_discovery_matches_nvidia_smi"), ""]
    rows = [[g["index"], f"`{g['uuid']}`", f"{g['nvml_name']} / {g['smi_name']}", f"{g['nvml_mib']} / {g['smi_mib']}",
             g["grade"], "yes" if g["match"] else "**no**"] for g in a.get("gpus", [])]
    out += _table(["GPU", "uuid", "name (NVML / nvidia-smi)", "MiB (NVML / nvidia-smi)", "grade", "match"], rows)
    if a.get("mig_instances"):
        out += [f"MIG instances: {len(a['mig_instances'])}.", ""]
    return out + [f"Test: {_why(report, 'test_nvml_discovery_matches_nvidia_smi')}", ""]


def _slices_lines(report: dict[str, Any]) -> list[str]:
    b = report.get("checks", {}).get("b_two_slices", {})
    out = ["## b. Two 8 GiB slices on one GPU", "",
           "Task A allocates 12 GiB in 1 GiB steps in its slice; task B, in its own slice, holds 6 GiB and runs "
           "exact fp32 matmuls (checked against the CPU) meanwhile. Under mps and hami-core A must get "
           "out-of-memory within its slice; under watchdog the test samples NVML every 0.5 s and kills A "
           "(grace 2 s, bound: grace + 2 samples).", ""]
    rows = []
    for grade in ("mps", "hami-core", "watchdog"):
        fig = b.get(grade)
        t = _why(report, f"test_two_slices_on_one_gpu[{grade}]")
        if not fig or "a" not in fig:
            rows.append([grade, "—", "—", "—", t])
            continue
        a, bb = fig["a"], fig.get("b") or {}
        if grade == "watchdog":
            a_text = (f"over at {a.get('peak_mib', {}).get('A')} MiB; killed {a.get('decide_s', 0):.2f} s after first "
                      f"seen over, exited {a.get('exit_s', 0):.2f} s later")
        else:
            a_text = (f"out of memory after {a.get('reached_gib')} GiB" if a.get("oom")
                      else f"**no out-of-memory**: reached {a.get('reached_gib')} GiB")
        b_text = (f"{bb.get('iters')} products, {bb.get('mismatches')} wrong, {_cell(bb.get('tflops'))} TFLOP/s"
                  if bb else "—")
        rows.append([grade, a_text, b_text, "yes" if fig.get("overlap") else "no", t])
    return out + _table(["grade", "task A", "task B", "B ran meanwhile", "test"], rows)


def _share_lines(report: dict[str, Any]) -> list[str]:
    c = (report.get("checks", {}).get("c_mps_share") or {}).get("run") or {}
    out = ["## c. MPS compute share", "",
           "Two MPS clients capped at 25 % and 75 % of the threads run the same bf16 8192 x 8192 matmul loop "
           "for 10 s together.", ""]
    if "25" not in c or "75" not in c:
        return out + [_not_measured(report, "test_mps_thread_percentages_share_compute"), ""]
    rows = [[f"{k} %", c[k].get("sm_count"), c[k].get("tflops")] for k in ("25", "75")]
    out += _table(["thread cap", "SMs the client sees", "TFLOP/s"], rows)
    base = (report.get("checks", {}).get("d_overhead") or {}).get("none", {}).get("matmul_tflops")
    extra = f"; no slice alone: {_cell(base)} TFLOP/s" if base else ""
    return out + [f"Ratio 75 % / 25 %: **{_cell(c.get('ratio'))}** (sum {_cell(c.get('sum_tflops'))} TFLOP/s{extra}). "
                  f"Test: {_why(report, 'test_mps_thread_percentages_share_compute')}", ""]


def _overhead_lines(report: dict[str, Any]) -> list[str]:
    d = report.get("checks", {}).get("d_overhead") or {}
    out = ["## d. Overhead against no slice", "",
           "bf16 8192 x 8192 matmuls (1000 after warm-up, CUDA events) and a 4-layer transformer's per-batch "
           "latency (200 batches), each in a fresh process: no slice, then a half-GPU slice with no thread cap.", ""]
    if "none" not in d:
        return out + [_not_measured(report, "test_no_slice_baseline"), ""]
    rows = []
    for grade in ("none", "mps", "hami-core", "watchdog"):
        f = d.get(grade)
        if not f:
            rows.append([grade, "—", "", "—", "", "—", "", _why(report, f"test_slice_overhead[{grade}]")])
            continue
        rows.append([grade, f["matmul_tflops"], f.get("ratio_matmul"), f["model_p50_ms"], f.get("ratio_p50"),
                     f["model_p99_ms"], f.get("ratio_p99"), "baseline" if grade == "none" else "measured"])
    return out + _table(["slice", "matmul TFLOP/s", "ratio", "model p50 ms", "ratio", "p99 ms", "ratio", "note"], rows)


def _meminfo_lines(report: dict[str, Any]) -> list[str]:
    e = report.get("checks", {}).get("e_meminfo") or {}
    out = ["## e. torch.cuda.mem_get_info() inside a slice", "", "An 8 GiB slice at each grade; none is no slice.", ""]
    rows = []
    for grade in ("none", "mps", "hami-core", "watchdog"):
        f = e.get(grade)
        if not f:
            rows.append([grade, "—", "—", "—", _why(report, f"test_mem_get_info_in_a_slice[{grade}]"), "—"])
            continue
        rows.append([grade, f.get("slice_mib"), f["free_mib"], f["total_mib"], f["reports"], f["device_count"]])
    return out + _table(["slice", "slice MiB", "free MiB", "total MiB", "total is the", "devices seen"], rows)


def _tests_lines(report: dict[str, Any]) -> list[str]:
    rows = [[f"`{nodeid.split('tests/gpu/')[-1]}`", t["outcome"], t.get("duration_s"), _short(t.get("message") or "")]
            for nodeid, t in report.get("tests", {}).items()]
    rows += [[f"`{e['nodeid']}` (collection)", "error", None, _short(e["message"])] for e in report.get("errors", [])]
    return ["## Tests", "", *_table(["test", "outcome", "s", "note"], rows)]


def counts(report: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in report.get("tests", {}).values():
        out[t["outcome"]] = out.get(t["outcome"], 0) + 1
    if report.get("errors"):
        out["collection errors"] = len(report["errors"])
    return out


def render(report: dict[str, Any], json_link: str) -> str:
    """The Markdown page for a report (what ``docs/gpu-verification.md`` holds after a run)."""
    suite = report.get("suite", {})
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts(report).items())) or "no test ran"
    cut = "; **cut short at the time limit**" if suite.get("timed_out") else ""
    lines = ["# Real-GPU verification", "",
             f"Measured by `{COMMAND}` on {report.get('date')}; every figure is in [`{Path(json_link).name}`]"
             f"({json_link}). This page is generated from that file: run the command again rather than editing it.",
             "", f"**Result: {tally}** in {suite.get('wall_s')} s "
                 f"(pytest exit status {suite.get('exit_status')}{cut}).",
             "", *_machine_lines(report), *_grades_lines(report), *_discovery_lines(report), *_slices_lines(report),
             *_share_lines(report), *_overhead_lines(report), *_meminfo_lines(report), *_tests_lines(report),
             "## Running it", "",
             "`make gpu-check` on a machine with an NVIDIA GPU, PyTorch, pytest and `nvidia-ml-py` (no Ray, pydantic "
             "or network needed); `python3 bench/gpu_check.py --help` for options. Without a GPU it says why and "
             "leaves this page alone. `HAMI_RAY_LIBVGPU` points at HAMi-core's `libvgpu.so` (default "
             "`/usr/local/vgpu/libvgpu.so`) to test grade hami-core.", ""]
    return "\n".join(lines)


def _copy_logs(scratch: Path, out_dir: Path) -> None:
    logs = [p for p in (scratch / "t").rglob("*.stderr") if p.stat().st_size > 0]
    if not logs:
        return
    dest = out_dir / "logs"
    dest.mkdir(parents=True, exist_ok=True)
    for p in logs:
        shutil.copyfile(p, dest / f"{p.parent.name}-{p.name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the GPU conformance suite and write docs/gpu-verification.md.")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help=f"figures (default {DEFAULT_JSON.relative_to(REPO)})")
    p.add_argument("--md", type=Path, default=DEFAULT_MD, help=f"the page (default {DEFAULT_MD.relative_to(REPO)})")
    p.add_argument("--out", type=Path, default=None, help="also copy both files (and worker logs) into this directory")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for the whole suite")
    args = p.parse_args(argv)

    reason = gpu_absent_reason()
    if reason is not None:
        print(f"gpu-check: skipped: {reason}")
        print(f"gpu-check: {args.md} and {args.json} are left as they are")
        return 0

    started = time.monotonic()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    facts = machine()
    scratch = Path(tempfile.mkdtemp(prefix="hgpu-"))  # short: MPS puts Unix sockets under it
    try:
        results = run_suite(scratch, args.timeout)
        report = {"command": COMMAND, "argv": sys.argv, "date": date, "machine": facts, **results,
                  "wall_s": round(time.monotonic() - started, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(render(report, os.path.relpath(args.json, args.md.parent)))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.json, args.out / args.json.name)
            shutil.copyfile(args.md, args.out / args.md.name)
            _copy_logs(scratch, args.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    status = results["suite"]["exit_status"]
    print(f"gpu-check: {', '.join(f'{n} {k}' for k, n in sorted(counts(report).items()))}; "
          f"wrote {args.json} and {args.md}" + (f" (copied to {args.out})" if args.out else ""))
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
