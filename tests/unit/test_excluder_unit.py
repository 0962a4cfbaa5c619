"""Exclusion globs: a whole-path glob is told apart by its literal text before the first
wildcard, and that shortcut must never change what is excluded."""

from __future__ import annotations

import fnmatch

import pytest

from instance_agent.archive import Excluder

PATHS = [
    b"/var/log/journal/abc/system.journal",
    b"/var/log/journal",
    b"/var/log/journalx/a",
    b"/var/log/app/app.log",
    b"/var/log/app/app.log.gz",
    b"/srv/cache/tmp/x",
    b"/srv/data/\xff\xfe.log",
    b"/opt/a[1]/b",
]


def _expected(patterns: list[str], path: bytes) -> bool:
    text = path.decode("utf-8", "surrogateescape")
    return any(fnmatch.fnmatchcase(text if "/" in p else text.rsplit("/", 1)[-1], p) for p in patterns)


@pytest.mark.parametrize(
    "patterns",
    [
        [],
        ["/var/log/journal/**"],
        ["*/tmp/*"],  # a wildcard first: no literal prefix, every path is matched against it
        ["/srv/*/tmp/*", "/var/log/app/*.gz"],
        ["*.gz"],
        ["*.gz", "/var/log/journal/*"],
        ["/opt/a[0-9]/*", "/srv/data/?\udcfe.log"],
    ],
)
def test_excluded_exactly_when_a_glob_matches(patterns: list[str]) -> None:
    excluded = Excluder(patterns)
    assert [excluded(p) for p in PATHS] == [_expected(patterns, p) for p in PATHS]
