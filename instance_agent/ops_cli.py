"""Operator sub-commands: `list`, `restore`, `verify`, `doctor`, `status`.

Wiring only, as in cli.py: flags to config, logging, clients (from wiring.py); the work is in
listing.py, restore.py, verify.py, doctor.py and status.py. Shared options (bucket, prefix,
region, …) come from the config schema, so they read the same flag > environment > file
precedence as `backup`; the filters (--asg-name, --instance-id, --since) are flags only, so a
group in agent.toml never silently narrows a listing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from instance_agent import config, logs, s3args, wiring
from instance_agent.errors import ConfigError

OPS = "ops"  # the command name given to config.load: no option is required by it

RESTORE_DEST_HELP = """\
DEST must be new or empty. Extraction goes into DEST/.instance-agent-partial-XXXXXXXX, and
only a complete, checked archive is moved into DEST; on any error that directory is removed
(and DEST too, if restore created it), so a failed restore leaves nothing that looks like a
tree. Refused, failing the whole restore: absolute names, '..', symlinks or hard links that
leave DEST, device nodes and FIFOs, setuid/setgid files (unless --allow-setuid). Owners are
not restored; modes are.
"""

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

EXAMPLES_VERIFY = """\
examples:
  instance-agent verify ./restored --manifest s3://my-backups/…/20260131T120000Z.tar.zst
  instance-agent verify ./restored --manifest ./20260131T120000Z.tar.zst.manifest.json --json

Checks every entry of the manifest under DIR: type, size, SHA-256 when the manifest has one
(backups made with --hash sha256), otherwise the modification time; symlink targets; and
that DIR holds nothing else. Each difference is printed with its path.
exit codes: 0 identical, 1 differences (or S3 refused), 2 usage or configuration error.
"""

EXAMPLES_DOCTOR = """\
examples:
  sudo instance-agent doctor
  instance-agent doctor --config /etc/instance-agent/agent.toml --publish-test
  instance-agent doctor --json | jq '.checks[] | select(.result == "fail")'

One line per check: ✓ works, ✗ broken (followed by its fix), – skipped (with the reason).
Checks: config, compression, imds (IMDSv2 and hop limit), identity, lifecycle hook (group,
hook, heartbeat timeout), lifecycle permission, bucket, s3 permissions (a multipart upload
created and aborted under the prefix: nothing is stored), topic, ssm agent, systemd unit.
It uses the same options as `backup`, so it checks exactly what a backup would use.
exit codes: 0 nothing is ✗, 1 something is ✗, 2 usage error.
"""

EXAMPLES_STATUS = """\
examples:
  instance-agent status
  instance-agent status --json
  instance-agent status --runtime-dir /run/instance-agent --state-dir /var/lib/instance-agent

