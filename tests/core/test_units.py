"""Tests of hami_ray.core.units: memory, percent, core and count quantities, good and bad."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hami_ray.core.errors import InvalidRequest, PermanentError
from hami_ray.core.units import MemoryQuantity, parse_cores, parse_count, parse_memory, parse_percent

# --- memory: the good forms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("8GiB", MemoryQuantity(mib=8192)),
        ("8Gi", MemoryQuantity(mib=8192)),
        ("8gib", MemoryQuantity(mib=8192)),  # case-insensitive units
        (" 8 GiB ", MemoryQuantity(mib=8192)),  # surrounding and inner blanks
        ("512MiB", MemoryQuantity(mib=512)),
        ("512Mi", MemoryQuantity(mib=512)),
        ("1.5GiB", MemoryQuantity(mib=1536)),
        ("1TiB", MemoryQuantity(mib=1024 * 1024)),
        ("2048KiB", MemoryQuantity(mib=2)),
        ("1KiB", MemoryQuantity(mib=1)),  # 1/1024 MiB rounds up to 1
        # 16 GB = 16e9 bytes = 15258.789 MiB -> rounded up to whole MiB
        ("16GB", MemoryQuantity(mib=15259)),
        ("16G", MemoryQuantity(mib=15259)),
        # 1 MB = 1e6 bytes = 0.9537 MiB -> 1
        ("1MB", MemoryQuantity(mib=1)),
        ("4096", MemoryQuantity(mib=4096)),  # a bare number is MiB
        (4096, MemoryQuantity(mib=4096)),
        (4096.0, MemoryQuantity(mib=4096)),
        ("25%", MemoryQuantity(percent=25.0)),
        ("12.5%", MemoryQuantity(percent=12.5)),
        ("100%", MemoryQuantity(percent=100.0)),
    ],
)
def test_parse_memory_good_forms(value: object, expected: MemoryQuantity) -> None:
    assert parse_memory(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        0, -1, -4096, "0", "0GiB", "0MiB", "-8GiB", "-1", "0%", "-25%", "101%", "150%",  # not positive / >100 %
        "8 gigs", "8GB2", "8 G i B", "8XiB", "8%%",  # unknown units
        "eight", "", "   ", "GiB", "8.GiB", ".5GiB", "1e3", "nan", "inf", "0x10",  # non-numeric
        "0.5", "1.5",  # fractional MiB
        0.5, -2.0, math.nan, math.inf,  # bad floats
        True, None, [8], {"mib": 8},  # wrong types
    ],
)
def test_parse_memory_rejects_with_the_field_named(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_memory(value, "gpu_memory")
    assert info.value.field == "gpu_memory"
    assert str(info.value).startswith("invalid gpu_memory: ")
    assert isinstance(info.value, PermanentError) and isinstance(info.value, ValueError)


def test_parse_memory_names_a_custom_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_memory("8 gigs", "nvidia.com/gpumem")
    assert info.value.field == "nvidia.com/gpumem"
    assert "gigs" in info.value.reason


def test_unknown_unit_message_names_the_unit() -> None:
    with pytest.raises(InvalidRequest, match="unknown unit 'gigs'"):
        parse_memory("8 gigs")


@given(st.integers(min_value=1, max_value=1 << 20))
def test_binary_units_are_exact(n: int) -> None:
    assert parse_memory(f"{n}MiB").mib == n
    assert parse_memory(f"{n}GiB").mib == n * 1024
    assert parse_memory(n).mib == n


@given(st.integers(min_value=1, max_value=10**6))
def test_decimal_units_round_up_to_whole_mib(n: int) -> None:
    got = parse_memory(f"{n}MB").mib
    assert got is not None
    # the smallest whole MiB that holds n * 10^6 bytes
    assert got * 1024 * 1024 >= n * 10**6 > (got - 1) * 1024 * 1024


# --- memory quantities resolve per device ----------------------------------------------------------


def test_percent_resolves_on_the_device_rounding_down() -> None:
    q = parse_memory("25%")
    assert q.resolve(81920) == 20480  # 25 % of 80 GiB
    assert q.resolve(40960) == 10240  # 25 % of 40 GiB
    assert parse_memory("33%").resolve(1000) == 330
    assert parse_memory("33.3%").resolve(1000) == 333  # 333.0 (floor of 333.00000000000006)
    assert parse_memory("1%").resolve(150) == 1  # 1.5 -> 1


def test_absolute_size_ignores_the_device() -> None:
    assert parse_memory("8GiB").resolve(81920) == 8192
    assert parse_memory("8GiB").resolve(1) == 8192


# --- percent -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("25%", 25.0), (25, 25.0), (25.5, 25.5), (" 50 % ", 50.0),
                                                 ("100", 100.0), (0.1, 0.1)])
def test_parse_percent_good(value: object, expected: float) -> None:
    assert parse_percent(value, "f") == expected


@pytest.mark.parametrize("value", [0, -1, 100.01, 101, "0%", "101%", "abc", "", "nan", "inf", math.nan,
                                   True, None, [25]])
def test_parse_percent_rejects(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_percent(value, "gpumem-percentage")
    assert info.value.field == "gpumem-percentage"


# --- cores ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (30, 30), (100, 100), ("30", 30), ("30%", 30),
                                                 (" 45 ", 45), (50.0, 50)])
def test_parse_cores_good(value: object, expected: int) -> None:
    assert parse_cores(value) == expected


@pytest.mark.parametrize("value", [-1, 101, 1000, "-5", "101", "150%", 30.5, "30.5", "thirty", "", None,
                                   True, False, [30], math.nan, math.inf])
def test_parse_cores_rejects_outside_0_100(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_cores(value, "gpu_cores")
    assert info.value.field == "gpu_cores"


# --- counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (8, 8), ("2", 2), (2.0, 2)])
def test_parse_count_good(value: object, expected: int) -> None:
    assert parse_count(value) == expected


@pytest.mark.parametrize("value", [0, -1, 0.5, 1.5, "0.5", "1.5", "two", "", None, True, [1], math.nan,
                                   math.inf])
def test_parse_count_rejects_fractions_and_garbage(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_count(value, "gpus")
    assert info.value.field == "gpus"


def test_fractional_gpu_message_points_to_slices() -> None:
    with pytest.raises(InvalidRequest, match="gpu_memory/gpu_cores"):
        parse_count(0.5)


# --- regressions ---------------------------------------------------------------------------------------------

HUGE = 10**400  # an int too large for a float
HUGE_TEXT = "1" * 400  # parses to float('inf')


# Regression test for a bug this suite found (since fixed): units.py parse_count() calls float(value) and catches only
# ValueError; a huge int (gpus=10**400) escapes as OverflowError instead of InvalidRequest
def test_huge_count_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        parse_count(HUGE, "gpus")


# Regression test for a bug this suite found (since fixed): units.py parse_memory() never checks that float(number_text) is
# finite; '111...1MiB' (400 digits) gives inf and math.ceil(inf) raises OverflowError instead of InvalidRequest
@pytest.mark.parametrize("unit", ["MiB", "GiB", "GB"])
def test_huge_memory_is_invalid_request(unit: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_memory(HUGE_TEXT + unit, "gpu_memory")


# Regression test for a bug this suite found (since fixed): units.py parse_percent() calls float(value) on an int without
# catching OverflowError
def test_huge_percent_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        parse_percent(HUGE, "gpumem-percentage")
