"""doctor's local checks: the config, the compression library, IMDS (token, hop limit) and
the instance's identity."""

from __future__ import annotations

import zlib

import requests

from instance_agent import config
from instance_agent.doctor_check import FAIL, OK, SKIP, Check, Context, Facts
from instance_agent.errors import ConfigError, IMDSError
from instance_agent.imds import DEFAULT_ENDPOINT, ENDPOINT_ENV

PROBE_TOKEN_TTL = 60  # seconds: the probe's token is used once


def check_config(ctx: Context, facts: Facts) -> Check:
    cfg = ctx.cfg
    where = cfg.config_file or "no config file"
    fix = (
        f"correct it in {where if cfg.config_file else 'the flags or environment'}; "
        "`instance-agent backup --help` lists every option with its variable"
    )
    if ctx.config_error:
        return Check("config", FAIL, ctx.config_error, fix)
    try:
        config.check_consistency(cfg, config.BACKUP)
    except ConfigError as err:
        return Check("config", FAIL, str(err), fix)
    return Check(
        "config",
        OK,
        f"valid ({where}); bucket {cfg.bucket}, prefix {cfg.prefix!r}, compression {cfg.compression}",
    )


def check_compression(ctx: Context, facts: Facts) -> Check:
    kind = ctx.cfg.compression
    sample = b"instance-agent doctor\n" * 256
    if kind == "none":
        return Check("compression", SKIP, "compression = none: nothing to load")
    if kind == "gzip":
        ok = zlib.decompress(zlib.compress(sample)) == sample
        return Check("compression", OK if ok else FAIL, f"zlib {zlib.ZLIB_RUNTIME_VERSION}")
    try:
        import zstandard

        packed = zstandard.ZstdCompressor(level=ctx.cfg.level or 3).compress(sample)
        ok = zstandard.ZstdDecompressor().decompress(packed) == sample
    except Exception as err:
        return Check(
            "compression",
            FAIL,
            f"cannot load zstandard: {err}",
            "install it into the agent's environment (/opt/instance-agent/bin/pip "
            'install zstandard), or set compression = "gzip"',
        )
    lib = ".".join(str(v) for v in zstandard.ZSTD_VERSION)
    return Check("compression", OK if ok else FAIL, f"zstandard {zstandard.__version__} (libzstd {lib})")


def check_imds(ctx: Context, facts: Facts) -> Check:
    endpoint = (ctx.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")
    found = Facts(imds_endpoint=endpoint)
    fix_enable = (
        "on the instance: aws ec2 modify-instance-metadata-options --instance-id "
        "<id> --http-endpoint enabled --http-tokens required; off EC2, pass "
        f"--instance-id and --region (and check {ENDPOINT_ENV})"
    )
    client = ctx.imds(endpoint)
    started = ctx.monotonic()
    try:
        answer = client.probe(ttl=PROBE_TOKEN_TTL)
    except requests.ConnectTimeout:
        return Check(
            "imds", FAIL, f"no answer from IMDS at {endpoint} (connect timed out)", fix_enable, found
        )
    except requests.ReadTimeout:
        # Connected, but the answer never came back: the classic sign of a response hop
        # limit too low for this network namespace (e.g. a container).
        return Check(
            "imds",
            FAIL,
            f"IMDS at {endpoint} accepted the connection but its token "
            "answer never arrived: the response hop limit is too low for this "
            "process (a container needs 2)",
            "aws ec2 modify-instance-metadata-options --instance-id <id> "
            "--http-put-response-hop-limit 2 (the template's launch template sets 2)",
            found,
        )
    except requests.RequestException as err:
        return Check(
            "imds", FAIL, f"IMDS at {endpoint} is unreachable ({type(err).__name__})", fix_enable, found
        )
    finally:
        client.close()
    ms = (ctx.monotonic() - started) * 1000
    if answer.token_status == 403:
        return Check(
            "imds",
            FAIL,
            "IMDS refused the IMDSv2 token request (403): the metadata "
            "endpoint is disabled or the request is blocked",
            fix_enable,
            found,
        )
    if answer.read_status is None:
        return Check(
            "imds", FAIL, f"IMDS token request answered HTTP {answer.token_status}", fix_enable, found
        )
    if answer.read_status != 200:
        return Check(
            "imds",
            FAIL,
            f"IMDS issued a token but refused a read with it (HTTP {answer.read_status})",
            fix_enable,
            found,
        )
    return Check(
        "imds",
        OK,
        f"IMDSv2 at {endpoint}: token and read in {ms:.0f} ms; the "
        "answer reached this process, so the hop limit is enough here",
        facts=Facts(imds_endpoint=endpoint, imds_ok=True),
    )


def check_identity(ctx: Context, facts: Facts) -> Check:
    cfg = ctx.cfg
    instance_id, region = cfg.instance_id, cfg.region
    source = "config"
    if (not instance_id or not region) and facts.imds_ok and facts.imds_endpoint:
        client = ctx.imds(facts.imds_endpoint)
        try:
            instance_id = instance_id or client.instance_id(timeout=3.0)
            region = region or client.region(timeout=3.0)
            source = "IMDS" if not (cfg.instance_id or cfg.region) else "config and IMDS"
        except IMDSError as err:
            return Check(
                "identity",
                FAIL,
                f"IMDS answered the token but not the identity: {err}",
                "pass --instance-id and --region",
                Facts(instance_id=instance_id, region=region),
            )
        finally:
            client.close()
    if not region:
        region = ctx.environ.get("AWS_REGION") or ctx.environ.get("AWS_DEFAULT_REGION")
    found = Facts(instance_id=instance_id, region=region)
    if not instance_id or not region:
        missing = " and ".join(n for n, v in (("instance id", instance_id), ("region", region)) if not v)
        return Check(
            "identity",
            FAIL,
            f"no {missing}: IMDS cannot tell, and the config does not say",
            "fix IMDS (above), or pass --instance-id and --region",
            found,
        )
    return Check("identity", OK, f"instance {instance_id}, region {region} (from {source})", facts=found)
