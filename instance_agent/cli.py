"""`instance-agent`: the parser, `backup`, `demo`, signals and the exit code — wiring only.

The top of the import graph: it registers the sub-commands of ops_cli.py and watch_cli.py,
and nothing imports it back; what they share (schema options, clients, identity) is in
wiring.py, the one module that builds boto3 clients. Every AgentError ends here as one line on
stderr and its exit code (0 ok/partial, 1 failed, 2 usage or config). stdout carries only the
`--json` result.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from instance_agent import __version__, config, handoff_cli, launch_gate, logs, ops_cli, watch_cli, wiring
from instance_agent.errors import EXIT_USAGE, AgentError, ConfigError
from instance_agent.wiring import PROG

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
        # main() prefixes "instance-agent: error:"; a subcommand's parser adds its own name
        # ("restore: ..."), the top-level one nothing, so the program is named once.
        command = self.prog.removeprefix(PROG).strip()
        raise ConfigError(f"{command}: {message}" if command else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Back up an EC2 instance to S3 before its Auto "
        "Scaling group terminates it, report on SNS, complete the lifecycle action.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "backup",
        help="back up now, report, and complete the lifecycle action",
        epilog=EXAMPLES_BACKUP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wiring.add_config_option(p)
    p.add_argument("--json", action="store_true", help="print the result object on stdout")
    wiring.add_schema_options(p, config.BACKUP)
    p.set_defaults(func=cmd_backup)

    d = sub.add_parser(
        "demo",
        help="run the whole story on a local emulated AWS (needs the `local` extra)",
        epilog=EXAMPLES_DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "--source",
        metavar="DIR",
        help="back up DIR instead of generated sample logs "
        "(flag only; default: about --size-mib of generated logs)",
    )
    d.add_argument(
        "--size-mib", type=int, default=64, help="size of the generated sample logs (flag only; default 64)"
    )
    d.add_argument(
        "--trigger",
        choices=("direct", "lambda", "watch"),
        default="direct",
        help="who answers the termination: direct (the pipeline in this process, "
        "after IMDSv2 says Terminated), lambda (the Lambda trigger, then the SSM "
        "document run as the SSM agent would), watch (the `watch` daemon); "
        "flag only; default direct",
    )
    d.add_argument(
        "--keep-running",
        action="store_true",
        help="afterwards keep the stand-in "
        "up, with a fresh InService instance, until Ctrl-C or SIGTERM (flag only; "
        "default off)",
    )
    d.add_argument(
        "--env-file",
        metavar="FILE",
        help="with --keep-running or --detach: write "
        "the variables that point a shell at the stand-in to FILE (default with "
        "--detach: demo.env; flag only)",
    )
    d.add_argument(
        "--detach",
        action="store_true",
        help="--keep-running in the background: "
        "return once the stand-in is ready; stop it with kill $DEMO_PID (flag only; "
        "default off)",
    )
    d.set_defaults(func=cmd_demo)

    watch_cli.register(sub)
    ops_cli.register(sub)
    handoff_cli.register(sub)
    launch_gate.add_parser(sub)
    return parser


def cmd_backup(args: argparse.Namespace) -> int:
    import gc
    import threading

    from instance_agent import signals, termination
    from instance_agent.imds import IMDS

    cfg = wiring.load(args, config.BACKUP)
    logs.setup(cfg.log_level)
    cancel = threading.Event()
    signals.cancel_on_signals(cancel)
    wants_state = wiring.wants_lifecycle_state(cfg)
    # Building the clients allocates botocore's models, objects that live as long as the
    # process: collections while they are built find nothing to free (about 0.03 CPU-s), and
    # frozen afterwards they are left out of every later pass.
    gc.disable()
    try:
        # One IMDSv2 session for the identity and the lifecycle state, and none at all when
        # the config names the instance and no state is wanted.
        imds = IMDS() if wants_state or not (cfg.instance_id and cfg.region) else None
        try:
            ident = wiring.resolve_identity(cfg, imds)
            imds_state = wiring.read_lifecycle_state(imds) if imds is not None and wants_state else None
        finally:
            if imds is not None:
                imds.close()
        clients = wiring.make_clients(cfg, ident.region)
    finally:
        gc.freeze()
        gc.enable()
    opts = termination.Options(
        imds_state=imds_state, cancel=cancel, progress_interval=5.0 if sys.stderr.isatty() else 30.0
    )
    outcome = termination.run(cfg, ident, clients, opts)
    if args.json:
        sys.stdout.write(json.dumps(outcome.result.to_json()) + "\n")
        sys.stdout.flush()
    return outcome.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from instance_agent.local import demo
    except ImportError as err:  # moto missing
        raise ConfigError(
            f"the demo needs the `local` extra: pip install 'instance-agent[local]' ({err})"
        ) from None
    logs.setup("info")
    if args.detach:
        return demo.detach(
            source=args.source,
            size_mib=args.size_mib,
            trigger=args.trigger,
            env_file=args.env_file or "demo.env",
        )
    return demo.run(
        source=args.source,
        size_mib=args.size_mib,
        trigger=args.trigger,
        keep_running=args.keep_running,
        env_file=args.env_file,
    )


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
