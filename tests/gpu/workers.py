"""The GPU suite's worker programs: each runs in its own process, started with a slice's environment, and
prints ONE JSON line of figures on stdout, which ``tests/gpu/harness.py`` parses.

    python workers.py alloc --gib 12 --step 1 [--hold 60]
    python workers.py matmul --seconds 10 [--dtype bf16|fp16|fp32|exact] [--size 8192] [--hold-gib 6]
                             [--ready FILE] [--go FILE] [--stop FILE]
    python workers.py matmul --iters 1000 --size 8192
    python workers.py model --batches 200
    python workers.py meminfo
    python workers.py facts

Only the standard library and PyTorch, imported here and never in the pytest process, so the suite's own
process stays free of CUDA. Device memory comes from PyTorch's caching allocator (``cudaMalloc``), never
managed memory. SIGTERM exits through Python (``SystemExit``) so the CUDA context is torn down in order: an
MPS client killed with work queued can leave its server undefined (nvidia-isolation.md §1).

A failure prints ``{"ok": false, "error": ...}`` and exits 1; success prints ``"ok": true``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 1 << 30
MIB = 1 << 20
SYNC_EVERY = 10  # matmuls between synchronisations in a timed loop: bounds the time past --seconds
_emitted = False


def emit(result: dict[str, Any]) -> None:
    """Print the one result line (flushed: the parent may read it while this process still runs)."""
    global _emitted
    _emitted = True
    print(json.dumps(result, separators=(",", ":"), sort_keys=True), flush=True)


def _torch() -> Any:
    import torch  # noqa: PLC0415 - only workers import PyTorch

    return torch


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 600 else text[:600] + "..."


def _is_oom(torch: Any, exc: BaseException) -> bool:
    """CUDA out-of-memory, as PyTorch's allocator raises it (``torch.OutOfMemoryError``) or as a plain CUDA
    error from another path (``RuntimeError``/``torch.AcceleratorError``: "CUDA error: out of memory")."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(k, type))
    if kinds and isinstance(exc, kinds):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _device(torch: Any) -> dict[str, Any]:
    """What this process sees: the device, its SM count (MPS thread caps show here) and its memory."""
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return {"pid": os.getpid(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "device_count": torch.cuda.device_count(), "device": props.name,
            "sm_count": props.multi_processor_count, "uuid": str(getattr(props, "uuid", "")),
            "free_mib": free // MIB, "total_mib": total // MIB,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _signal_file(path: str | None) -> None:
    if path:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, path)  # the parent sees the whole file or none


def _await_file(path: str | None, timeout_s: float) -> None:
    if not path:
        return
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go signal ({path}) within {timeout_s:g} s")
        time.sleep(0.002)


def cmd_alloc(args: argparse.Namespace) -> int:
    """Allocate ``--gib`` GiB in ``--step`` GiB blocks, touching each, until done or out of memory.

    Prints ``reached_gib`` (GiB held when it stopped), ``oom`` and the wall time of the event (``t_event``,
    epoch seconds: the OOM, or holding everything), then holds the memory ``--hold`` seconds (a watchdog
    test kills it meanwhile).
    """
    torch = _torch()
    dev = torch.device("cuda", 0)
    torch.zeros(1, device=dev)  # the context first: the blocks below are what is counted
    out: dict[str, Any] = {"ok": True, "oom": False, "error": None, **_device(torch)}
    step = int(args.step * GIB)
    held = []
    reached = 0.0
    while reached + args.step <= args.gib + 1e-9:
        try:
            block = torch.empty(step, dtype=torch.uint8, device=dev)
            block.fill_(1)
            torch.cuda.synchronize()
        except Exception as exc:
            if not _is_oom(torch, exc):
                raise
            out.update(oom=True, error=_short(exc))
            break
        held.append(block)
        reached += args.step
    out.update(reached_gib=reached, t_event=time.time(), allocated_mib=torch.cuda.memory_allocated(dev) // MIB)
    emit(out)
    if args.hold > 0:
        time.sleep(args.hold)
    del held
    return 0


def cmd_matmul(args: argparse.Namespace) -> int:
    """Square matmuls on the GPU, for ``--iters`` iterations or ``--seconds`` of wall time.

    ``--dtype exact``: fp32 matrices of small integers (-2..2) with TF32 off, every product compared with
    one computed on the CPU. Sums stay below 2**24, so every result is exact in any summation order and a
    single differing element counts as a mismatch. Other dtypes: random matrices, throughput only.
    ``--hold-gib`` keeps that much memory allocated meanwhile. ``--ready``/``--go``: after warm-up, create
    the ready file, then wait for the go file (two clients start their timed loops together). ``--stop``:
    a ``--seconds`` loop also ends once that file exists.
    """
    torch = _torch()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda", 0)
    ballast = None
    if args.hold_gib > 0:
        ballast = torch.empty(int(args.hold_gib * GIB), dtype=torch.uint8, device=dev)
        ballast.fill_(1)
    n = args.size
    ref = None
    if args.dtype == "exact":
        gen = torch.Generator().manual_seed(args.seed)
        a_cpu = torch.randint(-2, 3, (n, n), generator=gen).to(torch.float32)
        b_cpu = torch.randint(-2, 3, (n, n), generator=gen).to(torch.float32)
        ref = (a_cpu @ b_cpu).to(dev)
        a, b = a_cpu.to(dev), b_cpu.to(dev)
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=dev, dtype=a.dtype)
    bad = torch.zeros((), dtype=torch.int64, device=dev)

    def step() -> None:
        torch.matmul(a, b, out=c)
        if ref is not None:
            bad.add_((c != ref).sum())

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    out: dict[str, Any] = {"ok": True, **_device(torch)}
    _signal_file(args.ready)
    _await_file(args.go, args.go_timeout)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t_start = time.time()
    t0 = time.perf_counter()
    start.record()
    iters = 0
    if args.iters > 0:
        for _ in range(args.iters):
            step()
        iters = args.iters
    else:
        while True:
            for _ in range(SYNC_EVERY):
                step()
            iters += SYNC_EVERY
            torch.cuda.synchronize()
            if time.perf_counter() - t0 >= args.seconds or (args.stop and os.path.exists(args.stop)):
                break
    end.record()
    torch.cuda.synchronize()
    wall_s = time.perf_counter() - t0
    gpu_s = start.elapsed_time(end) / 1000.0
    flops = 2.0 * n**3 * iters
    seconds = gpu_s if args.iters > 0 else wall_s  # fixed work: GPU time; fixed time: wall time
    out.update(dtype=args.dtype, size=n, iters=iters, wall_s=wall_s, gpu_s=gpu_s, t_start=t_start,
               t_end=time.time(), tflops=flops / seconds / 1e12 if seconds > 0 else 0.0,
               mismatches=int(bad.item()) if ref is not None else None,
               held_gib=args.hold_gib, allocated_mib=torch.cuda.memory_allocated(dev) // MIB)
    del ballast
    emit(out)
    return 0


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list: ``q=0.99`` of 200 values is the 198th."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def cmd_model(args: argparse.Namespace) -> int:
    """Per-batch inference latency of a small transformer built in code (no download): ``--layers``
    pre-norm encoder layers of width ``--width``, bf16, a batch of ``--batch`` x ``--seq`` tokens; each
    batch timed from launch to ``synchronize``."""
    torch = _torch()
    nn = torch.nn
    dev = torch.device("cuda", 0)
    torch.manual_seed(args.seed)
    layers = [nn.TransformerEncoderLayer(d_model=args.width, nhead=args.heads, dim_feedforward=4 * args.width,
                                         dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
              for _ in range(args.layers)]
    model = nn.Sequential(*layers).to(device=dev, dtype=torch.bfloat16).eval()
    x = torch.randn(args.batch, args.seq, args.width, device=dev, dtype=torch.bfloat16)
    latencies = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(x)
        torch.cuda.synchronize()
        for _ in range(args.batches):
            t = time.perf_counter()
            y = model(x)
            torch.cuda.synchronize()
            latencies.append(time.perf_counter() - t)
        finite = bool(torch.isfinite(y).all().item())
    ms = sorted(v * 1000.0 for v in latencies)
    emit({"ok": True, **_device(torch), "batches": len(ms), "layers": args.layers, "width": args.width,
          "batch": args.batch, "seq": args.seq, "p50_ms": _percentile(ms, 0.50), "p99_ms": _percentile(ms, 0.99),
          "mean_ms": sum(ms) / len(ms), "finite": finite})
    return 0


def cmd_meminfo(args: argparse.Namespace) -> int:
    """What the slice looks like from inside: ``torch.cuda.mem_get_info()``, device count, name, SMs."""
    torch = _torch()
    emit({"ok": True, **_device(torch)})
    return 0


def cmd_facts(args: argparse.Namespace) -> int:
    """PyTorch's version and build, and the devices it sees (for the report's machine facts)."""
    torch = _torch()
    out: dict[str, Any] = {"ok": True, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                           "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available()}
    cudnn = getattr(torch.backends, "cudnn", None)
    out["cudnn"] = cudnn.version() if cudnn is not None and cudnn.is_available() else None
    out["devices"] = []
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out["devices"].append({"name": props.name, "capability": list(torch.cuda.get_device_capability(i)),
                                   "sm_count": props.multi_processor_count, "total_mib": props.total_memory // MIB})
    emit(out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    alloc = sub.add_parser("alloc", help="allocate GiB blocks until done or out of memory")
    alloc.add_argument("--gib", type=float, default=12.0)
    alloc.add_argument("--step", type=float, default=1.0)
    alloc.add_argument("--hold", type=float, default=0.0, help="seconds to hold the memory after reporting")
    mm = sub.add_parser("matmul", help="square matmuls for --iters iterations or --seconds")
    mm.add_argument("--seconds", type=float, default=10.0)
    mm.add_argument("--iters", type=int, default=0, help="fixed iterations (timed with CUDA events)")
    mm.add_argument("--size", type=int, default=8192)
    mm.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "exact"), default="bf16")
    mm.add_argument("--warmup", type=int, default=10)
    mm.add_argument("--hold-gib", type=float, default=0.0)
    mm.add_argument("--seed", type=int, default=12)
    mm.add_argument("--ready", default=None)
    mm.add_argument("--go", default=None)
    mm.add_argument("--go-timeout", type=float, default=120.0)
    mm.add_argument("--stop", default=None, help="end the timed loop early once this file exists")
    model = sub.add_parser("model", help="per-batch latency of a small transformer")
    model.add_argument("--batches", type=int, default=200)
    model.add_argument("--warmup", type=int, default=20)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--width", type=int, default=1024)
    model.add_argument("--heads", type=int, default=16)
    model.add_argument("--batch", type=int, default=16)
    model.add_argument("--seq", type=int, default=256)
    model.add_argument("--seed", type=int, default=12)
    sub.add_parser("meminfo", help="torch.cuda.mem_get_info() and the device, as this process sees them")
    sub.add_parser("facts", help="PyTorch's version and the devices it sees")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "alloc": cmd_alloc, "matmul": cmd_matmul, "model": cmd_model, "meminfo": cmd_meminfo, "facts": cmd_facts}


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        if _emitted:  # the result line is out; say what went wrong after it on stderr
            print(f"{args.command}: {_short(exc)}", file=sys.stderr, flush=True)
        else:
            emit({"ok": False, "pid": os.getpid(), "error": _short(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
