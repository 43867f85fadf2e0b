"""``python -m hami_ray.sim.compare``: a policy against the baseline over many simulate JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hami_ray.sim.compare import main, markdown


def _result(trace: str, diffs_at_100: list[float]) -> dict[str, object]:
    """A simulate result of fgd and fgd-plus on ``trace`` whose per-seed differences at 100 % are given."""
    def spread(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]}

    def diff(values: list[float]) -> dict[str, float]:
        return {**spread(values), "below": sum(v <= -0.005 for v in values), "tie": sum(abs(v) < 0.005 for v in values),
                "above": sum(v >= 0.005 for v in values)}

    fgd = [5.0, 5.2, 4.8]
    plus = [a + d for a, d in zip(fgd, diffs_at_100, strict=True)]
    return {
        "fgd": {"seed_spread_at": {"100": spread(fgd)}},
        "fgd-plus": {"seed_spread_at": {"100": spread(plus)},
                     "vs_baseline": {"baseline": "fgd", "diff_at": {"90": diff([0.0, 0.0, 0.0]), "100": diff(diffs_at_100),
                                                                     "130": None}}},
        "meta": {"pods": f"openb_pod_list_{trace}.csv", "seeds": [42, 43, 44]},
    }


def test_markdown_names_the_traces_where_the_policy_was_above_on_some_seed(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_result("default", [-0.3, -0.1, 0.0])))
    (tmp_path / "b.json").write_text(json.dumps(_result("multigpu40", [-0.1, 0.12, 0.02])))
    text = markdown(sorted(tmp_path.glob("*.json")), "fgd-plus")
    lines = text.splitlines()
    assert lines[0].startswith("| trace | seeds | fgd @100 | fgd-plus @100 | fgd-plus - fgd @90 |")
    default = next(line for line in lines if line.startswith("| default |"))
    assert "| 2/1/0 |" in default
    assert "-0.10 [-0.30, +0.00]" in default  # the median of -0.3, -0.1 and 0.0
    multigpu = next(line for line in lines if line.startswith("| multigpu40 |"))
    assert "| 1/0/2 |" in multigpu
    assert "At or below fgd on every seed at 100 %: 1 of 2 traces (not: multigpu40)." in lines
    assert "At or below fgd on every seed at 90 %: 2 of 2 traces." in lines
    assert "At or below fgd on every seed at 130 %: 0 of 2 traces (not: default, multigpu40)." in lines


def test_a_run_without_a_baseline_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _result("default", [0.0, 0.0, 0.0])
    del data["fgd-plus"]["vs_baseline"]  # type: ignore[attr-defined]
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no 'fgd-plus' compared with a baseline"):
        main([str(tmp_path)])
    (tmp_path / "a.json").write_text(json.dumps(_result("default", [0.0, 0.0, 0.0])))
    main([str(tmp_path), "--policy", "fgd-plus"])
    assert "| default | 3 |" in capsys.readouterr().out
