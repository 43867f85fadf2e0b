"""The kubelet device plugin API v1beta1 in Python: ``pb2`` (messages) and ``pb2_grpc`` (services).

The project's own ``proto/deviceplugin/v1beta1/api.proto`` (package data beside this module; upstream's
package, service, method and field names and numbers, which is what the wire carries) is compiled with
grpcio-tools into ``_generated/`` (git-ignored, never committed) the first time this module is imported,
and again when the .proto or the tools' versions change.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent
PROTO = Path("deviceplugin") / "v1beta1" / "api.proto"  # under ./proto (also its name in the descriptor pool)
GENERATED = _HERE / "_generated"


def _proto_root() -> Path | None:
    """The folder holding ``deviceplugin/v1beta1/api.proto``: ``proto/`` in this package (package data,
    so an installed package has it too)."""
    root = _HERE / "proto"
    return root if (root / PROTO).is_file() else None


def _stamp(root: Path) -> str:
    """What the generated code must have been built from: the .proto and the tools' versions."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    digest = hashlib.sha256((root / PROTO).read_bytes())
    for tool in ("grpcio-tools", "protobuf"):
        try:
            digest.update(f"{tool} {version(tool)}\n".encode())
        except PackageNotFoundError:
            digest.update(f"{tool} missing\n".encode())
    return digest.hexdigest()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _generate(root: Path, stamp: str) -> None:
    """Run grpcio-tools' protoc into a temporary folder and move the files in place, the stamp last,
    under a file lock: two processes importing at once generate once, and nobody imports half a file."""
    GENERATED.mkdir(exist_ok=True)
    with open(GENERATED / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read(GENERATED / "STAMP") == stamp:
            return  # another process did it while we waited
        from grpc_tools import protoc  # type: ignore[import-untyped]  # noqa: PLC0415

        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=GENERATED))
        try:
            code = protoc.main(["protoc", f"-I{root}", f"--python_out={staging}", f"--grpc_python_out={staging}", str(PROTO)])
            if code != 0:
                raise ImportError(f"grpc_tools.protoc failed ({code}) on {root / PROTO}")
            built = staging / PROTO.parent
            services = (built / "api_pb2_grpc.py").read_text()
            wrong = "from deviceplugin.v1beta1 import api_pb2 as"
            if wrong not in services:
                raise ImportError("unexpected import in the generated api_pb2_grpc.py (grpcio-tools changed?)")
            files = {
                "__init__.py": '"""Generated from ../proto/deviceplugin/v1beta1/api.proto by hami_ray.k8s.deviceplugin."""\n',
                "api_pb2.py": (built / "api_pb2.py").read_text(),
                "api_pb2_grpc.py": services.replace(wrong, f"from {__package__}._generated import api_pb2 as"),
                "STAMP": stamp,
            }
            for name, text in files.items():  # STAMP last: it says the rest is complete
                (staging / name).write_text(text)
                os.replace(staging / name, GENERATED / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _load_api() -> tuple[Any, Any]:
    """The generated messages and services (``api_pb2``, ``api_pb2_grpc``), generated first when they are
    missing or were built from another .proto or other tools. Without the .proto (an installed package run
    elsewhere) or where the folder cannot be written (an image's user), the code there is used as it is."""
    root = _proto_root()
    have = _read(GENERATED / "STAMP")
    if root is not None and have != (stamp := _stamp(root)):
        try:
            _generate(root, stamp)
        except (OSError, ImportError) as exc:
            if have is None:
                raise ImportError(f"the device plugin API code could not be generated into {GENERATED}: {exc}") from exc
            log.warning("the device plugin API code in %s is kept (not generated again: %s)", GENERATED, exc)
    elif root is None and have is None:
        raise ImportError(f"{_HERE / 'proto' / PROTO} is not found and no code was generated from it in {GENERATED}")
    return (importlib.import_module(f"{__package__}._generated.api_pb2"),
            importlib.import_module(f"{__package__}._generated.api_pb2_grpc"))


pb2, pb2_grpc = _load_api()
