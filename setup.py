"""The build hook: the device plugin API's Python modules (``hami_ray/k8s/_generated``) are generated from
``hami_ray/k8s/proto/deviceplugin/v1beta1/api.proto`` by ``build_py`` (grpcio-tools is a build requirement
in pyproject.toml), so a wheel ships them and nothing writes into an installed package on import.

- ``pip install .`` / ``pip wheel .``: into the build folder, hence into the wheel.
- ``pip install -e .``: beside the sources (``hami_ray/k8s/_generated``, git-ignored), which the
  editable install imports; ``make`` installs again when the .proto changes.

Everything else is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CODEGEN = HERE / "hami_ray" / "k8s" / "proto" / "codegen.py"
GENERATED = ("hami_ray", "k8s", "_generated")


def _codegen() -> ModuleType:
    """``hami_ray/k8s/proto/codegen.py`` by path: importing the package would need its dependencies."""
    spec = importlib.util.spec_from_file_location("hami_ray_codegen", CODEGEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithGrpc(build_py):
    """``build_py``, then the gRPC modules into the build folder (or the sources, when editable)."""

    def _generated_dir(self) -> Path:
        if self.editable_mode:
            return Path(self.get_package_dir("hami_ray.k8s")).resolve() / GENERATED[-1]
        return Path(self.build_lib, *GENERATED)

    def run(self) -> None:
        super().run()
        for path in _codegen().write(self._generated_dir()):
            print(f"generated {path}")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = [str(path) for path in super().get_outputs(include_bytecode)]
        if self.editable_mode:
            return outputs
        extra = [str(Path(self.build_lib, *GENERATED, name)) for name in _codegen().FILES]
        return outputs + [path for path in extra if path not in outputs]


setup(cmdclass={"build_py": BuildPyWithGrpc})
