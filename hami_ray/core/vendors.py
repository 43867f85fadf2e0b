"""The table of HAMi device vendors: resource names and annotation keys, as data.

HAMi registers one device implementation per vendor (``InitDevicesWithConfig``), each with its own
extended resource names (``nvidia.com/gpu``...), the pod annotations that carry its allocation, the
selector annotations users set, and the node annotation its device plugin registers devices in.
hami-ray needs the same names to read pods and nodes written for HAMi, so they are listed here once
(hami.md §1.1-1.3, defaults of ``charts/hami/values.yaml`` and the device ConfigMap).

Called by :mod:`hami_ray.core.hami` (pod resources → requests) and :mod:`hami_ray.core.codec`
(annotation keys); the Kubernetes bridge reads the register and allocation keys from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class RegisterFormat(StrEnum):
    """How a vendor's node register annotation is encoded (hami.md §1.3)."""

    JSON = "json"  # ``MarshalNodeDevices``: a JSON array of DeviceInfo
    LEGACY = "legacy"  # ``EncodeNodeDevices``: ``uuid,count,devmem,devcore,type,numa,health[,index,mode]:``


class ResourceRole(StrEnum):
    """What an extended resource of a vendor means in a container's limits."""

    COUNT = "count"
    MEMORY = "memory"  # MiB per device (times the memory factor)
    MEMORY_PERCENTAGE = "memory-percentage"  # percent of each device's memory
    CORES = "cores"  # percent of each device's compute
    PRIORITY = "priority"  # HAMi-core task priority (0 high, 1 low)


@dataclass(frozen=True, slots=True)
class Vendor:
    """One HAMi device implementation, by its request type keyword (``CommonWord``/device type).

    ``type_word`` is what the allocation annotation carries in its ``Type`` field (``NVIDIA``,
    ``MLU``...), not a card model. Keys that a vendor does not have are ``None``.
    """

    type_word: str
    count: str
    memory: str | None = None
    memory_percentage: str | None = None
    cores: str | None = None
    priority: str | None = None
    to_allocate: str | None = None
    allocated: str | None = None
    use_type: str | None = None
    nouse_type: str | None = None
    use_uuid: str | None = None
    nouse_uuid: str | None = None
    register: str | None = None
    register_format: RegisterFormat | None = None
    handshake: str | None = None
    numa_bind: str | None = None
    # NVIDIA's webhook sets gpucores=100 when a whole-memory request gives no cores
    # (``defaultExclusiveCoreIfNeeded``, hami.md §2.2); no other vendor does.
    exclusive_core_default: bool = False
    # Older resource names still honoured (Enflame's ``vgcu`` pair).
    extra_resources: tuple[tuple[str, ResourceRole], ...] = ()

    def resources(self) -> dict[str, ResourceRole]:
        """The vendor's resource names and what each means.

        Example: ``NVIDIA_VENDOR.resources()["nvidia.com/gpumem"] is ResourceRole.MEMORY``.
        """
        named = {
            self.count: ResourceRole.COUNT,
            self.memory: ResourceRole.MEMORY,
            self.memory_percentage: ResourceRole.MEMORY_PERCENTAGE,
            self.cores: ResourceRole.CORES,
            self.priority: ResourceRole.PRIORITY,
        }
        out = {name: role for name, role in named.items() if name is not None}
        out.update(self.extra_resources)
        return out


def _per_chip(word: str, count: str, memory: str, cores: str, register: str | None,
              fmt: RegisterFormat | None, handshake: str | None) -> Vendor:
    # Iluvatar, Ascend, Vastai and Biren build their allocation keys with fmt.Sprintf from the
    # CommonWord (hami.md §1.2).
    return Vendor(
        type_word=word, count=count, memory=memory, cores=cores,
        to_allocate=f"hami.io/{word}-devices-to-allocate", allocated=f"hami.io/{word}-devices-allocated",
        register=register, register_format=fmt, handshake=handshake,
    )


NVIDIA_VENDOR = Vendor(
    type_word="NVIDIA",
    count="nvidia.com/gpu",
    memory="nvidia.com/gpumem",
    memory_percentage="nvidia.com/gpumem-percentage",
    cores="nvidia.com/gpucores",
    priority="nvidia.com/priority",
    to_allocate="hami.io/vgpu-devices-to-allocate",
    allocated="hami.io/vgpu-devices-allocated",
    use_type="nvidia.com/use-gputype",
    nouse_type="nvidia.com/nouse-gputype",
    use_uuid="nvidia.com/use-gpuuuid",
    nouse_uuid="nvidia.com/nouse-gpuuuid",
    register="hami.io/node-nvidia-register",
    register_format=RegisterFormat.JSON,
    handshake="hami.io/node-handshake",
    numa_bind="nvidia.com/numa-bind",
    exclusive_core_default=True,
)

