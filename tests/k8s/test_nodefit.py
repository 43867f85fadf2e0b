"""kube-scheduler's node filters as the bridge applies them before looking at devices (no cluster)."""

from __future__ import annotations

from hami_ray.k8s.nodefit import SELECTOR, TAINTED, UNSCHEDULABLE, NodeInfo, allowed, why_not


def _node(name: str, labels: dict[str, str] | None = None, taints: list[dict[str, str]] | None = None,
          unschedulable: bool = False) -> NodeInfo:
    return NodeInfo.of({"metadata": {"name": name, "labels": labels or {}},
                        "spec": {"taints": taints or [], "unschedulable": unschedulable}})


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def test_taints_and_tolerations() -> None:
    node = _node("a", taints=[GPU_TAINT])
    assert why_not({"spec": {}}, node) == TAINTED
    assert why_not({"spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}}, node) is None
    assert why_not({"spec": {"tolerations": [{"key": "nvidia.com/gpu", "value": "present"}]}}, node) is None
    assert why_not({"spec": {"tolerations": [{"key": "nvidia.com/gpu", "value": "other"}]}}, node) == TAINTED
    assert why_not({"spec": {"tolerations": [{"operator": "Exists"}]}}, node) is None  # tolerates everything
    assert why_not({"spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                              "effect": "NoExecute"}]}}, node) == TAINTED  # another effect
    soft = _node("b", taints=[{"key": "x", "effect": "PreferNoSchedule"}])
    assert soft.open and why_not({"spec": {}}, soft) is None  # a preference never filters


def test_cordon_selector_and_required_affinity() -> None:
    assert why_not({"spec": {}}, _node("c", unschedulable=True)) == UNSCHEDULABLE
    labelled = _node("d", labels={"gpu": "on", "zone": "z1", "gen": "9"})
    assert why_not({"spec": {"nodeSelector": {"gpu": "on"}}}, labelled) is None
    assert why_not({"spec": {"nodeSelector": {"gpu": "off"}}}, labelled) == SELECTOR

    def affinity(*expressions: dict[str, object], fields: list[dict[str, object]] | None = None) -> dict[str, object]:
        term: dict[str, object] = {"matchExpressions": list(expressions)}
        if fields:
            term["matchFields"] = fields
        return {"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [term]}}}}}

    assert why_not(affinity({"key": "zone", "operator": "In", "values": ["z1", "z2"]}), labelled) is None
    assert why_not(affinity({"key": "zone", "operator": "NotIn", "values": ["z1"]}), labelled) == SELECTOR
    assert why_not(affinity({"key": "gen", "operator": "Gt", "values": ["8"]}), labelled) is None
    assert why_not(affinity({"key": "gen", "operator": "Lt", "values": ["8"]}), labelled) == SELECTOR
    assert why_not(affinity({"key": "missing", "operator": "DoesNotExist"}), labelled) is None
    assert why_not(affinity(fields=[{"key": "metadata.name", "operator": "In", "values": ["d"]}]), labelled) is None
    assert why_not(affinity(fields=[{"key": "metadata.name", "operator": "In", "values": ["e"]}]), labelled) == SELECTOR


def test_allowed_counts_what_it_leaves_out() -> None:
    nodes = {n.name: n for n in (_node("open-1"), _node("open-2"), _node("tainted", taints=[GPU_TAINT]),
                                 _node("cordoned", unschedulable=True), _node("labelled", labels={"gpu": "on"}))}
    open_nodes = [n for n, i in nodes.items() if i.open]
    fits, refused = allowed({"spec": {}}, nodes, open_nodes)
    assert sorted(fits) == ["labelled", "open-1", "open-2"] and refused == {TAINTED: 1, UNSCHEDULABLE: 1}
    fits, refused = allowed({"spec": {"nodeSelector": {"gpu": "on"}}}, nodes, open_nodes)
    assert fits == ["labelled"] and refused == {SELECTOR: 2, TAINTED: 1, UNSCHEDULABLE: 1}
    just_open = {n: i for n, i in nodes.items() if i.open}
    fits, refused = allowed({"spec": {}}, just_open, open_nodes)
    assert fits == open_nodes and refused == {}  # the fast path: nothing to look at