Shows what the watcher wrote to its status file (watch-status.json in the runtime directory,
else the state directory): last poll, last IMDS state, last backup; and the newest
exactly-once record, whichever trigger path made it.
exit codes: 0 the watcher is running, 1 it is not (no status file, its process is gone, or
it has not updated the file for two minutes), 2 usage error.
"""


# The schema's help speaks of backing up; here the same options locate existing backups.
HELP = {
    "bucket": "S3 bucket of the backups",
    "prefix": "key prefix of the backups, e.g. 'backups/'",
    "region": "region of the bucket; else the SDK's (AWS_REGION, ~/.aws/config)",
    "key_template": "the key template the backups were made with; when it starts "
    "{prefix}{group}/, --asg-name and --instance-id narrow the listing itself",
}


def _common(parser: argparse.ArgumentParser, *names: str) -> None:
    wiring.add_config_option(parser)
    for name in names:
        wiring.add_option(parser, name, HELP.get(name))


def _filters(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--asg-name",
        dest="filter_group",
        metavar="NAME",
        help=f"only {what} of this Auto Scaling group (flag only; default: all)",
    )
    parser.add_argument(
        "--instance-id",
        dest="filter_instance",
        metavar="ID",
        help=f"only {what} of this instance (flag only; default: all)",
    )


def _globs(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help=f"{verb} only members matching GLOB, or under a directory that "
        "does: the name as archived, without a leading '/', e.g. "
        "'var/log/nginx' or 'var/log/*.log'; repeatable (flag only; default: "
        "everything)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help=f"do not {verb} members matching GLOB, or under a directory that "
        "does; repeatable (flag only; default: none)",
    )


def _intermixed(parser: argparse.ArgumentParser) -> None:
    """Let options follow the positional arguments (`restore URL --verify DEST`), as with
    any ordinary command. The top-level parser holds sub-parsers, which
    parse_intermixed_args does not support, so each sub-command's own parser (called by
    the sub-parsers action through parse_known_args) parses intermixed instead."""
    plain = parser.parse_known_args

    def parse(args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        # parse_known_intermixed_args calls parse_known_args itself: the plain one then.
        setattr(parser, "parse_known_args", plain)  # noqa: B010
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            setattr(parser, "parse_known_args", parse)  # noqa: B010

    setattr(parser, "parse_known_args", parse)  # noqa: B010


def register(sub: Any) -> None:
    """Add the operator sub-commands to the CLI's sub-parser collection."""
    raw = argparse.RawDescriptionHelpFormatter
    s3_options = ("bucket", "prefix", "region", "expected_bucket_owner", "key_template", "log_level")

    p = sub.add_parser(
        "list",
        help="list backups with their size, file count and status",
        epilog=EXAMPLES_LIST,
        formatter_class=raw,
    )
    _common(p, *s3_options)
    _filters(p, "backups")
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
    _intermixed(p)

    r = sub.add_parser(
        "restore",
        help="stream a backup down and extract it safely",
        epilog=EXAMPLES_RESTORE,
        formatter_class=raw,
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
    _filters(r, "with --latest: backups")
    r.add_argument(
        "--verify",
        action="store_true",
        help="after extracting, check the tree "
        "against the manifest (as `verify` does); exit 1 on any difference (flag "
        "only; default off)",
    )
    _globs(r, "restore")
    r.add_argument(
        "--allow-setuid",
        action="store_true",
        help="restore setuid/setgid files with those bits (flag only; default: refuse the archive)",
    )
    r.add_argument("--json", action="store_true", help="print the result as JSON (flag only; default off)")
    _common(r, *s3_options)
    r.set_defaults(func=cmd_restore)
    _intermixed(r)

    v = sub.add_parser(
        "verify",
        help="compare a restored tree with its backup's manifest",
        epilog=EXAMPLES_VERIFY,
        formatter_class=raw,
    )
    v.add_argument("dest", metavar="DIR", help="the restored tree")
    v.add_argument(
        "--manifest",
        required=True,
        metavar="s3://BUCKET/KEY|FILE",
        help="the manifest, or its archive's key (the manifest beside it is read), "
        "or a local manifest file (flag only; required)",
    )
    _globs(v, "verify")
    v.add_argument("--json", action="store_true", help="print the result as JSON (flag only; default off)")
    _common(v, "region", "expected_bucket_owner", "log_level")
    v.set_defaults(func=cmd_verify)
    _intermixed(v)

    d = sub.add_parser(
        "doctor",
        help="check everything a backup will need, here and now",
        epilog=EXAMPLES_DOCTOR,
        formatter_class=raw,
    )
    wiring.add_config_option(d)
    d.add_argument("--json", action="store_true", help="print the checks as JSON (flag only; default off)")
    d.add_argument(
        "--publish-test",
        action="store_true",
        help="publish one test message to "
        "the topic, the only way to prove it exists with the instance role (flag "
        "only; default: publish nothing)",
    )
    d.add_argument(
        "--launch",
        action="store_true",
        help="the launching hook's gate (the user "
        "data runs it before CONTINUE): skip the checks that need a terminating "
        "action (flag only; default off)",
    )
    wiring.add_schema_options(d, config.BACKUP)
    d.set_defaults(func=cmd_doctor)
    _intermixed(d)

    s = sub.add_parser(
        "status",
        help="what the watcher is doing, and whether it runs",
        epilog=EXAMPLES_STATUS,
        formatter_class=raw,
    )
    _common(s, "state_dir", "runtime_dir")
    s.add_argument("--json", action="store_true", help="print the status as JSON (flag only; default off)")
    s.set_defaults(func=cmd_status)
    _intermixed(s)


# --- shared wiring --------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> config.Config:
    cfg = wiring.load(args, OPS)
    logs.setup(cfg.log_level)
    return cfg


def _need_bucket(cfg: config.Config) -> str:
    if not cfg.bucket:
        raise ConfigError(
            "no bucket: pass --bucket, set INSTANCE_AGENT_BUCKET or `bucket` in the config file"
        )
    return cfg.bucket


_extra = s3args.owner_args


def s3_client(cfg: config.Config) -> Any:
    """An S3 client for reading backups, with a connection for each manifest reader."""
    from instance_agent import listing

    return wiring.s3_reader(cfg, listing.MANIFEST_READERS + 2)


def _check_filters(args: argparse.Namespace) -> Any:
    from instance_agent import listing

    group, instance = args.filter_group, args.filter_instance
    for opt_name, value, flag in (
        ("asg_name", group, "--asg-name"),
        ("instance_id", instance, "--instance-id"),
    ):
        check = config.OPTION_BY_NAME[opt_name].check
        problem = check(value) if value is not None and check else None
        if problem:
            raise ConfigError(f"{flag}: {problem}")
    since = listing.parse_since(args.since) if getattr(args, "since", None) else None
    return listing.Filters(group=group, instance_id=instance, since=since)


def _selection(args: argparse.Namespace) -> Any:
    from instance_agent.restore import Selection

    return Selection(tuple(args.include), tuple(args.exclude))


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --- the commands ---------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from instance_agent import listing, orphans

    cfg = _load(args)
    bucket = _need_bucket(cfg)
    if not 1 <= args.page_size <= 1000:
        raise ConfigError("--page-size must be 1-1000")
    filters = _check_filters(args)
    if args.handoffs:
        return _list_handoffs(args, cfg, bucket, filters)
    backups = orphans.find_all(
        s3_client(cfg),
        bucket,
        cfg.prefix,
        filters,
        key_template=cfg.key_template,
        page_size=args.page_size,
        extra=_extra(cfg),
        verify=args.verify,
    )
    if args.json or not sys.stdout.isatty():
        _print(listing.render_json(backups))
    elif backups:
        _print(listing.render_table(backups))
    else:
        _print(f"no backups under s3://{bucket}/{cfg.prefix}\n")
    broken = [b for b in backups if b.status == orphans.MISSING]
    for b in broken:
        sys.stderr.write(f"error: {b.url} cannot be restored whole: {b.error}\n")
    return 1 if broken else 0


def _list_handoffs(args: argparse.Namespace, cfg: config.Config, bucket: str, filters: Any) -> int:
    import time

    from instance_agent import handoff_list

    views = handoff_list.find(
        s3_client(cfg),
        bucket,
        cfg.prefix,
        group=filters.group,
        source=filters.instance_id,
        now=time.time(),
        lease=cfg.handoff_lease,
        extra=_extra(cfg),
    )
    if args.json or not sys.stdout.isatty():
        _print(handoff_list.render_json(views))
    else:
        _print(
            handoff_list.render_table(views) if views else f"no hand-offs under s3://{bucket}/{cfg.prefix}\n"
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from instance_agent import assemble, listing, orphans, restore, segrefs

    cfg = _load(args)
    s3 = s3_client(cfg)
    extra = _extra(cfg)
    if args.latest:
        if len(args.paths) != 1:
            raise ConfigError("with --latest give only DEST")
        bucket = _need_bucket(cfg)
        filters = _check_filters(args)
        backups = orphans.find_all(
            s3, bucket, cfg.prefix, filters, key_template=cfg.key_template, extra=extra
        )
        if not backups:
            narrowed = " ".join(
                f"{k} {v}"
                for k, v in (("of group", filters.group), ("of instance", filters.instance_id))
                if v
            )
            raise listing.BackupNotFound(
                f"no backup {narrowed + ' ' if narrowed else ''}under s3://{bucket}/{cfg.prefix}"
            )
        chosen = listing.latest(backups)
        bucket, key = chosen.bucket, chosen.key
        if chosen.status == "incomplete":
            return _restore_incomplete(args, s3, chosen, extra)
        sys.stderr.write(
            f"latest backup: {chosen.url} (created {chosen.time.strftime('%Y-%m-%d %H:%M:%SZ')})\n"
        )
    else:
        if args.filter_group or args.filter_instance:
            raise ConfigError("--asg-name and --instance-id choose a backup only with --latest")
        if len(args.paths) != 2:
            raise ConfigError(
                "give the archive and DEST: restore s3://bucket/key DEST (or "
                "restore --latest --instance-id ID DEST)"
            )
        bucket, key = listing.parse_s3_url(args.paths[0])
        key = listing.archive_key_of(key)
    dest = args.paths[-1]
    restore.check_key(key)
    restore.check_destination(dest)
    select = _selection(args)
    url = f"s3://{bucket}/{key}"

    manifest: dict[str, Any] | None
    try:
        read = listing.read_manifest if args.verify else listing.read_manifest_head
        manifest = read(s3, bucket, key + listing.MANIFEST_SUFFIX, extra)
    except listing.BackupNotFound:
        if args.verify:
            raise listing.BackupNotFound(f"cannot verify: no manifest beside {url}") from None
        manifest = None
        sys.stderr.write(f"note: no manifest beside {url}; restoring without its size check\n")
    totals = manifest.get("totals") if manifest else None
    tar_bytes = totals.get("tar_bytes") if isinstance(totals, dict) else None
    # Files shipped as segments (continuous shipping) are named only in the entries.
    shipped = isinstance(totals, dict) and bool(totals.get("held_files"))
    if shipped and manifest is not None and "entries" not in manifest:
        manifest = listing.read_manifest(s3, bucket, key + listing.MANIFEST_SUFFIX, extra)
    if shipped and manifest is not None:
        manifest = segrefs.expand(s3, bucket, key, manifest, extra)  # format 2: entries from segments

    try:
        if shipped and manifest is not None:
            report = assemble.restore_assembled(
                s3, bucket, key, manifest, dest, allow_setuid=args.allow_setuid, select=select, extra=extra
            )
        else:
            report = restore.restore_s3(
                s3,
                bucket,
                key,
                dest,
                allow_setuid=args.allow_setuid,
                select=select,
                expected_tar_bytes=tar_bytes if isinstance(tar_bytes, int) else None,
                extra=extra,
            )
    except (restore.RestoreError, restore.UnsafeArchive) as err:
        raise type(err)(f"{err}; nothing was restored into {dest}") from None
    result: dict[str, Any] = {
        "status": "restored",
        "url": url,
        "dest": os.path.abspath(dest),
        "files": report.files,
        "directories": report.dirs,
        "links": report.links,
        "bytes": report.bytes,
        "excluded": report.excluded,
    }
    summary = (
        f"restored {_count(report.files, 'file')}, "
        f"{_count(report.dirs, 'directory', 'directories')} and "
        f"{_count(report.links, 'link')} ({report.bytes:,} bytes) from {url} into {dest}\n"
    )
    return _finish_restore(args, dest, manifest, select, result, summary)


def _finish_restore(
    args: argparse.Namespace,
    dest: str,
    manifest: Any,
    select: Any,
    result: dict[str, Any],
    summary: str,
) -> int:
    """Verify against `manifest` when asked, print the result, and exit 0 or raise."""
    verified = None
    if args.verify:
        from instance_agent import verify

        assert manifest is not None  # --verify reads the manifest before anything is restored
        verified = verify.compare(dest, manifest, select)
        result.update(
            status="verified" if not verified.differences else "differs",
            checked=verified.checked,
            differences=[d.to_json() for d in verified.differences],
        )
        summary += _verify_text(verified)
    _print(json.dumps(result) + "\n" if args.json else summary)
    if verified is not None:
        verified.raise_if_different()
    return 0


def _restore_incomplete(args: argparse.Namespace, s3: Any, chosen: Any, extra: Any) -> int:
    """An instance with shipped segments and no complete backup: restore the segments."""
    from instance_agent import assemble, orphans, restore

    dest = args.paths[-1]
    restore.check_destination(dest)
    sys.stderr.write(
        f"warning: restoring shipped segments only from {chosen.url} "
        f"({_count(len(chosen.segments or []), 'segment')}): the final archive is missing\n"
    )
    manifest = orphans.manifest_of(s3, chosen, extra)
    select = _selection(args)
    try:
        report = assemble.restore_assembled(
            s3,
            chosen.bucket,
            chosen.key,
            manifest,
            dest,
            allow_setuid=args.allow_setuid,
            select=select,
            extra=extra,
            final=False,
        )
    except (restore.RestoreError, restore.UnsafeArchive) as err:
        raise type(err)(f"{err}; nothing was restored into {dest}") from None
    result: dict[str, Any] = {
        "status": "restored",
        "url": chosen.url,
        "incomplete": True,
        "dest": os.path.abspath(dest),
        "files": report.files,
        "bytes": report.bytes,
        "segments": chosen.segments,
    }
    summary = (
        f"restored {_count(report.files, 'file')} ({report.bytes:,} bytes) from "
        f"{_count(len(chosen.segments or []), 'shipped segment')} into {dest}\n"
    )
    return _finish_restore(args, dest, manifest, select, result, summary)


def _verify_text(report: Any) -> str:
    lines = [f"differs: {d.display()}" for d in report.differences]
    verdict = (
        f"verified {report.checked} entries against the manifest: identical"
        if not report.differences
        else f"{len(report.differences)} difference(s) in {report.checked} entries"
    )
    return "".join(line + "\n" for line in [*lines, verdict])


def cmd_verify(args: argparse.Namespace) -> int:
    from instance_agent import verify

    cfg = _load(args)
    s3 = s3_client(cfg) if args.manifest.startswith("s3://") else None
    manifest = verify.load_manifest(args.manifest, s3, _extra(cfg))
    report = verify.compare(args.dest, manifest, _selection(args))
    if args.json:
        _print(
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
        _print(_verify_text(report))
    report.raise_if_different()
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from instance_agent import doctor

    problem = None
    try:
        cfg = wiring.load(args, OPS)
    except ConfigError as err:
        cfg, problem = config.Config.defaults(), str(err)
    logs.setup(cfg.log_level if problem is None else "info")
    checks = doctor.run(
        cfg, problem, wiring.make_probe_clients, publish_test=args.publish_test, launch=args.launch
    )
    if args.json:
        _print(json.dumps({"ok": not doctor.failed(checks), "checks": [c.to_json() for c in checks]}) + "\n")
    else:
        encoding = sys.stdout.encoding or "ascii"
        try:
            "✓✗–".encode(encoding)
            symbols = True
        except (UnicodeEncodeError, LookupError):
            symbols = False
        _print(doctor.render(checks, symbols=symbols))
    return 1 if doctor.failed(checks) else 0


def cmd_status(args: argparse.Namespace) -> int:
    from instance_agent import status

    cfg = _load(args)
    dirs = (cfg.runtime_dir, cfg.state_dir)
    now = time.time()
    found = status.find_status(dirs)
    path, doc = found if found else (None, None)
    private = [d for d in dirs if os.path.isdir(d) and not os.access(d, os.R_OK | os.X_OK)]
    if doc is not None:
        verdict = status.assess(doc, now)
    elif private:
        # The daemon's directories are root's: say so, rather than "not running".
        verdict = status.Assessment(
            False,
            f"unknown: cannot read {' or '.join(private)} "
            "(permission denied); run `sudo instance-agent status`",
        )
    else:
        verdict = status.Assessment(
            False,
            f"not running: no {status.STATUS_FILE} in "
            f"{' or '.join(dirs)} (is it installed? systemctl status "
            "instance-agent)",
        )
    record = status.latest_record(dirs)
    if args.json:
        _print(
            json.dumps(
                {
                    "running": verdict.running,
                    "reason": verdict.reason,
                    "status_file": path,
                    "status": doc,
                    "termination_record": record,
                    "shipping": status.shipping_block(doc),
                }
            )
            + "\n"
        )
    else:
        _print(status.render(path, doc, verdict, record, now))
    if not verdict.running:
        raise status.WatcherNotRunning(f"the watcher is {verdict.reason}")
    return 0
