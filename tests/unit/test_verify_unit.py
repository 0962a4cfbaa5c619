"""verify.compare and manifest_check.relative_inside on small trees, in milliseconds: what
counts as a path inside DEST, and which parents and extras a tree of nested directories has."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from instance_agent.manifest_check import UnsafeManifest, relative_inside
from instance_agent.restore import Selection
from instance_agent.verify import compare


@pytest.mark.parametrize(
    "path",
    [b"a", b"a/b", b"a..b", b"..a/b", b"a/b..", b"a/...", b"a/.../b", b"a/..b/c", b"a/b./..c"],
)
def test_a_path_with_dots_that_are_not_a_parent_component_is_inside(path: bytes) -> None:
    assert relative_inside(path)


@pytest.mark.parametrize(
    "path", [b"", b"..", b"../x", b"a/..", b"a/../b", b"a//../b", b"/a", b"a\0b", b"x/y/../../.."]
)
def test_a_parent_component_an_absolute_path_or_a_nul_is_outside(path: bytes) -> None:
    assert not relative_inside(path)


def _file_entry(root: Path, rel: str) -> dict[str, Any]:
    st = os.lstat(root / rel)
    return {"path": rel, "type": "file", "size": st.st_size, "mtime": st.st_mtime, "mode": "0644"}


def _tree(root: Path, files: list[str]) -> list[dict[str, Any]]:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 3)
    return [_file_entry(root, rel) for rel in files]


FILES = ["top.txt", "a/one.log", "a/two.log", "a/b/c/deep.log", "a/b/c/deeper.log", "d/e/f/g.txt"]


def test_files_listed_without_their_directories_leave_no_parent_reported(tmp_path: Path) -> None:
    entries = _tree(tmp_path, FILES)
    report = compare(str(tmp_path), {"entries": entries})
    assert report.checked == len(FILES)
    assert report.differences == []


def test_an_extra_directory_or_file_beside_the_parents_is_reported_once(tmp_path: Path) -> None:
    entries = _tree(tmp_path, FILES)
    (tmp_path / "a" / "b" / "stray").mkdir()
    (tmp_path / "a" / "b" / "stray" / "inside.txt").write_text("x")
    (tmp_path / "d" / "e" / "extra.txt").write_text("x")
    report = compare(str(tmp_path), {"entries": entries})
    found = sorted((d.path, d.problem) for d in report.differences)
    assert found == [(b"a/b/stray", "not in the backup"), (b"d/e/extra.txt", "not in the backup")]


def test_a_missing_or_changed_file_is_named_with_its_problem(tmp_path: Path) -> None:
    entries = _tree(tmp_path, FILES)
    (tmp_path / "a" / "b" / "c" / "deep.log").unlink()
    (tmp_path / "a" / "two.log").write_bytes(b"longer than it was when the backup was made")
    report = compare(str(tmp_path), {"entries": entries})
    problems = {d.path: d.problem for d in report.differences}
    assert problems[b"a/b/c/deep.log"] == "missing"
    assert problems[b"a/two.log"] == "size 43 bytes, the backup has 27"
    assert len(problems) == 2


def test_a_selection_checks_only_what_it_selects(tmp_path: Path) -> None:
    entries = _tree(tmp_path, FILES)
    (tmp_path / "d" / "e" / "f" / "g.txt").unlink()  # not selected: not a difference
    report = compare(str(tmp_path), {"entries": entries}, select=Selection(include=("a/*",)))
    assert report.checked == 4
    # What the selection leaves out is not expected under DEST: on disk, it is an extra.
    found = sorted((d.path, d.problem) for d in report.differences)
    assert found == [(b"d", "not in the backup"), (b"top.txt", "not in the backup")]


def test_a_path_b64_entry_is_compared_like_a_text_one(tmp_path: Path) -> None:
    name = b"caf\xe9.log"  # not UTF-8: the manifest carries it as path_b64
    (tmp_path / os.fsdecode(name)).write_bytes(b"bytes")
    entry = {"path_b64": base64.b64encode(name).decode(), "type": "file", "size": 5, "mode": "0644"}
    assert compare(str(tmp_path), {"entries": [entry]}).differences == []
    entry["size"] = 6
    [difference] = compare(str(tmp_path), {"entries": [entry]}).differences
    assert (difference.path, difference.problem) == (name, "size 5 bytes, the backup has 6")


def test_an_unsafe_entry_refuses_the_whole_manifest(tmp_path: Path) -> None:
    entries = _tree(tmp_path, FILES)
    entries.append({"path": "a/../../etc/passwd", "type": "file", "size": 1})
    with pytest.raises(UnsafeManifest, match="has an unsafe path"):
        compare(str(tmp_path), {"entries": entries})
