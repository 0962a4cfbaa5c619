"""A usage error is one line on stderr that names the program once, and exit code 2.

argparse's own messages went through `_Parser.error`, which prefixed the parser's `prog`, and
then through `main`, which prefixes "instance-agent: error:" again: "instance-agent: error:
instance-agent: unrecognized arguments: --bogus"."""

from __future__ import annotations

import pytest

from instance_agent import cli
from instance_agent.errors import EXIT_USAGE


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--bogus", "list"], "instance-agent: error: unrecognized arguments: --bogus"),
        ([], "instance-agent: error: the following arguments are required: COMMAND"),
        (["backup", "--frobnicate"], "instance-agent: error: unrecognized arguments: --frobnicate"),
    ],
)
def test_top_level_usage_error_names_the_program_once(
    capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    assert _error_line(capsys, argv) == line


def test_unknown_command_lists_the_commands_once(capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["frob"])
    assert line.startswith("instance-agent: error: argument COMMAND: invalid choice: 'frob' (choose from ")
    assert line.count("instance-agent") == 1


@pytest.mark.parametrize(
    ("argv", "subcommand"),
    [
        (["restore"], "restore"),
        (["verify", "--manifest"], "verify"),
        (["list", "--prefix"], "list"),
    ],
)
def test_subcommand_usage_error_names_the_subcommand(
    capsys: pytest.CaptureFixture[str], argv: list[str], subcommand: str
) -> None:
    line = _error_line(capsys, argv)
    assert line.startswith(f"instance-agent: error: {subcommand}: "), line
    assert line.count("instance-agent") == 1, line
