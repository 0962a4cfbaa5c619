"""restore's policy (restore_plan.py), pure: which backup, how its manifest is read, and which
way it is restored, from the flags and from what was listed. No S3, no files."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from instance_agent.errors import ConfigError
from instance_agent.listing import Backup, BackupNotFound, Filters
from instance_agent.restore_plan import (
    HEAD,
    LISTED,
    WHOLE,
    Layout,
    Request,
    check_request,
    choose,
    layout,
    without_manifest,
)

BUCKET = "my-backups"
WHERE = f"s3://{BUCKET}/backups/"
INSTANCE = "i-0123456789abcdef0"


def backup(hour: int, status: str = "succeeded", **kw: Any) -> Backup:
    when = datetime(2026, 1, 31, hour, tzinfo=timezone.utc)
    key = kw.pop("key", f"backups/web/{INSTANCE}/20260131T{hour:02d}0000Z.tar.zst")
    manifest = None if status == "no manifest" else key + ".manifest.json"
    return Backup(BUCKET, key, 100, when, manifest, status, created=when, **kw)


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (Request(("a", "b"), latest=True), "with --latest give only DEST"),
        (
            Request(("s3://b/k.tar.zst", "dest"), instance_id=INSTANCE),
            "--asg-name and --instance-id choose a backup only with --latest",
        ),
        (Request(("dest",)), "give the archive and DEST: restore s3://bucket/key DEST"),
    ],
)
def test_usage_errors_come_before_anything_is_read(request_: Request, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("(", r"\(")):
        check_request(request_)


def test_a_key_names_its_backup_and_a_manifest_key_names_the_archive_beside_it() -> None:
    key = "backups/web/i-1/20260131T120000Z.tar.zst"
    request = Request((f"s3://{BUCKET}/{key}.manifest.json", "restored"))
    check_request(request)
    plan = choose(request)

    assert (plan.bucket, plan.key, plan.dest) == (BUCKET, key, "restored")
    assert plan.url == f"s3://{BUCKET}/{key}"
    assert plan.manifest == HEAD  # only its totals are needed: a ranged GET
    assert (plan.announce, plan.warning, plan.segments) == (None, None, None)


def test_verify_reads_the_whole_manifest() -> None:
    plan = choose(Request((f"s3://{BUCKET}/k.tar.gz", "d"), verify=True))
    assert plan.manifest == WHOLE and plan.verify


def test_a_key_that_is_no_archive_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="is not an archive"):
        choose(Request((f"s3://{BUCKET}/notes.txt", "d")))


def test_latest_is_the_newest_described_backup_not_a_newer_one_without_manifest() -> None:
    listed = [backup(9), backup(12), backup(13, "no manifest")]
    plan = choose(Request(("d",), latest=True), listed, where=WHERE)

    assert plan.backup is listed[1] and plan.key == listed[1].key
    assert plan.announce == f"latest backup: {listed[1].url} (created 2026-01-31 12:00:00Z)\n"
    assert plan.manifest == HEAD and plan.segments is None


def test_shipped_segments_alone_are_restored_only_when_no_complete_backup_exists() -> None:
    segments = [f"backups/web/{INSTANCE}/segments/s-{i}.tar.zst" for i in range(3)]
    orphan = backup(14, "incomplete", key=segments[0], segments=segments)

    assert choose(Request(("d",), latest=True), [backup(9), orphan], where=WHERE).segments is None

    plan = choose(Request(("d",), latest=True, verify=True), [orphan], where=WHERE)
    assert plan.segments == tuple(segments) and plan.manifest == LISTED
    assert plan.announce is None
    assert plan.warning == (
        f"warning: restoring shipped segments only from {orphan.url} (3 segments): "
        "the final archive is missing\n"
    )


def test_nothing_listed_says_what_was_looked_for() -> None:
    filters = Filters(group="web", instance_id=INSTANCE)
    with pytest.raises(BackupNotFound) as err:
        choose(Request(("d",), latest=True), [], filters=filters, where=WHERE)
    assert str(err.value) == f"no backup of group web of instance {INSTANCE} under {WHERE}"
    with pytest.raises(BackupNotFound, match=f"^no backup under {WHERE}$"):
        choose(Request(("d",), latest=True), [], filters=Filters(), where=WHERE)


def test_a_missing_manifest_is_a_note_unless_verify_needs_it() -> None:
    plan = choose(Request((f"s3://{BUCKET}/k.tar", "d")))
    assert (
        without_manifest(plan) == f"note: no manifest beside {plan.url}; restoring without its size check\n"
    )
    with pytest.raises(BackupNotFound, match="cannot verify: no manifest beside"):
        without_manifest(choose(Request((f"s3://{BUCKET}/k.tar", "d"), verify=True)))


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (None, Layout(False, False, None)),
        ({"format": 1}, Layout(False, False, None)),
        ({"format": 1, "totals": {"tar_bytes": 10240}}, Layout(False, False, 10240)),
        ({"format": 2, "totals": {"tar_bytes": 10240, "held_files": 0}}, Layout(False, False, 10240)),
        # Files shipped as segments are named only in the entries, which a head read leaves out.
        ({"format": 2, "totals": {"tar_bytes": 512, "held_files": 3}}, Layout(True, True, 512)),
        ({"format": 2, "totals": {"held_files": 3}, "entries": []}, Layout(True, False, None)),
    ],
)
def test_the_manifest_says_whether_segments_are_part_of_the_backup(
    manifest: dict[str, Any] | None, expected: Layout
) -> None:
    assert layout(manifest) == expected
