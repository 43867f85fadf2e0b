"""SliceQuotaExceeded: its place in the tree, its message, and pickling (Ray ships it between processes)."""

from __future__ import annotations

import pickle

from hami_ray.core import errors
from hami_ray.core.errors import HamiRayError, PermanentError, SliceQuotaExceeded


def test_slice_quota_exceeded_message_fields_and_pickle() -> None:
    err = SliceQuotaExceeded("lease-7", "GPU-0", 9000, 8192, 4242)
    assert isinstance(err, PermanentError) and isinstance(err, HamiRayError)
    text = str(err)
    for part in ("lease-7", "GPU-0", "9000 MiB", "8192 MiB", "4242"):
        assert part in text
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SliceQuotaExceeded
    assert (back.lease_id, back.uuid, back.used_mib, back.limit_mib, back.pid) == ("lease-7", "GPU-0", 9000, 8192, 4242)
    assert str(back) == text
    assert "SliceQuotaExceeded" in (errors.__doc__ or "")
