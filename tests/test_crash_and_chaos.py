"""Crash safety and filesystem chaos: what the agent does when the machine misbehaves.

- The watcher killed with SIGKILL mid-upload, then restarted: the stale upload of the killed
  run (and only it) is aborted, the backup runs again, one report, one completion.
- A state directory on a read-only or full file system: one clear warning, the backup runs,
  and two racing runs still back up once.
- The source changing under the archiver: appends, truncation, deletes, a directory replaced
  by a file, permission changes, non-UTF-8 names, 100,000 small files, a 10 GB sparse file,
  symlink loops and a /proc-like mount. Every case must finish, and the manifest must list
  every skipped or changed file with its reason (nothing else, nothing less).

To change files *while* the archiver reads them, every UploadPart is held at the fault proxy:
the pipeline fills its bounded buffers and the archiver blocks in the middle of a large
"victim" file. The test sees that through /proc/PID/fdinfo (the read offset stops moving),
changes the tree, then releases the upload.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import Stack
from support import scoreboard
from support.agentproc import WatchProc, watch_argv
from support.faultproxy import FaultProxy, HoldUntil, Rule, upload_part
from support.trees import text_log, walk
from test_faults import drop_bucket

NO_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]
# More than the held pipeline can buffer: 3 upload parts of 8 MiB with one worker and a queue
# of one. Held runs archive without compression, because multithreaded zstd soaks up tens of
# MiB of input of its own and the stall would no longer fall inside the victim.
VICTIM_MIB = 40
Tree = dict[bytes, tuple[str, bytes | None]]


@pytest.fixture
def stack(stack: Stack) -> Iterator[Stack]:
    """conftest's stack, whose SeaweedFS bucket is dropped afterwards (test_faults.drop_bucket)."""
    yield stack
    drop_bucket(stack)


# -- helpers -----------------------------------------------------------------------------


def completions(stack: Stack) -> list[tuple[str | None, str]]:
    return [(c.result, c.outcome) for c in stack.lifecycle_calls("CompleteLifecycleAction")]


def sns_docs(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(m["message"]) for m in stack.sns()]


def manifest_of(stack: Stack, result: dict[str, Any]) -> dict[str, Any]:
    body = stack.client("s3").get_object(Bucket=stack.bucket, Key=result["manifest_key"])["Body"]
    doc: dict[str, Any] = json.loads(body.read())
    return doc


def _path(obj: dict[str, Any]) -> bytes:
    return obj["path"].encode() if "path" in obj else base64.b64decode(obj["path_b64"])


def warnings_under(doc: dict[str, Any], src: Path) -> dict[bytes, str]:
    """The manifest's warnings as {path relative to src: reason}; all must be under src."""
    base = os.fsencode(src)
    out = {}
    for w in doc["warnings"]:
        path = _path(w)
        assert path == base or path.startswith(base + b"/"), path
        out[path[len(base) + 1 :]] = w["reason"]
    return out


def entry(doc: dict[str, Any], src: Path, rel: bytes) -> dict[str, Any]:
    member = os.fsencode(src).lstrip(b"/") + b"/" + rel
    return next(e for e in doc["entries"] if _path(e) == member)


def assert_warnings(got: dict[bytes, str], expected: dict[bytes, str]) -> None:
    """Exactly the expected paths, each with a reason matching its pattern."""
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for path, pattern in expected.items():
        assert re.fullmatch(pattern, got[path]), (path, got[path], pattern)


def read_offset(pid: int, path: bytes) -> int | None:
    """The file offset of `path` in process `pid`, if it has the file open."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(os.fsencode(f"{fd_dir}/{fd}")) != path:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                for line in fh:
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except OSError:
            continue
    return None


def blocked_in(proc: subprocess.Popen[bytes], path: bytes, timeout: float = 60.0) -> int:
    """Wait until the agent has `path` open and its offset has not moved for 0.5 s (the
    pipeline is stalled on the held upload); return that offset."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the agent ended before blocking in the victim file"
        pos = read_offset(proc.pid, path)
        now = time.monotonic()
        if pos != last:
            last, since = pos, now
        elif pos and now - since >= 0.5:
            return pos
        time.sleep(0.02)
    raise AssertionError(f"the agent never stalled inside {path!r} (offset {last})")


