"""A policy against the baseline over many traces, from ``hami-ray simulate`` JSON files, as Markdown.

    python -m hami_ray.sim.compare docs/traces --policy fgd-plus

Reads the ``seed_spread_at`` and ``vs_baseline`` keys that :mod:`hami_ray.sim.experiment` writes (the run
must have had a baseline: ``--baseline``, or fgd among the policies). Per trace: both policies' median
[min, max] over the seeds at 100 % arrival, then the policy minus the baseline seed by seed at 90, 100 and
130 % (median [min, max], and on how many seeds lower/tie/higher). The last lines say on which traces the
policy was at or below the baseline on every seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

POINTS = ("90", "100", "130")


def _spread(s: dict[str, float] | None, sign: str = "") -> str:
    if s is None:
        return "-"
    return f"{s['median']:{sign}.2f} [{s['min']:{sign}.2f}, {s['max']:{sign}.2f}]"


def rows(files: list[Path], policy: str) -> list[tuple[str, dict[str, Any], dict[str, Any], int]]:
    """(trace, the policy's results, the baseline's results, seeds) per file, sorted by trace name."""
    out = []
    for path in sorted(files):
        data = json.loads(path.read_text())
        mine = data.get(policy)
        if not isinstance(mine, dict) or "vs_baseline" not in mine:
            raise ValueError(f"{path}: no {policy!r} compared with a baseline (run hami-ray simulate with one)")
        base = data[mine["vs_baseline"]["baseline"]]
        trace = Path(data["meta"]["pods"]).stem.removeprefix("openb_pod_list_")
        out.append((trace, mine, base, len(data["meta"]["seeds"])))
    return out


def markdown(files: list[Path], policy: str) -> str:
    table = rows(files, policy)
    if not table:
        raise ValueError("no JSON files")
    baseline = table[0][1]["vs_baseline"]["baseline"]
    head = [f"| trace | seeds | {baseline} @100 | {policy} @100 |"
            + "".join(f" {policy} - {baseline} @{p} | lower/tie/higher @{p} |" for p in POINTS)]
    head.append("|---" * (4 + 2 * len(POINTS)) + "|")
    never_above: dict[str, list[str]] = {p: [] for p in POINTS}
    for trace, mine, base, seeds in table:
        cells = [trace, str(seeds), _spread(base["seed_spread_at"]["100"]), _spread(mine["seed_spread_at"]["100"])]
        for point in POINTS:
            d = mine["vs_baseline"]["diff_at"].get(point)
            cells += [_spread(d, "+"), "-" if d is None else f"{d['below']}/{d['tie']}/{d['above']}"]
            if d is not None and d["above"] == 0:
                never_above[point].append(trace)
        head.append("| " + " | ".join(cells) + " |")
    head.append("")
    for point in POINTS:
        others = [t for t, *_ in table if t not in never_above[point]]
        head.append(f"At or below {baseline} on every seed at {point} %: {len(never_above[point])} of {len(table)} "
                    f"traces" + (f" (not: {', '.join(others)})" if others else "") + ".")
    return "\n".join(head)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder of hami-ray simulate JSON files")
    parser.add_argument("--policy", default="fgd-plus", help="the policy compared with the runs' baseline")
    args = parser.parse_args(argv)
    print(markdown(sorted(args.folder.glob("*.json")), args.policy))


if __name__ == "__main__":
    main()
