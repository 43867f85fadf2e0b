"""The device plugin API's generated gRPC modules: made at build or install time, never on import.

- what is importable matches what ``hami_ray/k8s/proto/codegen.py`` makes of the .proto now (no drift);
- the runtime floors in pyproject.toml are the ones the generated code checks for;
- a wheel built from a clean tree carries the modules, its build prints no deprecation, and the package
  imports from a read-only folder (as an unprivileged user where the suite runs as root) and writes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest

import hami_ray.k8s._generated as generated

REPO = Path(__file__).resolve().parents[2]
CODEGEN = REPO / "hami_ray" / "k8s" / "proto" / "codegen.py"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
NOBODY = 65534


def _codegen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hami_ray_codegen_test", CODEGEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pin(requirements: list[str], name: str) -> str:
    """The version after ``name==`` / ``name>=`` in a list of requirement strings."""
    for req in requirements:
        match = re.fullmatch(rf"{re.escape(name)}\s*(==|>=)\s*([\w.]+)", req.strip())
        if match:
            return match.group(2)
    raise AssertionError(f"{name} is not pinned in {requirements}")


def test_generated_modules_match_the_proto() -> None:
    build_tools = _pin(PYPROJECT["build-system"]["requires"], "grpcio-tools")
    assert version("grpcio-tools") == build_tools, "the test extra's grpcio-tools must be the build's (pyproject.toml)"
    fresh = _codegen().render()
    installed = Path(generated.__file__).parent
    assert sorted(fresh) == ["__init__.py", "api_pb2.py", "api_pb2_grpc.py"]
    for name, text in fresh.items():
        assert (installed / name).read_text() == text, (
            f"{installed / name} is not what the .proto gives now: install again (make, or pip install -e .)")


def test_runtime_floors_are_what_the_generated_code_checks() -> None:
    fresh = _codegen().render()
    grpc_needed = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", fresh["api_pb2_grpc.py"])
    proto_needed = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),"
                             r"\s*(\d+),", fresh["api_pb2.py"])
    assert grpc_needed and proto_needed
    deps = PYPROJECT["project"]["dependencies"]
    assert _pin(deps, "grpcio") == grpc_needed.group(1)
    assert _pin(deps, "protobuf") == ".".join(proto_needed.groups())
    assert not any(d.startswith("grpcio-tools") for d in deps)  # build and test time only


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def wheel() -> Iterator[Path]:
    """A wheel built from a clean copy of the tree (no ``_generated``), without network."""
    work = Path(tempfile.mkdtemp(prefix="hami-ray-wheel-"))
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "_generated", "*.egg-info")
    for package in ("hami_ray", "node_actors"):
        shutil.copytree(REPO / package, src / package, ignore=skip)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "--no-cache-dir", "-w", str(work / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "deprecat" not in (built.stdout + built.stderr).lower()  # e.g. setuptools on a pre-PEP 639 license
    (path,) = (work / "dist").glob("hami_ray-*.whl")
    yield path
    for p in [work, *work.rglob("*")]:  # the read-only test took write permission away
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(work)


def test_wheel_ships_the_generated_modules(wheel: Path) -> None:
    fresh = _codegen().render()
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name, text in fresh.items():
            assert zf.read(f"hami_ray/k8s/_generated/{name}").decode() == text
        metadata = zf.read("hami_ray-0.1.0.dist-info/METADATA").decode()
    assert "hami_ray/k8s/proto/deviceplugin/v1beta1/api.proto" in names
    assert "hami_ray-0.1.0.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: License" not in metadata and "pydantic-settings" not in metadata


IMPORT_CHECK = """
import sys
from hami_ray.k8s import grpc_api
from hami_ray.k8s.deviceplugin import DevicePlugin
from hami_ray.k8s.grpc_api import pb2, pb2_grpc
assert grpc_api.__file__.startswith(sys.argv[1]), grpc_api.__file__
sent = pb2.ListAndWatchResponse(devices=[pb2.Device(ID="GPU-0", health="Healthy")])
assert pb2.ListAndWatchResponse.FromString(sent.SerializeToString()).devices[0].ID == "GPU-0"
assert hasattr(pb2_grpc, "DevicePluginServicer") and hasattr(pb2_grpc, "RegistrationStub")
print("imported from", grpc_api.__file__)
"""


def test_the_wheel_imports_from_a_read_only_folder(wheel: Path) -> None:
    site = wheel.parent.parent / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # what installing a pure-Python wheel amounts to
    for p in [site, *site.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) | stat.S_IRGRP | stat.S_IROTH
                | (stat.S_IXGRP | stat.S_IXOTH if p.is_dir() else 0))
    for p in (site.parent, site.parent.parent):
        p.chmod(p.stat().st_mode | stat.S_IXOTH)  # an unprivileged user can reach it (mkdtemp makes 0700)
    before = _snapshot(site)
    demote = []
    if os.geteuid() == 0:  # root writes through a-w: import as nobody, where the folder is truly read-only
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a read-only folder cannot be enforced")
        demote = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([*demote, sys.executable, "-c", IMPORT_CHECK, str(site)], capture_output=True,
                            text=True, env=env, cwd="/", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported from" in result.stdout
    assert _snapshot(site) == before  # nothing created or changed in the installed package
