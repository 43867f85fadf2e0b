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


def test_slice_preempted_is_temporary_names_the_queue_and_pickles() -> None:
    from hami_ray.core.errors import SlicePreempted, TemporaryError  # noqa: PLC0415
    from hami_ray.wire import error_reply, result  # noqa: PLC0415

    err = SlicePreempted("lease-7", "org/team-a", "reclaim", 10.0)
    assert isinstance(err, TemporaryError)  # the same work fits again later: Ray may retry it
    assert "lease-7" in str(err) and "queue org/team-a reclaimed its guarantee" in str(err) and "10 s" in str(err)
    assert "higher priority in queue q" in str(SlicePreempted("l", "q", "priority", 5))
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.lease_id, back.for_queue, back.reason, back.grace_s) == (
        SlicePreempted, "lease-7", "org/team-a", "reclaim", 10.0)
    try:
        result(error_reply(err))  # over the fast path: as data, typed again
    except SlicePreempted as again:
        assert str(again) == str(err)
    else:
        raise AssertionError("the reply raised nothing")
