"""Which nodes a pod may go to before its devices are looked at, as kube-scheduler's filters say:
cordoned nodes (``spec.unschedulable``), taints with effect ``NoSchedule``/``NoExecute`` the pod does not
tolerate, ``spec.nodeSelector`` and required node affinity (``nodeSelectorTerms``: ``matchExpressions``
on labels, ``matchFields`` on ``metadata.name``). The reasons use kube-scheduler's words, so that
``0/N nodes are available: ...`` counts them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

UNSCHEDULABLE = "node(s) were unschedulable"
TAINTED = "node(s) had untolerated taint"
SELECTOR = "node(s) didn't match Pod's node affinity/selector"


@dataclass(frozen=True)
class NodeInfo:
    """What the filters read of a node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, Any], ...] = ()
    unschedulable: bool = False

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> NodeInfo:
        meta, spec = node.get("metadata") or {}, node.get("spec") or {}
        taints = tuple(t for t in spec.get("taints") or [] if t.get("effect") in ("NoSchedule", "NoExecute"))
        return cls(name=str(meta.get("name")), labels=dict(meta.get("labels") or {}), taints=taints,
                   unschedulable=bool(spec.get("unschedulable")))

    @property
    def open(self) -> bool:
        """Any pod may go here (no cordon, no taint): the fast path of :func:`allowed`."""
        return not self.unschedulable and not self.taints


def constrained(pod: Mapping[str, Any]) -> bool:
    """Whether the pod narrows its nodes itself (selector or required affinity)."""
    spec = pod.get("spec") or {}
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {})
    return bool(spec.get("nodeSelector")) or bool(affinity.get("requiredDuringSchedulingIgnoredDuringExecution"))


def why_not(pod: Mapping[str, Any], node: NodeInfo) -> str | None:
    """Why ``pod`` cannot go to ``node`` (one of the reasons above), or None."""
    spec = pod.get("spec") or {}
    if node.unschedulable and not _tolerates(spec, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}):
        return UNSCHEDULABLE
    if any(not _tolerates(spec, taint) for taint in node.taints):
        return TAINTED
    selector = spec.get("nodeSelector") or {}
    if any(node.labels.get(k) != v for k, v in selector.items()):
        return SELECTOR
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    if terms and not any(_term_matches(term, node) for term in terms):
        return SELECTOR
    return None


def allowed(pod: Mapping[str, Any], nodes: Mapping[str, NodeInfo], open_nodes: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """The nodes ``pod`` may go to, and per reason how many it may not. ``open_nodes``: the nodes without
    cordon or taints (cached by the caller): a pod without selector or affinity may go to all of them."""
    if not constrained(pod) and len(open_nodes) == len(nodes):
        return list(open_nodes), {}
    fits: list[str] = []
    refused: dict[str, int] = {}
    candidates = nodes if constrained(pod) else {n: i for n, i in nodes.items() if not i.open}
    for name, info in candidates.items():
        reason = why_not(pod, info)
        if reason is None:
            fits.append(name)
        else:
            refused[reason] = refused.get(reason, 0) + 1
    if not constrained(pod):
        fits.extend(open_nodes)
    return fits, refused


def _tolerates(spec: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    for toleration in spec.get("tolerations") or []:
        effect = toleration.get("effect")
        if effect and effect != taint.get("effect"):
            continue
        key, operator = toleration.get("key"), toleration.get("operator") or "Equal"
        if not key and operator == "Exists":
            return True  # tolerates everything
        if key != taint.get("key"):
            continue
        if operator == "Exists" or toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def _term_matches(term: Mapping[str, Any], node: NodeInfo) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False  # an empty term matches no node (kube-scheduler)
    return (all(_expression(e, node.labels) for e in expressions)
            and all(_expression(f, {"metadata.name": node.name}) for f in fields))


def _expression(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator"), list(expr.get("values") or [])
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and len(values) == 1:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False
