"""A retention's horizon on shipped state (issue 19 item 3): a file whose segment is half the
retention old is no longer held, so the termination archive takes it again and the shipper
ships it again, before the bucket's rule can expire the segment a backup would name."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from instance_agent import ledgerseed
from instance_agent.shiprecord import FileId, Shipped
from instance_agent.shipstate import DAY, Ledger, refresh_age

BUCKET, PREFIX, INSTANCE = "b", "backups/web/i-0abc-segments/", "i-0abc"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(path: Path, at: float, key: str = PREFIX + "a.tar.zst") -> Shipped:
    st = os.lstat(path)
    return Shipped(
        FileId.of(st), os.fsencode(path), "a" * 64, "b" * 64, key, 1, 1, st.st_ctime_ns, BUCKET, at
    )


def held(ledger: Ledger, path: Path) -> bool:
    st = os.lstat(path)
    return ledger.held(os.fsencode(path), st, None, os.fsencode(path)) is not None


def test_refresh_age_is_half_the_retention_and_none_without_one() -> None:
    assert refresh_age(0) is None
    assert refresh_age(30) == 15 * DAY
    assert refresh_age(1) == DAY / 2


def test_a_segment_past_half_the_retention_holds_nothing(tmp_path: Path) -> None:
    young, old = tmp_path / "young.log", tmp_path / "old.log"
    young.write_bytes(b"y" * 10)
    old.write_bytes(b"o" * 10)
    now = 1_800_000_000.0
    clock = Clock(now)
    ledger = Ledger(None, INSTANCE, [record(young, now - 14 * DAY), record(old, now - 16 * DAY)], clock=clock)
    ledger.aim(BUCKET, PREFIX, refresh_age(30))
    assert held(ledger, young)
    assert not held(ledger, old)  # archived at termination instead of named
    assert ledger.get(FileId.of(os.lstat(old))) is None  # and the shipper ships it again
    assert ledger.totals() == (1, 10)
    # Time passes: the young one reaches the horizon too.
    clock.now = now + 2 * DAY
    assert not held(ledger, young)
    # Without a retention nothing ages out.
    ledger.aim(BUCKET, PREFIX)
    assert held(ledger, young) and held(ledger, old)


def test_the_view_for_a_termination_archive_keeps_the_horizon(tmp_path: Path) -> None:
    f = tmp_path / "f.log"
    f.write_bytes(b"x")
    now = 1_800_000_000.0
    ledger = Ledger(None, INSTANCE, [record(f, now - 20 * DAY)], clock=Clock(now))
    ledger.aim(BUCKET, PREFIX, refresh_age(30))
    assert not held(ledger.view(), f)


def test_ship_time_survives_the_ledger_file_and_an_undated_line_counts_as_too_old(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    f = tmp_path / "f.log"
    f.write_bytes(b"x" * 5)
    now = 1_800_000_000.0
    ledger = Ledger.load(str(state), INSTANCE)
    ledger.add_segment([record(f, now - DAY)])
    ledger.compact()
    ledger.close()
    again = Ledger.load(str(state), INSTANCE)
    rec = again.get(FileId.of(os.lstat(f)))
    assert rec is not None and rec.at == now - DAY
    # A line written before ship times were recorded (format 3 without "at"): with a
    # retention it is shipped again once, rather than trusted to be young.
    lines = (state / "ship-ledger.jsonl").read_bytes().split(b"\n")
    seg = json.loads(lines[1])
    del seg["at"]
    (state / "ship-ledger.jsonl").write_bytes(lines[0] + b"\n" + json.dumps(seg).encode() + b"\n")
    undated = Ledger.load(str(state), INSTANCE)
    undated.aim(BUCKET, PREFIX, refresh_age(30))
    assert undated.get(FileId.of(os.lstat(f))) is None
    undated.aim(BUCKET, PREFIX)
    assert undated.get(FileId.of(os.lstat(f))) is not None


class DatedS3:
    """Objects in memory, each with the date S3 gave it."""

    def __init__(self, objects: dict[str, tuple[bytes, datetime]]) -> None:
        self.objects = objects

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        keys = sorted(k for k in self.objects if k.startswith(kwargs["Prefix"]))
        contents = [
            {"Key": k, "Size": len(self.objects[k][0]), "LastModified": self.objects[k][1]} for k in keys
        ]
        return {"Contents": contents, "IsTruncated": False}

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        return {"Body": io.BytesIO(self.objects[kwargs["Key"]][0])}


def test_a_seeded_record_is_dated_by_s3_not_by_its_manifest(tmp_path: Path) -> None:
    f = tmp_path / "f.log"
    f.write_bytes(b"x" * 7)
    seg = PREFIX + "f.log.1files.tar.zst"
    line = record(f, 0.0, seg).file_json()
    doc = {
        "key": seg,
        "segment_of": INSTANCE,
        "totals": {"tar_bytes": 1, "compressed_bytes": 1},
        "shipped": [line],
    }
    shipped = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    s3 = DatedS3({seg: (b"tar", shipped), seg + ".manifest.json": (json.dumps(doc).encode(), shipped)})
    now = datetime(2026, 11, 20, tzinfo=timezone.utc).timestamp()
    ledger = Ledger(None, INSTANCE, clock=Clock(now))
    assert ledgerseed.seed(ledger, s3, BUCKET, PREFIX, INSTANCE) == (1, 1)
    fid = FileId.of(os.lstat(f))
    rec = ledger.get(fid)
    assert rec is not None and rec.at == shipped.timestamp()
    ledger.aim(BUCKET, PREFIX, refresh_age(30))  # 18.5 days old: past a 30-day rule's horizon
    assert ledger.get(fid) is None
    ledger.aim(BUCKET, PREFIX, refresh_age(60))
    assert ledger.get(fid) is not None
