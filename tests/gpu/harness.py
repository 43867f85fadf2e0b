"""Running the suite's worker subprocesses, bounded, and collecting its figures.

Used by the tests in ``tests/gpu``: :class:`Worker` starts ``workers.py`` with an environment (a slice's, from
:mod:`tests.gpu.slices`), reads its one JSON result line with a timeout, and always stops it (SIGTERM, then
SIGKILL) when its ``with`` block ends. :data:`RESULTS` is the session's figures, filled with :func:`record`
and written by ``conftest.py`` to the file named by ``HAMI_RAY_GPU_RESULTS`` (``bench/gpu_check.py`` reads it).
No PyTorch here: only the workers import it.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.gpu.machine import WORKERS

RESULTS_ENV = "HAMI_RAY_GPU_RESULTS"
SETUP_S = 120.0  # import torch + CUDA (or MPS client) initialisation, cold, before a worker's result
STOP_S = 10.0  # per stage of stopping a worker (SIGTERM, then SIGKILL)
TAIL_CHARS = 2000

# The session's figures: ``checks`` by check and key (bench/gpu_check.py renders them), ``tests`` by node id.
RESULTS: dict[str, Any] = {"checks": {}, "tests": {}, "errors": []}


def record(check: str, key: str, value: Any) -> None:
    """Keep one figure set of a check, e.g. ``record("e_meminfo", "mps", {...})``."""
    RESULTS["checks"].setdefault(check, {})[key] = value


def dump_results() -> None:
    """Write :data:`RESULTS` to ``$HAMI_RAY_GPU_RESULTS`` (atomically) when that is set; else nothing."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(RESULTS, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


# Variables a worker must not inherit from the suite's own environment: they would move it into (or out
# of) an MPS daemon or HAMi-core, or hide devices, whatever slice it is meant to run in.
_INHERITED_ISOLATION = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "LD_PRELOAD", "HAMI_RAY_SLICE",
                        "XLA_PYTHON_CLIENT_MEM_FRACTION")
_INHERITED_PREFIXES = ("CUDA_MPS_", "CUDA_DEVICE_MEMORY_", "CUDA_DEVICE_SM_LIMIT")


def worker_env(slice_env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without isolation variables, plus ``slice_env``.

    Example: ``worker_env({"CUDA_VISIBLE_DEVICES": "GPU-8a1f..."})`` runs a worker with no slice on one GPU.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in _INHERITED_ISOLATION and not k.startswith(_INHERITED_PREFIXES)}
    env.update(slice_env)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerFailed(AssertionError):
    """A worker exited without its result, reported an error, or did not answer in time; str() says which,
    with the tail of its stderr."""


class Worker:
    """One ``workers.py`` subprocess; a context manager that always stops it.

    Args:
        command: the worker's arguments, e.g. ``["alloc", "--gib", "12"]``.
        env: its whole environment (see :func:`worker_env`).
        logs: a directory for its stderr.
        name: a short name for messages and the log file.

    Example::

        with Worker(["meminfo"], worker_env(env), tmp_path, "m") as w:
            figures = w.result(SETUP_S)
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str], logs: Path, name: str) -> None:
        self.name = name
        self.stderr_path = logs / f"{name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        try:
            self.proc = subprocess.Popen([sys.executable, str(WORKERS), *command], env=dict(env),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
                                         text=True)
        except BaseException:
            self._stderr.close()
            raise
        self._reader = threading.Thread(target=self._read, name=f"worker-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._lines.put(line)
        except (OSError, ValueError):  # the pipe was closed under us while stopping
            pass
        finally:
            self._lines.put(None)

    def tail(self) -> str:
        """The end of the worker's stderr, for failure messages."""
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- {self.name} stderr (tail) ---\n{text[-TAIL_CHARS:]}" if text.strip() else ""

    def result(self, timeout_s: float) -> dict[str, Any]:
        """The worker's JSON result line, waiting at most ``timeout_s``.

        Raises:
            WorkerFailed: it reported ``ok: false``, exited without a result, or timed out.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailed(f"{self.name}: no result within {timeout_s:g} s{self.tail()}")
            try:
                line = self._lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                try:
                    code = self.proc.wait(timeout=STOP_S)
                except subprocess.TimeoutExpired:
                    code = None
                raise WorkerFailed(f"{self.name} exited ({code}) without a result{self.tail()}")
            line = line.strip()
            if not line.startswith("{"):
                continue
            data: dict[str, Any] = json.loads(line)
            if data.get("ok") is not True:
                raise WorkerFailed(f"{self.name} failed: {data.get('error')}{self.tail()}")
            return data

    def poll_result(self) -> dict[str, Any] | None:
        """The result line if it has arrived, else None; never waits."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return None
            if line is None:
                self._lines.put(None)  # later callers see the end too
                return None
            if line.strip().startswith("{"):
                data: dict[str, Any] = json.loads(line)
                return data

    def drained(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until everything the exited worker printed has been read."""
        self._reader.join(timeout=timeout_s)

    def wait(self, timeout_s: float) -> int:
        """Its exit status, waiting at most ``timeout_s``.

        Raises:
            WorkerFailed: it is still running.
        """
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise WorkerFailed(f"{self.name} still runs after {timeout_s:g} s{self.tail()}") from exc

    def stop(self) -> None:
        """SIGTERM (the worker exits through Python), then SIGKILL; reaps it and closes its pipes."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=STOP_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=STOP_S)
        finally:
            self._reader.join(timeout=STOP_S)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def run_worker(command: Sequence[str], env: Mapping[str, str], logs: Path, name: str,
               timeout_s: float = SETUP_S) -> dict[str, Any]:
    """Run a worker to its end and return its result plus ``returncode``.

    Raises:
        WorkerFailed: as :meth:`Worker.result`, or it did not exit within ``timeout_s`` of starting.
    """
    started = time.monotonic()
    with Worker(command, env, logs, name) as w:
        data = w.result(timeout_s)
        data["returncode"] = w.wait(max(STOP_S, timeout_s - (time.monotonic() - started)))
        if data["returncode"] != 0:
            raise WorkerFailed(f"{name} exited {data['returncode']} after its result{w.tail()}")
        return data


def wait_for_file(path: Path, worker: Worker, timeout_s: float = SETUP_S) -> None:
    """Wait until ``worker`` creates ``path`` (its ready signal).

    Raises:
        WorkerFailed: the worker exited first (its result says why) or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if worker.proc.poll() is not None:
            worker.drained(STOP_S)
            got = worker.poll_result()
            raise WorkerFailed(f"{worker.name} exited ({worker.proc.returncode}) before it was ready: "
                               f"{(got or {}).get('error')}{worker.tail()}")
        if time.monotonic() > deadline:
            raise WorkerFailed(f"{worker.name} was not ready within {timeout_s:g} s{worker.tail()}")
        time.sleep(0.02)
