"""Tests of hami_ray.core.request (``@hami_ray.remote`` keywords) and of SliceRequest's own validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from hami_ray.core.grades import Isolation
from hami_ray.core.errors import InvalidRequest, UnknownPolicy
from hami_ray.core.model import SliceRequest
from hami_ray.core.names import DevicePolicyName, NodePolicyName, device_policy_name, node_policy_name
from hami_ray.core.request import KEYWORDS, slice_request

# --- good forms ----------------------------------------------------------------------------------


def test_ray_user_example() -> None:
    req = slice_request({"gpus": 1, "gpu_memory": "8GiB", "gpu_cores": 30})
    assert (req.count, req.memory_mib, req.memory_percent, req.cores) == (1, 8192, None, 30)
    assert not req.exclusive


@pytest.mark.parametrize(
    ("memory", "mib", "percent"),
    [("8GiB", 8192, None), ("8Gi", 8192, None), ("512MiB", 512, None), (4096, 4096, None),
     ("16GB", 15259, None), ("25%", None, 25.0)],
)
def test_memory_forms(memory: object, mib: int | None, percent: float | None) -> None:
    req = slice_request({"gpu_memory": memory})
    assert (req.memory_mib, req.memory_percent) == (mib, percent)


def test_defaults_are_one_whole_device() -> None:
    req = slice_request({})
    assert req == SliceRequest()
    assert (req.count, req.memory_mib, req.memory_percent, req.cores) == (1, None, None, 0)
    assert req.memory_on(81920) == 81920  # neither memory form: the whole device, as HAMi


def test_none_values_mean_default() -> None:
    assert slice_request({"gpus": None, "gpu_memory": None, "gpu_cores": None, "gpu_type": None}) == SliceRequest()


def test_names_lists_and_policies() -> None:
    req = slice_request({
        "gpus": "2", "gpu_cores": "100%", "gpu_type": "A100, H100", "exclude_gpu_type": ["T4", " "],
        "gpu_uuid": ("GPU-a",), "exclude_gpu_uuid": "GPU-b,GPU-c", "numa_bind": True, "priority": 7,
        "node_policy": "Spread", "device_policy": " TOPOLOGY-aware ", "vendor": " AMD ",
    })
    assert req.count == 2 and req.cores == 100 and req.exclusive
    assert req.include_types == ("A100", "H100")
    assert req.exclude_types == ("T4",)  # blank names dropped
    assert req.include_uuids == ("GPU-a",)
    assert req.exclude_uuids == ("GPU-b", "GPU-c")
    assert req.numa_bind is True and req.priority == 7
    assert req.node_policy is NodePolicyName.SPREAD
    assert req.device_policy is DevicePolicyName.TOPOLOGY
    assert req.vendor == "AMD"


def test_percent_memory_resolves_on_the_chosen_device() -> None:
    req = slice_request({"gpu_memory": "25%"})
    assert req.memory_on(81920) == 20480  # 25 % of 80 GiB
    assert req.memory_on(40960) == 10240


# --- bad forms: a typed InvalidRequest naming the keyword ----------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"gpu_memory": 0}, "gpu_memory"),
        ({"gpu_memory": -1}, "gpu_memory"),
        ({"gpu_memory": "-8GiB"}, "gpu_memory"),
        ({"gpu_memory": "0GiB"}, "gpu_memory"),
        ({"gpu_memory": "8 gigs"}, "gpu_memory"),
        ({"gpu_memory": "lots"}, "gpu_memory"),
        ({"gpu_memory": "0%"}, "gpu_memory"),
        ({"gpu_memory": "101%"}, "gpu_memory"),
        ({"gpu_memory": 1.5}, "gpu_memory"),
        ({"gpu_cores": -1}, "gpu_cores"),
        ({"gpu_cores": 101}, "gpu_cores"),
        ({"gpu_cores": "many"}, "gpu_cores"),
        ({"gpu_cores": 12.5}, "gpu_cores"),
        ({"gpus": 0.5}, "gpus"),
        ({"gpus": 1.5}, "gpus"),
        ({"gpus": "0.25"}, "gpus"),
        ({"gpus": 0}, "gpus"),
        ({"gpus": -2}, "gpus"),
        ({"gpus": "two"}, "gpus"),
        ({"gpus": True}, "gpus"),
        ({"gpu_type": 5}, "gpu_type"),
        ({"gpu_type": ["A100", 5]}, "gpu_type"),
        ({"exclude_gpu_type": {"T4": 1}}, "exclude_gpu_type"),
        ({"gpu_uuid": 7}, "gpu_uuid"),
        ({"exclude_gpu_uuid": [None]}, "exclude_gpu_uuid"),
        ({"numa_bind": "yes"}, "numa_bind"),
        ({"numa_bind": 1}, "numa_bind"),
        ({"priority": "high"}, "priority"),
        ({"priority": 1.0}, "priority"),
        ({"priority": True}, "priority"),
        ({"vendor": ""}, "vendor"),
        ({"vendor": 3}, "vendor"),
        ({"gpu_mem": "8GiB"}, "gpu_mem"),  # unknown keyword (a typo of gpu_memory)
        ({"num_gpus": 1.5}, "num_gpus"),  # a fraction above one device (Ray refuses it too)
    ],
)
def test_bad_input_names_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        slice_request(options)
    assert info.value.field == field
    assert str(info.value).startswith(f"invalid {field}: ")


def test_unknown_keyword_lists_the_known_ones() -> None:
    with pytest.raises(InvalidRequest) as info:
        slice_request({"gpus": 1, "zzz": 1, "aaa": 2})
    assert info.value.field == "aaa"  # the first unknown, sorted: deterministic
    assert "gpu_memory" in info.value.reason


@pytest.mark.parametrize(("key", "value"), [("node_policy", "most-allocated"), ("device_policy", "tetris"),
                                            ("device_policy", "fgd2"), ("node_policy", "")])
def test_unknown_policy(key: str, value: str) -> None:
    with pytest.raises(UnknownPolicy) as info:
        slice_request({key: value})
    assert info.value.field == key
    assert isinstance(info.value, InvalidRequest)
    assert "choose from" in info.value.reason


def test_policy_name_parsers() -> None:
    assert node_policy_name("BINPACK") is NodePolicyName.BINPACK
    assert device_policy_name(" FGD ") is DevicePolicyName.FGD
    assert all(device_policy_name(p.value.upper()) is p for p in DevicePolicyName)
    with pytest.raises(UnknownPolicy) as info:
        device_policy_name("best", field="hami.io/gpu-scheduler-policy")
    assert info.value.field == "hami.io/gpu-scheduler-policy"
    assert all(p.value in info.value.reason for p in DevicePolicyName)


def test_every_keyword_is_accepted() -> None:
    good = {"gpus": 1, "gpu_memory": "1GiB", "gpu_cores": 10, "gpu_type": "A100", "exclude_gpu_type": "T4",
            "gpu_uuid": "GPU-a", "exclude_gpu_uuid": "GPU-b", "numa_bind": False, "priority": 1,
            "node_policy": "binpack", "device_policy": "fgd", "vendor": "NVIDIA", "isolation": "mps",
            "queue": "org/team-a", "preemptible": False}
    assert set(good) == KEYWORDS - {"num_gpus"}  # num_gpus is the other way to say gpus/memory/cores
    slice_request(good)
    slice_request({k: v for k, v in good.items() if k not in ("gpus", "gpu_memory", "gpu_cores")} | {"num_gpus": 0.5})


def test_queue_and_preemptible_with_the_jobs_default_queue() -> None:
    assert slice_request({}).queue == "default" and slice_request({}).preemptible
    assert slice_request({}, default_queue="org/a").queue == "org/a"  # the job's $HAMI_RAY_QUEUE
    assert slice_request({"queue": "org/b"}, default_queue="org/a").queue == "org/b"
    for bad, field in (({"queue": "org//a"}, "queue"), ({"queue": 3}, "queue"), ({"queue": "/a"}, "queue"),
                       ({"preemptible": "no"}, "preemptible")):
        with pytest.raises(InvalidRequest) as info:
            slice_request(bad)
        assert info.value.field == field


@pytest.mark.parametrize(("value", "count", "percent", "cores"), [(0.25, 1, 25.0, 25), (0.5, 1, 50.0, 50),
                                                                  (1, 1, None, 100), (2, 2, None, 100),
                                                                  (0.001, 1, 0.1, 1)])
def test_num_gpus_is_a_slice_of_that_fraction(value: float, count: int, percent: float | None, cores: int) -> None:
    request = slice_request({"num_gpus": value})
    assert (request.count, request.memory_percent, request.cores) == (count, percent, cores)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "half", True, {"gpus": 1}])
def test_num_gpus_refuses_what_ray_refuses(bad: object) -> None:
    options = bad if isinstance(bad, dict) else {"num_gpus": bad}
    with pytest.raises(InvalidRequest) as info:
        slice_request({"num_gpus": 0.5, **options} if isinstance(bad, dict) else options)
    assert info.value.field == "num_gpus"


@pytest.mark.parametrize(("word", "grade"), [("mps", Isolation.MPS), ("HAMi-core", Isolation.HAMI_CORE),
                                             ("hami_core", Isolation.HAMI_CORE), (" MIG ", Isolation.MIG),
                                             ("watchdog", Isolation.WATCHDOG), ("none", Isolation.NONE)])
def test_isolation_floor_is_parsed(word: str, grade: Isolation) -> None:
    assert slice_request({"gpu_memory": "8GiB", "isolation": word}).isolation is grade


@pytest.mark.parametrize("bad", ["strong", "", 3, ["mps"]])
def test_unknown_isolation_grade_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        slice_request({"isolation": bad})
    assert info.value.field == "isolation"
    assert "mig, mps, hami-core, watchdog, none" in info.value.reason


# --- SliceRequest's own validation (pydantic), for callers that build it directly ------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"memory_mib": 1024, "memory_percent": 25.0},  # both forms
        {"memory_mib": 0},
        {"memory_mib": -1},
        {"memory_percent": 0.0},
        {"memory_percent": 100.5},
        {"cores": -1},
        {"cores": 101},
        {"count": -1},
        {"count": 1.5},
        {"cpu_milli": -1},
        {"host_memory_mib": -1},
        {"node_policy": "nope"},
        {"surprise": 1},  # extra="forbid"
    ],
)
def test_slice_request_model_validation(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SliceRequest.model_validate(fields)


def test_slice_request_is_frozen() -> None:
    req = SliceRequest()
    with pytest.raises(ValidationError):
        req.cores = 50  # type: ignore[misc]


def test_slice_request_cannot_produce_both_memory_forms() -> None:
    # one keyword carries memory, so slice_request can never build the "both" case; what it can be
    # given is a malformed value, which must be InvalidRequest, never a pydantic error
    for value in ("8GiB25%", "25%8GiB", "8GiB 25%"):
        with pytest.raises(InvalidRequest) as info:
            slice_request({"gpu_memory": value})
        assert info.value.field == "gpu_memory"


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 200), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.text(max_size=4), max_size=2))


@given(st.dictionaries(st.sampled_from(sorted(KEYWORDS)), _VALUES, max_size=6))
def test_only_invalid_request_escapes(options: dict[str, object]) -> None:
    """Whatever the keyword values, slice_request returns a request or raises InvalidRequest."""
    try:
        req = slice_request(options)
    except InvalidRequest as exc:
        assert exc.field in KEYWORDS
    else:
        assert req.count >= 1 and 0 <= req.cores <= 100
