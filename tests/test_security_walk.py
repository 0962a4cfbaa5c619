"""The source walk cannot be redirected: a directory swapped for a symlink is never followed.

The swap happens from the Archiver's `before_open` hook, between listing an entry and opening
it, so the race is won by the attacker every time instead of by chance."""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from support import scoreboard

from instance_agent.archive import Archiver

SECRET = b"root:$6$secret-hash:19000:0:99999:7:::\n"


def _archive(src: Path, hook: Callable[[bytes], None]) -> tuple[dict[str, bytes], list[str]]:
    out = io.BytesIO()
    arch = Archiver(out, clock=time.monotonic, before_open=hook)
    arch.add_sources([str(src)])
    report = arch.finish()
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        files = {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    return files, [f"{os.fsdecode(w.path)}: {w.reason}" for w in report.warnings]


def _tree(tmp: Path) -> tuple[Path, Path]:
    etc = tmp / "etc"
    etc.mkdir()
    (etc / "shadow").write_bytes(SECRET)
    src = tmp / "var" / "log"
    (src / "app" / "sub").mkdir(parents=True)
    (src / "app" / "sub" / "shadow").write_bytes(b"an ordinary log line\n")
    (src / "app" / "app.log").write_bytes(b"hello\n")
    return src, etc


def _swap_sub_when(at: Path, src: Path, etc: Path) -> Callable[[bytes], None]:
    """The hook: when the walker reaches `at`, app/sub becomes a symlink to the secret dir."""

    def swap(path: bytes) -> None:
        if path == os.fsencode(at):
            os.rename(src / "app" / "sub", src.parent / "moved")
            os.symlink(etc, src / "app" / "sub")

    return swap


def test_a_directory_swapped_for_a_symlink_before_it_is_opened_is_skipped(tmp_path: Path) -> None:
    with scoreboard.scenario(
        "Walk: a directory under a source swapped for a symlink to /etc between listing and opening"
    ) as row:
        row.faults = "app/sub renamed away and replaced by a symlink to a secret directory"
        src, etc = _tree(tmp_path)
        files, warnings = _archive(src, _swap_sub_when(src / "app" / "sub", src, etc))
        assert SECRET not in files.values()
        assert any(w.startswith(f"{src}/app/sub: ") and "not followed" in w for w in warnings)
        assert files[f"{str(src).lstrip('/')}/app/app.log"] == b"hello\n"
        row.outcome = "secret not archived; 1 manifest warning: replaced by a symlink … not followed"
        row.bytes_lost = 0


def test_a_parent_swapped_while_its_files_are_read_is_not_followed(tmp_path: Path) -> None:
    src, etc = _tree(tmp_path)
    # The walker is inside app/sub; the attacker replaces app/sub itself by a link.
    files, _ = _archive(src, _swap_sub_when(src / "app" / "sub" / "shadow", src, etc))
    assert SECRET not in files.values()
    # What is stored under the path is the file that was listed there, not /etc's.
    assert files[f"{str(src).lstrip('/')}/app/sub/shadow"] == b"an ordinary log line\n"
