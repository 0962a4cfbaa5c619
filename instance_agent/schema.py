"""The option table: every key of the configuration, for every command, in one place.

Each row is a `configkey.Option`: its kind, default, help (the README's configuration
reference is generated from it, docs.py) and its check (configchecks.py). config.Config has one
field per row, and config.load resolves each row by flag > env > file > default.
"""

from __future__ import annotations

from instance_agent.configchecks import (
    check_account_id,
    check_archive_size,
    check_asg_name,
    check_bucket,
    check_dir,
    check_heartbeat,
    check_hook_name,
    check_instance_id,
    check_ip_allow,
    check_level,
    check_not_negative,
    check_poll,
    check_positive,
    check_prefix,
    check_region,
    check_token,
    check_topic_arn,
)
from instance_agent.configkey import BACKUP, WATCH, Option

OPTIONS: tuple[Option, ...] = (
    Option(
        "source",
        "pathlist",
        ("/var/log",),
        "directory or file to archive; repeatable, order is priority",
        metavar="PATH",
    ),
    Option(
        "exclude",
        "list",
        ("/var/log/journal/**",),
        "glob to leave out; repeatable. Setting "
        "it replaces the default, which skips live binary journal files (they tear when "
        "copied; --journal exports them instead)",
        metavar="GLOB",
    ),
    Option(
        "journal",
        "bool",
        None,
        "also stream `journalctl -o export` (current and previous "
        "boot) as a second object; default on where journalctl exists",
        negative_flag=True,
    ),
    Option("bucket", "str", None, "S3 bucket for the archive (required)", check=check_bucket),
    Option("prefix", "str", "", "key prefix, e.g. 'backups/'", check=check_prefix),
    Option(
        "key_template",
        "str",
        "{prefix}{group}/{instance_id}/{timestamp}",
        "object key "
        "template; variables: prefix group instance_id region timestamp hostname; the "
        "extension is appended",
    ),
    Option("compression", "choice", "zstd", "archive compression", choices=("zstd", "gzip", "none")),
    Option("level", "int", None, "compression level (zstd default 3, gzip default 6)", check=check_level),
    Option(
        "max_archive_size",
        "size",
        1024**4,
        "largest archive the upload can hold; part sizes grow so that 10,000 parts reach it",
        check=check_archive_size,
    ),
    Option(
        "max_file_size",
        "size",
        None,
        "skip (with a warning) files larger than this; sparse "
        "files are read by extent, so their holes cost no reads",
        check=check_positive,
    ),
    Option(
        "one_file_system",
        "bool",
        False,
        "do not descend into directories on other file "
        "systems than their source (e.g. a /proc-like mount under a source)",
        negative_flag=True,
    ),
    Option(
        "max_duration",
        "float",
        None,
        "deadline in seconds: stop adding files then, close the archive and upload it as 'partial'",
        check=check_positive,
    ),
    Option("topic_arn", "str", None, "SNS topic for the report; none, no report", check=check_topic_arn),
    Option("asg_name", "str", None, "Auto Scaling group; discovered when absent", check=check_asg_name),
    Option(
        "hook_name",
        "str",
        None,
        "terminating lifecycle hook; discovered when absent",
        check=check_hook_name,
    ),
    Option(
        "lifecycle_token",
        "str",
        None,
        "LifecycleActionToken to complete by (else by instance id)",
        commands=frozenset({BACKUP}),
        check=check_token,
    ),
    Option("instance_id", "str", None, "instance id; from IMDS when absent", check=check_instance_id),
    Option("region", "str", None, "region; from IMDS when absent", check=check_region),
    Option(
        "on_success",
        "choice",
        "CONTINUE",
        "lifecycle result after a successful or partial backup",
        choices=("CONTINUE", "ABANDON"),
    ),
    Option(
        "on_failure",
        "choice",
        "ABANDON",
        "lifecycle result after a failed backup",
        choices=("CONTINUE", "ABANDON"),
    ),
    Option(
        "complete",
        "bool",
        True,
        "complete the lifecycle action (--no-complete: back up only; such runs are never deduplicated)",
        negative_flag=True,
    ),
    Option("sse", "choice", None, "server-side encryption", choices=("AES256", "aws:kms")),
    Option("kms_key_id", "str", None, "KMS key for --sse aws:kms"),
    Option(
        "expected_bucket_owner",
        "str",
        None,
        "account id that must own the bucket",
        check=check_account_id,
    ),
    Option(
        "storage_class",
        "choice",
        None,
        "S3 storage class",
        choices=(
            "STANDARD",
            "STANDARD_IA",
            "ONEZONE_IA",
            "INTELLIGENT_TIERING",
            "GLACIER_IR",
            "GLACIER",
            "DEEP_ARCHIVE",
            "REDUCED_REDUNDANCY",
        ),
    ),
    Option("hash", "choice", "none", "per-file digest in the manifest", choices=("none", "sha256")),
    Option("upload_workers", "int", 3, "concurrent part uploads", check=check_positive),
    Option("upload_queue", "int", 1, "finished parts waiting for a worker", check=check_positive),
    Option("state_dir", "str", "/var/lib/instance-agent", "lock and result records", check=check_dir),
    Option(
        "runtime_dir",
        "str",
        "/run/instance-agent",
        "fallback for the lock when state_dir is unusable",
        check=check_dir,
    ),
    Option(
        "lock_timeout", "float", 3600.0, "how long a second run waits for the first", check=check_positive
    ),
    # 3600 s is the longest deregistration delay an ELBv2 target group allows
    # (deregistration_delay.timeout_seconds, 0-3600); the rest is margin for Auto Scaling.
    Option(
        "wait_timeout",
        "float",
        3900.0,
        "how long to wait for Auto Scaling to hold the "
        "instance in Terminating:Wait once it is known to be leaving (covers a load "
        "balancer's deregistration delay, up to 3600 s)",
        check=check_positive,
    ),
    Option(
        "complete_timeout",
        "float",
        60.0,
        "deadline for CompleteLifecycleAction with its retries",
        check=check_positive,
    ),
    # A retained instance (instance lifecycle policy TerminateHookAbandon: retain,
    # https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html;
    # docs/aws-behaviour.md, "Lifecycle hooks"):
    # how long to keep retrying the backup, and the first retry's delay (then doubling, at
    # most 15 minutes apart; retained.py).
    Option(
        "retain_retry_for",
        "float",
        86400.0,
        "when the instance is retained after ABANDON, keep retrying the backup this long",
        check=check_positive,
    ),
    Option(
        "retain_first_retry",
        "float",
        30.0,
        "seconds before the first retry of a retained instance's backup (then doubling, capped at 900)",
        check=check_positive,
    ),
    Option(
        "heartbeat_interval",
        "float",
        None,
        "seconds between heartbeats; default HeartbeatTimeout/3, at most 600",
        check=check_heartbeat,
    ),
    Option("log_level", "choice", "info", "log verbosity", choices=("debug", "info", "warning", "error")),
    Option(
        "metrics",
        "bool",
        True,
        "publish the run's CloudWatch metrics (namespace InstanceAgent) when it ends; --no-metrics: don't",
        negative_flag=True,
    ),
    # --- watch only -------------------------------------------------------------------
    Option(
        "poll_interval",
        "float",
        2.0,
        "seconds between IMDS polls (minimum 0.5)",
        commands=frozenset({WATCH}),
        check=check_poll,
    ),
    Option(
        "spot",
        "bool",
        True,
        "watch Spot interruption notices (--no-spot to ignore them)",
        commands=frozenset({WATCH}),
        negative_flag=True,
    ),
    Option(
        "on_rebalance",
        "choice",
        "log",
        "on a rebalance recommendation: log it, or back up",
        commands=frozenset({WATCH}),
        choices=("log", "backup"),
    ),
    # --- the termination job's gate and commands: both commands read them (one agent.toml),
    # so Run Command waits behind the same drain gate as the watcher ------------------------
    Option(
        "drain_path",
        "pathlist",
        (),
        "before the backup, wait until this path is gone or an empty directory; repeatable",
        metavar="PATH",
    ),
    Option("drain_timeout", "float", 600.0, "longest wait for the drain paths", check=check_positive),
    Option("pre_command", "list", (), "shell command run before the archive; repeatable", metavar="CMD"),
    Option("post_command", "list", (), "shell command run after the backup; repeatable", metavar="CMD"),
    Option("command_timeout", "float", 60.0, "timeout of each pre/post command", check=check_positive),
    Option("pre_command_fatal", "bool", False, "a failing pre-command fails the backup", negative_flag=True),
    Option(
        "warm_pool_backup",
        "bool",
        False,
        "also back up when the instance returns to a "
        "warm pool (the instance and its disks are kept, so by default only the commands "
        "run and the hook is completed with CONTINUE)",
        negative_flag=True,
    ),
    Option(
        "push_path",
        "bool",
        False,
        "Run Command (the push path: EventBridge, the trigger Lambda, the SSM document) also "
        "backs this instance up, so doctor requires an active amazon-ssm-agent; off, a missing "
        "SSM agent is only a warning (the watcher needs none)",
        negative_flag=True,
    ),
    Option(
        "ip_allow",
        "list",
        (),
        "install-service: the addresses and CIDR ranges the service may reach besides IMDS, "
        "the Amazon DNS server and loopback (the VPC, its interface endpoints, the S3 prefix "
        "list's ranges); given, every other address is denied (IPAddressDeny=any); empty: no "
        "IP firewall; repeatable",
        metavar="CIDR",
        check=check_ip_allow,
    ),
    Option(
        "stop_grace",
        "float",
        90.0,
        "on SIGTERM during a backup, let it run this long before aborting",
        commands=frozenset({WATCH}),
        check=check_positive,
    ),
    # --- state hand-off (docs/handoff.md, "Moving state on scale-in"): the sender and the receiver
    # read the same agent.toml ------------------------------------------------------------
    Option(
        "handoff_path",
        "pathlist",
        (),
        "state that moves to one other instance of the group on scale-in, written before "
        "the full backup; repeatable",
        metavar="PATH",
    ),
    Option(
        "handoff_command",
        "str",
        None,
        "shell command the receiver runs once the state is in its inbox "
        "(INSTANCE_AGENT_HANDOFF_INBOX, _SOURCE, _KEY)",
        metavar="CMD",
    ),
    Option(
        "handoff_to",
        "choice",
        "any",
        "which instances may receive a hand-off",
        choices=("running", "launching", "any"),
    ),
    Option(
        "handoff_inbox",
        "str",
        None,
        "where a received hand-off is restored, one directory per source instance; unset: "
        "STATE_DIR/handoff-inbox",
        check=check_dir,
    ),
    Option(
        "handoff_lease",
        "float",
        600.0,
        "seconds a receiver's claim holds; after it another receiver may claim",
        check=check_positive,
    ),
    Option(
        "handoff_timeout",
        "float",
        300.0,
        "timeout of handoff_command (below handoff_lease)",
        check=check_positive,
    ),
    # Delivery without the Lambda (issue 22): the watcher's scan and the launch gate's wait.
    Option(
        "handoff_scan_interval",
        "float",
        300.0,
        "watch: look for unclaimed hand-offs of the group about this often (one listing, "
        "jittered), for when no trigger Lambda delivers them; 0: never",
        commands=frozenset({WATCH}),
        check=check_not_negative,
    ),
    Option(
        "handoff_wait",
        "float",
        0.0,
        "launch gate: wait up to this long for a hand-off from an instance still in "
        "Terminating:Wait (handoff_to = launching or any); 0: adopt only what is there",
        check=check_not_negative,
    ),
    # --- continuous shipping (docs/shipping.md) ---------------------------------------------
    Option(
        "ship",
        "bool",
        False,
        "the watcher ships each complete file as a segment while "
        "the instance runs, and the termination archive holds only what was not shipped",
        negative_flag=True,
    ),
    Option(
        "ship_settle",
        "float",
        60.0,
        "a file not modified for this many seconds is "
        "complete and shipped (a renamed or closed file is at once)",
        commands=frozenset({WATCH}),
        check=check_positive,
    ),
    Option(
        "retention_days",
        "int",
        0,
        "days the bucket's lifecycle rule keeps backups (the template's RetentionDays; 0: "
        "kept until deleted); a file whose segment is half that old is shipped again, so "
        "no backup names a segment the rule is about to expire",
        check=check_not_negative,
    ),
    Option(
        "ship_final",
        "choice",
        "journal",
        "how the termination archive finds what changed since shipped: `journal` trusts the "
        "watcher's inotify record of what changed since its last full scan (lstat only "
        "those files), `walk` lstats every file of the sources (docs/shipping.md says when "
        "the journal is not trusted and when to choose walk)",
        choices=("journal", "walk"),
        commands=frozenset({WATCH}),
    ),
    Option(
        "ship_bandwidth",
        "size",
        None,
        "cap on the shipping upload rate, in bytes per second; unset: no cap",
        commands=frozenset({WATCH}),
        check=check_positive,
    ),
)

OPTION_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
