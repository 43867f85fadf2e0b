"""A kubelet stand-in for the device plugin tests: it speaks the device plugin API's protobuf wire format by
hand (field numbers, no generated code, so the project's .proto numbering is checked against the wire),
serves ``/v1beta1.Registration/Register`` on ``<dir>/kubelet.sock`` and dials the plugin's socket as the
kubelet does (GetDevicePluginOptions, ListAndWatch, Allocate)."""

from __future__ import annotations

import queue
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from kubernetes import client

from hami_ray.k8s.deviceplugin import DevicePlugin
from node_actors.backends import SimulatedBackend


# --- the protobuf wire format, by hand ------------------------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def decode_fields(buf: bytes) -> dict[int, list[Any]]:
    """Field number -> values (varints as int, length-delimited as bytes)."""
    out: dict[int, list[Any]] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        if key & 7 == 0:
            value, i = _varint(buf, i)
        elif key & 7 == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise AssertionError(f"wire type {key & 7} not expected")
        out.setdefault(key >> 3, []).append(value)
    return out


def _text(fields: dict[int, list[Any]], number: int) -> str:
    return bytes(fields.get(number, [b""])[-1]).decode()


def encode_field(number: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    out, n = bytearray([number << 3 | 2]), len(data)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


class Kubelet:
    """The kubelet's side of the device plugin API, on ``<plugin_dir>/kubelet.sock``."""

    def __init__(self, plugin_dir: Path) -> None:
        self.dir = plugin_dir
        self.registrations: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.lists: queue.Queue[list[tuple[str, str, int]]] = queue.Queue()
        self.server: grpc.Server | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "v1beta1.Registration", {"Register": grpc.unary_unary_rpc_method_handler(self._register)}),))
        server.add_insecure_port(f"unix://{self.dir / 'kubelet.sock'}")
        server.start()
        self.server = server

    def _register(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        fields = decode_fields(raw)
        options = decode_fields(fields.get(4, [b""])[-1])
        self.registrations.put((time.monotonic(), {
            "version": _text(fields, 1), "endpoint": _text(fields, 2), "resource_name": _text(fields, 3),
            "pre_start_required": bool(options.get(1, [0])[-1]), "preferred": bool(options.get(2, [0])[-1])}))
        return b""  # Empty

    def connect(self, endpoint: str) -> dict[int, list[Any]]:
        """Dial the plugin, ask its options, follow ListAndWatch (each list lands in ``lists``)."""
        self.channel = grpc.insecure_channel(f"unix://{self.dir / endpoint}")
        options = decode_fields(self.channel.unary_unary("/v1beta1.DevicePlugin/GetDevicePluginOptions")(b"", timeout=5))
        stream = self.channel.unary_stream("/v1beta1.DevicePlugin/ListAndWatch")(b"")

        def follow() -> None:
            try:
                for raw in stream:
                    devices = []
                    for device in map(decode_fields, decode_fields(raw).get(1, [])):
                        numa = [decode_fields(n).get(1, [0])[-1] for n in decode_fields(device.get(3, [b""])[-1]).get(1, [])]
                        devices.append((_text(device, 1), _text(device, 2), numa[0] if numa else -1))
                    self.lists.put(devices)
            except grpc.RpcError:
                pass

        threading.Thread(target=follow, daemon=True).start()
        return options

    def allocate(self, *containers: list[str]) -> list[dict[str, Any]]:
        """One Allocate with a container request per argument; per container its envs and mounts."""
        assert self.channel is not None
        request = b"".join(encode_field(1, b"".join(encode_field(1, i) for i in ids)) for ids in containers)
        raw = self.channel.unary_unary("/v1beta1.DevicePlugin/Allocate")(request, timeout=10)
        out = []
        for container in map(decode_fields, decode_fields(raw).get(1, [])):
            envs = {_text(e, 1): _text(e, 2) for e in map(decode_fields, container.get(1, []))}
            mounts = [(_text(m, 1), _text(m, 2), bool(m.get(3, [0])[-1])) for m in map(decode_fields, container.get(2, []))]
            out.append({"envs": envs, "mounts": mounts})
        return out

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.server is not None:
            self.server.stop(0).wait(5)
            self.server = None

    def restart(self) -> float:
        """Stop, delete every socket in the directory (as a new kubelet does), serve again; when it began."""
        self.stop()
        began = time.monotonic()
        for entry in self.dir.iterdir():
            if stat.S_ISSOCK(entry.lstat().st_mode):
                entry.unlink()
        self.start()
        return began


def start_plugin(plugin_api: client.ApiClient, node: str, kubelet: Kubelet, spec: str = "2xT4-16GB",
            **options: Any) -> tuple[DevicePlugin, SimulatedBackend]:
    backend = SimulatedBackend(spec, node, kubelet.dir / "state")
    plugin = DevicePlugin(plugin_api, node, backend.discover(), health=backend.health, plugin_dir=kubelet.dir,
                          **options)
    plugin.start()
    return plugin, backend
