"""What every command shares between its flags and its work: schema options, clients, identity.

cli.py, ops_cli.py, watch_cli.py and the local demo all import from here, and this module
imports only downward (config, the clients bundle, the identity, imds), so no command module
needs to import cli.py back. It is the one place that builds AWS clients.

botocore and IMDS's requests are imported inside the functions that need them: parsing
flags (and `--help`) must stay fast and work without them loaded.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from instance_agent import __version__, config, schema
from instance_agent.clients import Clients
from instance_agent.configchecks import REGION_RE
from instance_agent.errors import IdentityError, IMDSError
from instance_agent.identity import Identity

if TYPE_CHECKING:
    from botocore.config import Config as BotoConfig

    from instance_agent.imds import IMDS

PROG = "instance-agent"


def add_config_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    """`--config FILE`, the same on every command that reads the config."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML config file{note} (env "
        f"INSTANCE_AGENT_CONFIG; default {config.DEFAULT_CONFIG_FILE} if it "
        "exists)",
    )


def add_option(parser: argparse.ArgumentParser, name: str, help_text: str | None = None) -> None:
    """One option of the config schema as a flag, its help showing its env var and default.

    Flags default to None so that config.load can tell "not given" from a value and apply
    flag > environment > file > default itself."""
    opt = schema.OPTION_BY_NAME[name]
    default = opt.default
    if isinstance(default, tuple):
        default = ":".join(default) if opt.kind == "pathlist" else ",".join(default)
    shown = "auto" if default is None and opt.name == "journal" else default
    text = f"{help_text or opt.help} (env {opt.env}" + (
        f"; default {shown})" if shown not in (None, "") else ")"
    )
    text = text.replace("%", "%%")  # argparse formats help with %
    if opt.kind == "bool":
        parser.add_argument(
            opt.flag, dest=opt.name, default=None, help=text, action=argparse.BooleanOptionalAction
        )
    elif opt.kind in ("list", "pathlist"):
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            default=None,
            action="append",
            metavar=opt.metavar or opt.name.upper(),
            help=text,
        )
    else:
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            default=None,
            metavar=opt.metavar or "|".join(opt.choices) or None,
            help=text,
        )


def add_schema_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Every option of the config schema that `command` reads."""
    for opt in schema.OPTIONS:
        if command in opt.commands:
            add_option(parser, opt.name)


def flags(args: argparse.Namespace) -> dict[str, Any]:
    """The schema's options from parsed arguments, None where not given, for config.load."""
    return {o.name: getattr(args, o.name, None) for o in schema.OPTIONS}


def resolve_identity(cfg: config.Config, imds: IMDS | None = None) -> Identity:
    """Instance id and region: config first, then IMDS; region may also come from the SDK.
    `imds` lets the caller reuse one IMDSv2 session (and its token) for later reads."""
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
                if not REGION_RE.match(region):
                    # An HTML error page from a proxy or a broken IMDS is not a region.
                    raise IdentityError(
                        f"IMDS answered placement/region with {region[:40]!r}, "
                        "which is not a region name; pass --region"
                    )
            except IMDSError:
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                if not region:
                    raise
    except IMDSError as err:
        raise IdentityError(
            f"cannot get the instance identity from IMDS at {imds.endpoint} "
            f"({err}); pass --instance-id and --region"
        ) from None
    finally:
        if own:
            imds.close()
    return Identity(instance_id, region)


def wants_lifecycle_state(cfg: config.Config) -> bool:
    """Whether a run should read IMDS's target-lifecycle-state: only when it may complete an
    action and has no token (a token already says the instance is leaving)."""
    return cfg.complete and not cfg.lifecycle_token


def read_lifecycle_state(imds: IMDS) -> str | None:
    """IMDS's target-lifecycle-state, best effort: `Terminated` tells a run that Auto Scaling
    is about to hold the instance, even while its own API still says InService."""
    try:
        value = imds.get("autoscaling/target-lifecycle-state", timeout=0)
    except IMDSError:
        return None
    return value.strip() if value else None