@dataclass
class Run:
    code: int
    result: dict[str, Any]
    stderr: str
    seconds: float
    offset: int  # where the archiver stood in the victim when the tree was changed


def chaos_backup(
    stack: Stack,
    src: Path,
    tmp: Path,
    *,
    victim: Path | None = None,
    during: Callable[[int], None] = lambda _pos: None,
    args: tuple[str, ...] = (),
    prefix: list[str] | None = None,
    sources: tuple[Path, ...] = (),
    terminating: bool = True,
) -> Run:
    """`instance-agent backup` of `src` for a termination (or `--no-complete`); with a
    victim, `during(offset)` runs while the archiver is stalled inside it. Output goes to
    files, so a full pipe never stalls the agent."""
    if terminating:
        stack.scale_in()
    else:
        args = ("--no-complete", *args)
    release = threading.Event()
    out_path, err_path = tmp / "agent.out", tmp / "agent.err"
    with FaultProxy(stack.s3_endpoint) as proxy, out_path.open("wb") as out, err_path.open("wb") as err:
        if victim is not None:
            proxy.add_rule(Rule(query=upload_part, fault=HoldUntil(release, timeout=120)))
            args = ("--compression", "none", *args)
        argv = [
            *(prefix or []),
            *stack.backup_argv(),
            "--upload-workers",
            "1",
            "--upload-queue",
            "1",
            "--source",
            str(src),
            *(a for s in sources for a in ("--source", str(s))),
            *args,
        ]
        started = time.monotonic()
        proc = subprocess.Popen(
            argv, env=stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint), stdout=out, stderr=err
        )
        offset = 0
        try:
            if victim is not None:
                offset = blocked_in(proc, os.fsencode(victim))
                during(offset)
        finally:
            release.set()
            code = proc.wait(timeout=600)
        took = time.monotonic() - started
    text = out_path.read_text()
    result = json.loads(text) if text.strip() else {}
    return Run(code, result, err_path.read_text(errors="replace"), took, offset)


def finish(
    stack: Stack,
    run: Run,
    row: scoreboard.Row,
    src: Path,
    tmp: Path,
    before: Tree,
    expected: dict[bytes, str],
    after: Tree | None = None,
) -> tuple[dict[str, Any], Tree]:
    """The checks every chaos case shares; returns the manifest and the restored tree.
    `after` defaults to the source as it is now (pass it when the source holds files too
    big to read whole: a 1 TiB hole)."""
    assert run.code == 0, run.stderr[-3000:]
    assert run.result["status"] == "succeeded"
    doc = manifest_of(stack, run.result)
    warned = warnings_under(doc, src)
    assert_warnings(warned, expected)
    assert run.result["warnings"] == len(doc["warnings"]) == doc["totals"]["warnings"]
    assert stack.incomplete_uploads() == []
    # The chaos never reaches the report or the hook.
    assert [d["status"] for d in sns_docs(stack)] == ["succeeded"]
    assert completions(stack) == [("CONTINUE", "ok")]
    restored = stack.gnu_restore(run.result["key"], src, tmp)
    row.bytes_lost = scoreboard.lost_bytes(before, walk(src) if after is None else after, restored, warned)
    row.seconds = run.seconds
    reasons = sorted({re.sub(r"\d+", "N", r) for r in warned.values()})
    row.outcome = f"succeeded; {len(warned)} manifest warning(s)" + (
        ": " + "; ".join(reasons) if reasons else ""
    )
    row.retried = "0"
    assert row.bytes_lost == 0
    return doc, restored


