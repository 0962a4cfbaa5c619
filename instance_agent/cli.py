"""`instance-agent`: flags, logging, signals and AWS clients — wiring only.

This is the one module that builds boto3 clients. Every AgentError ends here as one line on
stderr and its exit code (0 ok/partial, 1 failed, 2 usage or config). stdout carries only the
`--json` result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

from instance_agent import __version__, config, logs
from instance_agent.errors import EXIT_USAGE, AgentError, ConfigError, IdentityError, IMDSError

PROG = "instance-agent"

EXAMPLES_BACKUP = """\
examples:
  instance-agent backup --bucket my-backups --topic-arn arn:aws:sns:…:ops --json
  instance-agent backup --bucket my-backups --source /var/log --source /srv/app/logs \\
      --max-duration 100 --no-complete
  INSTANCE_AGENT_BUCKET=my-backups instance-agent backup --lifecycle-token $TOKEN

exit codes: 0 succeeded or partial, 1 failed (reported and completed with --on-failure),
2 usage or configuration error (nothing was done). A duplicate exits with the first run's code.
"""

EXAMPLES_DEMO = """\
examples:
  instance-agent demo
  instance-agent demo --trigger lambda --size-mib 8
  instance-agent demo --detach --env-file demo.env && . ./demo.env && instance-agent list

Everything runs on 127.0.0.1 with fake credentials: a moto server (S3, SNS, SSM, Auto
Scaling) and an IMDSv2 stub. Nothing reaches AWS. exit codes: 0 passed, 1 failed.
"""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus a message and exits; we want one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def _add_schema_options(parser: argparse.ArgumentParser, command: str) -> None:
    for opt in config.OPTIONS:
        if command not in opt.commands:
            continue
        default = opt.default
        if isinstance(default, tuple):
            default = ":".join(default) if opt.kind == "pathlist" else ",".join(default)
        shown = "auto" if default is None and opt.name == "journal" else default
        help_text = f"{opt.help} (env {opt.env}" + (
            f"; default {shown})" if shown not in (None, "") else ")")
        help_text = help_text.replace("%", "%%")
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.name, default=None, help=help_text,
                                action=argparse.BooleanOptionalAction)
        elif opt.kind in ("list", "pathlist"):
            parser.add_argument(opt.flag, dest=opt.name, default=None, action="append",
                                metavar=opt.metavar or opt.name.upper(), help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.name, default=None,
                                metavar=opt.metavar or "|".join(opt.choices) or None,
                                help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Back up an EC2 instance to S3 before its Auto "
                     "Scaling group terminates it, report on SNS, complete the lifecycle action.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("backup", help="back up now, report, and complete the lifecycle action",
                       epilog=EXAMPLES_BACKUP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML config file (env INSTANCE_AGENT_CONFIG;"
                   f" default {config.DEFAULT_CONFIG_FILE} if it exists)")
    p.add_argument("--json", action="store_true", help="print the result object on stdout")
    _add_schema_options(p, config.BACKUP)
    p.set_defaults(func=cmd_backup)

    d = sub.add_parser("demo", help="run the whole story on a local emulated AWS (needs the "
                       "`local` extra)", epilog=EXAMPLES_DEMO,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--source", metavar="DIR", help="back up DIR instead of generated sample logs "
                   "(flag only; default: about --size-mib of generated logs)")
    d.add_argument("--size-mib", type=int, default=64, help="size of the generated sample logs "
                   "(flag only; default 64)")
    d.add_argument("--trigger", choices=("direct", "lambda", "watch"), default="direct",
                   help="who answers the termination: direct (the pipeline in this process, "
                   "after IMDSv2 says Terminated), lambda (the Lambda trigger, then the SSM "
                   "document run as the SSM agent would), watch (the `watch` daemon); "
                   "flag only; default direct")
    d.add_argument("--keep-running", action="store_true", help="afterwards keep the stand-in "
                   "up, with a fresh InService instance, until Ctrl-C or SIGTERM (flag only; "
                   "default off)")
    d.add_argument("--env-file", metavar="FILE", help="with --keep-running or --detach: write "
                   "the variables that point a shell at the stand-in to FILE (default with "
                   "--detach: demo.env; flag only)")
    d.add_argument("--detach", action="store_true", help="--keep-running in the background: "
                   "return once the stand-in is ready; stop it with kill $DEMO_PID (flag only; "
                   "default off)")
    d.set_defaults(func=cmd_demo)

    from instance_agent import ops_cli, watch_cli

    watch_cli.register(sub)
    ops_cli.register(sub)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {o.name: getattr(args, o.name, None) for o in config.OPTIONS}


def resolve_identity(cfg: config.Config, imds: Any = None) -> Any:
    """Instance id and region: config first, then IMDS; region may also come from the SDK.
    `imds` lets the caller reuse one IMDSv2 session (and its token) for later reads."""
    from instance_agent.backup import Identity
    from instance_agent.imds import IMDS

    instance_id, region = cfg.instance_id, cfg.region
    if instance_id and region:
        return Identity(instance_id, region)
    own = imds is None
    imds = imds or IMDS()
    try:
        if not instance_id:
            instance_id = imds.instance_id()
        if not region:
            try:
                region = imds.region()
                if not config.REGION_RE.match(region):
                    # An HTML error page from a proxy or a broken IMDS is not a region.
                    raise IdentityError(f"IMDS answered placement/region with {region[:40]!r}, "
                                        "which is not a region name; pass --region")
            except IMDSError:
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                if not region:
                    raise
    except IMDSError as err:
        raise IdentityError(f"cannot get the instance identity from IMDS at {imds.endpoint} "
                            f"({err}); pass --instance-id and --region") from None
    finally:
        if own:
            imds.close()
    return Identity(instance_id, region)


def make_clients(cfg: config.Config, region: str) -> Any:
    """boto3 clients with standard retries; endpoints from boto3's own settings
    (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, …)."""
    import boto3
    from botocore.config import Config as BotoConfig

    from instance_agent.backup import Clients

    session = boto3.session.Session(region_name=region)
    base = BotoConfig(
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5, read_timeout=60,
        max_pool_connections=cfg.upload_workers + 4,
        user_agent_extra=f"{PROG}/{__version__}",
    )
    # The stubs' TypedDict signatures are stricter than our small Protocols; the adapters'
    # tests cover the calls, so the clients cross this line untyped.
    client = cast(Any, session.client)
    return Clients(
        s3=client("s3", config=base),
        # The report comes before the completion and after the heartbeats: a black-holed
        # Publish may hold the hook ~24 s at most (3 x (3 + 5) s), not 6 x 65 s.
        sns=client("sns", config=base.merge(BotoConfig(
            connect_timeout=3, read_timeout=5,
            retries={"mode": "standard", "total_max_attempts": 3})))
        if cfg.topic_arn else None,
        autoscaling=client("autoscaling", config=base) if cfg.complete else None,
        cloudwatch=make_cloudwatch(cfg, region),
    )


def make_cloudwatch(cfg: config.Config, region: str) -> Any:
    """The CloudWatch client for the run's metrics; None with --no-metrics."""
    if not cfg.metrics:
        return None
    import boto3
    from botocore.config import Config as BotoConfig

    # After the lifecycle action is complete, so nothing waits on it; still short, so a
    # black-holed endpoint costs the process seconds, not minutes.
    return boto3.session.Session(region_name=region).client(
        "cloudwatch", config=BotoConfig(connect_timeout=3, read_timeout=5,
                                        retries={"mode": "standard", "total_max_attempts": 3},
                                        user_agent_extra=f"{PROG}/{__version__}"))


