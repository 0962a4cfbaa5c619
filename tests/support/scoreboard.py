"""The reliability scoreboard: one row per fault, crash or chaos scenario, and docs/reliability.md.

Each scenario test wraps its work in `scenario(name)` and fills in what it measured: the
faults it injected, the requests that were retried, the outcome, the bytes lost and the time
to the outcome. When `INSTANCE_AGENT_SCOREBOARD` names a file, the table is rewritten there
after every scenario, so at the end of a run it holds exactly that run's rows, in the order
of the tests' collection:

    INSTANCE_AGENT_SCOREBOARD=docs/reliability.md .venv/bin/python -m pytest <scenario files>

where the files are every test file that calls `scenario(` (`scenario_files()`; the
document prints the exact command, and tests/test_docs.py checks that it is current).

Under pytest-xdist each worker keeps its rows and hands them to the controller when it ends
(conftest's `pytest_sessionfinish` and `pytest_testnodedown`); only the controller writes the
document, merged from every worker and sorted by each row's test's place in the collection,
so a parallel run writes the same table, in the same order, as a serial one.

A scenario whose test fails is still written, with the failure as its outcome: the document
must never show a green row for a red test.

"Bytes lost" is computed, never typed in: `lost_bytes` compares the source before and after
the backup with what came back out of S3, and counts the bytes of every file that is neither
restored (as it was before or after the backup ran) nor accounted for by a manifest warning.
A run that failed counts as lost nothing only if the failure reached the operator (published
on SNS and completed with the failure result, or an exit code to the caller that did nothing).
"""

from __future__ import annotations

import itertools
import os
import platform
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ENV = "INSTANCE_AGENT_SCOREBOARD"
_TESTS = Path(__file__).resolve().parents[1]


def scenario_files(tests: Path = _TESTS) -> list[str]:
    """Every test file that writes rows: the regeneration command is derived, never typed,
    so a new scenario file cannot silently be left out of the document."""
    return sorted(
        f"tests/{p.name}" for p in tests.glob("test_*.py") if "scenario(" in p.read_text(encoding="utf-8")
    )


COMMAND = "INSTANCE_AGENT_SCOREBOARD=docs/reliability.md .venv/bin/python -m pytest " + " ".join(
    scenario_files()
)

# Read once, at import (collection): conftest's guard clears every INSTANCE_AGENT_* variable
# before each test runs.
TARGET = os.environ.get(ENV)
# Set in an xdist worker: it hands its rows over (`export`) instead of writing the document.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# The running test's index in the collection (the same in every xdist worker), set by
# conftest before each test: rows are sorted by it.
position = 0

Tree = Mapping[bytes, tuple[str, bytes | None]]  # support.trees.walk(): path -> (type, content)


@dataclass
class Row:
    scenario: str
    faults: str = ""
    retried: str = "0"
    outcome: str = ""
    bytes_lost: int | None = None
    seconds: float | None = None
    # Set by a test marked xfail for a gap reported to the owner: the row then says so,
    # with what was observed, instead of "test failed".
    known_gap: str | None = None
    started: float = field(default_factory=time.monotonic, repr=False)
    # (test's index in the collection, the scenario's rank in the run): the table's order.
    order: tuple[int, int] = field(default=(0, 0), repr=False)

    def cells(self) -> list[str]:
        lost = "—" if self.bytes_lost is None else f"{self.bytes_lost:,}"
        took = "—" if self.seconds is None else f"{self.seconds:.1f} s"
        return [self.scenario, self.faults, self.retried, self.outcome, lost, took]


_rows: list[Row] = []
_lock = threading.Lock()
_rank = itertools.count()


