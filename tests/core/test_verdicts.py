"""``Scheduler.verdicts`` (every node's answer in one pass, for an extender's filter) says exactly what
placing on each node alone says: the same nodes fit, and each other node gets the reason that placing
there alone reports."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hami_ray.core.errors import InvalidRequest, Unschedulable
from hami_ray.core.ledger import Ledger
from hami_ray.core.model import SliceRequest
from hami_ray.core.scheduler import Scheduler
from tests.core.builders import allocate, make_node

MODELS = ("A100", "T4")
REQUESTS = st.builds(
    SliceRequest,
    count=st.integers(0, 3),
    memory_mib=st.sampled_from([None, 1024, 8192, 20000, 40000]),
    cores=st.sampled_from([0, 10, 50, 100]),
    include_types=st.sampled_from([(), ("T4",)]),
    numa_bind=st.booleans(),
)


def _cluster(load: list[SliceRequest]) -> Ledger:
    ledger = Ledger([make_node(f"n{i}").gpus(2 + i % 3, "40GiB" if i % 2 else "16GiB", MODELS[i % 2],
                                             numa=i % 2).build() for i in range(6)])
    engine = Scheduler(ledger)
    for request in load:  # a used cluster, whatever fits of it
        try:
            allocate(ledger, engine.place(request))
        except (Unschedulable, InvalidRequest):
            pass
    return ledger


@settings(max_examples=120, deadline=None)
@given(load=st.lists(REQUESTS, max_size=12), pod=st.lists(REQUESTS, min_size=1, max_size=3))
def test_verdicts_agree_with_placing_on_each_node_alone(load: list[SliceRequest], pod: list[SliceRequest]) -> None:
    ledger = _cluster(load)
    engine = Scheduler(ledger)
    names = sorted(ledger.nodes)
    held = ledger.snapshot()
    try:
        verdicts = engine.verdicts(pod, names)
    except InvalidRequest:
        for name in names:  # the request is invalid for every node alike
            try:
                engine.place(pod, nodes=[name])
            except (InvalidRequest, Unschedulable):
                continue
            raise AssertionError(f"{name} took a request verdicts called invalid")
        return
    assert sorted(verdicts) == names
    for name in names:
        try:
            engine.place(pod, nodes=[name])
            alone: str | None = None
        except Unschedulable as exc:
            (alone,) = exc.reasons
        assert verdicts[name] == alone, (name, pod)
    assert ledger.snapshot() == held  # verdicts (and the failed placements) held nothing
