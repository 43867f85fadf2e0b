"""Markdown table of fgd vs fgd-plus over every openb trace, from ``hami-ray simulate`` JSON files.

    python bench/trace_table.py out/traces10 out/traces > docs/traces.md-fragment

For each trace the first folder that has its JSON wins. Columns: unallocated GPU % (median over seeds)
at 90 % and 100 % arrival for both policies, and which is better at 100 %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folders: list[str]) -> None:
    names: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("openb_pod_list_*.json")):
            names.setdefault(path.stem, path)
    print("| trace | seeds | fgd @90 | fgd-plus @90 | fgd @100 | fgd-plus @100 | fgd @130 | fgd-plus @130 |")
    print("|---|---|---|---|---|---|---|---|")
    worse = []
    for name, path in sorted(names.items()):
        data = json.loads(path.read_text())
        a, b = data["fgd"]["unallocated_pct_at"], data["fgd-plus"]["unallocated_pct_at"]
        seeds = len(data["meta"]["seeds"])
        mark = "" if b["100"] <= a["100"] else " (worse)"
        if mark:
            worse.append(name)
        print(f"| {name.removeprefix('openb_pod_list_')} | {seeds} | {a['90']:.2f} | {b['90']:.2f} | "
              f"{a['100']:.2f} | **{b['100']:.2f}**{mark} | {a['130']:.2f} | {b['130']:.2f} |")
    print()
    print(f"fgd-plus worse than fgd at 100 %: {', '.join(worse) if worse else 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["out/traces10", "out/traces"])