def _boto_config(max_pool_connections: int) -> BotoConfig:
    """Standard retries and bounded timeouts; endpoints come from boto3's own settings
    (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, …)."""
    from botocore.config import Config as BotoConfig

    return BotoConfig(
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=max_pool_connections,
        user_agent_extra=f"{PROG}/{__version__}",
    )


def _client_factory(region: str | None) -> Any:
    import botocore.session

    # botocore's session, not boto3's: the same clients, credential chain and endpoint
    # settings, without importing boto3's resource layer and s3transfer (about 0.05 CPU-s of
    # a one-shot run). boto3 stays the declared dependency: it brings botocore, and the demo
    # uses it. One session per call: the clients it builds share its loader, so the
    # endpoint, partition and retry data are parsed once and the model directories listed
    # once, not per client.
    session = botocore.session.Session()

    def client(name: str, **kwargs: Any) -> Any:
        # The stubs' TypedDict signatures are stricter than our small Protocols; the
        # adapters' tests cover the calls, so the clients cross this line untyped.
        return session.create_client(name, region_name=region, **kwargs)

    return client


def make_probe_clients(cfg: config.Config, region: str) -> Clients:
    """`doctor`'s clients: each probe call answers or fails within 2 x (3 + 10) s, so a
    black-holed endpoint fails `doctor --launch` in well under a minute, not after 5 x 65 s
    per call (the launching hook's timeout is 900 s)."""
    return make_clients(cfg, region, probe=True)


def make_clients(cfg: config.Config, region: str, *, probe: bool = False) -> Clients:
    """The pipeline's clients: S3 always, SNS with a topic, Auto Scaling when completing, and
    CloudWatch (unless --no-metrics) built on its first call."""
    from botocore.config import Config as BotoConfig

    base = _boto_config(cfg.upload_workers + 4)
    if probe:
        base = base.merge(
            BotoConfig(
                connect_timeout=3, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 2}
            )
        )
    client = _client_factory(region)
    return Clients(
        s3=client("s3", config=base),
        # The report comes before the completion and after the heartbeats: a black-holed
        # Publish may hold the hook ~24 s at most (3 x (3 + 5) s), not 6 x 65 s.
        sns=client(
            "sns",
            config=base.merge(
                BotoConfig(
                    connect_timeout=3, read_timeout=5, retries={"mode": "standard", "total_max_attempts": 3}
                )
            ),
        )
        if cfg.topic_arn
        else None,
        autoscaling=client("autoscaling", config=base) if cfg.complete else None,
        cloudwatch=_LazyCloudWatch(client) if cfg.metrics else None,
    )


class _LazyCloudWatch:
    """The CloudWatch client, built when the run has metrics to publish. Most one-shot runs
    have none (an ad-hoc backup outside a group, a duplicate), and building a client costs
    about 0.1 CPU-second of model loading, on the same cores as the backup."""

    def __init__(self, client: Callable[..., Any]) -> None:
        self._client = client
        self._built: Any = None

    def put_metric_data(self, **kwargs: Any) -> Mapping[str, Any]:
        if self._built is None:
            from botocore.config import Config as BotoConfig

            # Built before the lifecycle completion, which waits on it at most
            # metrics.PUBLISH_BOUND (a worker thread); short timeouts still, so a
            # black-holed endpoint's worker gives up in seconds, not minutes.
            self._built = self._client(
                "cloudwatch",
                config=BotoConfig(
                    connect_timeout=3,
                    read_timeout=5,
                    retries={"mode": "standard", "total_max_attempts": 3},
                    user_agent_extra=f"{PROG}/{__version__}",
                ),
            )
        return cast(Mapping[str, Any], self._built.put_metric_data(**kwargs))


def s3_reader(cfg: config.Config, connections: int) -> Any:
    """An S3 client for reading backups. The region is the config's, else the SDK's own
    (AWS_REGION, ~/.aws/config): an operator's laptop has no IMDS to ask."""
    return _client_factory(cfg.region or None)("s3", config=_boto_config(connections))


def load(args: argparse.Namespace, command: str) -> config.Config:
    """The config a command's parsed arguments ask for: flags over environment over file."""
    return config.load(flags(args), os.environ, config_file=args.config, command=command)
