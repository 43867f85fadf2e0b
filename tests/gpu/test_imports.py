"""The GPU suite imports no pydantic and no Ray (the GPU machine has neither), and keeps PyTorch out of
its own process: every module of ``tests/gpu``, the node-side modules it drives and ``bench/gpu_check.py``
import in a fresh interpreter where ``pydantic`` and ``ray`` cannot be imported. A CPU test (no ``gpu``
marker): it runs in ``make test``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = sorted(f"tests.gpu.{p.stem}" for p in Path(__file__).parent.glob("*.py") if p.stem != "__init__")
NODE_SIDE = ["hami_ray.core.grades", "node_actors.backends.nvidia", "node_actors.isolation", "node_actors.mps",
             "node_actors.enforcement", "node_actors.pids", "node_actors.processes", "node_actors.settings"]
GPU_CHECK = REPO / "bench" / "gpu_check.py"

PROGRAM = """
import importlib, importlib.util, sys
sys.modules["pydantic"] = None  # any `import pydantic` now raises ImportError
sys.modules["ray"] = None
for name in sys.argv[1:]:
    importlib.import_module(name)
spec = importlib.util.spec_from_file_location("gpu_check", {gpu_check!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert callable(module.main)
assert "torch" not in sys.modules, "the suite's own process imported torch"
print("ok")
"""


def test_the_gpu_suite_imports_without_pydantic_or_ray() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", PROGRAM.format(gpu_check=str(GPU_CHECK)), *NODE_SIDE, *SUITE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    lines = done.stderr.strip().splitlines()
    chain = [line.strip() for line in lines if str(REPO) in line]  # the import chain through our modules
    assert done.returncode == 0 and done.stdout.strip() == "ok", "\n".join([*lines[-1:], *chain])


def test_the_suite_lists_its_modules() -> None:
    assert {"tests.gpu.conftest", "tests.gpu.harness", "tests.gpu.machine", "tests.gpu.slices",
            "tests.gpu.workers"} <= set(SUITE)
