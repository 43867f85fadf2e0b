"""Generate the device plugin API's Python modules from ``deviceplugin/v1beta1/api.proto`` with grpcio-tools.

Run when the package is built or installed (``setup.py``'s ``build_py``: into the wheel, or beside the
sources for an editable install), never at import time: an installed package is never written to. The
drift test (``tests/k8s/test_grpc_codegen.py``) renders again into memory and compares.

Standard library and ``grpc_tools`` only, and loaded by file path (``setup.py`` runs before the package's
own dependencies exist). By hand: ``python hami_ray/k8s/proto/codegen.py [OUT_DIR]`` (default
``hami_ray/k8s/_generated``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the -I folder: the .proto's path below it is its name on the wire
PROTO = Path("deviceplugin") / "v1beta1" / "api.proto"
PACKAGE = "hami_ray.k8s._generated"  # where the modules live once installed
DEFAULT_OUT = ROOT.parent / "_generated"
FILES = ("__init__.py", "api_pb2.py", "api_pb2_grpc.py")
_PROTOC_IMPORT = "from deviceplugin.v1beta1 import api_pb2 as"  # what grpcio-tools writes for the services


def render(root: Path = ROOT) -> dict[str, str]:
    """The generated modules, name -> text: grpcio-tools' protoc into a temporary folder, then the
    services' import of the messages made absolute (``hami_ray.k8s._generated.api_pb2``)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # noqa: PLC0415 - a build-time tool

    with tempfile.TemporaryDirectory(prefix="hami-ray-protoc-") as tmp:
        code = protoc.main(["protoc", f"-I{root}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO)])
        if code != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({code}) on {root / PROTO}")
        built = Path(tmp) / PROTO.parent
        messages = (built / "api_pb2.py").read_text()
        services = (built / "api_pb2_grpc.py").read_text()
    if _PROTOC_IMPORT not in services:
        raise RuntimeError(f"no {_PROTOC_IMPORT!r} in the generated api_pb2_grpc.py (grpcio-tools changed?)")
    return {
        "__init__.py": f'"""Generated from ../proto/{PROTO.as_posix()} by ../proto/codegen.py at build or install time."""\n',
        "api_pb2.py": messages,
        "api_pb2_grpc.py": services.replace(_PROTOC_IMPORT, f"from {PACKAGE} import api_pb2 as"),
    }


def write(out_dir: Path, root: Path = ROOT) -> list[Path]:
    """Render and write the modules into ``out_dir``, each through a temporary file moved in place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(root).items():
        target = out_dir / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    for path in write(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