def read_lifecycle_state(cfg: config.Config, imds: Any) -> str | None:
    """IMDS's target-lifecycle-state, best effort: `Terminated` tells a run that Auto Scaling
    is about to hold the instance, even while its own API still says InService."""
    if not cfg.complete or cfg.lifecycle_token:
        return None  # nothing to complete, or the token already says so
    try:
        value = imds.get("autoscaling/target-lifecycle-state", timeout=0)
    except IMDSError:
        return None
    return value.strip() if value else None


def cmd_backup(args: argparse.Namespace) -> int:
    import threading

    from instance_agent import signals, termination

    cfg = config.load(_flags(args), os.environ, config_file=args.config, command=config.BACKUP)
    logs.setup(cfg.log_level)
    cancel = threading.Event()
    signals.cancel_on_signals(cancel)
    from instance_agent.imds import IMDS

    imds = IMDS()  # one IMDSv2 session: identity, then the lifecycle state
    try:
        ident = resolve_identity(cfg, imds)
        imds_state = read_lifecycle_state(cfg, imds)
    finally:
        imds.close()
    clients = make_clients(cfg, ident.region)
    opts = termination.Options(imds_state=imds_state, cancel=cancel,
                               progress_interval=5.0 if sys.stderr.isatty() else 30.0)
    outcome = termination.run(cfg, ident, clients, opts)
    if args.json:
        sys.stdout.write(json.dumps(outcome.result.to_json()) + "\n")
        sys.stdout.flush()
    return outcome.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from instance_agent.local import demo
    except ImportError as err:  # moto missing
        raise ConfigError(f"the demo needs the `local` extra: pip install "
                          f"'instance-agent[local]' ({err})") from None
    logs.setup("info")
    if args.detach:
        return demo.detach(source=args.source, size_mib=args.size_mib, trigger=args.trigger,
                           env_file=args.env_file or "demo.env")
    return demo.run(source=args.source, size_mib=args.size_mib, trigger=args.trigger,
                    keep_running=args.keep_running, env_file=args.env_file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except AgentError as err:
        sys.stderr.write(f"{PROG}: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_USAGE
