"""`restore`: the flags parsed, the plan chosen (restore_plan.py), carried out
(restore_run.py), verified when asked, and the result printed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from instance_agent import ops_common as ops

if TYPE_CHECKING:
    from instance_agent.restore_run import Restored

RESTORE_DEST_HELP = """\
DEST must be new or empty. Extraction goes into DEST/.instance-agent-partial-XXXXXXXX, and
only a complete, checked archive is moved into DEST; on any error that directory is removed
(and DEST too, if restore created it), so a failed restore leaves nothing that looks like a
tree. Refused, failing the whole restore: absolute names, '..', symlinks or hard links that
leave DEST, device nodes and FIFOs, setuid/setgid files (unless --allow-setuid). Owners are
not restored; modes are.
"""

EXAMPLES_RESTORE = (
    """\
examples:
  instance-agent restore s3://my-backups/backups/web/i-0abc/20260131T120000Z.tar.zst ./restored
  instance-agent restore --verify --include 'var/log/nginx' s3://my-backups/…tar.zst ./nginx
  instance-agent restore --latest --instance-id i-0123456789abcdef0 --verify ./restored

"""
    + RESTORE_DEST_HELP
    + """
exit codes: 0 restored (and verified), 1 failed or differs from the manifest, 2 usage or
configuration error (nothing was done).
"""
)


def register(sub: Any) -> None:
    """Add `restore` to the CLI's sub-parser collection."""
    r = ops.add_parser(
        sub,
        "restore",
        EXAMPLES_RESTORE,
        "stream a backup down and extract it safely",
        usage="%(prog)s [options] (s3://BUCKET/KEY | --latest) DEST",
    )
    r.add_argument(
        "paths",
        nargs="+",
        metavar="s3://BUCKET/KEY DEST",
        help="the archive (or its manifest) and a new or empty directory; with --latest, DEST only",
    )
    r.add_argument(
        "--latest",
        action="store_true",
        help="restore the newest backup under the "
        "prefix, narrowed by --instance-id and --asg-name (flag only; default off)",
    )
    ops.add_filters(r, "with --latest: backups")
    r.add_argument(
        "--verify",
        action="store_true",
        help="after extracting, check the tree "
        "against the manifest (as `verify` does, with the digests of the bytes as they were "
        "written instead of reading the files back); exit 1 on any difference (flag "
        "only; default off)",
    )
    ops.add_globs(r, "restore")
    r.add_argument(
        "--allow-setuid",
        action="store_true",
        help="restore setuid/setgid files with those bits (flag only; default: refuse the archive)",
    )
    r.add_argument("--json", action="store_true", help="print the result as JSON (flag only; default off)")
    ops.add_common(r, *ops.S3_OPTIONS)
    r.set_defaults(func=cmd_restore)


def cmd_restore(args: argparse.Namespace) -> int:
    from instance_agent import orphans, restore_plan, restore_run

    cfg = ops.load(args)
    request = restore_plan.Request(
        tuple(args.paths), args.latest, args.filter_group, args.filter_instance, args.verify
    )
    restore_plan.check_request(request)
    s3, owner = ops.s3_client(cfg), ops.owner_args(cfg)
    if request.latest:
        bucket = ops.need_bucket(cfg)
        found = ops.check_filters(args)
        listed = orphans.find_all(s3, bucket, cfg.prefix, found, key_template=cfg.key_template, extra=owner)
        plan = restore_plan.choose(request, listed, filters=found, where=f"s3://{bucket}/{cfg.prefix}")
    else:
        plan = restore_plan.choose(request)
    done = restore_run.execute(
        plan, s3, owner, select=ops.selection(args), allow_setuid=args.allow_setuid, say=sys.stderr.write
    )
    return _finish(args, done, *_result(done))


def _result(done: Restored) -> tuple[dict[str, Any], str]:
    """The result as JSON, and as the line of text that says it."""
    from instance_agent.restore_plan import count

    plan, report = done.plan, done.report
    dest = os.path.abspath(plan.dest)
    if plan.segments is not None:
        return {
            "status": "restored",
            "url": plan.url,
            "incomplete": True,
            "dest": dest,
            "files": report.files,
            "bytes": report.bytes,
            "segments": list(plan.segments),
        }, (
            f"restored {count(report.files, 'file')} ({report.bytes:,} bytes) from "
            f"{count(len(plan.segments), 'shipped segment')} into {plan.dest}\n"
        )
    return {
        "status": "restored",
        "url": plan.url,
        "dest": dest,
        "files": report.files,
        "directories": report.dirs,
        "links": report.links,
        "bytes": report.bytes,
        "excluded": report.excluded,
    }, (
        f"restored {count(report.files, 'file')}, "
        f"{count(report.dirs, 'directory', 'directories')} and "
        f"{count(report.links, 'link')} ({report.bytes:,} bytes) from {plan.url} into {plan.dest}\n"
    )


def _finish(args: argparse.Namespace, done: Restored, result: dict[str, Any], summary: str) -> int:
    """Verify against the manifest when asked, print the result, and exit 0 or raise."""
    verified = None
    if args.verify:
        from instance_agent import verify

        assert done.manifest is not None  # --verify reads the manifest before anything is restored
        # The digests of the bytes restore wrote stand for reading every file back.
        verified = verify.compare(done.plan.dest, done.manifest, ops.selection(args), done.report.written)
        result.update(
            status="verified" if not verified.differences else "differs",
            checked=verified.checked,
            differences=[d.to_json() for d in verified.differences],
        )
        summary += verify.render_text(verified)
    ops.emit(json.dumps(result) + "\n" if args.json else summary)
    if verified is not None:
        verified.raise_if_different()
    return 0
