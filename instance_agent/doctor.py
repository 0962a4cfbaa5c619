"""`instance-agent doctor`: check, before it is needed, everything a backup will need here.

One line per check: ✓ it works, ✗ it is broken (with the fix), ! it works but lacks
something worth knowing (with what to do; not a failure), – skipped (with the reason: not
applicable here, or it depends on a check that failed). Exit 0 only when nothing is ✗.

The permission probes are harmless and ask for nothing the backup does not need itself:
- S3: CreateMultipartUpload under the prefix, with the backup's encryption, storage class
  and expected owner, then AbortMultipartUpload of it. That proves s3:PutObject (which every
  part and the manifest need) and the abort a failed backup needs. Nothing is stored. Then
  ListMultipartUploads under the prefix, which a run after a crash uses to find the killed
  run's upload.
- Auto Scaling: the two describe calls hook discovery makes, and RecordLifecycleActionHeartbeat.
  While the instance is not terminating AWS authorises that call, then answers "No active
  Lifecycle Action": the permission is proven and nothing changes. CompleteLifecycleAction is
  never probed: on a terminating instance it would end the real action.
- SNS: the instance role grants only sns:Publish (no GetTopicAttributes), so only a message
  proves the topic; doctor sends one only with --publish-test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import __version__, awserror, config, s3args, status
from instance_agent.config import Config
from instance_agent.errors import AgentError, ConfigError, IMDSError
from instance_agent.imds import DEFAULT_ENDPOINT, ENDPOINT_ENV, IMDS, TOKEN_HEADER, TTL_HEADER
from instance_agent.install_service import UNIT_NAME
from instance_agent.lifecycle import TERMINATING_WAIT, HookTarget, default_interval, discover, instance_state

# WARN: works here, but something worth knowing is missing; it does not fail doctor.
OK, FAIL, SKIP, WARN = "ok", "fail", "skip", "warn"
SYMBOLS = {OK: "✓", FAIL: "✗", SKIP: "–", WARN: "!"}
WORDS = {OK: "ok", FAIL: "FAIL", SKIP: "skip", WARN: "warn"}  # for terminals that cannot show the symbols
# IMDS answers in milliseconds on an instance; 1 s to connect and 2 s to answer tell a dead
# or misrouted endpoint from a slow one without making doctor slow off EC2.
IMDS_TIMEOUT = (1.0, 2.0)
PROBE_TOKEN_TTL = 60  # seconds: the probe's token is used once
SSM_UNITS = ("amazon-ssm-agent.service", "snap.amazon-ssm-agent.amazon-ssm-agent.service")
SSM_COMM = "amazon-ssm-agen"  # /proc/*/comm keeps 15 characters
HOOK_NAME_HINT = "instance-agent-backup"


@dataclass
class Check:
    name: str
    result: str  # ok | fail | skip
    message: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "result": self.result,
            "symbol": SYMBOLS[self.result],
            "message": self.message,
            "fix": self.fix,
        }


_code, _describe, _denied = awserror.code_of, awserror.describe, awserror.denied


def _systemctl(args: list[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return 1, str(err)
    return proc.returncode, proc.stdout.strip()


def systemd_booted() -> bool:
    """sd_booted(): systemd is PID 1 exactly when this directory exists."""
    return os.path.isdir("/run/systemd/system")


def _process_running(comm: str) -> int | None:
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
                if fh.read().strip() == comm:
                    return int(pid)
        except OSError:
            continue
    return None


@dataclass
class Doctor:
    """Runs the checks in order; later checks use what earlier ones found."""

    cfg: Config
    config_error: str | None
    make_clients: Callable[[Config, str], Any]
    publish_test: bool = False
    launch: bool = False  # --launch: the launching hook's gate (check_lifecycle_permission)
    systemctl: Callable[[list[str]], tuple[int, str]] = _systemctl
    booted: Callable[[], bool] = systemd_booted
    checks: list[Check] = field(default_factory=list)
    imds_endpoint: str = ""
    imds_ok: bool = False
    instance_id: str | None = None
    region: str | None = None
    clients: Any = None
    target: HookTarget | None = None
    state: str | None = None

    def add(self, name: str, result: str, message: str, fix: str | None = None) -> None:
        self.checks.append(Check(name, result, message, fix))

    def run(self) -> list[Check]:
        for step in (
            self.check_config,
            self.check_compression,
            self.check_imds,
            self.check_identity,
            self.check_hook,
            self.check_lifecycle_permission,
            self.check_bucket_and_upload,
            self.check_topic,
            self.check_ssm_agent,
            self.check_systemd_unit,
            self.check_shipping,
            self.check_retained,
        ):
            try:
                step()
            except Exception as err:  # one broken check must not hide the others
                self.add(
                    step.__name__.removeprefix("check_").replace("_", " "),
                    FAIL,
                    f"the check itself failed: {type(err).__name__}: {err}",
                    "report this as a bug, with the output of --json",
                )
        return self.checks

    @property
    def on_ec2(self) -> bool:
        return self.imds_ok and self.imds_endpoint == DEFAULT_ENDPOINT

    def _not_ec2(self) -> str:
        if self.imds_ok:
            return f"not an EC2 instance: IMDS at {self.imds_endpoint} is a stand-in"
        return "not on an EC2 instance, as far as IMDS can tell (see imds)"

    # -- local ------------------------------------------------------------------------------
    def check_config(self) -> None:
        where = self.cfg.config_file or "no config file"
        fix = (
            f"correct it in {where if self.cfg.config_file else 'the flags or environment'}; "
            "`instance-agent backup --help` lists every option with its variable"
        )
        if self.config_error:
            self.add("config", FAIL, self.config_error, fix)
            return
        try:
            config.check_consistency(self.cfg, config.BACKUP)
        except ConfigError as err:
            self.add("config", FAIL, str(err), fix)
            return
        self.add(
            "config",
            OK,
            f"valid ({where}); bucket {self.cfg.bucket}, prefix "
            f"{self.cfg.prefix!r}, compression {self.cfg.compression}",
        )

    def check_compression(self) -> None:
        kind = self.cfg.compression
        sample = b"instance-agent doctor\n" * 256
        if kind == "none":
            self.add("compression", SKIP, "compression = none: nothing to load")
        elif kind == "gzip":
            ok = zlib.decompress(zlib.compress(sample)) == sample
            self.add("compression", OK if ok else FAIL, f"zlib {zlib.ZLIB_RUNTIME_VERSION}")
        else:
            try:
                import zstandard

                packed = zstandard.ZstdCompressor(level=self.cfg.level or 3).compress(sample)
                ok = zstandard.ZstdDecompressor().decompress(packed) == sample
            except Exception as err:
                self.add(
                    "compression",
                    FAIL,
                    f"cannot load zstandard: {err}",
                    "install it into the agent's environment (/opt/instance-agent/bin/pip "
                    'install zstandard), or set compression = "gzip"',
                )
                return
            lib = ".".join(str(v) for v in zstandard.ZSTD_VERSION)
            self.add("compression", OK if ok else FAIL, f"zstandard {zstandard.__version__} (libzstd {lib})")

    # -- instance metadata --------------------------------------------------------------
    def check_imds(self) -> None:
        endpoint = (os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")
        self.imds_endpoint = endpoint
        fix_enable = (
            "on the instance: aws ec2 modify-instance-metadata-options --instance-id "
            "<id> --http-endpoint enabled --http-tokens required; off EC2, pass "
            f"--instance-id and --region (and check {ENDPOINT_ENV})"
        )
        session = requests.Session()
        session.trust_env = False  # never through a proxy, like the agent's own client
        started = time.monotonic()
        try:
            resp = session.put(
                f"{endpoint}/latest/api/token",
                timeout=IMDS_TIMEOUT,
                headers={TTL_HEADER: str(PROBE_TOKEN_TTL)},
            )
            token = resp.text if resp.status_code == 200 else None
            if token:
                check = session.get(
                    f"{endpoint}/latest/meta-data/instance-id",
                    headers={TOKEN_HEADER: token},
                    timeout=IMDS_TIMEOUT,
                )
        except requests.ConnectTimeout:
            self.add("imds", FAIL, f"no answer from IMDS at {endpoint} (connect timed out)", fix_enable)
            return
        except requests.ReadTimeout:
            # Connected, but the answer to the PUT never came back: the classic sign of a
            # response hop limit too low for this network namespace (e.g. a container).
            self.add(
                "imds",
                FAIL,
                f"IMDS at {endpoint} accepted the connection but its token "
                "answer never arrived: the response hop limit is too low for this "
                "process (a container needs 2)",
                "aws ec2 modify-instance-metadata-options --instance-id <id> "
                "--http-put-response-hop-limit 2 (the template's launch template sets 2)",
            )
            return
        except requests.RequestException as err:
            self.add("imds", FAIL, f"IMDS at {endpoint} is unreachable ({type(err).__name__})", fix_enable)
            return
        finally:
            session.close()
        ms = (time.monotonic() - started) * 1000
        if resp.status_code == 403:
            self.add(
                "imds",
                FAIL,
                "IMDS refused the IMDSv2 token request (403): the metadata "
                "endpoint is disabled or the request is blocked",
                fix_enable,
            )
        elif not token:
            self.add("imds", FAIL, f"IMDS token request answered HTTP {resp.status_code}", fix_enable)
        elif check.status_code != 200:
            self.add(
                "imds",
                FAIL,
                f"IMDS issued a token but refused a read with it (HTTP {check.status_code})",
                fix_enable,
            )
        else:
            self.imds_ok = True
            self.add(
                "imds",
                OK,
                f"IMDSv2 at {endpoint}: token and read in {ms:.0f} ms; the "
                "answer reached this process, so the hop limit is enough here",
            )

    def check_identity(self) -> None:
        cfg = self.cfg
        self.instance_id, self.region = cfg.instance_id, cfg.region
        source = "config"
        if (not self.instance_id or not self.region) and self.imds_ok:
            client = IMDS(self.imds_endpoint)
            try:
                self.instance_id = self.instance_id or client.instance_id(timeout=3.0)
                self.region = self.region or client.region(timeout=3.0)
                source = "IMDS" if not (cfg.instance_id or cfg.region) else "config and IMDS"
            except IMDSError as err:
                self.add(
                    "identity",
                    FAIL,
                    f"IMDS answered the token but not the identity: {err}",
                    "pass --instance-id and --region",
                )
                return
            finally:
                client.close()
        if not self.region:
            self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not self.instance_id or not self.region:
            missing = " and ".join(
                n for n, v in (("instance id", self.instance_id), ("region", self.region)) if not v
            )
            self.add(
                "identity",
                FAIL,
                f"no {missing}: IMDS cannot tell, and the config does not say",
                "fix IMDS (above), or pass --instance-id and --region",
            )
            return
        self.add("identity", OK, f"instance {self.instance_id}, region {self.region} (from {source})")

    # -- AWS ------------------------------------------------------------------------------
    def _clients(self) -> Any:
        if self.clients is None and self.region:
            self.clients = self.make_clients(self.cfg, self.region)
        return self.clients

    def check_hook(self) -> None:
        name = "lifecycle hook"
        if not self.cfg.complete:
            self.add(name, SKIP, "complete = false: this agent completes no lifecycle action")
            return
        if not self.instance_id or not self._clients():
            self.add(name, SKIP, "needs the instance id and region (see identity)")
            return
        client = self.clients.autoscaling
        describe_fix = (
            "allow autoscaling:DescribeAutoScalingInstances and "
            'autoscaling:DescribeLifecycleHooks on "*" in the instance role '
            "(packaging/template.yaml, statement DiscoverHook)"
        )
        try:
            found = instance_state(client, self.instance_id)
        except AgentError as err:
            self.add(
                name,
                FAIL,
                str(err),
                describe_fix
                if err.code in awserror.DENIED_CODES
                else "check the network path to the Auto Scaling endpoint",
            )
            return
        if found is None:
            self.add(
                name,
                FAIL,
                f"instance {self.instance_id} is in no Auto Scaling group: "
                "nothing will trigger a backup or wait for one",
                f"launch it from the group, or: aws autoscaling attach-instances "
                f"--instance-ids {self.instance_id} --auto-scaling-group-name <group>; on a "
                "host outside any group, set complete = false",
            )
            return
        group, self.state = found
        if self.cfg.asg_name and self.cfg.asg_name != group:
            self.add(
                name,
                FAIL,
                f"asg_name is {self.cfg.asg_name!r}, but the instance is in {group!r}",
                f'set asg_name = "{group}", or remove it to discover it',
            )
            return
        try:
            target = discover(client, self.instance_id, group=group, hook=self.cfg.hook_name, token=None)
        except AgentError as err:
            self.add(
                name,
                FAIL,
                str(err),
                describe_fix
                if err.code in awserror.DENIED_CODES
                else "set hook_name to the group's terminating hook",
            )
            return
        if target is None:
            self.add(
                name,
                FAIL,
                f"group {group} has no terminating lifecycle hook: the instance "
                "would be gone before any backup",
                f"aws autoscaling put-lifecycle-hook --auto-scaling-group-name {group} "
                f"--lifecycle-hook-name {HOOK_NAME_HINT} --lifecycle-transition "
                "autoscaling:EC2_INSTANCE_TERMINATING --heartbeat-timeout 900 "
                "--default-result ABANDON",
            )
            return
        self.target = target
        interval = self.cfg.heartbeat_interval or default_interval(target.heartbeat_timeout)
        self.add(
            name,
            OK,
            f"group {group}, hook {target.hook}, heartbeat timeout "
            f"{target.heartbeat_timeout} s (heartbeats every {interval:g} s); the "
            f"instance is {self.state}",
        )

    def check_lifecycle_permission(self) -> None:
        name = "lifecycle permission"
        if self.target is None:
            self.add(
                name,
                SKIP,
                "needs the lifecycle hook (see lifecycle hook)" if self.cfg.complete else "complete = false",
            )
            return
        if self.launch:
            # The probe heartbeats the terminating hook, which has no action while the
            # instance launches; the user data's CompleteLifecycleAction of the launching
            # hook uses the same statement on the same group, and proves it right after.
            self.add(
                name,
                SKIP,
                "--launch: no terminating action to probe; completing the "
                "launching hook proves CompleteLifecycleAction on the group",
            )
            return
        ids = {
            "AutoScalingGroupName": self.target.group,
            "LifecycleHookName": self.target.hook,
            "InstanceId": self.target.instance_id,
        }
        fix = (
            "allow autoscaling:RecordLifecycleActionHeartbeat and "
            "autoscaling:CompleteLifecycleAction on the group in the instance role "
            "(packaging/template.yaml, statement CompleteOwnLifecycleAction)"
        )
        try:
            self.clients.autoscaling.record_lifecycle_action_heartbeat(**ids)
        except ClientError as err:
            msg = str(err.response.get("Error", {}).get("Message", ""))
            if _code(err) == "ValidationError" and msg.startswith("No active Lifecycle Action"):
                self.add(
                    name,
                    OK,
                    "RecordLifecycleActionHeartbeat is allowed (AWS found no "
                    "active action, as expected while the instance is not terminating); "
                    "CompleteLifecycleAction is not probed: it would end a real action",
                )
            else:
                self.add(
                    name,
                    FAIL,
                    f"RecordLifecycleActionHeartbeat: {_describe(err)}",
                    fix if _denied(err) else None,
                )
            return
        except BotoCoreError as err:
            self.add(
                name,
                FAIL,
                f"RecordLifecycleActionHeartbeat: {_describe(err)}",
                "check the network path to the Auto Scaling endpoint",
            )
            return
        waiting = self.state in TERMINATING_WAIT
        self.add(
            name,
            OK,
            "RecordLifecycleActionHeartbeat works"
            + (
                " (the instance is terminating: this heartbeat extended its hook's timeout)"
                if waiting
                else ""
            ),
        )

    def check_bucket_and_upload(self) -> None:
        cfg = self.cfg
        if not cfg.bucket:
            self.add("bucket", SKIP, "no bucket configured (see config)")
            self.add("s3 permissions", SKIP, "no bucket configured")
            return
        if not self._clients():
            self.add("bucket", SKIP, "needs the region (see identity)")
            self.add("s3 permissions", SKIP, "needs the region (see identity)")
            return
        from instance_agent.backup import _s3_extra

        s3 = self.clients.s3
        where = f"s3://{cfg.bucket}/{cfg.prefix}"
        key = f"{cfg.prefix}.instance-agent-doctor/{self.instance_id or 'unknown'}/{uuid.uuid4().hex}"
        extra = _s3_extra(cfg)
        owner = s3args.owner_args(cfg)
        write_fix = (
            f"allow s3:PutObject and s3:AbortMultipartUpload on arn:aws:s3:::{cfg.bucket}/"
            f"{cfg.prefix}* in the instance role (packaging/template.yaml, statement "
            "WriteBackups)"
        )
        if cfg.expected_bucket_owner:
            write_fix += (
                f"; S3 also answers AccessDenied when account "
                f"{cfg.expected_bucket_owner} does not own the bucket"
            )
        if cfg.sse == "aws:kms":
            write_fix += "; with SSE-KMS the role needs kms:GenerateDataKey and kms:Decrypt on the key"
        try:
            upload_id = s3.create_multipart_upload(Bucket=cfg.bucket, Key=key, **extra)["UploadId"]
        except (ClientError, BotoCoreError) as err:
            code = _code(err)
            if code == "NoSuchBucket":
                self.add(
                    "bucket",
                    FAIL,
                    f"bucket {cfg.bucket} does not exist",
                    f"create it (packaging/template.yaml makes one), or fix `bucket` in "
                    f"{cfg.config_file or 'the flags or environment'}",
                )
                self.add("s3 permissions", SKIP, "no bucket to probe")
            elif _denied(err):
                self.add("bucket", SKIP, "cannot tell: S3 refused the probe (see s3 permissions)")
                self.add(
                    "s3 permissions",
                    FAIL,
                    f"CreateMultipartUpload under {where} was "
                    f"denied ({_describe(err)}): the backup could not upload",
                    write_fix,
                )
            else:
                self.add(
                    "bucket",
                    FAIL,
                    f"CreateMultipartUpload under {where}: {_describe(err)}",
                    "check the bucket's region and the network path to S3 (a VPC endpoint or NAT)",
                )
                self.add("s3 permissions", SKIP, "the bucket did not answer")
            return
        owned = f", owned by {cfg.expected_bucket_owner}" if cfg.expected_bucket_owner else ""
        self.add("bucket", OK, f"bucket {cfg.bucket} exists{owned}")
        kms_refused = self._probe_kms_part(key, upload_id, owner)
        try:
            s3.abort_multipart_upload(Bucket=cfg.bucket, Key=key, UploadId=upload_id, **owner)
        except (ClientError, BotoCoreError) as err:
            self.add(
                "s3 permissions",
                FAIL,
                f"s3:PutObject works but AbortMultipartUpload was "
                f"refused ({_describe(err)}): a failed backup could not remove its partial "
                "upload (the probe's stays until the bucket's lifecycle rule expires it)",
                write_fix,
            )
            return
        try:
            # What a run after a crash does to find the killed run's upload and abort it.
            s3.list_multipart_uploads(Bucket=cfg.bucket, Prefix=cfg.prefix, MaxUploads=1, **owner)
        except (ClientError, BotoCoreError) as err:
            self.add(
                "s3 permissions",
                FAIL,
                "s3:PutObject and s3:AbortMultipartUpload work, but "
                f"ListMultipartUploads was refused ({_describe(err)}): after a crash the next "
                "run cannot find and abort the killed run's upload (the bucket's lifecycle "
                "rule still expires it)",
                f"allow s3:ListBucketMultipartUploads on arn:aws:s3:::{cfg.bucket} in the "
                "instance role (packaging/template.yaml, statement ListOwnUploads)",
            )
            return
        if kms_refused:
            self.add(
                "s3 permissions",
                FAIL,
                f"CreateMultipartUpload works but UploadPart with "
                f"SSE-KMS was refused ({kms_refused}): every backup would fail on its "
                "first part",
                f"{write_fix}",
            )
            return
        self.add(
            "s3 permissions",
            OK,
            f"s3:PutObject, s3:AbortMultipartUpload and "
            f"s3:ListBucketMultipartUploads under {where} (a multipart upload was created "
            "and aborted; nothing stored)",
        )

    def _probe_kms_part(self, key: str, upload_id: str, owner: dict[str, str]) -> str | None:
        """With SSE-KMS, upload one tiny part: CreateMultipartUpload needs only
        kms:GenerateDataKey, while UploadPart and CompleteMultipartUpload also need
        kms:Decrypt (Amazon S3 user guide, "Multipart upload API and permissions"), so without
        this a role lacking Decrypt passes and the backup fails on its first part. The part is
        discarded by the abort that follows. Returns S3's refusal, or None."""
        if self.cfg.sse != "aws:kms":
            return None
        try:
            self.clients.s3.upload_part(
                Bucket=self.cfg.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=1,
                Body=b"instance-agent doctor",
                **owner,
            )
        except (ClientError, BotoCoreError) as err:
            return _describe(err)
        return None

    def check_topic(self) -> None:
        name = "topic"
        topic = self.cfg.topic_arn
        if not topic:
            self.add(name, SKIP, "no topic_arn: the backup reports to no one")
            return
        topic_region = topic.split(":")[3]
        if self.region and topic_region != self.region:
            self.add(
                name,
                FAIL,
                f"the topic is in {topic_region}, the agent's clients use "
                f"{self.region}: the report would fail",
                f'use a topic in {self.region}, or set region = "{topic_region}"',
            )
            return
        if not self.publish_test:
            self.add(
                name,
                SKIP,
                "not probed: the instance role grants only sns:Publish, so only "
                "a message proves the topic; `instance-agent doctor --publish-test` sends one",
            )
            return
        if not self._clients() or self.clients.sns is None:
            self.add(name, SKIP, "needs the region (see identity)")
            return
        body = {"event": "doctor_test", "instance_id": self.instance_id, "agent_version": __version__}
        try:
            resp = self.clients.sns.publish(
                TopicArn=topic,
                Message=json.dumps(body),
                Subject=f"instance-agent doctor: test message from {self.instance_id}",
            )
        except (ClientError, BotoCoreError) as err:
            if _code(err) == "NotFound":
                self.add(name, FAIL, f"topic {topic} does not exist", "create it, or fix topic_arn")
            else:
                self.add(
                    name,
                    FAIL,
                    f"Publish: {_describe(err)}",
                    "allow sns:Publish on the topic in the instance role (packaging/"
                    "template.yaml, statement Report)"
                    if _denied(err)
                    else None,
                )
            return
        self.add(name, OK, f"published a test message to {topic} (id {resp.get('MessageId')})")

    # -- services ---------------------------------------------------------------------------
    def check_ssm_agent(self) -> None:
        # Only Run Command (the push path) needs the SSM agent; a watcher-only instance (a
        # Debian image ships no SSM agent) must not be ABANDONed at launch for lacking one.
        name = "ssm agent"
        if not self.on_ec2:
            self.add(name, SKIP, self._not_ec2())
            return
        if self.booted():
            _, out = self.systemctl(["is-active", *SSM_UNITS])
            if "active" in out.split():
                self.add(name, OK, "amazon-ssm-agent is active: the push path can reach this instance")
                return
        else:
            pid = _process_running(SSM_COMM)
            if pid:
                self.add(name, OK, f"amazon-ssm-agent runs (pid {pid}; no systemd)")
                return
        missing = "amazon-ssm-agent is not active" if self.booted() else "no amazon-ssm-agent process"
        if self.cfg.push_path:
            self.add(
                name,
                FAIL,
                f"{missing}, and push_path says Run Command backs this instance up: the push "
                "path cannot reach it (the watcher still works)",
                "install and start it (sudo systemctl enable --now amazon-ssm-agent), or set "
                "push_path = false where only the watcher backs up",
            )
        else:
            self.add(
                name,
                WARN,
                f"{missing}: only the watcher backs this instance up (push_path is off, and "
                "only Run Command needs the SSM agent)",
                "none needed; with the push path, install amazon-ssm-agent and set push_path = true",
            )

    def check_systemd_unit(self) -> None:
        name = "systemd unit"
        if not self.on_ec2:
            self.add(name, SKIP, self._not_ec2())
            return
        if not self.booted():
            self.add(
                name,
                SKIP,
                "PID 1 is not systemd (a container?): the watcher runs as a service only under systemd",
            )
            return
        if not shutil.which("systemctl"):
            self.add(name, SKIP, "systemctl is not installed")
            return
        _, enabled = self.systemctl(["is-enabled", UNIT_NAME])
        _, active = self.systemctl(["is-active", UNIT_NAME])
        if enabled == "enabled" and active == "active":
            self.add(name, OK, f"{UNIT_NAME} is enabled and active")
        elif enabled in ("", "not-found") or "No such file" in enabled:
            self.add(
                name,
                FAIL,
                f"{UNIT_NAME} is not installed: nothing watches for termination on this instance",
                "sudo instance-agent install-service",
            )
        else:
            self.add(
                name,
                FAIL,
                f"{UNIT_NAME} is {enabled or 'not enabled'} and {active or 'not active'}",
                f"sudo systemctl enable --now {UNIT_NAME}; journalctl -u {UNIT_NAME} says why it stopped",
            )

    def check_shipping(self) -> None:
        """Whether continuous shipping keeps up: complete files should not wait long."""
        if not self.cfg.ship:
            self.add(
                "shipping",
                SKIP,
                "off (--ship ships files as they complete, so a termination archives only what is new)",
            )
            return
        found = status.find_status((self.cfg.runtime_dir, self.cfg.state_dir))
        doc = found[1] if found else None
        if doc is None or not isinstance(doc.get("shipping"), dict):
            self.add(
                "shipping",
                SKIP,
                "on, but no running watcher has reported shipping yet",
                "start the watcher: sudo systemctl start " + UNIT_NAME,
            )
            return
        block, backlog = status.shipping_block(doc), doc.get("shipping_backlog") or {}
        since = backlog.get("behind_since")
        behind = time.time() - since if isinstance(since, (int, float)) else 0.0
        shipped = (
            f"{block['shipped_files']} files ({block['shipped_bytes'] / 2**20:.1f} MiB) "
            f"shipped; {block['pending_files']} not shipped yet "
            f"({block['pending_bytes'] / 2**20:.1f} MiB, live files included)"
        )
        if block["state"] == "restarting":
            self.add(
                "shipping",
                FAIL,
                f"stalled: the shipping thread is restarting after an error "
                f"({block['restarts']} restarts); {shipped}; last error: {block['last_error']}",
                f"journalctl -u {UNIT_NAME} shows the error; what is not shipped is archived at termination",
            )
            return
        if behind > SHIP_BEHIND_AFTER:
            self.add(
                "shipping",
                FAIL,
                f"not keeping up: {backlog.get('due_files')} complete "
                f"files waiting for {behind / 60:.0f} min; {shipped}; last error: "
                f"{block['last_error']}",
                "check the last error (S3 access?), or raise "
                "--ship-bandwidth; what is not shipped is archived at termination",
            )
            return
        error = f"; last error: {block['last_error']}" if block["last_error"] else ""
        scan = "; inotify unavailable, scanning the sources instead" if block["watch"] == "scan" else ""
        restarts = f"; restarted {block['restarts']} times" if block["restarts"] else ""
        self.add("shipping", OK, f"keeping up: {shipped}{scan}{restarts}{error}")

    def check_retained(self) -> None:
        """A retained instance (`*:Retained`, kept after its terminating action ended in
        ABANDON, https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html):
        what it waits for. Said only when it is, or when the watcher's retries are on record."""
        found = status.find_status((self.cfg.runtime_dir, self.cfg.state_dir))
        kept = found[1].get("retained") if found else None
        kept = kept if isinstance(kept, dict) else None
        now = self.state is not None and self.state.endswith(":Retained")
        if not now and (kept is None or kept.get("event") == "retained_recovered"):
            return
        let_go = (
            "to let it go without a backup: aws autoscaling terminate-instance-in-auto-scaling-group "
            f"--instance-id {self.instance_id or '<id>'} --no-should-decrement-desired-capacity"
        )
        where = self.state or "retained"
        if kept is None:
            self.add(
                "retained",
                FAIL,
                f"{where} after a failed backup, and no watcher is retrying it",
                f"sudo systemctl start {UNIT_NAME} (it retries), or run instance-agent backup; {let_go}",
            )
            return
        done = f"{kept.get('attempts', 0)} backup retries, last error: {kept.get('last_error') or 'none'}"
        if kept.get("event") == "retained_gave_up":
            self.add(
                "retained",
                FAIL,
                f"{where}: the watcher gave up after {done}",
                f"fix the error, then run instance-agent backup; {let_go}",
            )
            return
        self.add(
            "retained",
            FAIL,
            f"{where}: the watcher retries the backup ({done}); next retry in "
            f"{kept.get('next_retry_in_s') or 0:g} s, gives up in {kept.get('give_up_in_s') or 0:g} s",
            f"fix the last error (bucket policy, KMS key, network) and the next retry lands; {let_go}",
        )


# Complete files waiting longer than this mean shipping is not keeping up with the logs.
SHIP_BEHIND_AFTER = 600.0


def run(
    cfg: Config,
    config_error: str | None,
    make_clients: Callable[[Config, str], Any],
    *,
    publish_test: bool = False,
    launch: bool = False,
) -> list[Check]:
    return Doctor(cfg, config_error, make_clients, publish_test=publish_test, launch=launch).run()


def failed(checks: list[Check]) -> bool:
    return any(c.result == FAIL for c in checks)


def render(checks: list[Check], *, symbols: bool = True) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = SYMBOLS[c.result] if symbols else f"[{WORDS[c.result]}]"
        lines.append(f"{mark} {c.name.ljust(width)}  {c.message}")
        if c.result in (FAIL, WARN) and c.fix:
            lines.append(f"  {' ' * width}  fix: {c.fix}")
    verdict = (
        "nothing is broken"
        if not failed(checks)
        else f"{sum(c.result == FAIL for c in checks)} check(s) failed"
    )
    return "\n".join(lines) + f"\n{verdict}\n"