def random_file(path: Path, mib: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(mib * 2**20)
    path.write_bytes(data)
    return data


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(path, options): a tmpfs there, unmounted at the end of the test."""
    mounted: list[Path] = []

    def mount(path: Path, options: str = "size=16m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- crash safety --------------------------------------------------------------------------


def test_watcher_killed_mid_upload_then_restarted_backs_up_once(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "data.bin", 20, seed=1)  # three parts
    text_log(src / "access.log", 2_000_000, seed=2)
    before = walk(src)
    s3 = stack.client("s3")
    # Uploads in flight that are not the killed run's: another instance of the group, and this
    # instance under another prefix. The restarted run must leave both alone.
    others = {
        f"{stack.group}/i-0aaaaaaaaaaaaaaaa/20260101T000000Z.tar.zst",
        f"elsewhere/{stack.instance_id}/20260101T000000Z.tar.zst",
    }
    other_ids = {k: s3.create_multipart_upload(Bucket=stack.bucket, Key=k)["UploadId"] for k in others}
    release = threading.Event()
    argv = watch_argv(stack, "--source", str(src))
    try:
        with (
            scoreboard.scenario("Crash: watcher killed (SIGKILL) mid-upload, then restarted") as row,
            FaultProxy(stack.s3_endpoint) as proxy,
        ):
            held = proxy.add_rule(Rule(query=upload_part, fault=HoldUntil(release, timeout=60), times=1))
            env = stack.env(AWS_ENDPOINT_URL_S3=proxy.endpoint, INSTANCE_AGENT_LOG_LEVEL="info")
            with WatchProc(argv, env) as first:
                first.wait_for("watching")
                stack.scale_in()
                assert held.fired.wait(30), first.text()
                first.proc.send_signal(signal.SIGKILL)  # no finally, no report, no completion
                assert first.wait(10) == -signal.SIGKILL
            release.set()
            stale = [u["Key"] for u in stack.incomplete_uploads() if u["Key"] not in others]
            assert len(stale) == 1 and stale[0].startswith(f"{stack.group}/{stack.instance_id}/")
            assert stack.sns() == [] and completions(stack) == []
            row.faults = "SIGKILL while UploadPart 1 was in flight"

            restarted = time.monotonic()
            with WatchProc(argv, env) as second:
                _, done = second.wait_for("response finished", timeout=60)
                row.seconds = time.monotonic() - restarted
                second.send(signal.SIGTERM)
                assert second.wait(10) == 0
            row.retried = "1 whole run (by the restarted watcher)"

            assert done["status"] == "succeeded" and done["lifecycle_result"] == "CONTINUE"
            aborted = second.find("aborted a stale multipart upload of an earlier run")
            assert [r["key"] for _, r in aborted] == stale
            # Only the killed run's upload went; the others' are still in flight.
            assert sorted(u["Key"] for u in stack.incomplete_uploads()) == sorted(others)
            docs = sns_docs(stack)
            assert [d["status"] for d in docs] == ["succeeded"]
            assert completions(stack) == [("CONTINUE", "ok")]
            assert [(o.result, o.how) for o in stack.outcomes()] == [("CONTINUE", "completed")]
            archives = [k for k in stack.objects() if k.endswith(".tar.zst")]
            assert archives == [done["key"]]
            restored = stack.gnu_restore(done["key"], src, tmp_path)
            row.bytes_lost = scoreboard.lost_bytes(before, walk(src), restored, [])
            row.outcome = "stale upload aborted (2 others' kept); backed up again; 1 SNS, 1 CONTINUE"
            assert row.bytes_lost == 0

            # A third start, by Run Command this time, finds the record and does nothing.
            proc, again = stack.backup("--source", str(src))
            assert proc.returncode == 0 and again["status"] == "duplicate"
            assert again["key"] == done["key"] and len(stack.sns()) == 1
    finally:
        for key, upload_id in other_ids.items():
            s3.abort_multipart_upload(Bucket=stack.bucket, Key=key, UploadId=upload_id)
    assert stack.incomplete_uploads() == []


@pytest.mark.parametrize(
    "kind",
    [
        "read-only",
        "full",
    ],
)
def test_unusable_state_dir_warns_once_and_two_racing_runs_back_up_once(
    stack: Stack, tmp_path: Path, tmpfs: Callable[..., Path], kind: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    random_file(src / "data.bin", 12, seed=3)
    if kind == "read-only":
        state = tmpfs(tmp_path / "statefs", "ro,size=1m")
    else:
        state = tmpfs(tmp_path / "statefs", "size=256k") / "state"
        state.mkdir()
        with (
            (state.parent / "filler").open("wb", buffering=0) as fh,
            pytest.raises(OSError, match="No space left"),
        ):
            while True:  # to the last block
                fh.write(b"\0" * 65536)
    runtime = tmp_path / "run"
    release = threading.Event()
    with (
        scoreboard.scenario(f"State dir on a {kind} file system: two runs race") as row,
        FaultProxy(stack.s3_endpoint) as proxy,
    ):
        held = proxy.add_rule(Rule(query=upload_part, fault=HoldUntil(release, timeout=60), times=1))
        env = stack.env(
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            INSTANCE_AGENT_STATE_DIR=str(state),
            INSTANCE_AGENT_RUNTIME_DIR=str(runtime),
            INSTANCE_AGENT_LOG_LEVEL="info",
        )
        argv = stack.backup_argv("--source", str(src))
        stack.scale_in()
        started = time.monotonic()
        with WatchProc(argv, env) as first:
            assert held.fired.wait(30), first.text()
            with WatchProc(argv, env) as second:
                second.wait_for("another run holds the termination lock; waiting")
                release.set()
                codes = (first.wait(120), second.wait(120))
                results = (json.loads(first.stdout()), json.loads(second.stdout()))
        row.seconds = time.monotonic() - started
        row.faults = f"state dir on a {kind} tmpfs; a second run started while the first uploaded"
        statuses = sorted(r["status"] for r in results)
        row.outcome = (
            f"{' + '.join(statuses)}; {len(stack.sns())} SNS; {len(completions(stack))} completion call(s)"
        )
        row.retried = "0"
        row.bytes_lost = 0 if stack.objects().get(results[0]["key"]) else 12 * 2**20
        if kind == "full":
            row.known_gap = "the result record is not written anywhere: exactly-once is lost"

        assert codes == (0, 0), first.text() + second.text()
        assert statuses == ["duplicate", "succeeded"]
        assert results[1]["key"] == results[0]["key"]
        assert [k for k in stack.objects() if k.endswith(".tar.zst")] == [results[0]["key"]]
        assert [d["status"] for d in sns_docs(stack)] == ["succeeded"]
        assert completions(stack) == [("CONTINUE", "ok")]
        # The record that made the second run a duplicate lives in the runtime dir.
        assert list(runtime.glob(f"termination-{stack.instance_id}.json"))
        # One clear warning: it names the directory and the error; no run repeats it.
        for run in (first, second):
            about = [r for _, r in run.records if r.get("level") == "warning" and str(state) in json.dumps(r)]
            assert len(about) <= 1, run.text()
        worker = first if results[0]["status"] == "succeeded" else second
        warnings = [
            r for _, r in worker.records if r.get("level") == "warning" and str(state) in json.dumps(r)
        ]
        assert len(warnings) == 1, worker.text()
        assert re.search(
            r"read-only|no space|writable by group or others", json.dumps(warnings[0]), re.IGNORECASE
        )


# -- filesystem chaos ------------------------------------------------------------------------


def test_chaos_file_appended_at_high_rate(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    hot = src / "a-hot.log"
    random_file(hot, VICTIM_MIB, seed=4)
    text_log(src / "b-app.log", 1_000_000, seed=5)
    (src / "nested" / "c.log").write_text("steady\n")
    before = walk(src)
    stop = threading.Event()
    appended = [0]

    def append() -> None:
        # 64 KiB every few milliseconds (about 15 MB/s, a very busy log) for as long as the
        # backup runs, so appends land before, during and after the archiver's read.
        chunk = b"appended line of a busy service, about sixty-four bytes long..\n" * 1024
        with open(hot, "ab", buffering=0) as fh:
            while not stop.wait(0.004) and appended[0] < 256 * 2**20:
                appended[0] += fh.write(chunk)

    appender = threading.Thread(target=append, daemon=True)
    with scoreboard.scenario("Chaos: a file appended at high rate during its read") as row:
        appender.start()
        try:
            run = chaos_backup(stack, src, tmp_path, victim=hot)
        finally:
            stop.set()
            appender.join(10)
        row.faults = f"{appended[0] / 2**20:.0f} MiB appended while the backup ran"
        doc, restored = finish(
            stack, run, row, src, tmp_path, before, {b"a-hot.log": r"grew during read; cut at \d+ bytes"}
        )
        # The archive holds exactly the bytes the file had when it was opened: a clean cut.
        size = entry(doc, src, b"a-hot.log")["size"]
        assert size >= VICTIM_MIB * 2**20
        assert restored[b"a-hot.log"] == ("file", hot.read_bytes()[:size])


def test_chaos_file_truncated_during_its_read(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    victim = src / "a-big.log"
    original = random_file(victim, VICTIM_MIB, seed=6)
    (src / "b.log").write_text("after the victim\n")
    before = walk(src)
    with scoreboard.scenario("Chaos: a file truncated to 1 MiB in the middle of its read") as row:
        row.faults = "truncate(1 MiB) while the read stood past it"
        run = chaos_backup(
            stack, src, tmp_path, victim=victim, during=lambda _pos: os.truncate(victim, 2**20)
        )
        size = VICTIM_MIB * 2**20
        _, restored = finish(
            stack,
            run,
            row,
            src,
            tmp_path,
            before,
            {
                b"a-big.log": rf"shrank during read from {size} to {run.offset} bytes; padded "
                "with zeros"
            },
        )
        # What was read before the cut is intact; the rest of the declared size is zeros.
        data = restored[b"a-big.log"][1] or b""
        assert len(data) == size
        assert data[: run.offset] == original[: run.offset]
        assert not data[run.offset :].strip(b"\0")


def test_chaos_files_deleted_and_directories_replaced_by_files(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "c").mkdir(parents=True)
    (src / "e-dir").mkdir()
    victim = src / "d" / "a-big.bin"
    random_file(victim, VICTIM_MIB, seed=7)
    (src / "d" / "b.log").write_text("sibling of the victim\n")
    (src / "d" / "c" / "x.log").write_text("below the victim's dir\n")
    (src / "e-dir" / "inner.log").write_text("a dir that becomes a file\n")
    (src / "z.log").write_text("deleted before it is read\n")
    before = walk(src)

    def chaos(_pos: int) -> None:
        (src / "z.log").unlink()
        # The directory being walked becomes a file: the walker holds the directory's
        # descriptor, so its listed children are still read from where it was moved.
        (src / "d").rename(src / "d-moved")
        (src / "d").write_text("now a file\n")
        # A directory not reached yet becomes a file: the walker finds a file there.
        shutil.rmtree(src / "e-dir")
        (src / "e-dir").write_text("was a directory\n")

    with scoreboard.scenario("Chaos: files deleted, directories replaced by files") as row:
        row.faults = "1 file deleted, 2 directories replaced by files"
        run = chaos_backup(stack, src, tmp_path, victim=victim, during=chaos)
        doc, restored = finish(
            stack,
            run,
            row,
            src,
            tmp_path,
            before,
            {
                b"z.log": "vanished before it was read",
            },
        )
        assert restored[b"e-dir"] == ("file", b"was a directory\n")
        assert entry(doc, src, b"e-dir")["type"] == "file"


def test_chaos_permissions_changed_during_backup(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "c-private").mkdir(parents=True)
    victim = src / "a-big.bin"
    random_file(victim, VICTIM_MIB, seed=8)
    (src / "b-secret.log").write_text("about to be locked away\n")
    (src / "c-private" / "x.log").write_text("in a directory about to be locked\n")
    (src / "d-mode.log").write_text("mode changes, still readable\n")
    (src / "d-mode.log").chmod(0o644)
    before = walk(src)

    def chaos(_pos: int) -> None:
        (src / "b-secret.log").chmod(0)
        (src / "c-private").chmod(0)
        (src / "d-mode.log").chmod(0o600)
        victim.chmod(0)  # already open: the read goes on

    with scoreboard.scenario(
        "Chaos: permissions changed during the backup (agent without CAP_DAC_OVERRIDE)"
    ) as row:
        row.faults = "chmod 000 on a file, a directory and the open file; chmod 600 on one"
        try:
            run = chaos_backup(stack, src, tmp_path, victim=victim, during=chaos, prefix=NO_DAC)
            doc, _ = finish(
                stack,
                run,
                row,
                src,
                tmp_path,
                before,
                {
                    b"b-secret.log": "cannot open: Permission denied",
                    b"c-private": "directory not listable: Permission denied",
                },
            )
        finally:
            for p in (victim, src / "b-secret.log", src / "c-private"):
                p.chmod(0o700)
        assert entry(doc, src, b"d-mode.log")["mode"] == "0600"  # the mode it had when read
        assert entry(doc, src, b"a-big.bin")["size"] == VICTIM_MIB * 2**20


def test_chaos_non_utf8_names(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    base = os.fsencode(src)
    victim = base + b"/a-\xff-big.bin"
    with open(victim, "wb") as fh:
        fh.write(random.Random(9).randbytes(VICTIM_MIB * 2**20))
    with open(base + b"/b-\xe9.log", "wb") as fh:
        fh.write(b"latin-1 name, deleted during the backup\n")
    os.mkdir(base + b"/c-\xfe-dir")
    with open(base + b"/c-\xfe-dir/\x80\x81.log", "wb") as fh:
        fh.write(b"a name that is no encoding at all\n")
    os.symlink(b"\xfe-target-\xff", base + b"/link-\xff")
    (src / "ok.log").write_text("plain\n")
    before = walk(src)
    with scoreboard.scenario("Chaos: non-UTF-8 names, one deleted during the backup") as row:
        row.faults = "1 file with a non-UTF-8 name deleted mid-backup"
        run = chaos_backup(
            stack,
            src,
            tmp_path,
            victim=Path(os.fsdecode(victim)),
            during=lambda _pos: os.unlink(base + b"/b-\xe9.log"),
        )
        doc, restored = finish(
            stack, run, row, src, tmp_path, before, {b"b-\xe9.log": "vanished before it was read"}
        )
        assert any("path_b64" in w for w in doc["warnings"])
        assert restored == walk(src)  # every other name came back byte for byte


def test_chaos_symlink_loops(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    os.symlink("loop-b", src / "loop-a")
    os.symlink("loop-a", src / "loop-b")
    os.symlink(".", src / "self")
    os.symlink("..", src / "up")
    os.symlink("../deep", src / "deep" / "back")
    (src / "deep" / "f.log").write_text("inside the loops\n")
    before = walk(src)
    with scoreboard.scenario("Chaos: symlink loops, one given as a source") as row:
        row.faults = "5 looping links; --source on a link loop"
        # The looping link is also a source of its own: it must be refused, not followed.
        run = chaos_backup(stack, src, tmp_path, sources=(src / "loop-a",))
        _, restored = finish(
            stack,
            run,
            row,
            src,
            tmp_path,
            before,
            {b"loop-a": "source not readable: Too many levels of symbolic links"},
        )
        assert restored == before  # links stored as links, never followed


def test_chaos_proc_like_mount_with_one_file_system(
    stack: Stack, tmp_path: Path, tmpfs: Callable[..., Path]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    text_log(src / "app.log", 500_000, seed=10)
    proc = tmpfs(src / "proc", "size=64m")
    before = walk(src)  # the mount's content is covered by its warning, and unreadable whole
    # What makes /proc dangerous to archive: self-links, huge sizes, files that are not files.
    (proc / "1").mkdir()
    (proc / "1" / "status").write_text("Name:\tinit\nState:\tS (sleeping)\n")
    (proc / "1" / "cmdline").write_bytes(b"/sbin/init\0")
    os.symlink("1", proc / "self")
    with open(proc / "kcore", "wb") as fh:
        fh.truncate(2**40)  # 1 TiB, all hole
    (proc / "sys" / "kernel").mkdir(parents=True)
    (proc / "sys" / "kernel" / "hostname").write_text("ip-10-0-0-1\n")
    with scoreboard.scenario("Chaos: a /proc-like tmpfs mounted inside the source, --one-file-system") as row:
        row.faults = "tmpfs with a 1 TiB kcore and self-links mounted at src/proc"
        run = chaos_backup(stack, src, tmp_path, args=("--one-file-system",))
        doc, restored = finish(
            stack,
            run,
            row,
            src,
            tmp_path,
            before,
            {b"proc": r"on another file system \(--one-file-system\); not descended"},
            after=before,
        )
        assert restored[b"proc"] == ("dir", None)
        assert not [k for k in restored if k.startswith(b"proc/")]
    # Without the flag the mount's content is archived: it really is another file system.
    shutil.rmtree(tmp_path / "restore")
    (proc / "kcore").unlink()
    run = chaos_backup(stack, src, tmp_path, terminating=False)
    assert run.code == 0
    doc = manifest_of(stack, run.result)
    assert entry(doc, src, b"proc/1/status")["type"] == "file"


SPARSE_SIZE = 10 * 10**9  # "a 10 GB sparse file"
EXTENTS = (0, 3 * 10**9 + 12345, SPARSE_SIZE - 4096)


def _sparse(src: Path) -> Tree:
    """A 10 GB file with three 4 KiB data extents beside a small one; returns the tree
    without the big file (never read whole by the tests)."""
    (src / "small.log").write_text("next to the big one\n")
    small = walk(src)
    with open(src / "disk.img", "wb") as fh:
        fh.truncate(SPARSE_SIZE)
        for off in EXTENTS:
            fh.seek(off)
            fh.write(random.Random(off).randbytes(4096))
    return small


def test_chaos_10gb_sparse_file_over_max_file_size_is_skipped(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    before = _sparse(src)
    with scoreboard.scenario("Chaos: a 10 GB sparse file, --max-file-size 1GiB") as row:
        row.faults = "10 GB file (3 data extents) over the limit"
        run = chaos_backup(stack, src, tmp_path, args=("--max-file-size", "1GiB"))
        finish(
            stack,
            run,
            row,
            src,
            tmp_path,
            before,
            {b"disk.img": rf"{SPARSE_SIZE} bytes is over --max-file-size; skipped"},
            after=before,
        )
        assert run.result["bytes_read"] < 2**20


@pytest.mark.slow
def test_chaos_10gb_sparse_file_is_archived_by_extent(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _sparse(src)
    with scoreboard.scenario("Chaos: a 10 GB sparse file, no size limit") as row:
        row.faults = "10 GB file, 3 data extents of 4 KiB"
        run = chaos_backup(stack, src, tmp_path)
        assert run.code == 0, run.stderr[-3000:]
        assert run.result["status"] == "succeeded" and run.result["warnings"] == 0
        assert run.result["bytes_read"] < 16 * 2**20  # the holes were never read
        # 10 GB do not fit in a restore directory here: check the member by streaming it.
        body = stack.client("s3").get_object(Bucket=stack.bucket, Key=run.result["key"])["Body"]
        archive = tmp_path / "a.tar.zst"
        archive.write_bytes(body.read())
        mismatch = _compare_member(archive, os.fsencode(src / "disk.img").lstrip(b"/"), src / "disk.img")
        row.seconds = run.seconds
        row.bytes_lost = mismatch
        row.retried = "0"
        row.outcome = (
            f"succeeded; {run.result['bytes_read'] / 2**20:.0f} MiB read of 10 GB; "
            f"archive {archive.stat().st_size / 1000:.0f} kB; restore identical"
        )
        assert mismatch == 0


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data extents of a sparse file, as (start, end), by SEEK_DATA/SEEK_HOLE."""
    out, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, hole))
        pos = hole
    return out


