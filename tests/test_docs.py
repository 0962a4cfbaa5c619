"""The documentation is generated where it can be, and the README's two set-up commands are what
CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from instance_agent.docs import END, PAGE, START, config_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_config_table_matches_the_schema() -> None:
    page = (ROOT / PAGE).read_text(encoding="utf-8")
    table = page[page.index(START) : page.index(END) + len(END)]
    assert table == config_table(), f"run: python -m instance_agent.docs --write (it rewrites {PAGE})"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^(python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines()
    assert "instance-agent demo" in commands[0]


def test_the_reliability_scoreboard_was_generated_from_every_scenario_file() -> None:
    """A file that gained scenario rows but was never run into the document would leave the
    scoreboard claiming less than the tests check (and its regeneration command stale)."""
    from support.scoreboard import COMMAND

    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert COMMAND in doc, (
        "docs/reliability.md is stale: regenerate it with tests/support/scoreboard.py's command"
    )
