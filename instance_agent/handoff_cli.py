"""`instance-agent adopt KEY`: flags to handoff_adopt.adopt, the SNS report, the exit code.

Exit codes: 0 adopted, or nothing to do here (already adopted, or claimed by a live
receiver: a repeated delivery is not a failure); 1 refused (unsafe, the command failed,
given up) and reported on SNS; 2 a bad key or configuration (nothing was done).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from instance_agent import config, handoff_adopt, listing, logs, signals, wiring
from instance_agent.errors import EXIT_OK, AgentError, ConfigError

EXAMPLES = """\
examples:
  instance-agent adopt s3://my-backups/web/handoff/i-0abc/20260131T120000Z.tar.zst
  instance-agent adopt web/handoff/i-0abc/20260131T120000Z.tar.zst --json

The state lands in HANDOFF_INBOX/<source instance>/ (its paths below it as on the sender),
then handoff_command runs with INSTANCE_AGENT_HANDOFF_INBOX, _SOURCE and _KEY set.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "adopt",
        help="claim a hand-off of the group, restore it into the inbox, run handoff_command",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "handoff", metavar="KEY", help="the hand-off archive: s3://bucket/key or a key of --bucket"
    )
    wiring.add_config_option(p)
    p.add_argument("--json", action="store_true", help="print the result object on stdout")
    wiring.add_schema_options(p, config.BACKUP)
    p.set_defaults(func=cmd_adopt)


def cmd_adopt(args: argparse.Namespace) -> int:
    target: str = args.handoff
    if target.startswith("s3://"):
        bucket, target = listing.parse_s3_url(target)
        if args.bucket and args.bucket != bucket:
            raise ConfigError(f"{args.handoff} is not in --bucket {args.bucket}")
        args.bucket = bucket
    cfg = wiring.load(args, config.BACKUP)
    logs.setup(cfg.log_level)
    cancel = threading.Event()
    signals.cancel_on_signals(cancel)
    ident = wiring.resolve_identity(cfg)
    clients = wiring.make_clients(cfg, ident.region)
    key = listing.archive_key_of(target)
    try:
        result = handoff_adopt.adopt(cfg, ident, clients, key, cancel=cancel)
    except ConfigError:
        raise
    except AgentError as err:
        failed = {
            "event": "handoff_refused",
            "status": "refused",
            "instance_id": ident.instance_id,
            "key": key,
            "adopter": ident.instance_id,
            "error": str(err),
        }
        handoff_adopt.report(cfg, clients, failed)
        if args.json:
            _print(failed)
        raise
    if result["status"] == "adopted":
        handoff_adopt.report(
            cfg, clients, {"event": "handoff_adopted", "instance_id": ident.instance_id, **result}
        )
    if args.json:
        _print(result)
    return EXIT_OK


def _print(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()
