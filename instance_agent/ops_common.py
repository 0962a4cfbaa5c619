"""What the operator sub-commands (list, restore, verify, doctor, status) share: their common
options, the filters and globs, parsing options after the positional arguments, the config
they read, the S3 reader, and writing results to stdout.

Shared options (bucket, prefix, region, …) come from the config schema, so they read the
same flag > environment > file precedence as `backup`; the filters (--asg-name,
--instance-id, --since) are flags only, so a group in agent.toml never silently narrows a
listing.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from instance_agent import config, logs, s3args, schema, wiring
from instance_agent.errors import ConfigError

if TYPE_CHECKING:
    from instance_agent.listing import Filters
    from instance_agent.restore import Selection

OPS = "ops"  # the command name given to config.load: no option is required by it
S3_OPTIONS = ("bucket", "prefix", "region", "expected_bucket_owner", "key_template", "log_level")
RAW = argparse.RawDescriptionHelpFormatter

# The schema's help speaks of backing up; here the same options locate existing backups.
HELP = {
    "bucket": "S3 bucket of the backups",
    "prefix": "key prefix of the backups, e.g. 'backups/'",
    "region": "region of the bucket; else the SDK's (AWS_REGION, ~/.aws/config)",
    "key_template": "the key template the backups were made with; when it starts "
    "{prefix}{group}/, --asg-name and --instance-id narrow the listing itself",
}


def add_common(parser: argparse.ArgumentParser, *names: str) -> None:
    wiring.add_config_option(parser)
    for name in names:
        wiring.add_option(parser, name, HELP.get(name))


def add_filters(parser: argparse.ArgumentParser, what: str) -> None:
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


def add_globs(parser: argparse.ArgumentParser, verb: str) -> None:
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


def intermixed(parser: argparse.ArgumentParser) -> None:
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


def add_parser(sub: Any, name: str, epilog: str, summary: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A sub-command's parser: its `summary` in the CLI's help, its `epilog` (examples, exit
    codes) kept as written, and its options allowed after its positional arguments."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, epilog=epilog, formatter_class=RAW, **kwargs
    )
    intermixed(parser)
    return parser


def load(args: argparse.Namespace) -> config.Config:
    cfg = wiring.load(args, OPS)
    logs.setup(cfg.log_level)
    return cfg


def need_bucket(cfg: config.Config) -> str:
    if not cfg.bucket:
        raise ConfigError(
            "no bucket: pass --bucket, set INSTANCE_AGENT_BUCKET or `bucket` in the config file"
        )
    return cfg.bucket


owner_args = s3args.owner_args


def s3_client(cfg: config.Config) -> Any:
    """An S3 client for reading backups, with a connection for each manifest reader."""
    from instance_agent import listing

    return wiring.s3_reader(cfg, listing.MANIFEST_READERS + 2)


def check_filters(args: argparse.Namespace) -> Filters:
    """--asg-name, --instance-id and --since, checked."""
    from instance_agent import listing

    group, instance = args.filter_group, args.filter_instance
    for opt_name, value, flag in (
        ("asg_name", group, "--asg-name"),
        ("instance_id", instance, "--instance-id"),
    ):
        check = schema.OPTION_BY_NAME[opt_name].check
        problem = check(value) if value is not None and check else None
        if problem:
            raise ConfigError(f"{flag}: {problem}")
    since = listing.parse_since(args.since) if getattr(args, "since", None) else None
    return listing.Filters(group=group, instance_id=instance, since=since)


def selection(args: argparse.Namespace) -> Selection:
    """--include and --exclude."""
    from instance_agent.restore import Selection

    return Selection(tuple(args.include), tuple(args.exclude))


def emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
