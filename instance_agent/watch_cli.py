"""Sub-commands of the watcher: `watch` (the daemon) and `install-service` (its unit).

Wiring only, as in cli.py: flags to config, logging, and wiring.py's identity and client
factories handed to the daemon (only wiring.py builds boto3 clients). The daemon itself
(watch.py) is imported only when it runs.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from instance_agent import config, logs, wiring
from instance_agent.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from instance_agent.config import Config

EXAMPLES_WATCH = """\
examples:
  instance-agent watch --bucket my-backups --topic-arn arn:aws:sns:…:ops
  instance-agent watch --config /etc/instance-agent/agent.toml --poll-interval 5 \\
      --drain-path /srv/worker/busy --drain-timeout 900 \\
      --pre-command 'systemctl stop myapp' --post-command 'logger backup done'
  instance-agent watch --bucket my-backups --no-spot --on-rebalance backup

It polls IMDSv2 for its own termination (target-lifecycle-state), Spot interruption and
rebalance notices, and runs the same backup as `instance-agent backup`, with the same lock:
whichever of the two starts first does the work, the other reports `duplicate`.
Signals: SIGTERM/SIGINT stop it (a running backup gets --stop-grace, then is aborted,
reported and completed with --on-failure); SIGHUP reloads the config file.
"""

EXAMPLES_INSTALL = """\
examples:
  instance-agent install-service --bucket my-backups --topic-arn arn:aws:sns:…:ops
  instance-agent install-service --root /mnt/image --no-start --bucket my-backups
  instance-agent install-service --dry-run --bucket my-backups --drain-path /srv/busy

Writes /etc/systemd/system/instance-agent.service and /etc/instance-agent/agent.toml (from
the flags given; without any, an existing agent.toml is kept), then runs
`systemctl daemon-reload` and `systemctl enable --now instance-agent.service`.
Running it again with the same flags changes nothing.
"""


def register(sub: Any) -> None:
    """Add the watcher's sub-commands to the CLI's sub-parser collection."""
    w = sub.add_parser(
        "watch",
        help="watch IMDS for termination and Spot notices, back up then (the systemd service)",
        epilog=EXAMPLES_WATCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wiring.add_config_option(w, ", re-read on SIGHUP")
    wiring.add_schema_options(w, config.WATCH)
    w.set_defaults(func=cmd_watch)

    s = sub.add_parser(
        "install-service",
        help="install the systemd unit and agent.toml",
        epilog=EXAMPLES_INSTALL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--root",
        metavar="DIR",
        default="/",
        help="write under DIR instead of / "
        "(like systemctl --root); systemctl then only enables the unit there",
    )
    s.add_argument(
        "--no-start",
        action="store_true",
        help="do not run systemctl; enable the unit with its WantedBy symlink instead (CI, AMI bakes)",
    )
    s.add_argument(
        "--dry-run", action="store_true", help="print what would change and the rendered files; write nothing"
    )
    s.add_argument(
        "--exec-path",
        metavar="PATH",
        help="the instance-agent executable for ExecStart (default: the one beside this Python)",
    )
    s.add_argument(
        "--watchdog-sec",
        metavar="SECONDS",
        type=int,
        default=30,
        help="WatchdogSec= of the unit (default 30)",
    )
    wiring.add_schema_options(s, config.WATCH)
    s.set_defaults(func=cmd_install_service)


def cmd_watch(args: argparse.Namespace) -> int:
    cfg = wiring.load(args, config.WATCH)
    logs.setup(cfg.log_level)

    def reload() -> Config:
        # The same flags over a freshly read file and environment: flags still win.
        return wiring.load(args, config.WATCH)

    return run_watcher(cfg, reload)


def run_watcher(cfg: Config, reload: Callable[[], Config] | None = None) -> int:
    """The daemon with wiring.py's factories; `reload` returns a new Config (SIGHUP)."""
    from instance_agent import launch_gate, watch, watch_job

    return watch.serve(
        cfg,
        watch_job.Deps(
            resolve_identity=wiring.resolve_identity,
            make_clients=wiring.make_clients,
            reload=reload,
            answer_launch=launch_gate.answer_from_watcher,
        ),
    )


def cmd_install_service(args: argparse.Namespace) -> int:
    from pathlib import Path

    from instance_agent import install_service

    if args.watchdog_sec < 1:
        raise ConfigError("--watchdog-sec must be at least 1")
    exec_start = [os.path.abspath(args.exec_path)] if args.exec_path else install_service.default_exec_start()
    installer = install_service.Installer(
        root=Path(os.path.abspath(args.root)),
        flags=wiring.flags(args),
        exec_start=exec_start,
        watchdog_sec=args.watchdog_sec,
        start=not args.no_start,
        dry_run=args.dry_run,
    )
    return installer.run()
