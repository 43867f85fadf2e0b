"""The Hypothesis profiles of tests/conftest.py as every property test in tests/ ends up with them (issue 15):
no deadline anywhere; under CI (``CI`` set, as ``.ci/run`` does) the too-slow health check is off too; and the
CI profile lowers no test's ``max_examples``. Each profile is looked at in a fresh interpreter, since a test's
settings are fixed when its module is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# imports tests.conftest (it loads the profile), then every test module that uses hypothesis, and prints each
# property test's effective settings: @given functions and methods, and stateful machines' TestCase classes
_PROBE = r"""
import importlib, inspect, json, sys
from pathlib import Path
import hypothesis
import tests.conftest  # noqa: F401 - loads the profile, as pytest does before importing any test module

out = {"profile": str(hypothesis.settings.default), "tests": {}}
for path in sorted(Path("tests").rglob("test_*.py")):
    if "hypothesis" not in path.read_text(encoding="utf-8"):
        continue
    name = ".".join(path.with_suffix("").parts)
    module = importlib.import_module(name)
    found = []
    for attr, value in vars(module).items():
        found.append((f"{name}.{attr}", value))
        if inspect.isclass(value):
            found += [(f"{name}.{attr}.{m}", v) for m, v in vars(value).items()]
    for qual, obj in found:
        s = getattr(obj, "_hypothesis_internal_use_settings", None) if getattr(obj, "is_hypothesis_test", False) \
            else getattr(obj, "settings", None) if inspect.isclass(obj) else None
        if isinstance(s, hypothesis.settings):
            out["tests"][qual] = {"deadline": None if s.deadline is None else str(s.deadline),
                                  "too_slow_off": hypothesis.HealthCheck.too_slow in s.suppress_health_check,
                                  "max_examples": s.max_examples}
json.dump(out, sys.stdout)
"""


def _settings_under(ci: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def profiles() -> dict[str, dict[str, object]]:
    return {"ci": _settings_under("1"), "dev": _settings_under(None)}


def test_every_property_test_runs_without_a_deadline(profiles: dict[str, dict[str, object]]) -> None:
    for which, seen in profiles.items():
        tests = seen["tests"]
        assert isinstance(tests, dict) and len(tests) >= 10, (which, tests)  # the property tests were found
        with_deadline = {name: s["deadline"] for name, s in tests.items() if s["deadline"] is not None}
        assert not with_deadline, f"{which}: property tests with a deadline: {with_deadline}"


def test_ci_turns_the_too_slow_health_check_off_everywhere(profiles: dict[str, dict[str, object]]) -> None:
    ci, dev = profiles["ci"]["tests"], profiles["dev"]["tests"]
    assert isinstance(ci, dict) and isinstance(dev, dict)
    checked = {name for name, s in ci.items() if not s["too_slow_off"]}
    assert not checked, f"under CI these property tests still fail when input generation is slow: {checked}"
    assert "suppress_health_check=()" in str(profiles["dev"]["profile"])  # a developer still hears of slow strategies
    assert "print_blob=True" in str(profiles["ci"]["profile"])  # a CI failure says how to reproduce it


def test_ci_keeps_generating_new_inputs(profiles: dict[str, dict[str, object]]) -> None:
    """hypothesis's own CI profile derandomizes (the same inputs every run) and keeps no example database:
    ours replaces it, so each CI run explores inputs the runs before did not."""
    for which in ("ci", "dev"):
        assert "derandomize=False" in str(profiles[which]["profile"]), which
        assert "database=None" not in str(profiles[which]["profile"]), which


def test_the_ci_profile_lowers_no_max_examples(profiles: dict[str, dict[str, object]]) -> None:
    ci, dev = profiles["ci"]["tests"], profiles["dev"]["tests"]
    assert isinstance(ci, dict) and isinstance(dev, dict)
    assert ci.keys() == dev.keys()
    assert {n: s["max_examples"] for n, s in ci.items()} == {n: s["max_examples"] for n, s in dev.items()}


@pytest.mark.parametrize(("value", "profile"), [("1", "ci"), ("true", "ci"), ("0", "hami-ray"), ("", "hami-ray")])
def test_the_ci_variable_picks_the_profile(value: str, profile: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if k != "CI"}, "CI": value}
    done = subprocess.run([sys.executable, "-c", "import tests.conftest, hypothesis; "
                           "print(hypothesis.settings._current_profile)"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == profile
