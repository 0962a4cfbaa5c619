"""`verify`: flags to calls (verify.py), the differences as text or JSON, the exit code."""

from __future__ import annotations

import argparse
import json
from typing import Any

from instance_agent.ops_common import (
    add_common,
    add_globs,
    add_parser,
    emit,
    load,
    owner_args,
    s3_client,
    selection,
)

EXAMPLES_VERIFY = """\
examples:
  instance-agent verify ./restored --manifest s3://my-backups/…/20260131T120000Z.tar.zst
  instance-agent verify ./restored --manifest ./20260131T120000Z.tar.zst.manifest.json --json

Checks every entry of the manifest under DIR: type, size, SHA-256 when the manifest has one
(backups made with --hash sha256), otherwise the modification time; symlink targets; and
that DIR holds nothing else. Each difference is printed with its path.
exit codes: 0 identical, 1 differences (or S3 refused), 2 usage or configuration error.
"""


def register(sub: Any) -> None:
    """Add `verify` to the CLI's sub-parser collection."""
    v = add_parser(sub, "verify", EXAMPLES_VERIFY, "compare a restored tree with its backup's manifest")
    v.add_argument("dest", metavar="DIR", help="the restored tree")
    v.add_argument(
        "--manifest",
        required=True,
        metavar="s3://BUCKET/KEY|FILE",
        help="the manifest, or its archive's key (the manifest beside it is read), "
        "or a local manifest file (flag only; required)",
    )
    add_globs(v, "verify")
    v.add_argument("--json", action="store_true", help="print the result as JSON (flag only; default off)")
    add_common(v, "region", "expected_bucket_owner", "log_level")
    v.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from instance_agent import verify

    cfg = load(args)
    s3 = s3_client(cfg) if args.manifest.startswith("s3://") else None
    manifest = verify.load_manifest(args.manifest, s3, owner_args(cfg))
    report = verify.compare(args.dest, manifest, selection(args))
    if args.json:
        emit(
            json.dumps(
                {
                    "status": "identical" if not report.differences else "differs",
                    "checked": report.checked,
                    "differences": [d.to_json() for d in report.differences],
                }
            )
            + "\n"
        )
    else:
        emit(verify.render_text(report))
    report.raise_if_different()
    return 0
