"""Parsing of memory and percentage quantities in requests.

Called by :mod:`hami_ray.core.request` (Python keywords) and :mod:`hami_ray.core.hami` (Kubernetes
resources). Memory is carried in MiB everywhere in hami-ray, as HAMi does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hami_ray.core.errors import InvalidRequest

MIB = 1024 * 1024

# Binary units (KiB, Ki) are powers of 1024, decimal units (KB, K) powers of 1000, as in Kubernetes
# quantities. All are case-sensitive on the 'i' only: "8gib" and "8GiB" are the same.
_UNIT_BYTES: dict[str, int] = {
    "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4,
}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z%]*)\s*$")


@dataclass(frozen=True, slots=True)
class MemoryQuantity:
    """Either an absolute size in MiB or a percentage of the device that is chosen later."""

    mib: int | None = None
    percent: float | None = None

    def resolve(self, device_memory_mib: int) -> int:
        """MiB on a device of ``device_memory_mib``; a percentage rounds down, as HAMi's ``Fit``."""
        if self.mib is not None:
            return self.mib
        assert self.percent is not None
        return int(device_memory_mib * self.percent / 100)


def parse_percent(value: object, field: str) -> float:
    """Parse ``"25%"``, ``25`` or ``25.5`` into a percent in (0, 100].

    Raises:
        InvalidRequest: not a number, or outside (0, 100].
    """
    if isinstance(value, bool):
        raise InvalidRequest(field, f"expected a percentage, got a boolean {value!r}")
    if isinstance(value, str):
        text = value.strip().rstrip("%").strip()
        try:
            number = float(text)
        except ValueError:
            raise InvalidRequest(field, f"not a percentage: {value!r}") from None
    elif isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise InvalidRequest(field, f"percentage must be in (0, 100], got {value!r}") from None
    else:
        raise InvalidRequest(field, f"expected a percentage, got {type(value).__name__}")
    if not math.isfinite(number) or number <= 0 or number > 100:
        raise InvalidRequest(field, f"percentage must be in (0, 100], got {value!r}")
    return number


def parse_memory(value: object, field: str = "gpu_memory") -> MemoryQuantity:
    """Parse a device-memory request.

    Accepted: an int (MiB), ``"512MiB"``, ``"8GiB"``, ``"8Gi"``, ``"16GB"`` (decimal, rounded up to
    whole MiB), ``"25%"`` (of the device chosen later).

    Example: ``parse_memory("8GiB").mib == 8192``.

    Raises:
        InvalidRequest: zero or negative, non-numeric, an unknown unit ("8 gigs"), or a percent
            outside (0, 100].
    """
    if isinstance(value, bool):
        raise InvalidRequest(field, f"expected a memory size, got a boolean {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidRequest(field, f"memory must be positive, got {value}")
        return MemoryQuantity(mib=value)
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0 or not value.is_integer():
            raise InvalidRequest(field, f"memory in MiB must be a positive whole number, got {value!r}")
        return MemoryQuantity(mib=int(value))
    if not isinstance(value, str):
        raise InvalidRequest(field, f"expected a memory size such as '8GiB', got {type(value).__name__}")
    text = value.strip()
    if text.startswith("-"):
        raise InvalidRequest(field, f"memory must be positive, got {value!r}")
    match = _QUANTITY.match(text)
    if not match:
        raise InvalidRequest(field, f"not a memory size: {value!r} (use e.g. '8GiB', '512MiB', 4096 or '25%')")
    number_text, unit = match.groups()
    number = float(number_text)
    if not math.isfinite(number):
        raise InvalidRequest(field, f"memory size out of range: {value!r}")
    if unit == "%":
        return MemoryQuantity(percent=parse_percent(value, field))
    if unit == "":
        if not number.is_integer():
            raise InvalidRequest(field, f"memory in MiB must be a whole number, got {value!r}")
        mib = int(number)
    else:
        factor = _UNIT_BYTES.get(unit.lower())
        if factor is None:
            raise InvalidRequest(field, f"unknown unit {unit!r} in {value!r} (use MiB, GiB, Mi, Gi, MB, GB)")
        mib = math.ceil(number * factor / MIB)
    if mib <= 0:
        raise InvalidRequest(field, f"memory must be positive, got {value!r}")
    return MemoryQuantity(mib=mib)


def parse_cores(value: object, field: str = "gpu_cores") -> int:
    """Parse a compute-core percentage 0-100 (0 means "no core limit", as HAMi's default).

    Raises:
        InvalidRequest: not an integer, or outside 0-100.
    """
    if isinstance(value, bool):
        raise InvalidRequest(field, f"expected an integer 0-100, got a boolean {value!r}")
    if isinstance(value, str):
        text = value.strip().rstrip("%").strip()
        try:
            value = int(text)
        except ValueError:
            raise InvalidRequest(field, f"not an integer percentage: {value!r}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidRequest(field, f"cores must be a whole percentage, got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise InvalidRequest(field, f"expected an integer 0-100, got {type(value).__name__}")
    if value < 0 or value > 100:
        raise InvalidRequest(field, f"cores must be within 0-100, got {value}")
    return value


def parse_count(value: object, field: str = "gpus") -> int:
    """Parse a whole device count >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise InvalidRequest(field, f"expected a whole number of devices, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(field, f"not a number: {value!r}") from None
    except OverflowError:
        raise InvalidRequest(field, f"device count out of range: {value!r}") from None
    if not math.isfinite(number):
        raise InvalidRequest(field, f"device count out of range: {value!r}")
    if not number.is_integer():
        raise InvalidRequest(field, f"device count must be whole (use gpu_memory/gpu_cores for fractions), got {value!r}")
    if number < 1:
        raise InvalidRequest(field, f"device count must be at least 1, got {value!r}")
    return int(number)