def _compare_member(archive: Path, member: bytes, original: Path) -> int:
    """Bytes of `member` in the archive that differ from `original` (or are missing).

    The original's holes are compared with zeros rather than read: reading 10 GB of hole
    fills the page cache with zero pages and takes many times longer."""
    chunk = 8 << 20
    with (
        archive.open("rb") as fh,
        zstandard.ZstdDecompressor().stream_reader(fh) as raw,
        tarfile.open(fileobj=raw, mode="r|") as tf,
    ):
        info = next(m for m in tf if os.fsencode(m.name) == member)
        start, size = info.offset_data, info.size
    assert size == original.stat().st_size
    zeros = bytes(chunk)
    got, want = bytearray(chunk), bytearray(chunk)
    pos = bad = 0
    src = os.open(original, os.O_RDONLY)
    try:
        extents = _extents(src, size)
        with archive.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as raw:
            while n := raw.readinto(got):
                lo, hi = max(pos, start), min(pos + n, start + size)
                if lo < hi:
                    a, b = lo - start, hi - start  # the same range in the original
                    want[: b - a] = zeros[: b - a]
                    for x, y in extents:
                        x, y = max(x, a), min(y, b)
                        if x < y:
                            os.preadv(src, [memoryview(want)[x - a : y - a]], x)
                    if got[lo - pos : hi - pos] != want[: b - a]:
                        bad += b - a
                pos += n
    finally:
        os.close(src)
    return bad + max(0, start + size - pos)


@pytest.mark.slow
def test_chaos_100000_small_files_some_deleted_during_the_backup(stack: Stack, tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = []
    for d in range(100):
        (src / f"d{d:03}").mkdir(parents=True)
        for f in range(1000):
            path = src / f"d{d:03}" / f"{f:04}.log"
            path.write_bytes(b"%d/%d\n" % (d, f) * (1 + f % 7))
            names.append(path)
    before = walk(src)
    victims = random.Random(11).sample(names, 1000)
    stop = threading.Event()
    deleted = [0]

    def delete() -> None:
        for path in victims:
            if stop.is_set():
                return
            path.unlink()
            deleted[0] += 1
            time.sleep(0.002)

    with scoreboard.scenario("Chaos: 100,000 small files, 1,000 deleted during the backup") as row:
        deleter = threading.Thread(target=delete, daemon=True)
        deleter.start()
        try:
            run = chaos_backup(stack, src, tmp_path)
        finally:
            stop.set()
            deleter.join(10)
        row.faults = f"{deleted[0]} files deleted while the archiver walked"
        assert run.code == 0, run.stderr[-3000:]
        doc = manifest_of(stack, run.result)
        warned = warnings_under(doc, src)
        gone = {os.fsencode(p.relative_to(src)) for p in victims[: deleted[0]]}
        # Only deleted files may be warned about, and only as vanished.
        assert set(warned) <= gone
        assert set(warned.values()) <= {"vanished before it was read"}
        doc, restored = finish(stack, run, row, src, tmp_path, before, dict(warned))
        files = [k for k, (kind, _) in restored.items() if kind == "file"]
        assert len(files) == doc["totals"]["files"] == run.result["files"]
        # Every file that was never deleted is in the archive (lost_bytes checked its bytes).
        assert len(files) >= 100_000 - deleted[0]
