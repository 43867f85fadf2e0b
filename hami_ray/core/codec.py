"""Codecs for HAMi's annotations: the pod allocation string and the node device register.

HAMi keeps its whole state in annotations (hami.md §1.2-1.4): the scheduler writes the chosen devices
into the pod (``hami.io/vgpu-devices-allocated``), device plugins register their devices on the node
(``hami.io/node-nvidia-register``, JSON; older vendors a comma format) and, optionally, pair scores
(``hami.io/node-nvidia-score``). Reading and writing them byte for byte is what lets hami-ray and HAMi
share a cluster.

Called by the Kubernetes bridge (annotations ↔ allocations and nodes) and by tests that replay HAMi
clusters. Pure string work: no Kubernetes client here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from pydantic import ValidationError

from hami_ray.core.errors import AnnotationFormatError, InvalidRequest
from hami_ray.core.model import Device, DeviceGrant, DeviceMode
from hami_ray.core.vendors import NVIDIA_SCORE_ANNOTATION, NVIDIA_VENDOR, vendor_by_type

ALLOCATED_ANNOTATION = "hami.io/vgpu-devices-allocated"
REGISTER_ANNOTATION = "hami.io/node-nvidia-register"
CONTAINER_SEP = ";"  # HAMi's OnePodMultiContainerSplitSymbol
DEVICE_SEP = ":"  # OneContainerMultiDeviceSplitSymbol
FIELD_SEP = ","
HAMI_CORE_MODE = "hami-core"
_SEPARATORS = frozenset(CONTAINER_SEP + DEVICE_SEP + FIELD_SEP)
_INT = re.compile(r"^[+-]?[0-9]+$")  # Go's strconv.ParseInt(s, 10, ...): optional sign, digits only
_INT32 = (-(2**31), 2**31 - 1)
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


@dataclass(frozen=True, slots=True)
class DecodedDevice:
    """One ``UUID,Type,mem,cores`` entry of an allocation annotation."""

    uuid: str
    type: str
    memory_mib: int
    cores: int

    def to_grant(self) -> DeviceGrant:
        """The entry as a :class:`DeviceGrant` (``type`` is the request keyword, dropped)."""
        return DeviceGrant(uuid=self.uuid, memory_mib=self.memory_mib, cores=self.cores)


@dataclass(frozen=True, slots=True)
class RegisteredDevice:
    """One entry of a node register annotation (HAMi's ``DeviceInfo``).

    ``devmem`` is MiB already multiplied by ``deviceMemoryScaling``; ``devcore`` is 100 x
    ``deviceCoreScaling``; ``count`` is ``deviceSplitCount``. ``mig_profiles`` keeps HAMi's JSON
    objects as they are. ``vendor`` is not on the wire: the decoder sets it.
    """

    id: str
    count: int
    devmem: int
    devcore: int
    type: str
    index: int = 0
    numa: int = 0
    mode: str = HAMI_CORE_MODE
    health: bool = True
    mig_profiles: tuple[object, ...] = ()
    vendor: str = NVIDIA_VENDOR.type_word


def _check_token(value: str, what: str) -> None:
    if not value or _SEPARATORS & set(value):
        raise InvalidRequest(what, f"must be non-empty and free of ',', ':' and ';', got {value!r}")


def encode_pod_devices(containers: Sequence[Sequence[DeviceGrant]], type_word: str = "NVIDIA") -> str:
    """Encode per-container grants as HAMi's allocation annotation value.

    Each device is ``UUID,Type,mem,cores:`` and each container ends with ``;``; a container without
    devices is just ``;`` (HAMi's ``EncodePodSingleDevice``).

    Args:
        containers: grants per container, init containers first.
        type_word: the vendor's request keyword written as ``Type``.

    Returns:
        The annotation value.

    Raises:
        InvalidRequest: a uuid or type keyword that is empty or holds a separator.

    Example:
        >>> encode_pod_devices([[DeviceGrant(uuid="GPU-a", memory_mib=3000, cores=0)], []])
        'GPU-a,NVIDIA,3000,0:;;'
    """
    _check_token(type_word, "type_word")
    parts: list[str] = []
    for grants in containers:
        for grant in grants:
            _check_token(grant.uuid, "uuid")
            parts.append(f"{grant.uuid}{FIELD_SEP}{type_word}{FIELD_SEP}{grant.memory_mib}{FIELD_SEP}"
                         f"{grant.cores}{DEVICE_SEP}")
        parts.append(CONTAINER_SEP)
    return "".join(parts)


def _int32(text: str, field: str, what: str, *, minimum: int = _INT32[0]) -> int:
    if not _INT.match(text) or not max(minimum, _INT32[0]) <= int(text) <= _INT32[1]:
        raise AnnotationFormatError(field, f"{what} must be an integer in [{minimum}, {_INT32[1]}], got {text!r}")
    return int(text)


def _decode_container(piece: str, field: str) -> list[DecodedDevice]:
    devices: list[DecodedDevice] = []
    for entry in piece.split(DEVICE_SEP):
        if not entry:  # HAMi skips empty device entries
            continue
        items = entry.split(FIELD_SEP)
        if len(items) < 4:
            raise AnnotationFormatError(field, f"device entry {entry!r} needs UUID,Type,mem,cores")
        if not items[0] or not items[1]:
            raise AnnotationFormatError(field, f"device entry {entry!r} lacks a UUID or type")
        devices.append(DecodedDevice(
            uuid=items[0], type=items[1],
            memory_mib=_int32(items[2], field, "memory", minimum=0),
            cores=_int32(items[3], field, "cores", minimum=0),
        ))
    return devices


def decode_pod_devices(value: str, field: str = ALLOCATED_ANNOTATION) -> list[list[DecodedDevice]]:
    """Decode an allocation annotation value into devices per container.

    HAMi's ``DecodePodDevices`` splits on ``;`` and keeps empty pieces, so that entry ``i`` is
    container ``i``; its split also yields one extra empty entry after the final ``;``. Here ``;``
    is read as a terminator: that one trailing empty piece is dropped, so a pod of ``n`` containers
    decodes to ``n`` entries and ``decode_pod_devices(encode_pod_devices(x))`` gives ``x`` back.
    Entries ``0..n-1`` are identical to HAMi's. Fields beyond the fourth are ignored, as in HAMi.

    Args:
        value: the annotation value.
        field: the annotation key, reported on error.

    Returns:
        Per container, its decoded devices (``[]`` for a container without devices).

    Raises:
        AnnotationFormatError: an entry with fewer than 4 fields, an empty UUID or type, or a
            memory/cores value that is not a non-negative int32.

    Example:
        >>> decode_pod_devices("GPU-a,NVIDIA,3000,0:;;")
        [[DecodedDevice(uuid='GPU-a', type='NVIDIA', memory_mib=3000, cores=0)], []]
    """
    if not isinstance(value, str):
        raise AnnotationFormatError(field, f"expected a string, got {type(value).__name__}")
    pieces = value.split(CONTAINER_SEP)
    if pieces[-1] == "":
        pieces.pop()
    return [_decode_container(piece, field) for piece in pieces]


def _register_field(vendor: str) -> str:
    known = vendor_by_type(vendor)
    return known.register if known is not None and known.register else REGISTER_ANNOTATION


def _json_int(item: Mapping[str, object], key: str, field: str, minimum: int) -> int:
    value = item.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _INT32[1]:
        raise AnnotationFormatError(field, f"{key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _json_str(item: Mapping[str, object], key: str, field: str) -> str:
    value = item.get(key, "")
    if not isinstance(value, str):
        raise AnnotationFormatError(field, f"{key!r} must be a string, got {value!r}")
    return value


def _decode_json_register(value: str, field: str, vendor: str) -> list[RegisteredDevice]:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise AnnotationFormatError(field, f"not JSON: {exc}") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise AnnotationFormatError(field, f"expected a JSON array, got {type(data).__name__}")
    out: list[RegisteredDevice] = []
    for item in data:
        if not isinstance(item, dict):
            raise AnnotationFormatError(field, f"expected device objects, got {item!r}")
        device_id = _json_str(item, "id", field)
        if not device_id:
            raise AnnotationFormatError(field, f"device without an id: {item!r}")
        health = item.get("health", False)  # omitempty: HAMi omits health exactly when it is false
        profiles = item.get("migProfiles")
        profiles = [] if profiles is None else profiles
        if not isinstance(health, bool) or not isinstance(profiles, list):
            raise AnnotationFormatError(field, f"bad health or migProfiles in {item!r}")
        out.append(RegisteredDevice(
            id=device_id, count=_json_int(item, "count", field, 0), devmem=_json_int(item, "devmem", field, 0),
            devcore=_json_int(item, "devcore", field, 0), type=_json_str(item, "type", field),
            index=_json_int(item, "index", field, 0), numa=_json_int(item, "numa", field, _INT32[0]),
            mode=_json_str(item, "mode", field), health=health, mig_profiles=tuple(profiles), vendor=vendor,
        ))
    return out


def _decode_legacy_register(value: str, field: str, vendor: str) -> list[RegisteredDevice]:
    if DEVICE_SEP not in value:
        raise AnnotationFormatError(field, f"no ':' device separator in {value!r}")
    out: list[RegisteredDevice] = []
    for entry in value.split(DEVICE_SEP):
        if not entry:
            continue
        items = entry.split(FIELD_SEP)
        if len(items) not in (7, 9):  # HAMi's DecodeNodeDevices accepts exactly these two forms
            raise AnnotationFormatError(field, f"device entry {entry!r} has {len(items)} fields, expected 7 or 9")
        if items[6] not in _TRUE | _FALSE:
            raise AnnotationFormatError(field, f"health must be true or false, got {items[6]!r}")
        out.append(RegisteredDevice(
            id=items[0], count=_int32(items[1], field, "count"), devmem=_int32(items[2], field, "devmem"),
            devcore=_int32(items[3], field, "devcore"), type=items[4], numa=_int32(items[5], field, "numa"),
            health=items[6] in _TRUE,
            index=_int32(items[7], field, "index", minimum=0) if len(items) == 9 else 0,
            mode=items[8] if len(items) == 9 else HAMI_CORE_MODE, vendor=vendor,
        ))
    return out


def decode_node_register(value: str, *, vendor: str = "NVIDIA", field: str | None = None) -> list[RegisteredDevice]:
    """Decode a node register annotation, JSON (v2.10) or the legacy comma format.

    JSON keys missing take Go's zero values, as HAMi's ``UnMarshalNodeDevices`` does: ``index``,
    ``numa`` 0, ``mode`` ``""`` and ``health`` **false** (the writer tags every field ``omitempty``,
    so it leaves ``health`` out exactly for an unhealthy device). A 7-field legacy entry gets index
    0 and mode ``hami-core``, as ``DecodeNodeDevices``.

    Args:
        value: the annotation value; a leading ``[`` (or ``null``) selects JSON.
        vendor: the vendor type keyword stored in each device.
        field: the annotation key reported on error; the vendor's register key by default.

    Returns:
        The registered devices in annotation order (``[]`` for an empty value).

    Raises:
        AnnotationFormatError: malformed JSON, wrong types, or a legacy entry that is not 7 or 9
            fields of the right kinds.

    Example:
        >>> decode_node_register('[{"id":"GPU-a","count":10,"devmem":81920,"devcore":100,'
        ...                      '"type":"NVIDIA A100","mode":"hami-core","health":true}]')[0].devmem
        81920
    """
    key = field or _register_field(vendor)
    if not isinstance(value, str):
        raise AnnotationFormatError(key, f"expected a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        return []
    if text.startswith("[") or text == "null":
        return _decode_json_register(text, key, vendor)
    return _decode_legacy_register(text, key, vendor)


_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPED = re.compile("[<>&\u2028\u2029\ud800-\udfff]")


def go_json(value: object) -> str:
    r"""``value`` as Go's ``json.Marshal`` writes it, byte for byte (HAMi's device plugins write their
    annotations so): compact, non-ASCII as UTF-8, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped as
    ``\u003c``, ``\u003e``, ``\u0026``, ``\u2028``, ``\u2029`` (Go's HTML-safe default), a lone surrogate
    (what Go reads as invalid UTF-8) as ``\ufffd``. Control characters are escaped alike by both (``\n``,
    ``\b``, ``\u0001``; Go 1.22 and later). Keys keep their order: sort them first where Go would (maps).

    Example:
        >>> go_json([{"type": "A<B>&C"}])
        '[{"type":"A\\u003cB\\u003e\\u0026C"}]'
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return _GO_ESCAPED.sub(lambda m: _GO_ESCAPES.get(m.group(), "\\ufffd"), text)


def encode_node_register(devices: Sequence[RegisteredDevice], legacy: bool = False) -> str:
    """Encode devices as a register annotation value, as HAMi's device plugins write it.

    JSON follows ``MarshalNodeDevices``: compact, keys in ``DeviceInfo`` order, zero values left
    out, strings escaped as Go's ``json.Marshal`` does (:func:`go_json`). Legacy follows
    ``EncodeNodeDevices``: always the 9-field form.

    Raises:
        InvalidRequest: a legacy field holding a separator, or MIG profiles (legacy cannot carry them).

    Example:
        >>> encode_node_register([RegisteredDevice("GPU-a", 10, 81920, 100, "A100")], legacy=True)
        'GPU-a,10,81920,100,A100,0,true,0,hami-core:'
    """
    if legacy:
        parts = []
        for d in devices:
            for value, what in ((d.id, "id"), (d.type, "type"), (d.mode, "mode")):
                if _SEPARATORS & set(value):
                    raise InvalidRequest(what, f"the legacy format cannot carry {value!r}")
            if d.mig_profiles:
                raise InvalidRequest("mig_profiles", "the legacy format cannot carry MIG profiles")
            health = "true" if d.health else "false"
            parts.append(f"{d.id},{d.count},{d.devmem},{d.devcore},{d.type},{d.numa},{health},{d.index},{d.mode}:")
        return "".join(parts)
    entries = []
    for d in devices:
        pairs: list[tuple[str, object]] = [
            ("id", d.id), ("index", d.index), ("count", d.count), ("devmem", d.devmem), ("devcore", d.devcore),
            ("type", d.type), ("numa", d.numa), ("mode", d.mode), ("migProfiles", list(d.mig_profiles)),
            ("health", d.health),
        ]
        entries.append({k: v for k, v in pairs if v})  # Go's omitempty: 0, "", [] and false left out
    return go_json(entries)


def registered_to_device(rd: RegisteredDevice, index: int, *, links: Mapping[str, int] | None = None) -> Device:
    """Build a :class:`Device` from a registered one.

    ``devmem`` and ``devcore`` are already scaled by HAMi, so they become ``memory_mib`` and
    ``cores`` with scaling 1; ``count`` is the split count. Mode ``mig`` maps to MIG, anything else
    (``hami-core``, empty) to shared.

    Args:
        rd: the decoded register entry.
        index: the device index on the node (see :func:`devices_from_register` for the choice).
        links: pair scores to the other devices (from :func:`decode_node_scores`).

    Raises:
        InvalidRequest: a device with no memory, cores or slots, which hami-ray cannot schedule.

    Example:
        >>> registered_to_device(RegisteredDevice("GPU-a", 10, 81920, 100, "A100"), 0).split_count
        10
    """
    try:
        return Device(
            uuid=rd.id, index=index, vendor=rd.vendor, model=rd.type, memory_mib=rd.devmem, cores=rd.devcore,
            numa=rd.numa, healthy=rd.health, split_count=rd.count,
            mode=DeviceMode.MIG if rd.mode == DeviceMode.MIG.value else DeviceMode.SHARED,
            links={peer: score for peer, score in (links or {}).items() if peer != rd.id},
        )
    except ValidationError as exc:
        problems = ", ".join(str(err["loc"][0]) for err in exc.errors() if err["loc"])
        reason = f"device {rd.id!r} cannot be scheduled (bad {problems})"
        raise InvalidRequest(_register_field(rd.vendor), reason) from None


def decode_node_scores(value: str, field: str = NVIDIA_SCORE_ANNOTATION) -> dict[str, dict[str, int]]:
    """Decode ``hami.io/node-nvidia-score`` into ``{uuid: {peer uuid: score}}`` (``Device.links``).

    Raises:
        AnnotationFormatError: not a JSON array of ``{"uuid": str, "score": {str: int}}``.

    Example:
        >>> decode_node_scores('[{"uuid":"GPU-a","score":{"GPU-b":600}}]')
        {'GPU-a': {'GPU-b': 600}}
    """
    try:
        data = json.loads(value) if isinstance(value, str) and value.strip() else []
    except json.JSONDecodeError as exc:
        raise AnnotationFormatError(field, f"not JSON: {exc}") from None
    if not isinstance(data, list):
        raise AnnotationFormatError(field, f"expected a JSON array, got {type(data).__name__}")
    out: dict[str, dict[str, int]] = {}
    for item in data:
        if not isinstance(item, dict):
            raise AnnotationFormatError(field, f"expected {{'uuid': ..., 'score': {{...}}}}, got {item!r}")
        uuid = item.get("uuid")
        scores = {} if item.get("score") is None else item["score"]
        if not isinstance(uuid, str) or not uuid or not isinstance(scores, dict):
            raise AnnotationFormatError(field, f"expected {{'uuid': ..., 'score': {{...}}}}, got {item!r}")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in scores.values()):
            raise AnnotationFormatError(field, f"scores must be integers, got {scores!r}")
        out[uuid] = cast(dict[str, int], scores)
    return out


def encode_node_scores(scores: Mapping[str, Mapping[str, int]]) -> str:
    """Encode pair scores as the device plugin does (peers sorted, as Go marshals maps).

    Example:
        >>> encode_node_scores({"GPU-a": {"GPU-b": 600}})
        '[{"uuid":"GPU-a","score":{"GPU-b":600}}]'
    """
    entries = [{"uuid": uuid, "score": dict(sorted(peers.items()))} for uuid, peers in scores.items()]
    return go_json(entries)


def devices_from_register(register: str, scores: str | None = None, *, vendor: str = "NVIDIA") -> tuple[Device, ...]:
    """Decode a node's register (and optional score) annotation into its devices.

    Indexes come from the register when they are distinct (JSON), else from the position (the
    7-field legacy form has no index; JSON leaves index 0 out).

    Example:
        >>> devices_from_register("GPU-a,10,81920,100,A100,0,true:")[0].memory_mib
        81920
    """
    registered = decode_node_register(register, vendor=vendor)
    links = decode_node_scores(scores) if scores else {}
    indexes = [rd.index for rd in registered]
    if len(set(indexes)) != len(indexes):
        indexes = list(range(len(registered)))
    return tuple(registered_to_device(rd, i, links=links.get(rd.id)) for rd, i in zip(registered, indexes))
