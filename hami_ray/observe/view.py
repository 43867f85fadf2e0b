"""The status view (``hami-ray status``): a rich rendering of :class:`~hami_ray.observe.model.ClusterStatus`.

From the top: the cluster summary (devices, allocated and used memory as bars, FGD fragmentation, leases,
queue), the team queues once any are defined (guaranteed, limit, used, borrowed, share, waiting,
preempted), the waiting requests and why they wait, then per node its devices: model, memory allocated
(``▓``) and used (``█``) against capacity, cores allocated and utilisation, slices against the split
count, health, and under each device its slices with owner, limits and usage. Readable at 80 columns;
a large cluster is summarised by device model and shown a page of nodes at a time (busiest first),
``node``/``device`` narrow it to one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hami_ray.observe.model import ClusterStatus, DeviceStatus, NodeStatus, QueueStatus

PER_PAGE = 20  # nodes per page
SHOW_SLICES = 8  # slices listed under one device (the rest counted)
OWNER_W = 20  # cells for a slice's owner under its device


def bar(allocated: float, used: float | None, width: int) -> Text:
    """``width`` cells: used ``█`` within allocated ``▓``, free ``░`` (fractions of capacity, 0-1)."""
    a = min(width, round(max(0.0, allocated) * width))
    u = min(width, round(max(0.0, used or 0.0) * width))
    text = Text()
    text.append("█" * min(u, width), style="magenta")
    text.append("▓" * max(0, a - u), style="cyan")
    text.append("░" * max(0, width - max(a, u)), style="grey50")
    return text


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _gib(mib: int | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.0f}" if mib >= 10240 else f"{mib / 1024:.1f}"


def render(status: ClusterStatus, *, width: int = 80, node: str | None = None, device: str | None = None,
           page: int = 0, per_page: int = PER_PAGE) -> RenderableType:
    """The whole view for a terminal ``width`` columns wide."""
    bar_w = 10 if width < 100 else 20
    parts: list[RenderableType] = [_summary(status, bar_w)]
    if any(q.queue != "default" for q in status.queues):
        parts.append(queues_table(status.queues))
    if status.waiting:
        parts.append(_waiting(status, width))
    nodes = list(status.nodes)
    if device is not None:
        nodes = [n.model_copy(update={"devices": tuple(d for d in n.devices if d.uuid.startswith(device))})
                 for n in nodes]
        nodes = [n for n in nodes if n.devices]
    if node is not None:
        nodes = [n for n in nodes if n.name.startswith(node) or n.host == node]
    if not nodes:
        parts.append(Text("no nodes match" if (node or device) else "no nodes yet: no node actor has registered",
                          style="yellow"))
        return Group(*parts)
    if len(nodes) > per_page:
        parts.append(_by_model(nodes, bar_w))
        nodes.sort(key=lambda n: (-sum(d.memory_allocated_mib for d in n.devices), n.name))
        pages = (len(nodes) + per_page - 1) // per_page
        page = max(0, min(page, pages - 1))
        shown = nodes[page * per_page:(page + 1) * per_page]
        parts.extend(_node(n, bar_w, slices=False) for n in shown)
        parts.append(Text(f"page {page + 1}/{pages} of {len(nodes)} nodes, busiest first "
                          "(--page K, --node NAME, --device UUID, or --json for all)", style="dim"))
        return Group(*parts)
    parts.extend(_node(n, bar_w, slices=True) for n in nodes)
    parts.extend(_why_degraded(nodes))
    return Group(*parts)


def short_owner(owner: str, width: int = 0) -> str:
    """An owner in ``width`` cells: its kind and name, the application part of a Serve replica's dropped
    (``serve:app/Model#r3x9`` reads ``serve:Model#r3x9``), the end cut."""
    width = width or OWNER_W
    kind, _, rest = owner.partition(":")
    if rest and "/" in rest and len(owner) > width:
        owner = f"{kind}:{rest.split('/', 1)[1]}"
    return owner if len(owner) <= width else owner[:width - 1] + "…"


def label(node: NodeStatus) -> str:
    """A node as operators know it: its host (Ray's node name) and the start of its Ray id, which tells
    apart two nodes of one host; the id alone where the host is unknown."""
    short = node.name[:8] if node.host else f"{node.name[:16]}{'…' if len(node.name) > 16 else ''}"
    return f"{node.host} ({short})" if node.host else short


def _why_degraded(nodes: list[NodeStatus]) -> list[RenderableType]:
    """One line per node whose enforcement is degraded, saying why (never silent)."""
    out: list[RenderableType] = [
        Text(f"node {label(n)}: enforcement degraded: {n.enforcement_reason or 'unknown'}", style="red")
        for n in nodes if n.enforcement != "ok"]
    out.extend(Text(f"node {label(n)}: {w}", style="yellow") for n in nodes for w in n.warnings)
    return out


def _summary(status: ClusterStatus, bar_w: int) -> RenderableType:
    s = status.summary
    head = Text()
    head.append("hami-ray", style="bold")
    head.append(f"  {s.nodes} nodes · {s.devices} devices")
    if s.healthy_devices != s.devices:
        head.append(f" ({s.devices - s.healthy_devices} unhealthy)", style="red")
    head.append(f" · {s.leases} leases · queue {s.queue_depth}")
    if status.lost:
        head.append(f" · {len(status.lost)} lost", style="red")
    acted = ", ".join(f"{n} {a}" for a, n in sorted(status.enforcement.items()) if n)
    if acted:
        head.append(f" · enforced: {acted}", style="yellow")
    line = Text("memory  allocated ")
    line.append_text(bar(s.allocated_ratio, None, bar_w))
    line.append(f" {_pct(s.allocated_ratio)}  used ")
    line.append_text(bar(0.0, s.used_ratio, bar_w))
    line.append(f" {_pct(s.used_ratio)}")
    if s.sampled_devices < s.devices:
        line.append(f" ({s.sampled_devices}/{s.devices} sampled)", style="dim")
    line.append(f"  fragmentation {_pct(s.fragmentation)}")
    return Group(head, line)


def _amount(values: Mapping[str, int], of: Mapping[str, int] | None = None) -> str:
    """``"80 GiB 100c 1d"``: memory, cores, whole devices (zeros left out; ``of``: only the keys it has)."""
    keys = [k for k in ("memory_mib", "cores", "devices") if of is None or k in of]
    parts = []
    for k in keys:
        v = values.get(k, 0)
        if not v and of is None:
            continue
        parts.append(f"{_gib(v)} GiB" if k == "memory_mib" else f"{v}{'c' if k == 'cores' else 'd'}")
    return " ".join(parts) or "-"


def queues_table(queues: Sequence[QueueStatus]) -> RenderableType:
    """Team queues: guaranteed, limit, used, borrowed, share, waiting and preempted (``hami-ray queues``,
    and above the nodes in ``hami-ray status`` once queues are defined)."""
    table = Table(title="queues", title_justify="left", expand=False, show_edge=False, pad_edge=False)
    for col in ("queue", "guaranteed", "limit", "used", "borrowed", "share", "wait", "preempted"):
        table.add_column(col, justify="right" if col in ("share", "wait", "preempted") else "left", no_wrap=True)
    depth = {q.queue: 0 for q in queues}
    for q in queues:
        depth[q.queue] = depth.get(q.parent or "", -1) + 1 if q.parent else 0
    for q in queues:
        name = "  " * depth[q.queue] + (q.queue.rsplit("/", 1)[-1] if q.parent else q.queue)
        borrowed = _amount(q.borrowed)
        preempted = str(q.preempted) + (f" ({q.reclaiming} reclaiming)" if q.reclaiming else "")
        table.add_row(Text(name, style="" if q.preemptible else "bold"), _amount(q.guaranteed),
                      _amount(q.limit, q.limit) if q.limit else "-", _amount(q.used),
                      Text(borrowed, style="yellow" if borrowed != "-" else ""), f"{q.share:.2f}", str(q.waiting),
                      preempted)
    return table


def _waiting(status: ClusterStatus, width: int) -> RenderableType:
    table = Table(title=f"waiting ({status.summary.queue_depth})", title_justify="left", expand=False,
                  show_edge=False, pad_edge=False)
    table.add_column("owner", overflow="ellipsis", max_width=24, no_wrap=True)
    table.add_column("request", overflow="ellipsis", max_width=28, no_wrap=True)
    table.add_column("s", justify="right")
    table.add_column("why", overflow="ellipsis", no_wrap=True, max_width=max(20, width - 64))
    for w in status.waiting[:5]:
        table.add_row(Text(w.owner if w.queue == "default" else f"{w.owner} [{w.queue}]"), w.request, f"{w.waited_s:.0f}",
                      w.reason)
    return table


def _by_model(nodes: list[NodeStatus], bar_w: int) -> RenderableType:
    agg: dict[str, list[DeviceStatus]] = defaultdict(list)
    for n in nodes:
        for d in n.devices:
            agg[d.model].append(d)
    table = Table(title="by model", title_justify="left", show_edge=False, pad_edge=False)
    for col, justify in (("model", "left"), ("devices", "right"), ("allocated", "left"), ("", "right"),
                         ("used", "right"), ("slices", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for model, devs in sorted(agg.items()):
        cap = sum(d.memory_mib for d in devs) or 1
        alloc = sum(d.memory_allocated_mib for d in devs) / cap
        sampled = [d for d in devs if d.memory_used_mib is not None]
        used = sum(d.memory_used_mib or 0 for d in sampled) / cap
        table.add_row(model, str(len(devs)), bar(alloc, None, bar_w), _pct(alloc),
                      _pct(used) if sampled else "-", str(sum(d.slice_count for d in devs)))
    return table


def _node(node: NodeStatus, bar_w: int, *, slices: bool) -> RenderableType:
    frag = f"  frag {node.fragment_milli:.0f}/{node.idle_milli:.0f} milli idle" if node.idle_milli else ""
    title = Text(f"node {label(node)}  isolation {node.isolation}")
    if node.enforcement != "ok":
        title.append(f"  enforcement {node.enforcement}", style="bold red")
    title.append(frag)
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("model", no_wrap=True, overflow="ellipsis", max_width=OWNER_W + 2)
    table.add_column("memory ▓alloc █used", no_wrap=True)
    table.add_column("GiB", justify="right", no_wrap=True)
    table.add_column("cores", justify="right", no_wrap=True)
    table.add_column("slices", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for d in node.devices:
        cap = d.memory_mib or 1
        used = None if d.memory_used_mib is None else d.memory_used_mib / cap
        util = "" if d.utilization is None else f" u{d.utilization}"
        table.add_row(str(d.index), d.model.removeprefix("NVIDIA "), bar(d.memory_allocated_mib / cap, used, bar_w),
                      f"{_gib(d.memory_allocated_mib)}/{_gib(d.memory_used_mib)}/{_gib(d.memory_mib)}",
                      f"{d.cores_allocated}{util}", f"{d.slice_count}/{d.split_count}",
                      Text("ok", style="green") if d.healthy else Text("SICK", style="bold red"))
        if not slices:
            continue
        for s in d.slices[:SHOW_SLICES]:
            over = s.memory_used_mib is not None and s.memory_used_mib > s.memory_mib
            marked = "!" if s.note else ""
            state = "" if s.state == "active" else f" {s.state}"
            table.add_row("", Text(f"└ {short_owner(s.owner)}", style="dim"),
                          Text(f"…{s.lease_id[-6:]}{state} {s.isolation}{marked}", style="yellow" if marked else "dim"),
                          Text(f"{_gib(s.memory_mib)}/{_gib(s.memory_used_mib)}", style="red" if over else "dim"),
                          Text(f"{s.cores}", style="dim"), "", "")
        if len(d.slices) > SHOW_SLICES:
            table.add_row("", Text(f"└ … {len(d.slices) - SHOW_SLICES} more", style="dim"), "", "", "", "", "")
    return table
