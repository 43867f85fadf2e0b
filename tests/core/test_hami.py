"""Tests of hami_ray.core.hami: pods read with HAMi's webhook defaults and request resolution."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hami_ray.core.errors import InvalidRequest, UnknownPolicy
from hami_ray.core.hami import ContainerRequest, HamiConfig, parse_quantity, pod_requests
from hami_ray.core.model import SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName
from hami_ray.core.vendors import NVIDIA_VENDOR, RESOURCE_INDEX, VENDORS, vendor_by_type, vendor_for_resource

GPU, MEM, PCT, CORES, PRIO = ("nvidia.com/gpu", "nvidia.com/gpumem", "nvidia.com/gpumem-percentage",
                              "nvidia.com/gpucores", "nvidia.com/priority")


def make_pod(limits: dict[str, Any] | None = None, *, requests: dict[str, Any] | None = None,
             annotations: dict[str, Any] | None = None) -> dict[str, Any]:
    """A one-container pod with the given resources and annotations."""
    resources: dict[str, Any] = {}
    if limits is not None:
        resources["limits"] = limits
    if requests is not None:
        resources["requests"] = requests
    return {"metadata": {"name": "p", "annotations": annotations or {}},
            "spec": {"containers": [{"name": "main", "resources": resources}]}}


def only_request(pod: dict[str, Any], config: HamiConfig = HamiConfig()) -> SliceRequest | None:
    (container,) = pod_requests(pod, config)
    return container.request


# --- resolution (hami.md §2.2, §2.3) ------------------------------------------------------------

# expected: (count, memory_mib, memory_percent, cores); None memory fields = the whole device.
@pytest.mark.parametrize(
    ("limits", "config", "expected"),
    [
        ({GPU: "1"}, HamiConfig(), (1, None, None, 100)),  # whole memory + explicit count → exclusive cores
        ({GPU: "1", MEM: "3000"}, HamiConfig(), (1, 3000, None, 0)),
        ({GPU: "2", MEM: "8000", CORES: "30"}, HamiConfig(), (2, 8000, None, 30)),
        ({GPU: "1", PCT: "50"}, HamiConfig(), (1, None, 50.0, 0)),
        ({GPU: "1", PCT: "100"}, HamiConfig(), (1, None, None, 100)),  # 100 % is exclusive memory too
        ({GPU: "1", CORES: "0"}, HamiConfig(), (1, None, None, 0)),  # explicit cores are kept
        ({MEM: "3000"}, HamiConfig(), (1, 3000, None, 0)),  # webhook adds defaultGPUNum
        ({CORES: "30"}, HamiConfig(), (1, None, None, 30)),
        ({PCT: "100"}, HamiConfig(), (1, None, None, 0)),  # defaulted count: no exclusive-core default
        ({MEM: "3000"}, HamiConfig(default_gpu_num=2), (2, 3000, None, 0)),
        ({GPU: "1", MEM: "1000"}, HamiConfig(memory_factor=4), (1, 4000, None, 0)),  # gpumem × factor
        ({GPU: "1"}, HamiConfig(default_memory=2048), (1, 2048, None, 0)),  # defaultMemory is not whole
        ({GPU: "1", MEM: "1000"}, HamiConfig(default_cores=10), (1, 1000, None, 10)),
        ({GPU: 1, MEM: 3000}, HamiConfig(), (1, 3000, None, 0)),  # ints in hand-built dicts
        ({GPU: "1", MEM: "3k"}, HamiConfig(), (1, 3000, None, 0)),  # a quantity, as AsInt64 reads it
    ],
)
def test_resolution(limits: dict[str, Any], config: HamiConfig,
                    expected: tuple[int, int | None, float | None, int]) -> None:
    request = only_request(make_pod(limits), config)
    assert request is not None
    assert (request.count, request.memory_mib, request.memory_percent, request.cores) == expected
    assert request.vendor == "NVIDIA"


@pytest.mark.parametrize(
    ("limits", "config"),
    [
        ({}, HamiConfig()),
        ({"cpu": "1"}, HamiConfig()),
        ({GPU: "0"}, HamiConfig()),  # zero devices asked
        ({PRIO: "1"}, HamiConfig()),  # priority alone asks for no device (HAMi: Nums == 0)
        ({MEM: "3000"}, HamiConfig(default_gpu_num=0)),  # no default count → HAMi ignores it
    ],
)
def test_no_device_request(limits: dict[str, Any], config: HamiConfig) -> None:
    assert only_request(make_pod(limits), config) is None


def test_limits_win_over_requests_per_resource() -> None:
    request = only_request(make_pod({GPU: "2"}, requests={GPU: "1", MEM: "1000"}))
    assert request is not None and (request.count, request.memory_mib) == (2, 1000)


def test_requests_alone_are_read() -> None:
    request = only_request(make_pod(requests={GPU: "1", MEM: "1000"}))
    assert request is not None and (request.count, request.memory_mib) == (1, 1000)


def test_priority_becomes_task_priority() -> None:
    request = only_request(make_pod({GPU: "1", PRIO: "0"}))
    assert request is not None and request.task_priority == 0
    plain = only_request(make_pod({GPU: "1"}))
    assert plain is not None and plain.task_priority is None


@pytest.mark.parametrize(
    ("limits", "requests", "cpu_milli", "host_mib"),
    [
        ({"cpu": "500m", "memory": "1Gi"}, None, 500, 1024),
        ({"cpu": "2", "memory": "512Mi"}, None, 2000, 512),
        ({"cpu": "1.5", "memory": "100M"}, None, 1500, 96),  # 100e6 B = 95.4 MiB, rounded up
        ({"cpu": 1}, None, 1000, 0),
        ({"cpu": "4", "memory": "4Gi"}, {"cpu": "250m", "memory": "1Gi"}, 250, 1024),  # requests count
    ],
)
def test_host_resources(limits: dict[str, Any], requests: dict[str, Any] | None, cpu_milli: int,
                        host_mib: int) -> None:
    request = only_request(make_pod({GPU: "1", **limits}, requests=requests))
    assert request is not None and (request.cpu_milli, request.host_memory_mib) == (cpu_milli, host_mib)


# --- containers ----------------------------------------------------------------------------------

def test_init_containers_first_and_empty_containers_kept() -> None:
    pod = {"spec": {
        "initContainers": [{"name": "warmup", "resources": {"limits": {GPU: "1", MEM: "100"}}}],
        "containers": [{"name": "sidecar"}, {"name": "main", "resources": {"limits": {GPU: "1", MEM: "200"}}}],
    }}
    out = pod_requests(pod)
    assert [(c.name, c.init, c.request is None) for c in out] == [
        ("warmup", True, False), ("sidecar", False, True), ("main", False, False)]
    assert out[2].request is not None and out[2].request.memory_mib == 200
    assert isinstance(out[0], ContainerRequest)


# --- annotations -----------------------------------------------------------------------------------

def test_selectors_and_numa() -> None:
    request = only_request(make_pod({GPU: "1"}, annotations={
        "nvidia.com/use-gputype": "A100, H100", "nvidia.com/nouse-gputype": "MIG",
        "nvidia.com/use-gpuuuid": "GPU-a,GPU-b", "nvidia.com/nouse-gpuuuid": "",
        "nvidia.com/numa-bind": "true",
    }))
    assert request is not None
    assert request.include_types == ("A100", "H100") and request.exclude_types == ("MIG",)
    assert request.include_uuids == ("GPU-a", "GPU-b")
    assert request.exclude_uuids == ()  # an empty value is no constraint (CheckUUID)
    assert request.numa_bind is True


@pytest.mark.parametrize(
    ("annotations", "node", "device"),
    [
        ({}, NodePolicyName.BINPACK, DevicePolicyName.SPREAD),  # HAMi's flag defaults
        ({"hami.io/node-scheduler-policy": "spread"}, NodePolicyName.SPREAD, DevicePolicyName.SPREAD),
        ({"hami.io/gpu-scheduler-policy": "binpack"}, NodePolicyName.BINPACK, DevicePolicyName.BINPACK),
        ({"hami.io/gpu-scheduler-policy": "topology-aware"}, NodePolicyName.BINPACK, DevicePolicyName.TOPOLOGY),
        ({"hami.io/gpu-scheduler-policy": "mutex,binpack,numa"}, NodePolicyName.BINPACK, DevicePolicyName.BINPACK),
        ({"hami.io/gpu-scheduler-policy": " NUMA , spread"}, NodePolicyName.BINPACK, DevicePolicyName.NUMA),
        ({"hami.io/gpu-scheduler-policy": "", "hami.io/node-scheduler-policy": " "},
         NodePolicyName.BINPACK, DevicePolicyName.SPREAD),
    ],
)
def test_policies(annotations: dict[str, str], node: NodePolicyName, device: DevicePolicyName) -> None:
    request = only_request(make_pod({GPU: "1"}, annotations=annotations))
    assert request is not None and (request.node_policy, request.device_policy) == (node, device)


def test_config_policies_are_the_defaults() -> None:
    config = HamiConfig(node_policy=NodePolicyName.SPREAD, device_policy=DevicePolicyName.BINPACK)
    request = only_request(make_pod({GPU: "1"}), config)
    assert request is not None
    assert (request.node_policy, request.device_policy) == (NodePolicyName.SPREAD, DevicePolicyName.BINPACK)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hami.io/node-scheduler-policy", "fastest"),
        ("hami.io/gpu-scheduler-policy", "fastest"),
        ("hami.io/gpu-scheduler-policy", "binpack,fastest"),  # every entry of a chain is checked
        ("hami.io/gpu-scheduler-policy", "mutex"),  # known to HAMi, not implemented here
    ],
)
def test_unknown_policy_names_the_annotation(key: str, value: str) -> None:
    with pytest.raises(UnknownPolicy) as info:
        pod_requests(make_pod({GPU: "1"}, annotations={key: value}))
    assert info.value.field == key


# --- other vendors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("limits", "annotations", "expected"),
    [
        ({"cambricon.com/vmlu": "1", "cambricon.com/mlu.smlu.vmemory": "4096", "cambricon.com/mlu.smlu.vcore": "20"},
         {"cambricon.com/use-mlutype": "MLU370"}, ("MLU", 1, 4096, None, 20, ("MLU370",), ())),
        ({"hygon.com/dcunum": "2", "hygon.com/dcumem": "2000"}, {"hygon.com/use-gpuuuid": "DCU-1"},
         ("DCU", 2, 2000, None, 0, (), ("DCU-1",))),
        ({"huawei.com/Ascend910B3": "1", "huawei.com/Ascend910B3-memory": "16384"}, {},
         ("Ascend910B3", 1, 16384, None, 0, (), ())),
        ({"iluvatar.ai/BI-V150-vgpu": "1", "iluvatar.ai/BI-V150.vCore": "50"}, {},
         ("BI-V150", 1, None, None, 50, (), ())),
        ({"enflame.com/vgcu": "1", "enflame.com/vgcu-percentage": "25"}, {},  # Enflame's legacy names
         ("Enflame", 1, None, 25.0, 0, (), ())),
        ({"amd.com/gpu": "1"}, {"nvidia.com/use-gputype": "A100"},  # NVIDIA's selector is not AMD's
         ("AMD", 1, None, None, 0, (), ())),
    ],
)
def test_other_vendors(limits: dict[str, str], annotations: dict[str, str],
                       expected: tuple[object, ...]) -> None:
    r = only_request(make_pod(limits, annotations=annotations))
    assert r is not None
    assert (r.vendor, r.count, r.memory_mib, r.memory_percent, r.cores, r.include_types, r.include_uuids) == expected


def test_vendor_table() -> None:
    assert VENDORS[0] is NVIDIA_VENDOR and NVIDIA_VENDOR.type_word == "NVIDIA"
    assert len({v.type_word for v in VENDORS}) == len(VENDORS)
    assert vendor_for_resource("nvidia.com/gpumem") is NVIDIA_VENDOR
    assert vendor_for_resource("cpu") is None
    dcu = vendor_by_type("DCU")
    assert dcu is not None and dcu.register == "hami.io/node-dcu-register"
    assert RESOURCE_INDEX["huawei.com/Ascend910A-core"][0].allocated == "hami.io/Ascend910A-devices-allocated"


# --- bad input: one test per kind, asserting the type and the field ----------------------------------

@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({GPU: "abc"}, GPU),  # garbage
        ({GPU: "1.5"}, GPU),  # a fractional count
        ({GPU: "-1"}, GPU),  # negative
        ({GPU: None}, GPU),  # null value
        ({GPU: True}, GPU),
        ({GPU: "0", MEM: "1000"}, GPU),  # zero devices but memory
        ({GPU: "1", MEM: "-5"}, MEM),
        ({GPU: "1", MEM: "lots"}, MEM),
        ({GPU: "1", MEM: "8Gi"}, MEM),  # gpumem is MiB: a binary suffix is a mistake
        ({GPU: "1", MEM: "3T"}, MEM),  # 3e12 MiB: past int32, HAMi drops the request without a word
        ({GPU: "1", MEM: "8589934592"}, MEM),  # 8 GiB in bytes: past int32, dropped by HAMi
        ({GPU: "1", PCT: "101"}, PCT),
        ({GPU: "1", PCT: "-10"}, PCT),
        ({GPU: "1", PCT: "50.5"}, PCT),
        ({GPU: "1", CORES: "101"}, CORES),
        ({GPU: "1", CORES: "-1"}, CORES),
        ({GPU: "1", CORES: "abc"}, CORES),
        ({GPU: "1", PRIO: "high"}, PRIO),
        ({GPU: "1", "cpu": "abc"}, "cpu"),
        ({GPU: "1", "cpu": "-1"}, "cpu"),
        ({GPU: "1", "memory": "1 GB"}, "memory"),
        ({GPU: "1", "cambricon.com/vmlu": "1"}, "cambricon.com/vmlu"),  # two vendors in one container
        ({"enflame.com/vgcu": "1", "enflame.com/drs-gcu": "1"}, "enflame.com/drs-gcu"),  # two count names
    ],
)
def test_bad_resources(limits: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        pod_requests(make_pod(limits))
    assert info.value.field == field


# HAMi's meaning where the letter says otherwise (issue 16): expected (count, memory_mib, memory_percent,
# cores) and the words of the note the pod's event carries.
@pytest.mark.parametrize(
    ("limits", "config", "expected", "note"),
    [
        # GenerateResourceRequests reads gpumem 0 as unset: the whole device; the webhook sees a gpumem, so no
        # exclusive cores
        ({GPU: "1", MEM: "0"}, HamiConfig(), (1, None, None, 0), "nvidia.com/gpumem=0 is read as not given, as "
                                                                 "HAMi reads it: the whole device's memory"),
        ({GPU: "1", MEM: "0"}, HamiConfig(default_memory=2048), (1, 2048, None, 0), "the default of 2048 MiB"),
        ({GPU: "1", PCT: "0"}, HamiConfig(), (1, None, None, 0), "nvidia.com/gpumem-percentage=0 is read as not given"),
        ({MEM: "0"}, HamiConfig(), (1, None, None, 0), "the whole device's memory"),  # count added by the webhook
        ({GPU: "1", MEM: "0", PCT: "40"}, HamiConfig(), (1, None, 40.0, 0), "nvidia.com/gpumem-percentage=40 is used"),
        ({GPU: "1", MEM: "3000", PCT: "0"}, HamiConfig(), (1, 3000, None, 0), "nvidia.com/gpumem=3000 is used"),
        ({GPU: "1", MEM: "3000", PCT: "50"}, HamiConfig(), (1, 3000, None, 0),
         "nvidia.com/gpumem=3000 and nvidia.com/gpumem-percentage=50 both given: the MiB are used"),
        # the webhook's exclusive-core rule reads the percentage when there is one: 100 → gpucores 100
        ({GPU: "1", MEM: "3000", PCT: "100"}, HamiConfig(), (1, 3000, None, 100), "the MiB are used"),
        ({GPU: "1", MEM: "1000", PCT: "50"}, HamiConfig(memory_factor=4), (1, 4000, None, 0), "the MiB are used"),
    ],
)
def test_hami_meaning_is_read_and_noted(limits: dict[str, Any], config: HamiConfig,
                                        expected: tuple[int, int | None, float | None, int], note: str) -> None:
    (container,) = pod_requests(make_pod(limits), config)
    request = container.request
    assert request is not None
    assert (request.count, request.memory_mib, request.memory_percent, request.cores) == expected
    assert len(container.notes) >= 1 and any(note in n for n in container.notes), container.notes
    assert all(n.startswith("container 'main': ") for n in container.notes)


def test_plain_requests_carry_no_note() -> None:
    (container,) = pod_requests(make_pod({GPU: "1", MEM: "3000", CORES: "30"}))
    assert container.notes == ()


@pytest.mark.parametrize(("value", "words"), [
    ("8Gi", "is a plain number of MiB (8Gi is 8192), got '8Gi'; HAMi would silently drop"),
    ("8589934592", "'8589934592' is more than HAMi's int32 holds (a size in bytes? 8 GiB is 8192)"),
    ("8G", "'8G' is more than HAMi's int32 holds"),
])
def test_what_hami_drops_in_silence_is_refused_saying_so(value: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        pod_requests(make_pod({GPU: "1", MEM: value}))
    assert info.value.field == MEM and words in str(info.value), str(info.value)


def test_memory_factor_overflow() -> None:
    with pytest.raises(InvalidRequest) as info:
        pod_requests(make_pod({GPU: "1", MEM: "2000000000"}), HamiConfig(memory_factor=2))
    assert info.value.field == MEM


@pytest.mark.parametrize(
    ("annotations", "field"),
    [
        ({"nvidia.com/numa-bind": "maybe"}, "nvidia.com/numa-bind"),
        ({"nvidia.com/use-gputype": 3}, "nvidia.com/use-gputype"),  # not a string
    ],
)
def test_bad_annotations(annotations: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        pod_requests(make_pod({GPU: "1"}, annotations=annotations))
    assert info.value.field == field


@pytest.mark.parametrize(
    "pod",
    [
        {},
        {"spec": None},
        {"metadata": None, "spec": {"containers": None}},
        {"metadata": {"annotations": None}, "spec": {"containers": [{"name": "c", "resources": None}]}},
        {"spec": {"containers": [{"name": "c", "resources": {"limits": None, "requests": None}}]}},
        {"spec": {"containers": [{"resources": {}}]}},  # no name
    ],
)
def test_odd_shapes_kubernetes_treats_as_empty(pod: dict[str, Any]) -> None:
    assert all(c.request is None for c in pod_requests(pod))


@pytest.mark.parametrize(
    ("pod", "field"),
    [
        (None, "pod"),
        ({"spec": []}, "spec"),
        ({"metadata": "x"}, "metadata"),
        ({"metadata": {"annotations": ["a"]}}, "metadata.annotations"),
        ({"spec": {"containers": "abc"}}, "spec.containers"),
        ({"spec": {"initContainers": {"a": 1}}}, "spec.initContainers"),
        ({"spec": {"containers": [5]}}, "spec.containers[0]"),
        ({"spec": {"containers": [{"resources": []}]}}, "spec.containers[0].resources"),
        ({"spec": {"containers": [{"resources": {"limits": "1"}}]}}, "spec.containers[0].resources.limits"),
        ({"spec": {"containers": [{"resources": {"limits": {1: "1"}}}]}}, "spec.containers[0].resources.limits"),
    ],
)
def test_odd_shapes_are_invalid_requests(pod: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        pod_requests(pod)
    assert info.value.field == field


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.sampled_from(
        ["", "1", "-1", "1.5", "abc", "100m", "1Gi", "true", "binpack", "mutex"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "resources", "limits", "requests", GPU, MEM, PCT, CORES, "cpu", "memory"]),
        inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "metadata": st.none() | st.fixed_dictionaries({}, optional={"annotations": st.none() | st.dictionaries(
        st.sampled_from(["nvidia.com/numa-bind", "hami.io/gpu-scheduler-policy", "nvidia.com/use-gpuuuid"]),
        _json, max_size=2)}),
    "spec": st.none() | _json | st.fixed_dictionaries({}, optional={"containers": _json, "initContainers": _json}),
}))
def test_never_crashes(pod: dict[str, Any]) -> None:
    try:
        out = pod_requests(pod)
    except InvalidRequest:
        return
    assert all(isinstance(c, ContainerRequest) for c in out)


# --- quantities and config --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "value"),
    [("2", Fraction(2)), ("500m", Fraction(1, 2)), ("1Gi", Fraction(2**30)), ("1.5", Fraction(3, 2)),
     ("1e3", Fraction(1000)), ("2k", Fraction(2000)), (".5", Fraction(1, 2)), ("+1", Fraction(1)),
     ("100n", Fraction(1, 10**7)), (3, Fraction(3)), (0.25, Fraction(1, 4))],
)
def test_parse_quantity(text: object, value: Fraction) -> None:
    assert parse_quantity(text, "cpu") == value


@pytest.mark.parametrize("text", ["", "abc", "1 Gi", "1GB", "1gi", "--1", "-1", "1e", float("inf"), [1]])
def test_parse_quantity_rejects(text: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_quantity(text, "memory")
    assert info.value.field == "memory"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"default_memory": -1}, "default_memory"), ({"default_cores": 101}, "default_cores"),
     ({"default_gpu_num": -1}, "default_gpu_num"), ({"memory_factor": 0}, "memory_factor")],
)
def test_config_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        HamiConfig(**kwargs)
    assert info.value.field == field


def test_pod_without_devices_ignores_device_annotations() -> None:
    # HAMi never reads its annotations on a pod that asks for no device; neither do we.
    pod = make_pod({"cpu": "1"}, annotations={"hami.io/gpu-scheduler-policy": "fastest",
                                               "nvidia.com/numa-bind": "maybe"})
    assert only_request(pod) is None
