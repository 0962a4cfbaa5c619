"""The state directory is trusted only when it deserves it (like sshd's StrictModes)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import Stack
from support import scoreboard

from instance_agent import statedir

NOBODY = 65534


def _untrust(path: Path) -> str:
    """Make `path` another user's directory (as root), else one anybody may write."""
    path.mkdir()
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o755)
        return f"owned by uid {NOBODY}"
    path.chmod(0o777)
    return "writable by group or others"


def test_usable_refuses_other_owners_and_group_or_other_write(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    statedir.usable(str(mine))  # created 0700, ours: fine
    assert (mine.stat().st_mode & 0o777) == 0o700
    reason = _untrust(tmp_path / "theirs")
    with pytest.raises(statedir.Untrusted, match=reason):
        statedir.usable(str(tmp_path / "theirs"))
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide").chmod(0o775)
    with pytest.raises(statedir.Untrusted, match="writable by group or others"):
        statedir.usable(str(tmp_path / "wide"))


def test_usable_refuses_a_dir_below_a_parent_others_may_change(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anybody may rename our directory away and put theirs in its place
    with pytest.raises(
        statedir.Untrusted, match=re.escape(f"its parent {shared} is writable by group or others")
    ):
        statedir.usable(str(shared / "state"))
    shared.chmod(0o1777)  # sticky, like /tmp: only the owner may rename or remove an entry
    statedir.usable(str(shared / "state"))
    # A symlink is only as safe as the directory holding it, wherever it points.
    links = tmp_path / "links"
    links.mkdir()
    links.chmod(0o777)
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    (links / "state").symlink_to(target)
    with pytest.raises(statedir.Untrusted, match=re.escape(f"its parent {links} is writable")):
        statedir.usable(str(links / "state"))
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, NOBODY, NOBODY)
        with pytest.raises(
            statedir.Untrusted, match=re.escape(f"its parent {theirs} is owned by uid {NOBODY}")
        ):
            statedir.usable(str(theirs / "state"))


def test_files_are_never_opened_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "x.lock").symlink_to(victim)
    (d / "x.json").symlink_to(victim)
    (d / f"x.json.{os.getpid()}.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        statedir.open_or_create(str(d), "x.lock")
    with pytest.raises(OSError):
        statedir.read(str(d), "x.json")
    statedir.write_atomic(str(d), "x.json", b"{}")  # replaces the link itself
    assert victim.read_text() == "precious"
    assert not (d / "x.json").is_symlink() and (d / "x.json").read_bytes() == b"{}"
    assert sorted(p.name for p in d.iterdir()) == ["x.json", "x.lock"]


def test_planted_state_dir_is_refused_and_the_runtime_dir_used(stack: Stack) -> None:
    with scoreboard.scenario("State dir owned by another user, with planted symlinks") as row:
        state = stack.tmp / "planted"
        reason = _untrust(state)
        victim = stack.tmp / "victim"
        victim.write_text("root-owned file that must not be truncated")
        name = f"termination-{stack.instance_id}"
        for planted in (f"{name}.json.tmp", f"{name}.json.{os.getpid()}.tmp", f"{name}.json"):
            (state / planted).symlink_to(victim)
        (state / f"{name}.lock").symlink_to(stack.tmp / "created-by-root")
        before = sorted(p.name for p in state.iterdir())
        row.faults = "state_dir owned by another user; *.json.tmp, *.json and *.lock planted as symlinks"

        src = stack.tmp / "src"
        src.mkdir()
        (src / "app.log").write_bytes(os.urandom(2048))
        stack.scale_in()
        proc, result = stack.backup("--source", str(src), env=stack.env(INSTANCE_AGENT_STATE_DIR=str(state)))

        assert proc.returncode == 0 and result["status"] == "succeeded", proc.stderr[-2000:]
        assert victim.read_text() == "root-owned file that must not be truncated"
        assert not (stack.tmp / "created-by-root").exists()
        assert sorted(p.name for p in state.iterdir()) == before  # nothing written there
        assert "lock directory unusable" in proc.stderr and reason in proc.stderr
        assert list((stack.tmp / "run").glob("termination-*.json"))  # the fallback holds it
        row.outcome = (
            "succeeded; state dir refused with a warning, lock and record in the "
            "runtime dir; planted targets untouched"
        )
        row.bytes_lost = 0
