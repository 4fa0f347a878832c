"""The test suite's shape: each test module is named by what it specifies and opens by saying it.

Tests are grouped by subject (`test_writer_lease.py`, `test_crash_recovery.py`), not by when or
why they were written: a name made of an audit round, an issue number or a catch-all word
("reliability", "misc") hides what the file specifies and grows without bound.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MODULES = sorted(TESTS.glob("test_*.py"))

# Words that say when or why a file was written, or nothing at all, instead of what it specifies.
NOT_A_SUBJECT = {"audit", "audits", "round", "rounds", "issue", "issues", "bug", "bugs", "fix", "fixes",
                 "regression", "regressions", "misc", "various", "other", "more", "extra", "new", "old",
                 "reliability", "safety", "hardening", "todo", "tmp", "wip"}
NUMBERED = re.compile(r"^(r|round|issue|pr|v)?\d+$")


def not_a_subject(name: str) -> list[str]:
    """The words of a module name (`test_` and `.py` dropped) that name no subject."""
    return [word for word in name.removeprefix("test_").removesuffix(".py").split("_")
            if word in NOT_A_SUBJECT or NUMBERED.match(word)]


def test_the_rule_catches_round_names():
    assert not_a_subject("test_data_safety.py") == ["safety"]
    assert not_a_subject("test_reliability.py") == ["reliability"]
    assert not_a_subject("test_audit_round_3.py") == ["audit", "round", "3"]
    assert not_a_subject("test_issue17.py") == ["issue17"]
    assert not_a_subject("test_writer_lease.py") == []


@pytest.mark.parametrize("module", MODULES, ids=lambda path: path.name)
def test_a_test_module_is_named_by_its_subject_and_says_what_it_specifies(module):
    assert not not_a_subject(module.name), f"{module.name}: name it by what it specifies, not {not_a_subject(module.name)}"
    docstring = ast.get_docstring(ast.parse(module.read_text()))
    assert docstring and docstring.strip(), f"{module.name}: open with a docstring saying what it specifies"
