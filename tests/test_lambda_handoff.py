"""The trigger's hand-off path against the local AWS: an S3 "Object Created" event, in
AWS's own shape (tests/fixtures/events/), makes the handler send `adopt KEY` to one InService
instance of the sender's group whose SSM agent is Online, never the sender.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import ACCOUNT, REGION, make_group
from support.events import sample
from support.lambda_context import LambdaContext

import lambda_trigger.handler
from instance_agent.local import autoscaling, ssm
from instance_agent.local.moto_server import MotoServer
from lambda_trigger import events, handoff_flow
from lambda_trigger.settings import Settings

ADOPT_DOCUMENT = Path(__file__).resolve().parents[1] / "packaging" / "ssm-adopt-document.yaml"
BACKUP_DOCUMENT = Path(__file__).resolve().parents[1] / "packaging" / "ssm-document.yaml"


@dataclass
class Group:
    name: str
    sender: str
    peers: list[str]
    document: str
    topic_arn: str
    moto: MotoServer

    def key(self, stamp: str = "20260131T120000Z") -> str:
        return f"backups/{self.name}/handoff/{self.sender}/{stamp}.tar.zst"

    def invoke(self, event: object) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = lambda_trigger.handler.handler(event, LambdaContext())["results"]
        return results

    def commands(self) -> list[ssm.SentCommand]:
        return [c for c in ssm.sent_commands(ACCOUNT, REGION) if c.document == self.document]

    def sns(self) -> list[dict[str, Any]]:
        return [json.loads(m["message"]) for m in self.moto.sns_messages(self.topic_arn, ACCOUNT, REGION)]


def object_created(bucket: str, key: str) -> dict[str, Any]:
    """AWS's sample event, for this object."""
    event = copy.deepcopy(sample("s3-eb-object-created.awsdocs-2021.json"))
    event["resources"] = [f"arn:aws:s3:::{bucket}"]
    event["detail"]["bucket"]["name"] = bucket
    event["detail"]["object"]["key"] = key
    return event


