"""The termination walk alone, in process: what still grows with shipped history.

    python benchmarks/termination_walk.py DIR [--rounds 3]

Every regular file under DIR is recorded in an in-memory shipping ledger as shipped and
unchanged (its identity and inode change time, 4,096 files a segment), then the termination
archive's walk (archive.Archiver with Ledger.held as its skip test) runs over DIR into a
null sink, and the manifest is built. Nothing is read or uploaded: the time is the listing,
the lstat of each file and the ledger lookups; the peak RSS is the process's, ledger included
(run it from an older checkout, PYTHONPATH set to it, for the format-1 figures). Use a tree from
`termination_latency.py --files N --corpus DIR` (DIR/files-N).

`--journal` walks as the watcher's termination does with a trusted change journal
(finalwalk.py): the journal is armed on DIR and a full scan completed with nothing changed,
so the walk lists the directories and lstats no file.

`--prepared` adds the shipper's idle work (finalprep.py): the journal walk worked out ahead,
timed on its own (`prepare`), then the termination walk reusing it for every directory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instance_agent import finalprep
from instance_agent.archive import Archiver
from instance_agent.finalwalk import linked_inodes, quick_hold
from instance_agent.manifest import build
from instance_agent.shipjournal import Handover, Journal
from instance_agent.shiprecord import FileId, Shipped
from instance_agent.shipstate import Ledger

PER_SEGMENT = 4096


class _Null:
    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        return len(data)


def _ledger(root: str) -> Ledger:
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)
    recs = []
    for i, path in enumerate(paths):
        st = os.lstat(path)
        seg = i // PER_SEGMENT
        count = min(PER_SEGMENT, len(paths) - seg * PER_SEGMENT)
        key = f"b/i-0/segments/s{seg}.tar.zst"
        rec = Shipped(FileId.of(st), os.fsencode(path), "0" * 64, "1" * 64, key, 1, 1, st.st_ctime_ns)
        # (an agent before format 2 has no segment_files: the same walk, for comparison)
        recs.append(replace(rec, segment_files=count) if hasattr(rec, "segment_files") else rec)
    return Ledger(None, "i-0", recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--journal", action="store_true", help="the walk with a trusted change journal")
    ap.add_argument("--prepared", action="store_true", help="with --journal: reuse the walk worked out ahead")
    args = ap.parse_args()
    ledger = _ledger(args.dir)
    journal = None
    if args.journal:
        journal = Journal([args.dir], [])
        journal.arm()
        journal.scan_done([])
    for n in range(1, args.rounds + 1):
        recall = None
        if journal is not None and args.prepared:
            began = time.perf_counter()
            prepared = finalprep.prepare(journal, ledger)
            print(f"round {n}: prepare {time.perf_counter() - began:.3f} s (the shipper's, while idle)")
            ledger.handover = Handover(journal, True, prepared)
        start = time.perf_counter()
        # Built within the time, as the termination archive does (its index of the ledger).
        quick = quick_hold(journal, ledger) if journal is not None else None
        if journal is not None and args.prepared:
            recall = finalprep.for_archive(journal, ledger, linked_inodes(journal))
        arch = Archiver(_Null(), clock=time.monotonic, skip=ledger.held, quick=quick, recall=recall)
        arch.add_sources([args.dir])
        report = arch.finish()
        walked = time.perf_counter()
        parts = build(
            report,
            key="k",
            compression="zstd",
            agent_version="-",
            compressed_bytes=0,
            journal=None,
            segments=ledger.segments(),
        )
        built = time.perf_counter()
        print(
            f"round {n}: {report.held_files:,} held files ({report.held_prepared:,} prepared), "
            f"walk {walked - start:.3f} s, "
            f"manifest {built - walked:.3f} s, {sum(len(p) for p in parts):,} bytes"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process (ledger, walk and manifest): {peak:.1f} MiB")


if __name__ == "__main__":
    main()