NVIDIA_SCORE_ANNOTATION = "hami.io/node-nvidia-score"

ILUVATAR_CHIPS = ("MR-V100", "MR-V50", "BI-V150", "BI-V100")
ASCEND_CHIPS = ("Ascend910A", "Ascend910B2", "Ascend910B3", "Ascend910B4", "Ascend910B4-1", "Ascend310P",
                "Ascend910C")

_OTHERS = (
    Vendor(
        type_word="MLU", count="cambricon.com/vmlu", memory="cambricon.com/mlu.smlu.vmemory",
        cores="cambricon.com/mlu.smlu.vcore",
        to_allocate="hami.io/cambricon-mlu-devices-to-allocate", allocated="hami.io/cambricon-mlu-devices-allocated",
        use_type="cambricon.com/use-mlutype", nouse_type="cambricon.com/nouse-mlutype",
        use_uuid="cambricon.com/use-gpuuuid", nouse_uuid="cambricon.com/nouse-gpuuuid",
    ),
    Vendor(
        type_word="DCU", count="hygon.com/dcunum", memory="hygon.com/dcumem", cores="hygon.com/dcucores",
        to_allocate="hami.io/dcu-devices-to-allocate", allocated="hami.io/dcu-devices-allocated",
        use_type="hygon.com/use-dcutype", nouse_type="hygon.com/nouse-dcutype",
        use_uuid="hygon.com/use-gpuuuid", nouse_uuid="hygon.com/nouse-gpuuuid",
        register="hami.io/node-dcu-register", register_format=RegisterFormat.LEGACY,
        handshake="hami.io/node-handshake-dcu",
    ),
    Vendor(
        type_word="Metax-GPU", count="metax-tech.com/gpu",
        to_allocate="hami.io/metax-gpu-devices-to-allocate", allocated="hami.io/metax-gpu-devices-allocated",
        use_uuid="metax-tech.com/use-gpuuuid", nouse_uuid="metax-tech.com/nouse-gpuuuid",
    ),
    Vendor(
        type_word="Metax-SGPU", count="metax-tech.com/sgpu", memory="metax-tech.com/vmemory",
        cores="metax-tech.com/vcore",
        to_allocate="hami.io/metax-sgpu-devices-to-allocate", allocated="hami.io/metax-sgpu-devices-allocated",
        use_uuid="metax-tech.com/use-gpuuuid", nouse_uuid="metax-tech.com/nouse-gpuuuid",
    ),
    Vendor(
        type_word="GCU", count="enflame.com/gcu",
        to_allocate="hami.io/enflame-gcu-devices-to-allocate", allocated="hami.io/enflame-gcu-devices-allocated",
        use_uuid="enflame.com/use-gpuuuid", nouse_uuid="enflame.com/nouse-gpuuuid",
    ),
    Vendor(
        type_word="Enflame", count="enflame.com/drs-gcu", memory="enflame.com/gcu-memory",
        cores="enflame.com/gcu-core", allocated="hami.io/enflame-vgpu-devices-allocated",
        use_uuid="enflame.com/use-gpuuuid", nouse_uuid="enflame.com/nouse-gpuuuid",
        extra_resources=(
            ("enflame.com/vgcu", ResourceRole.COUNT),
            ("enflame.com/vgcu-percentage", ResourceRole.MEMORY_PERCENTAGE),
        ),
    ),
    Vendor(
        type_word="Mthreads", count="mthreads.com/vgpu", memory="mthreads.com/sgpu-memory",
        cores="mthreads.com/sgpu-core",
        to_allocate="hami.io/mthreads-vgpu-devices-to-allocate", allocated="hami.io/mthreads-vgpu-devices-allocated",
        use_uuid="mthreads.ai/use-gpuuuid", nouse_uuid="mthreads.ai/nouse-gpuuuid",
    ),
    *(
        _per_chip(chip, f"iluvatar.ai/{chip}-vgpu", f"iluvatar.ai/{chip}.vMem", f"iluvatar.ai/{chip}.vCore",
                  f"hami.io/node-{chip}-register", RegisterFormat.LEGACY, f"hami.io/node-handshake-{chip}")
        for chip in ILUVATAR_CHIPS
    ),
    Vendor(
        type_word="kunlun", count="kunlunxin.com/xpu", allocated="hami.io/kunlun-allocated",
        use_uuid="baidu.com/use-gpuuuid", nouse_uuid="baidu.com/nouse-gpuuuid",
    ),
    Vendor(
        type_word="XPU", count="kunlunxin.com/vxpu", memory="kunlunxin.com/vxpu-memory",
        to_allocate="hami.io/xpu-devices-to-allocate", allocated="hami.io/xpu-devices-allocated",
        use_uuid="hami.io/use-xpu-uuid", nouse_uuid="hami.io/no-use-xpu-uuid",
        register="hami.io/node-register-xpu", register_format=RegisterFormat.JSON,
        handshake="hami.io/node-handshake-xpu",
    ),
    # aws.amazon.com/neuroncore is a number of NeuronCores, not a percentage; it is read as "cores"
    # all the same, and the 0-100 bound holds for every Neuron device sold so far.
    Vendor(
        type_word="AWSNeuron", count="aws.amazon.com/neuron", cores="aws.amazon.com/neuroncore",
        allocated="hami.io/aws-neuron-devices-allocated",
        use_uuid="aws.amazon.com/use-neuron-uuid", nouse_uuid="aws.amazon.com/nouse-neuron-uuid",
    ),
    Vendor(
        type_word="AMD", count="amd.com/gpu", memory="amd.com/gpumem", cores="amd.com/gpucores",
        to_allocate="hami.io/amd-devices-to-allocate", allocated="hami.io/amd-devices-allocated",
        use_type="amd.com/use-gputype", nouse_type="amd.com/nouse-gputype",
        use_uuid="amd.com/use-gpu-uuid", nouse_uuid="amd.com/nouse-gpu-uuid",
        register="hami.io/node-amd-register", register_format=RegisterFormat.JSON,
    ),
    Vendor(
        type_word="Vastai", count="vastaitech.com/va",
        to_allocate="hami.io/Vastai-devices-to-allocate", allocated="hami.io/Vastai-devices-allocated",
        use_type="vastaitech.com/use-va", nouse_type="vastaitech.com/nouse-va",
        use_uuid="vastaitech.com/use-gpuuuid", nouse_uuid="vastaitech.com/nouse-gpuuuid",
        register="hami.io/node-va-register", register_format=RegisterFormat.JSON,
        handshake="hami.io/node-handshake-va",
    ),
    Vendor(
        type_word="Biren", count="birentech.com/gpu",
        to_allocate="hami.io/Biren-devices-to-allocate", allocated="hami.io/Biren-devices-allocated",
        use_type="birentech.com/use-biren", nouse_type="birentech.com/nouse-biren",
        use_uuid="birentech.com/use-gpuuuid", nouse_uuid="birentech.com/nouse-gpuuuid",
        register="hami.io/node-biren-register", register_format=RegisterFormat.JSON,
        handshake="hami.io/node-handshake-biren",
    ),
    *(
        _per_chip(chip, f"huawei.com/{chip}", f"huawei.com/{chip}-memory", f"huawei.com/{chip}-core",
                  f"hami.io/node-register-{chip}", RegisterFormat.JSON, f"hami.io/node-handshake-{chip}")
        for chip in ASCEND_CHIPS
    ),
)

