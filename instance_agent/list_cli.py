"""`list`: flags to calls (listing.py, orphans.py, handoff_list.py), the table or JSON, the
exit code."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from instance_agent import config
from instance_agent import ops_common as ops
from instance_agent.errors import ConfigError

EXAMPLES_LIST = """\
examples:
  instance-agent list --bucket my-backups --prefix backups/
  instance-agent list --asg-name web --since 7d
  instance-agent list --instance-id i-0123456789abcdef0 --since 2026-01-31 --json | jq .
  instance-agent list --asg-name web --verify

Columns: TIME (the manifest's `created`), GROUP, INSTANCE, RAW (bytes read), COMPRESSED,
FILES, STATUS (succeeded, partial: the deadline cut it short, no manifest: the run died after
its upload, incomplete: shipped segments no backup names, missing segments: with --verify, a
segment the backup names is gone or changed), ARCHIVE. A table on a terminal, a JSON array
(one backup per line) otherwise.
exit codes: 0 listed (maybe nothing), 1 S3 refused or --verify found a backup that is not
whole, 2 usage or configuration error.
"""


def register(sub: Any) -> None:
    """Add `list` to the CLI's sub-parser collection."""
    p = ops.add_parser(sub, "list", EXAMPLES_LIST, "list backups with their size, file count and status")
    ops.add_common(p, *ops.S3_OPTIONS)
    ops.add_filters(p, "backups")
    p.add_argument(
        "--since",
        metavar="DATE",
        help="only backups created at or after DATE: "
        "2026-01-31, 2026-01-31T12:00Z, or a duration ago such as 12h or 7d (flag "
        "only; default: all)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check that every segment a backup names is in the bucket at its size; "
        "exit 1 if any is missing (flag only; default: off, one GET per backup more)",
    )
    p.add_argument(
        "--handoffs",
        action="store_true",
        help="list the state hand-offs instead: unclaimed, claimed by whom, adopted by whom and "
        "when (flag only; default: backups)",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=1000,
        metavar="N",
        help="keys per ListObjectsV2 request (flag only; default 1000, S3's maximum)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON even on a terminal (flag only; default: a table on a terminal, JSON otherwise)",
    )
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    from instance_agent import listing, orphans

    cfg = ops.load(args)
    bucket = ops.need_bucket(cfg)
    if not 1 <= args.page_size <= 1000:
        raise ConfigError("--page-size must be 1-1000")
    filters = ops.check_filters(args)
    if args.handoffs:
        return _list_handoffs(args, cfg, bucket, filters)
    backups = orphans.find_all(
        ops.s3_client(cfg),
        bucket,
        cfg.prefix,
        filters,
        key_template=cfg.key_template,
        page_size=args.page_size,
        extra=ops.owner_args(cfg),
        verify=args.verify,
    )
    if args.json or not sys.stdout.isatty():
        ops.emit(listing.render_json(backups))
    elif backups:
        ops.emit(listing.render_table(backups))
    else:
        ops.emit(f"no backups under s3://{bucket}/{cfg.prefix}\n")
    broken = [b for b in backups if b.status == orphans.MISSING]
    for b in broken:
        sys.stderr.write(f"error: {b.url} cannot be restored whole: {b.error}\n")
    return 1 if broken else 0


def _list_handoffs(args: argparse.Namespace, cfg: config.Config, bucket: str, filters: Any) -> int:
    import time

    from instance_agent import handoff_list

    views = handoff_list.find(
        ops.s3_client(cfg),
        bucket,
        cfg.prefix,
        group=filters.group,
        source=filters.instance_id,
        now=time.time(),
        lease=cfg.handoff_lease,
        extra=ops.owner_args(cfg),
    )
    if args.json or not sys.stdout.isatty():
        ops.emit(handoff_list.render_json(views))
    else:
        ops.emit(
            handoff_list.render_table(views) if views else f"no hand-offs under s3://{bucket}/{cfg.prefix}\n"
        )
    return 0