@contextmanager
def scenario(name: str) -> Iterator[Row]:
    """Time one scenario and record it, failed or not. The test sets the row's fields; if it
    leaves `seconds` unset, the whole block's duration is used."""
    row = Row(name, order=(position, next(_rank)))
    try:
        yield row
    except BaseException as err:
        if row.known_gap:
            row.outcome = f"**KNOWN GAP** ({row.known_gap}): {row.outcome}"
        else:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            row.outcome = f"**TEST FAILED**: {first[:120]}"
        raise
    finally:
        if row.seconds is None:
            row.seconds = time.monotonic() - row.started
        with _lock:
            _rows.append(row)
            _write()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Iterable[Row]) -> str:
    lines = [
        "# Reliability scoreboard",
        "",
        "Generated by the fault, crash and chaos tests; do not edit by hand. Regenerate with:",
        "",
        "```sh",
        COMMAND,
        "```",
        "",
        f"Last run: {datetime.now(timezone.utc):%Y-%m-%d} UTC, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs. Every scenario runs the real agent (a subprocess, or the watcher "
        "daemon) against local stand-ins on 127.0.0.1: SeaweedFS for S3, moto for SNS and Auto "
        "Scaling, the IMDSv2 stub, with the fault proxy in between where a fault is injected.",
        "",
        "- **faults injected**: what the proxy, the stand-ins or the test did, and how often.",
        "- **requests retried**: requests the agent sent again after a fault (counted from the "
        "proxy's or stand-in's request log), or whole runs where a crash forced one.",
        "- **bytes lost**: source bytes neither restored byte for byte from S3 nor accounted "
        "for by a manifest warning or a failure reported to the operator. Must be 0.",
        "- **time to outcome**: from the start of the agent (or the fault) to its result.",
        "",
        "| scenario | faults injected | requests retried | outcome | bytes lost | time to outcome |",
        "|---|---|---|---|---:|---:|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def export() -> list[dict[str, object]]:
    """This process's rows as plain data, for an xdist worker to hand to the controller."""
    with _lock:
        return [asdict(row) for row in _rows]


def merge(rows: Iterable[Mapping[str, object]]) -> None:
    """Add rows a worker exported, and rewrite the document (the xdist controller)."""
    with _lock:
        for data in rows:
            fields = dict(data)
            fields["order"] = tuple(fields["order"])  # type: ignore[arg-type]
            _rows.append(Row(**fields))  # type: ignore[arg-type]
        _write()


def _write() -> None:
    if not TARGET or WORKER:
        return
    path = Path(TARGET)
    if not path.is_absolute():
        # Relative to the repository root, wherever pytest was started from.
        path = Path(__file__).resolve().parents[2] / path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(render(sorted(_rows, key=lambda row: row.order)), encoding="utf-8")
    tmp.replace(path)


# -- bytes lost ------------------------------------------------------------------------


def covered(path: bytes, warned: Iterable[bytes]) -> bool:
    """True when `path` or one of its parent directories has a manifest warning."""
    return any(path == w or path.startswith(w.rstrip(b"/") + b"/") for w in warned)


def lost_bytes(before: Tree, after: Tree, restored: Tree, warned: Iterable[bytes]) -> int:
    """Bytes of regular files lost without a word.

    `before` and `after` are the source tree just before the backup started and after it
    ended, `restored` is what GNU tar extracted from the archive (all three keyed by the path
    relative to the source), `warned` the manifest's warning paths, relative the same way.

    A file untouched during the backup must come back identical unless a warning covers it.
    A file the test changed meanwhile may come back as it was before or after the change, or
    not at all when it was gone at the end (deleted before the walker listed its directory);
    anything else is lost unless a warning covers it.
    """
    warned = list(warned)
    lost = 0
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        kinds = {t[0] for t in (old, new) if t is not None}
        if kinds.isdisjoint({"file", "unreadable"}) or covered(path, warned):
            continue
        # Untouched (old == new), only the identical file will do; changed, either version;
        # gone at the end (new is None), absent is right too.
        if restored.get(path) not in (old, new):
            sizes = [len(t[1] or b"") for t in (old, new) if t is not None and t[0] == "file"]
            lost += max(sizes, default=0)
    return lost