VENDORS: tuple[Vendor, ...] = (NVIDIA_VENDOR, *_OTHERS)
"""Every vendor HAMi v2.10 ships, NVIDIA first (the order of hami.md §1.1)."""


def resource_index(vendors: Iterable[Vendor] = VENDORS) -> Mapping[str, tuple[Vendor, ResourceRole]]:
    """Map every resource name of ``vendors`` to its vendor and role.

    Example: ``resource_index()["cambricon.com/vmlu"][0].type_word == "MLU"``.

    Raises:
        ValueError: two vendors claim the same resource name (a broken custom table).
    """
    index: dict[str, tuple[Vendor, ResourceRole]] = {}
    for vendor in vendors:
        for name, role in vendor.resources().items():
            if name in index:
                raise ValueError(f"resource {name!r} claimed by {index[name][0].type_word} and {vendor.type_word}")
            index[name] = (vendor, role)
    return MappingProxyType(index)


RESOURCE_INDEX = resource_index()
_BY_TYPE = MappingProxyType({v.type_word: v for v in VENDORS})


def vendor_for_resource(name: str) -> Vendor | None:
    """The vendor owning an extended resource name, or ``None`` for ``cpu``, ``memory``, others.

    Example: ``vendor_for_resource("nvidia.com/gpumem") is NVIDIA_VENDOR``.
    """
    entry = RESOURCE_INDEX.get(name)
    return None if entry is None else entry[0]


def vendor_by_type(type_word: str) -> Vendor | None:
    """The vendor whose request type keyword is ``type_word`` (``"NVIDIA"``, ``"MLU"``...).

    Example: ``vendor_by_type("DCU").register == "hami.io/node-dcu-register"``.
    """
    return _BY_TYPE.get(type_word)