@pytest.fixture
def group(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Group]:
    ssm.install()
    ssm.reset()
    suffix = uuid.uuid4().hex[:10]
    name = f"asg-{suffix}"
    sender = make_group(moto, name, f"hook-{suffix}")
    asg = boto3.client("autoscaling", region_name=REGION, endpoint_url=moto.endpoint)
    asg.update_auto_scaling_group(AutoScalingGroupName=name, MaxSize=3, DesiredCapacity=3)
    [desc] = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    peers = sorted(i["InstanceId"] for i in desc["Instances"] if i["InstanceId"] != sender)
    autoscaling.begin_termination(name, sender, account_id=ACCOUNT, region=REGION)
    for instance in (sender, *peers):
        ssm.register(instance, account_id=ACCOUNT, region=REGION)
    client = boto3.client("ssm", region_name=REGION, endpoint_url=moto.endpoint)
    backup, adopt = f"backup-{suffix}", f"adopt-{suffix}"
    for doc, path in ((backup, BACKUP_DOCUMENT), (adopt, ADOPT_DOCUMENT)):
        client.create_document(
            Name=doc, Content=path.read_text(), DocumentType="Command", DocumentFormat="YAML"
        )
    topic = boto3.client("sns", region_name=REGION, endpoint_url=moto.endpoint).create_topic(
        Name=f"t-{suffix}"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("DOCUMENT_NAME", backup)
    monkeypatch.setenv("HANDOFF_DOCUMENT_NAME", adopt)
    monkeypatch.setenv("TOPIC_ARN", topic["TopicArn"])
    lambda_trigger.handler.use_clients(None)
    yield Group(name, sender, peers, adopt, topic["TopicArn"], moto)
    ssm.reset()


def test_the_manifest_event_sends_adopt_to_one_in_service_online_peer(group: Group) -> None:
    key = group.key()
    [result] = group.invoke(object_created("my-backups", key + ".manifest.json"))
    assert result["status"] == "sent" and result["key"] == key and result["group"] == group.name
    assert result["receiver"] in group.peers and result["receiver"] != group.sender
    [command] = group.commands()
    assert command.instance_ids == (result["receiver"],)
    assert command.parameters == {"HandoffKey": [key]}
    assert command.comment == handoff_flow.comment_for(key) and len(command.comment) <= 100

    # A repeated delivery (EventBridge is at least once) asks the same receiver again.
    [again] = group.invoke(object_created("my-backups", key + ".manifest.json"))
    assert again["receiver"] == result["receiver"]


def test_an_offline_peer_and_the_terminating_sender_are_never_picked(group: Group) -> None:
    ssm.set_online(group.peers[0], False, account_id=ACCOUNT, region=REGION)
    for n in range(6):  # several keys: the hash would otherwise spread them over both peers
        [result] = group.invoke(object_created("b", group.key(f"2026013{n}T120000Z") + ".manifest.json"))
        assert result["receiver"] == group.peers[1]
    assert {c.instance_ids for c in group.commands()} == {(group.peers[1],)}


def test_with_no_receiver_it_is_left_unclaimed_and_reported(group: Group) -> None:
    for peer in group.peers:
        ssm.set_online(peer, False, account_id=ACCOUNT, region=REGION)
    [result] = group.invoke(object_created("b", group.key() + ".manifest.json"))
    assert result["status"] == "undelivered"
    assert result["reason"] == "no InService instance with an Online SSM agent"
    assert group.commands() == []
    [report] = group.sns()
    assert (report["status"], report["key"], report["group"]) == ("undelivered", group.key(), group.name)


def test_an_archive_or_any_other_object_is_not_a_delivery(group: Group) -> None:
    keys = [
        group.key(),  # the archive: its manifest is not there yet
        f"backups/{group.name}/{group.sender}/20260131T120000Z.tar.zst.manifest.json",  # a backup
        f"backups/{group.name}/handoff/{group.sender}/20260131T120000Z.tar.zst.claim.000001",
        f"../{group.name}/handoff/{group.sender}/20260131T120000Z.tar.zst.manifest.json",
        f"a+b/handoff/{group.sender}/20260131T120000Z.tar.zst.manifest.json",  # URL-encoding
        f"a%20b/handoff/{group.sender}/20260131T120000Z.tar.zst.manifest.json",
        f"x/handoff/{group.sender}/20260131T120000Z.tar.zst';reboot;'.manifest.json",
    ]
    results = [r for k in keys for r in group.invoke(object_created("b", k))]
    assert [r["status"] for r in results] == ["ignored"] * len(keys)
    assert group.commands() == []


def test_other_s3_events_are_ignored_and_a_broken_one_is_malformed() -> None:
    deleted = object_created("b", "x/handoff/i-0123456789abcdef0/20260131T120000Z.tar.zst.manifest.json")
    deleted["detail-type"] = "Object Deleted"
    [parsed] = events.parse(deleted)
    assert isinstance(parsed, events.Ignored)
    broken = object_created("b", "k")
    del broken["detail"]["object"]
    [parsed] = events.parse(broken)
    assert isinstance(parsed, events.Malformed)
    ok = object_created("b", "x/handoff/i-0123456789abcdef0/20260131T120000Z.tar.gz.manifest.json")
    assert events.parse(ok) == [
        events.HandoffObject(
            "b", "x/handoff/i-0123456789abcdef0/20260131T120000Z.tar.gz", "i-0123456789abcdef0", "eventbridge"
        )
    ]


def test_without_an_adopt_document_the_trigger_ignores_hand_offs(
    group: Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HANDOFF_DOCUMENT_NAME")
    assert Settings.from_env({"DOCUMENT_NAME": "d"}).handoff_document is None
    [result] = group.invoke(object_created("b", group.key() + ".manifest.json"))
    assert result["status"] == "ignored" and group.commands() == []


def test_a_receiver_ssm_refuses_gives_way_to_the_next(group: Group) -> None:
    # It went offline between DescribeInstanceInformation and SendCommand.
    ssm.inject_error("SendCommand", "InvalidInstanceId", account_id=ACCOUNT, region=REGION)
    [result] = group.invoke(object_created("b", group.key() + ".manifest.json"))
    assert result["status"] == "sent" and result["receiver"] in group.peers
    [command] = group.commands()
    assert command.instance_ids == (result["receiver"],)
    assert ssm.call_count("SendCommand", account_id=ACCOUNT, region=REGION) == 2


def test_a_late_event_whose_sender_is_gone_goes_to_the_group_the_key_names(group: Group) -> None:
    gone = "i-0fedcba9876543210"  # no longer known to Auto Scaling
    key = f"backups/{group.name}/handoff/{gone}/20260131T120000Z.tar.zst"
    [result] = group.invoke(object_created("b", key + ".manifest.json"))
    assert (result["status"], result["group"]) == ("sent", group.name)
    assert result["receiver"] in group.peers
    [result] = group.invoke(
        object_created("b", f"backups/no-such-group/handoff/{gone}/20260131T120000Z.tar.zst.manifest.json")
    )
    assert result["status"] == "undelivered"
    assert result["reason"] == "the sender is no longer in an Auto Scaling group"
