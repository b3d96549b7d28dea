"""deploy/prometheus: the recording and alerting rules pass `promtool check rules` and their unit tests
(`promtool test rules`). Debian's `prometheus` package ships promtool; .ci/run installs it."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: apt-get install prometheus (Debian), as .ci/run does"
    return path


def _run(*cmd) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_rules_are_valid(promtool):
    out = _run(promtool, "check", "rules", "deltaserve-rules.yml")
    assert "SUCCESS: 23 rules found" in out


def test_rule_unit_tests_pass(promtool):
    assert "SUCCESS" in _run(promtool, "test", "rules", "tests/deltaserve-rules.test.yml")


def test_a_broken_expectation_fails(promtool, tmp_path):
    """The unit tests can fail: the same file with one expected value changed does."""
    text = (RULES / "tests" / "deltaserve-rules.test.yml").read_text()
    broken = text.replace("value: 0.03", "value: 0.04", 1)
    assert broken != text
    (tmp_path / "t.yml").write_text(broken.replace("../deltaserve-rules.yml", str(RULES / "deltaserve-rules.yml")))
    done = subprocess.run([promtool, "test", "rules", str(tmp_path / "t.yml")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr
