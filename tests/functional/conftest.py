"""The functional tier's world: one instance, its files, and fakes of everything it calls.

`world` is a fresh instance per test: a source tree on disk, a state dir, an in-memory S3,
SNS, CloudWatch and Auto Scaling group, and a fake clock that the job's waits move. Tests run
`termination.run` in process and assert what a user would check: the completion Auto Scaling
received, the archives in S3 and their bytes, the SNS message, the exit code, the record.

`Options` are built in one place, `command_options` and `watcher_options` below: when the
job's options change shape, only these two change.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from functional.fakes import ClockEvent, FakeCloudWatch, FakeGroup, FakeS3, FakeSNS, ScriptedClock
from instance_agent import termination
from instance_agent.clients import Clients
from instance_agent.config import Config
from instance_agent.identity import Identity
from instance_agent.poller import TERMINATION, WARM_RETURN

INSTANCE = "i-0123456789abcdef0"
REGION = "us-east-1"
TOPIC = "arn:aws:sns:us-east-1:123456789012:backups"
BUCKET = "backups"
TOKEN = "b7c1e0a4-5f0e-4c59-9d8e-0a1b2c3d4e5f"
FILES = {
    "app/data.db": b"rows\x00" * 2000,
    "app/config.ini": b"[app]\nmode = production\n",
    "logs/app.log": b"".join(b"line %d\n" % i for i in range(500)),
    "empty": b"",
}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tar.zst")


@dataclass
class World:
    tmp: Path
    source: Path
    clock: ScriptedClock
    cancel: ClockEvent
    s3: FakeS3
    sns: FakeSNS
    cloudwatch: FakeCloudWatch
    asg: FakeGroup
    cfg: Config
    ident: Identity
    with_autoscaling: bool = True

    def configure(self, **changes: Any) -> None:
        self.cfg = replace(self.cfg, **changes)

    def clients(self) -> Clients:
        return Clients(
            s3=self.s3,
            sns=self.sns,
            autoscaling=self.asg if self.with_autoscaling else None,
            cloudwatch=self.cloudwatch,
        )

    def run(self, opts: termination.Options | None = None) -> termination.Outcome:
        return termination.run(self.cfg, self.ident, self.clients(), opts or command_options(self))

    # -- what a user checks -------------------------------------------------------------
    def archives(self) -> list[str]:
        return [k for k in self.s3.object_keys() if k.endswith(ARCHIVE_SUFFIXES)]

    def archive_files(self, key: str) -> dict[str, bytes]:
        """The regular files in an archive, by their path under the source."""
        body = self.s3.body(key)
        out: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in tar.getmembers():
                if member.isfile():
                    name = "/" + member.name.lstrip("/")
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    rel = Path(name).relative_to(self.source)
                    out[str(rel)] = extracted.read()
        return out

    def on_disk(self) -> dict[str, bytes]:
        return {
            str(p.relative_to(self.source)): p.read_bytes()
            for p in sorted(self.source.rglob("*"))
            if p.is_file()
        }

    def messages(self) -> list[dict[str, Any]]:
        return self.sns.messages()

    def record(self) -> dict[str, Any] | None:
        path = Path(self.cfg.state_dir) / f"termination-{INSTANCE}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_record(self, **fields: Any) -> None:
        """A record as an earlier run (of the other path) left it under the lock."""
        doc = {
            "recorded_at": fields.pop("recorded_at", None),
            "exit_code": 0,
            "result": {"status": "succeeded", "key": "backups/earlier.tar", "group": "web", "hook": "drain"},
            "backup_ok": True,
            "completed": False,
            "lifecycle_result": "CONTINUE",
            "action": None,
            "valid_for": 300.0,
            "format": 2,
        }
        doc.update(fields)
        if doc["recorded_at"] is None:
            import time

            doc["recorded_at"] = time.time()
        state = Path(self.cfg.state_dir)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        (state / f"termination-{INSTANCE}.json").write_text(json.dumps(doc))


def make_world(tmp_path: Path) -> World:
    source = tmp_path / "srv"
    for rel, data in FILES.items():
        path = source / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    clock = ScriptedClock()
    cfg = Config.defaults(
        source=(str(source),),
        bucket=BUCKET,
        compression="none",
        journal=False,
        topic_arn=TOPIC,
        state_dir=str(tmp_path / "state"),
        runtime_dir=str(tmp_path / "run"),
        instance_id=INSTANCE,
        region=REGION,
    )
    return World(
        tmp=tmp_path,
        source=source,
        clock=clock,
        cancel=ClockEvent(clock),
        s3=FakeS3(),
        sns=FakeSNS(),
        cloudwatch=FakeCloudWatch(),
        asg=FakeGroup(instance_id=INSTANCE, group="web"),
        cfg=cfg,
        ident=Identity(INSTANCE, REGION, hostname="ip-10-0-0-7"),
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield make_world(tmp_path)


# -- the one place Options are built ----------------------------------------------------------


def command_options(world: World, *, imds_state: str | None = None) -> termination.Options:
    """`instance-agent backup` (Run Command, or an operator): what cli.cmd_backup passes."""
    return termination.Options(
        imds_state=imds_state,
        cancel=world.cancel,
        clock=world.clock,
        sleep=world.clock.sleep,
    )


def watcher_options(world: World, kind: str, detail: str = "") -> termination.Options:
    """The watcher's job for one notice: what watch.Job passes, with the fake clock."""
    return termination.Options(
        trigger=kind,
        notice=detail,
        imds_state=detail if kind in (TERMINATION, WARM_RETURN) else None,
        cancel=world.cancel,
        clock=world.clock,
        sleep=world.clock.sleep,
    )


def leaving(world: World) -> termination.Options:
    """The watcher's notice that IMDS says `Terminated`: the common case."""
    return watcher_options(world, TERMINATION, "Terminated")


# -- what a user checks, in one line each ---------------------------------------------------


def the_backup(world: World) -> str:
    """The one archive in S3, checked against the disk and its manifest: its key."""
    archives = world.archives()
    assert len(archives) == 1, archives
    key = archives[0]
    assert world.archive_files(key) == world.on_disk()
    manifest = json.loads(world.s3.body(key + ".manifest.json"))
    assert manifest["key"] == key
    return key


def no_backup(world: World) -> None:
    assert world.archives() == []
    assert world.s3.uploads == {}, "a multipart upload was left behind"


def the_message(world: World) -> dict[str, Any]:
    """The one SNS message, with the fields every report carries."""
    messages = world.messages()
    assert len(messages) == 1, messages
    msg = messages[0]
    assert msg["instance_id"] == INSTANCE
    assert msg["bucket"] == BUCKET
    return msg
