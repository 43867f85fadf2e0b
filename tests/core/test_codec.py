"""Tests of hami_ray.core.codec: HAMi's pod allocation and node register annotations, byte for byte."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hami_ray.core.codec import (
    ALLOCATED_ANNOTATION,
    DecodedDevice,
    RegisteredDevice,
    decode_node_register,
    decode_node_scores,
    decode_pod_devices,
    devices_from_register,
    encode_node_register,
    encode_node_scores,
    encode_pod_devices,
    registered_to_device,
)
from hami_ray.core.errors import AnnotationFormatError, InvalidRequest
from hami_ray.core.model import DeviceGrant, DeviceMode

# docs/develop/protocol.md (hami.md §1.4): two containers, one GPU each, cores unset → 0.
PROTOCOL_UUID = "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448"
PROTOCOL_EXAMPLE = f"{PROTOCOL_UUID},NVIDIA,3000,0:;{PROTOCOL_UUID},NVIDIA,5000,0:;"
MULTI_GPU_EXAMPLE = "GPU-a,NVIDIA,8000,30:GPU-b,NVIDIA,8000,30:;"
# Issue #1950's register entry (one H200 NVL; the second entry shows how a non-zero index is written).
ISSUE_1950_REGISTER = (
    '[{"id":"GPU-4c2b5a0e-1f43-7d0a-8c36-0b1d2e3f4a5b","count":10,"devmem":143771,"devcore":100,'
    '"type":"NVIDIA H200 NVL","mode":"hami-core","health":true},'
    '{"id":"GPU-9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4","index":1,"count":10,"devmem":143771,"devcore":100,'
    '"type":"NVIDIA H200 NVL","numa":1,"mode":"hami-core","health":true}]'
)


def grant(uuid: str, mem: int, cores: int) -> DeviceGrant:
    return DeviceGrant(uuid=uuid, memory_mib=mem, cores=cores)


# --- pod allocation annotation -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "containers"),
    [
        (PROTOCOL_EXAMPLE, [[grant(PROTOCOL_UUID, 3000, 0)], [grant(PROTOCOL_UUID, 5000, 0)]]),
        (MULTI_GPU_EXAMPLE, [[grant("GPU-a", 8000, 30), grant("GPU-b", 8000, 30)]]),
        ("", []),
        (";", [[]]),
        # an init container without devices, then an app container with one, then one without
        (";GPU-a,NVIDIA,1024,50:;;", [[], [grant("GPU-a", 1024, 50)], []]),
    ],
    ids=["protocol.md", "multi-gpu", "no-containers", "one-empty", "empty-entries-kept"],
)
def test_pod_devices_round_trip_exact(value: str, containers: list[list[DeviceGrant]]) -> None:
    assert encode_pod_devices(containers) == value
    decoded = decode_pod_devices(value)
    assert [[d.to_grant() for d in c] for c in decoded] == containers
    assert all(d.type == "NVIDIA" for c in decoded for d in c)


def test_decode_matches_hami_split_for_every_container() -> None:
    # HAMi's split on ';' yields one extra trailing empty entry; the first n entries are the same.
    value = ";GPU-a,NVIDIA,1024,50:;;"
    hami_entries = value.split(";")
    decoded = decode_pod_devices(value)
    assert len(hami_entries) == len(decoded) + 1 and hami_entries[-1] == ""
    for entry, devices in zip(hami_entries, decoded):
        assert (entry == "") == (devices == [])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("GPU-a,NVIDIA,1,2:", [[DecodedDevice("GPU-a", "NVIDIA", 1, 2)]]),  # no trailing ';'
        ("GPU-a,NVIDIA,1,2,extra:;", [[DecodedDevice("GPU-a", "NVIDIA", 1, 2)]]),  # >4 fields: rest ignored
        ("GPU-a,NVIDIA,1,2::GPU-b,MLU,3,4:;", [[DecodedDevice("GPU-a", "NVIDIA", 1, 2),
                                                DecodedDevice("GPU-b", "MLU", 3, 4)]]),  # empty entry skipped
        ("GPU-a,NVIDIA,+7,0:;", [[DecodedDevice("GPU-a", "NVIDIA", 7, 0)]]),  # Go's ParseInt takes a '+'
    ],
    ids=["no-terminator", "extra-fields", "empty-device-entry", "plus-sign"],
)
def test_decode_tolerates_what_hami_tolerates(value: str, expected: list[list[DecodedDevice]]) -> None:
    assert decode_pod_devices(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "GPU-a,NVIDIA,3000:;",  # 3 fields
        "GPU-a:;",  # no comma at all
        ",NVIDIA,1,0:;",  # empty uuid
        "GPU-a,,1,0:;",  # empty type
        "GPU-a,NVIDIA,abc,0:;",
        "GPU-a,NVIDIA,1.5,0:;",
        "GPU-a,NVIDIA,-1,0:;",
        "GPU-a,NVIDIA,1,-5:;",
        "GPU-a,NVIDIA,1,x:;",
        "GPU-a,NVIDIA, 1,0:;",  # Go does not trim
        "GPU-a,NVIDIA,2147483648,0:;",  # past int32
    ],
    ids=["3-fields", "no-comma", "empty-uuid", "empty-type", "mem-garbage", "mem-fraction", "mem-negative",
         "cores-negative", "cores-garbage", "space", "int32-overflow"],
)
def test_decode_pod_devices_rejects(value: str) -> None:
    with pytest.raises(AnnotationFormatError) as info:
        decode_pod_devices(value)
    assert info.value.field == ALLOCATED_ANNOTATION


def test_decode_pod_devices_names_the_given_key() -> None:
    with pytest.raises(AnnotationFormatError) as info:
        decode_pod_devices("x:;", field="hami.io/vgpu-devices-to-allocate")
    assert info.value.field == "hami.io/vgpu-devices-to-allocate"


def test_decode_pod_devices_rejects_non_string() -> None:
    with pytest.raises(AnnotationFormatError):
        decode_pod_devices(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("containers", "type_word", "field"),
    [
        ([[grant("GPU,a", 1, 0)]], "NVIDIA", "uuid"),
        ([[grant("GPU:a", 1, 0)]], "NVIDIA", "uuid"),
        ([[grant("", 1, 0)]], "NVIDIA", "uuid"),
        ([[grant("GPU-a", 1, 0)]], "NV;IDIA", "type_word"),
        ([], "", "type_word"),
    ],
)
def test_encode_pod_devices_rejects_separators(containers: list[list[DeviceGrant]], type_word: str,
                                               field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        encode_pod_devices(containers, type_word)
    assert info.value.field == field


def test_encode_writes_the_vendor_keyword() -> None:
    assert encode_pod_devices([[grant("MLU-0", 1024, 10)]], type_word="MLU") == "MLU-0,MLU,1024,10:;"


_uuid = st.text(st.characters(exclude_characters=",:;", exclude_categories=["Cs"]), min_size=1, max_size=12)
_grants = st.builds(grant, _uuid, st.integers(0, 2**31 - 1), st.integers(0, 100))


@given(st.lists(st.lists(_grants, max_size=4), max_size=6), st.sampled_from(["NVIDIA", "MLU", "Ascend910B3"]))
def test_pod_devices_round_trip_property(containers: list[list[DeviceGrant]], type_word: str) -> None:
    value = encode_pod_devices(containers, type_word)
    decoded = decode_pod_devices(value)
    assert [[d.to_grant() for d in c] for c in decoded] == containers
    assert {d.type for c in decoded for d in c} <= {type_word}
    assert encode_pod_devices([[d.to_grant() for d in c] for c in decoded], type_word) == value


# --- node register annotation ------------------------------------------------------------------

def test_issue_1950_register_round_trip() -> None:
    devices = decode_node_register(ISSUE_1950_REGISTER)
    assert devices[0] == RegisteredDevice(
        id="GPU-4c2b5a0e-1f43-7d0a-8c36-0b1d2e3f4a5b", count=10, devmem=143771, devcore=100,
        type="NVIDIA H200 NVL", index=0, numa=0, mode="hami-core", health=True,
    )
    assert (devices[1].index, devices[1].numa) == (1, 1)
    assert encode_node_register(devices) == ISSUE_1950_REGISTER


def test_json_register_missing_keys_take_go_zero_values() -> None:
    (device,) = decode_node_register('[{"id":"GPU-a","count":4,"devmem":1024,"devcore":100,"type":"T4",'
                                     '"devicevendor":"NVIDIA","custominfo":{"x":1}}]')
    # health is omitempty on the writer: absent means the plugin saw the device unhealthy
    assert (device.health, device.mode, device.index, device.numa, device.mig_profiles) == (False, "", 0, 0, ())
    assert encode_node_register([device]) == '[{"id":"GPU-a","count":4,"devmem":1024,"devcore":100,"type":"T4"}]'


def test_json_register_keeps_mig_profiles() -> None:
    value = ('[{"id":"GPU-a","count":7,"devmem":143771,"devcore":100,"type":"NVIDIA H200","mode":"mig",'
             '"migProfiles":[{"name":"1g.18gb","memoryMB":18432,"core":14,"sliceCount":1,'
             '"placements":[{"start":0,"size":1}]}],"health":true}]')
    (device,) = decode_node_register(value)
    assert device.mig_profiles[0] == json.loads(value)[0]["migProfiles"][0]
    assert encode_node_register([device]) == value
    assert registered_to_device(device, 0).mode is DeviceMode.MIG


@pytest.mark.parametrize("value", ["", "   ", "null", "[]"])
def test_empty_register(value: str) -> None:
    assert decode_node_register(value) == []


def test_legacy_register_seven_and_nine_fields() -> None:
    value = "GPU-a,10,32768,100,NVIDIA-Tesla V100,0,true:GPU-b,10,32768,100,NVIDIA-Tesla V100,1,false,1,mig:"
    a, b = decode_node_register(value, vendor="DCU")
    assert a == RegisteredDevice("GPU-a", 10, 32768, 100, "NVIDIA-Tesla V100", vendor="DCU")
    assert (b.numa, b.health, b.index, b.mode) == (1, False, 1, "mig")
    # the encoder always writes the 9-field form, which round-trips exactly
    nine = encode_node_register([a, b], legacy=True)
    assert nine == ("GPU-a,10,32768,100,NVIDIA-Tesla V100,0,true,0,hami-core:"
                    "GPU-b,10,32768,100,NVIDIA-Tesla V100,1,false,1,mig:")
    assert decode_node_register(nine, vendor="DCU") == [a, b]


@pytest.mark.parametrize(
    "value",
    [
        "[{",  # broken JSON
        '[{"count":10}]',  # no id
        '[{"id":"a","count":"10"}]',  # a string count
        '[{"id":"a","count":-1}]',
        '[{"id":"a","devmem":1.5}]',
        '[{"id":"a","health":"yes"}]',
        '[{"id":"a","migProfiles":{}}]',
        "[1]",
        "GPU-a,10,1,100,T,0,true",  # no ':' separator
        "GPU-a,10,1,100,T,0,true,1:",  # 8 fields
        "GPU-a,10,1,100,T,0,yes:",  # health not a bool
        "GPU-a,x,1,100,T,0,true:",
        "GPU-a,10,1,100,T,0,true,-1,hami-core:",  # negative index
        "GPU-a:",  # no comma
    ],
)
def test_decode_node_register_rejects(value: str) -> None:
    with pytest.raises(AnnotationFormatError) as info:
        decode_node_register(value)
    assert info.value.field == "hami.io/node-nvidia-register"


def test_register_error_names_the_vendor_key() -> None:
    with pytest.raises(AnnotationFormatError) as info:
        decode_node_register("garbage:", vendor="DCU")
    assert info.value.field == "hami.io/node-dcu-register"


@pytest.mark.parametrize(
    ("device", "field"),
    [
        (RegisteredDevice("GPU,a", 1, 1, 100, "T"), "id"),
        (RegisteredDevice("GPU-a", 1, 1, 100, "T:4"), "type"),
        (RegisteredDevice("GPU-a", 1, 1, 100, "T", mig_profiles=({"name": "1g"},)), "mig_profiles"),
    ],
)
def test_legacy_encode_rejects_what_it_cannot_carry(device: RegisteredDevice, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        encode_node_register([device], legacy=True)
    assert info.value.field == field


def test_registered_to_device_takes_scaled_values() -> None:
    rd = RegisteredDevice("GPU-a", 20, 163840, 200, "NVIDIA A100", numa=1, health=False)
    device = registered_to_device(rd, 3, links={"GPU-b": 600, "GPU-a": 999})
    assert (device.uuid, device.index, device.model, device.vendor) == ("GPU-a", 3, "NVIDIA A100", "NVIDIA")
    assert (device.memory_mib, device.cores, device.split_count) == (163840, 200, 20)
    assert (device.memory_capacity_mib, device.core_capacity) == (163840, 200)  # no double scaling
    assert (device.numa, device.healthy, device.mode) == (1, False, DeviceMode.SHARED)
    assert device.links == {"GPU-b": 600}  # a self-pair is dropped


@pytest.mark.parametrize("rd", [RegisteredDevice("GPU-a", 0, 1024, 100, "T"),
                                RegisteredDevice("GPU-a", 10, 0, 100, "T"),
                                RegisteredDevice("GPU-a", 10, 1024, 0, "T")])
def test_registered_to_device_rejects_unschedulable(rd: RegisteredDevice) -> None:
    with pytest.raises(InvalidRequest) as info:
        registered_to_device(rd, 0)
    assert info.value.field == "hami.io/node-nvidia-register"


# --- pair scores and whole nodes ---------------------------------------------------------------

SCORES = '[{"uuid":"GPU-a","score":{"GPU-b":600,"GPU-c":20}},{"uuid":"GPU-b","score":{"GPU-a":600}}]'


def test_scores_round_trip() -> None:
    scores = decode_node_scores(SCORES)
    assert scores == {"GPU-a": {"GPU-b": 600, "GPU-c": 20}, "GPU-b": {"GPU-a": 600}}
    assert encode_node_scores(scores) == SCORES


@pytest.mark.parametrize("value", ["{", '{"uuid":"a"}', '[{"score":{}}]', '[{"uuid":"a","score":{"b":"x"}}]',
                                   '[{"uuid":"a","score":[1]}]', '["a"]', '[{"uuid":"a","score":[]}]'])
def test_decode_scores_rejects(value: str) -> None:
    with pytest.raises(AnnotationFormatError) as info:
        decode_node_scores(value)
    assert info.value.field == "hami.io/node-nvidia-score"


def test_devices_from_register_with_scores() -> None:
    register = encode_node_register([RegisteredDevice("GPU-a", 10, 81920, 100, "A100", health=True),
                                     RegisteredDevice("GPU-b", 10, 81920, 100, "A100", index=1, health=True)])
    a, b = devices_from_register(register, SCORES)
    assert (a.index, b.index) == (0, 1)
    assert a.links == {"GPU-b": 600, "GPU-c": 20} and b.links == {"GPU-a": 600}


def test_devices_from_legacy_register_are_indexed_by_position() -> None:
    devices = devices_from_register("GPU-a,10,1024,100,T,0,true:GPU-b,10,1024,100,T,0,true:")
    assert [d.index for d in devices] == [0, 1]
    assert all(d.links == {} for d in devices)


# --- bytes as Go writes them (issue 16) ------------------------------------------------------------
# Produced once by Go 1.26.8's encoding/json (json.Marshal, printed with %q) from HAMi's DeviceInfo as
# ../shared/reference/hami.md §1.3 lists its JSON tags (id, index,omitempty, count, devmem, devcore, type,
# numa,omitempty, mode, migProfiles,omitempty, health,omitempty) and []struct{uuid; score map[string]int}:
#   devs := []DeviceInfo{
#       {ID: "GPU-<a>&b", Index: 1, Count: 10, Devmem: 16384, Devcore: 100, Type: "NVIDIA <T4> & \u2028co\u2029",
#        Numa: 1, Mode: "hami-core", Health: true},
#       {ID: "GPU-\"q\"\\\t\n\r\b\f\x01\x7f", Count: 4, Devmem: 81920, Devcore: 100,
#        Type: "NVIDIA A100 é 日本 😀", Mode: "hami-core"}}
#   json.Marshal(devs); json.Marshal([]PairScore{{ID: "GPU-<a>", Scores: {"GPU->c": 100, "GPU-&b": 600}}})
GO_REGISTER = ("[{\"id\":\"GPU-\\u003ca\\u003e\\u0026b\",\"index\":1,\"count\":10,\"devmem\":16384,\"devcore\":100,"
               "\"type\":\"NVIDIA \\u003cT4\\u003e \\u0026 \\u2028co\\u2029\",\"numa\":1,\"mode\":\"hami-core\","
               "\"health\":true},{\"id\":\"GPU-\\\"q\\\"\\\\\\t\\n\\r\\b\\f\\u0001\x7f\",\"count\":4,\"devmem\":81920,"
               "\"devcore\":100,\"type\":\"NVIDIA A100 é 日本 😀\",\"mode\":\"hami-core\"}]").encode()
GO_SCORES = "[{\"uuid\":\"GPU-\\u003ca\\u003e\",\"score\":{\"GPU-\\u0026b\":600,\"GPU-\\u003ec\":100}}]".encode()


def test_register_and_scores_are_the_bytes_go_writes() -> None:
    from hami_ray.core.codec import encode_node_scores  # noqa: PLC0415

    devices = [RegisteredDevice("GPU-<a>&b", 10, 16384, 100, "NVIDIA <T4> & \u2028co\u2029", index=1, numa=1),
               RegisteredDevice("GPU-\"q\"\\\t\n\r\b\f\x01\x7f", 4, 81920, 100, "NVIDIA A100 é 日本 😀", health=False)]
    assert encode_node_register(devices).encode() == GO_REGISTER
    assert encode_node_scores({"GPU-<a>": {"GPU->c": 100, "GPU-&b": 600}}).encode() == GO_SCORES
    assert [d.type for d in decode_node_register(GO_REGISTER.decode())] == [d.type for d in devices]  # and back
