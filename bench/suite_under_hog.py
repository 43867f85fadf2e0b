"""``make test`` several times in a row, each next to a CPU hog (a busy loop per core), from a fresh clone.

    python bench/suite_under_hog.py --runs 5 --json docs/suite_under_hog.json

Issue 15 asks for the whole suite (the short chaos test included) to pass 5 times in a row next to a
CPU hog. Each run: one ``python -c 'while True: pass'`` per core (``--hogs``) started, then ``make test`` in
a fresh clone of this repository's HEAD (``../shared`` linked beside it, as CI lays it out; ``make test``
creates its own ``.venv`` the first time), then the hogs stopped by their pids. It stops at the first
failed run (``--keep-going`` runs them all). pytest runs with ``-x --tb=native`` (the first failure, its
plain traceback), a ``--basetemp`` per run that is kept (the failing test's files: logs of the
processes it started) and the in-process components' INFO log (``pytest_N.log``). The JSON is written
after every run: per run the commit, exit code, seconds, pytest's closing line, the end of the first
failure's traceback (``why``; for a run stopped after ``--run-limit-min``, rc 124, its last log line) and
the log's path;
``passed_in_a_row``.

Under the hog one run takes about 35 minutes on this 2-core machine, so five do not fit one 3-hour
session. ``--resume`` goes on from the runs ``--json`` holds when nothing but documentation (``docs/``,
``README.md``) and this bench's own scripts changed since their commit: runs of the same code, in a row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def fresh_clone(where: Path) -> Path:
    """A clone of this repository's HEAD at ``where/hami-ray``, with ``where/shared`` linking to ``../shared``."""
    clone = where / "hami-ray"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shared = REPO.parent / "shared"
    if shared.exists():
        (where / "shared").symlink_to(shared)
    return clone


def closing_line(log: Path) -> str:
    """pytest's last ``N passed``/``failed`` line of the log, or its last line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if " passed" in line or " failed" in line or " error" in line:
            return line.strip("= ")
    return lines[-1] if lines else ""


def failed_tests(log: Path) -> list[str]:
    """The tests pytest's summary names ``FAILED`` or ``ERROR``."""
    return [line.split()[1] for line in log.read_text(errors="replace").splitlines()
            if line.startswith(("FAILED ", "ERROR ")) and len(line.split()) > 1]


def failure_excerpt(log: Path, lines: int = 30) -> str:
    """The end of the first failure's traceback (its last ``lines`` lines: where it failed and the
    assertion's message), so the JSON says why even when the run's logs are gone with the machine."""
    text = log.read_text(errors="replace").splitlines()
    start = next((i for i, ln in enumerate(text) if ln.startswith("=") and (" FAILURES " in ln or " ERRORS " in ln)),
                 None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(text)) if text[i].startswith("=")
                or (text[i].startswith("-") and " Captured " in text[i])), len(text))
    return "\n".join(text[max(start + 1, end - lines):end])[-4000:]


def one_run(clone: Path, index: int, hogs: int, out: Path, limit_s: float) -> dict[str, object]:
    log = out / f"run_{index}.log"
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    env = {**os.environ, "PYTEST_ADDOPTS": f"-x --tb=native --basetemp={out / f'tmp_{index}'} "
                                           f"-o log_file={out / f'pytest_{index}.log'} -o log_file_level=INFO"}
    started = time.monotonic()
    hung = ""
    try:
        with log.open("wb") as f:
            proc = subprocess.Popen(["make", "test"], cwd=clone, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:  # a hang (a teardown that never returns): stop its process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = 124
                tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
                hung = f"no end in {limit_s / 60:.0f} min; the log's last line: {tail[0][-200:] if tail else ''}"
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    return {"run": index, "commit": commit, "rc": rc, "seconds": round(time.monotonic() - started, 1),
            "pytest": closing_line(log), "failed": failed_tests(log), "why": (failure_excerpt(log) or hung) if rc else "",
            "log": str(log)}


UNTESTED = [":(exclude)docs", ":(exclude)README.md", ":(exclude)bench/suite_under_hog.py",
            ":(exclude)bench/chaos_docs.py"]  # what a run's result does not depend on


def resumable(previous: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of ``previous`` to go on from: all of them if they passed and the code is theirs (only
    :data:`UNTESTED` paths changed since), else none (said why)."""
    runs: list[dict[str, Any]] = list(previous.get("runs") or [])
    if not runs:
        return []
    if any(r["rc"] != 0 for r in runs):
        print("resume: the previous runs had a failure: starting over", file=sys.stderr)
        return []
    commit = str(runs[-1]["commit"])
    same = subprocess.run(["git", "diff", "--quiet", commit, "HEAD", "--", ".", *UNTESTED], cwd=REPO,
                          check=False).returncode == 0
    if not same:
        print(f"resume: the code changed since {commit}: starting over", file=sys.stderr)
        return []
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy loops (default: one per core)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="where clone and logs go (default: a new temp dir)")
    parser.add_argument("--keep-going", action="store_true", help="run them all, failed or not")
    parser.add_argument("--run-limit-min", type=float, default=90.0,
                        help="a run with no end after this long is stopped (its process group killed) and recorded, rc 124")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the passed runs in --json if only docs changed since (see the module)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="hami-ray-hog-"))
    out.mkdir(parents=True, exist_ok=True)
    clone = fresh_clone(out)
    meta: dict[str, Any] = {
        "command": " ".join(["python", "bench/suite_under_hog.py", *sys.argv[1:]]), "hogs": args.hogs,
        "cpu_count": os.cpu_count(), "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pytest_addopts": "-x --tb=native --basetemp=<per run> -o log_file=<per run>"}
    result: dict[str, Any] = {"meta": meta, "runs": [], "passed_in_a_row": 0}
    runs: list[dict[str, Any]] = []
    if args.resume and args.json and args.json.exists():
        previous = json.loads(args.json.read_text())
        runs = resumable(previous)
        if runs:
            result["meta"] = {**previous["meta"], "resumed": [*previous["meta"].get("resumed", []), meta["started"]]}
    for index in range(len(runs) + 1, args.runs + 1):
        row = one_run(clone, index, args.hogs, out, args.run_limit_min * 60)
        runs.append(row)
        streak = 0
        for r in runs:
            streak = streak + 1 if r["rc"] == 0 else 0
        result.update(runs=runs, passed_in_a_row=streak)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if row["rc"] != 0 and not args.keep_going:
            break
    return 0 if all(r["rc"] == 0 for r in runs) and len(runs) >= args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
