"""State hand-off, the pure part: its configuration, its key layout, and who may claim it.

Every decision takes the time as an argument: the lease tests step a number, not a clock.
"""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from instance_agent import config, handoff, keys
from instance_agent.errors import ConfigError

KEY = "backups/web/handoff/i-0abc1234/20260131T120000Z.tar.zst"
LEASE = 600.0


def load(toml: str, tmp_path: Path) -> config.Config:
    file = tmp_path / "agent.toml"
    file.write_text('bucket = "my-backups"\n' + toml)
    env = {"INSTANCE_AGENT_DEFAULT_CONFIG": os.environ["INSTANCE_AGENT_DEFAULT_CONFIG"]}
    return config.load({}, env, config_file=str(file))


def test_the_handoff_options_come_from_agent_toml(tmp_path: Path) -> None:
    cfg = load(
        'handoff_path = ["/srv/spool", "/srv/queue.db"]\nhandoff_command = "replay"\n'
        'handoff_to = "running"\nhandoff_lease = 120\nhandoff_timeout = 60\n',
        tmp_path,
    )
    assert cfg.handoff_path == ("/srv/spool", "/srv/queue.db")
    assert (cfg.handoff_command, cfg.handoff_to) == ("replay", "running")
    assert (cfg.handoff_lease, cfg.handoff_timeout) == (120.0, 60.0)


def test_the_defaults_hand_nothing_off_and_keep_the_inbox_under_the_state_dir(tmp_path: Path) -> None:
    cfg = load("", tmp_path)
    assert cfg.handoff_path == () and cfg.handoff_command is None and cfg.handoff_to == "any"
    assert (cfg.handoff_lease, cfg.handoff_timeout) == (600.0, 300.0)
    assert cfg.inbox() == "/var/lib/instance-agent/handoff-inbox"
    assert load('handoff_inbox = "/data/inbox"\n', tmp_path).inbox() == "/data/inbox"


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ('handoff_path = ["spool"]\n', "handoff_path 'spool' must be an absolute path"),
        ('handoff_to = "nobody"\n', "handoff_to"),
        ("handoff_lease = 60\nhandoff_timeout = 60\n", "must be below handoff_lease"),
        ('handoff_inbox = "inbox"\n', "must be an absolute path"),
    ],
)
def test_bad_handoff_settings_are_one_line_errors(tmp_path: Path, toml: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(toml, tmp_path)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_source_instance_comes_only_from_a_handoff_key() -> None:
    assert handoff.source_of(KEY) == "i-0abc1234"
    for bad in (
        "backups/web/i-0abc1234/20260131T120000Z.tar.zst",  # a backup, not a hand-off
        "backups/web/handoff/../20260131T120000Z.tar.zst",
        "backups/web/handoff/etc/20260131T120000Z.tar.zst",  # not an instance id
        "backups/web/handoff/i-0abc1234/passwd",
        "handoff/i-0abc1234",
    ):
        with pytest.raises(ValueError):
            handoff.source_of(bad)


def test_claim_objects_sit_beside_the_archive_and_sort_by_generation() -> None:
    assert handoff.claim_key(KEY, 1) == KEY + ".claim.000001"
    assert handoff.claim_key(KEY, 12) > handoff.claim_key(KEY, 9)
    assert handoff.generation_of(KEY, KEY + ".claim.000012") == 12
    assert handoff.generation_of(KEY, KEY + ".failed.000002", handoff.FAILED) == 2
    assert handoff.generation_of(KEY, KEY + ".manifest.json") is None
    assert handoff.generation_of(KEY, KEY + ".claim.12") is None


def claim(generation: int, at: float, who: str = "i-0peer0001") -> handoff.Claim:
    return handoff.Claim(generation, who, at, LEASE)


def test_an_unclaimed_handoff_is_claimed_at_generation_one() -> None:
    assert handoff.decide([], 0, False, now=0.0) == handoff.Verdict(handoff.CLAIM_NOW, generation=1)


def test_a_live_claim_holds_until_its_lease_ends() -> None:
    held = handoff.decide([claim(1, 1000.0)], 0, False, now=1000.0 + LEASE - 1)
    assert held.action == handoff.HELD and held.holder == claim(1, 1000.0)
    assert held.expires_in == pytest.approx(1.0)


def test_after_the_lease_the_next_claimant_writes_the_next_generation() -> None:
    claims = [claim(1, 0.0), claim(2, 1000.0, "i-0peer0002")]
    # Generation 1 is long over, but only the newest claim counts: 2 is still live.
    assert handoff.decide(claims, 0, False, now=1000.0 + LEASE / 2).action == handoff.HELD
    later = handoff.decide(claims, 0, False, now=1000.0 + LEASE)
    assert later == handoff.Verdict(handoff.CLAIM_NOW, generation=3)


def test_adopted_is_final_whatever_the_claims_say() -> None:
    assert handoff.decide([claim(1, 0.0)], 0, True, now=1e9).action == handoff.DONE
    assert handoff.decide([], 0, True, now=0.0).action == handoff.DONE


def test_a_failed_command_is_retried_once_then_given_up() -> None:
    once = handoff.decide([claim(1, 0.0)], 1, False, now=LEASE)
    assert once == handoff.Verdict(handoff.CLAIM_NOW, generation=2)
    assert handoff.decide([claim(1, 0.0), claim(2, LEASE)], 2, False, now=3 * LEASE).action == handoff.GIVE_UP


def test_handoff_to_says_which_instances_receive() -> None:
    assert handoff.may_receive("any", "running") and handoff.may_receive("any", "launching")
    assert handoff.may_receive("running", "running") and not handoff.may_receive("running", "launching")
    assert handoff.may_receive("launching", "launching") and not handoff.may_receive("launching", "running")


@pytest.mark.parametrize("field", ["group", "instance_id", "hostname", "region"])
def test_a_value_named_handoff_never_makes_a_handoff_component(field: str) -> None:
    # `list` skips every key with a /handoff/ component: a backup key must never have one.
    values = {"prefix": "backups/", "group": "web", "instance_id": "i-0abc", "region": "eu-west-1"}
    values |= {"hostname": "h", "timestamp": "20260131T120000Z", field: "handoff"}
    key = keys.render("{prefix}{group}/{instance_id}/{region}/{hostname}/{timestamp}", values, "none")
    assert f"/{keys.HANDOFF_DIR}/" not in key and "handoff_" in key


@pytest.mark.parametrize(
    "toml",
    ['prefix = "team/handoff/"\n', 'key_template = "{prefix}{group}/handoff/{instance_id}/{timestamp}"\n'],
)
def test_a_prefix_or_template_in_the_handoff_namespace_is_refused(tmp_path: Path, toml: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(toml, tmp_path)
    assert "reserved for state hand-offs" in str(err.value)


def test_a_launching_receiver_picks_the_oldest_claimable_complete_handoff() -> None:
    prefix = handoff.group_prefix("backups/", "web")
    assert prefix == "backups/web/handoff/"
    old, new, half, done, taken = (f"{prefix}i-0000000{n}/20260131T12000{n}Z.tar.zst" for n in range(1, 6))
    listed = {
        new: 200.0,
        new + ".manifest.json": 201.0,
        old: 100.0,
        old + ".manifest.json": 101.0,
        old + ".claim.000001": 110.0,  # a claim whose lease ended at 110 + LEASE
        half: 150.0,  # no manifest: the sender is still writing it
        done: 50.0,
        done + ".manifest.json": 51.0,
        done + ".adopted": 60.0,
        taken: 90.0,
        taken + ".manifest.json": 91.0,
    }
    live = {**listed, taken + ".claim.000001": 1000.0}
    # taken's claim is live; old's ended (110 + LEASE < 1001), so old may be claimed again.
    assert handoff.unclaimed(live, now=1000.0 + 1, lease=LEASE) == [old, new]
    assert handoff.unclaimed(live, now=1000.0 + LEASE, lease=LEASE) == [taken, old, new]
    assert handoff.unclaimed(listed, now=0.0, lease=LEASE) == [taken, new]  # old's claim is live


def test_list_handoffs_says_where_each_one_stands() -> None:
    from instance_agent import handoff_list

    def state(listed: dict[str, float], now: float = 1000.0) -> tuple[str, int, int]:
        view = handoff_list.summarize(KEY, listed, now, LEASE)
        assert view.source == "i-0abc1234"
        return view.state, view.generation, view.failures

    base = {KEY: 100.0, KEY + ".manifest.json": 101.0}
    assert state({KEY: 100.0}) == ("incomplete", 0, 0)
    assert state(base) == ("unclaimed", 0, 0)
    assert state({**base, KEY + ".claim.000001": 900.0}) == ("claimed", 1, 0)
    assert state({**base, KEY + ".claim.000001": 900.0}, now=900.0 + LEASE) == ("unclaimed", 1, 0)
    failed = {**base, KEY + ".claim.000001": 200.0, KEY + ".failed.000001": 210.0}
    assert state(failed) == ("unclaimed", 1, 1)  # retried by the next claimant
    both = {**failed, KEY + ".claim.000002": 300.0, KEY + ".failed.000002": 310.0}
    assert state(both) == ("given-up", 2, 2)
    assert state({**base, KEY + ".claim.000001": 200.0, KEY + ".adopted": 250.0}) == ("adopted", 1, 0)


def test_list_handoffs_says_how_long_an_unclaimed_one_has_waited() -> None:
    from instance_agent import handoff_list

    base = {KEY: 100.0, KEY + ".manifest.json": 101.0}
    assert handoff_list.summarize(KEY, base, 1000.0, LEASE).waiting_s == 900.0
    claimed = {**base, KEY + ".claim.000001": 900.0}
    assert handoff_list.summarize(KEY, claimed, 1000.0, LEASE).waiting_s is None
    assert handoff_list.summarize(KEY, {**base, KEY + ".adopted": 250.0}, 1000.0, LEASE).waiting_s is None


class _Claims:
    """ListObjectsV2 and GetObject over one hand-off's claim objects (a fake of the S3 reads)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def list_objects_v2(self, **kwargs: object) -> dict[str, object]:
        prefix = str(kwargs["Prefix"])
        when = datetime.fromtimestamp(1000.0, tz=timezone.utc)
        contents = [{"Key": k, "LastModified": when} for k in sorted(self.objects) if k.startswith(prefix)]
        return {"Contents": contents, "IsTruncated": False}

    def get_object(self, **kwargs: object) -> dict[str, object]:
        return {"Body": io.BytesIO(self.objects[str(kwargs["Key"])])}


@pytest.mark.parametrize("lease", ["Infinity", "1e300", "86400000", "-1", "0", '"600"', "NaN"])
def test_a_claims_own_lease_never_outlasts_the_receivers(tmp_path: Path, lease: str) -> None:
    """A compromised peer wrote a claim whose body says `lease_s: Infinity` (json.loads takes
    it): every receiver took the claim as live for ever, and the hand-off was never
    delivered. The body may shorten the lease, never stretch it past this receiver's."""
    from instance_agent import handoff_adopt

    cfg = load('handoff_to = "running"\nhandoff_lease = 120\nhandoff_timeout = 60\n', tmp_path)
    key = "logs/web-group/handoff/i-0123456789abcdef0/20260101T000000Z.tar.zst"
    body = b'{"instance_id": "i-0aaaaaaaaaaaaaaaa", "lease_s": ' + lease.encode() + b"}"
    s3 = _Claims({handoff.claim_key(key, 1): body})
    [claim], failures, adopted = handoff_adopt._state(s3, "bucket", key, cfg)
    assert (claim.generation, claim.instance_id, failures, adopted) == (1, "i-0aaaaaaaaaaaaaaaa", 0, False)
    assert claim.lease_s == 120.0
    assert handoff.expired(claim, now=1000.0 + 121)


def test_a_claims_shorter_lease_is_honoured(tmp_path: Path) -> None:
    from instance_agent import handoff_adopt

    cfg = load('handoff_to = "running"\nhandoff_lease = 120\nhandoff_timeout = 60\n', tmp_path)
    key = "logs/web-group/handoff/i-0123456789abcdef0/20260101T000000Z.tar.zst"
    s3 = _Claims({handoff.claim_key(key, 1): b'{"instance_id": "i-0aaaaaaaaaaaaaaaa", "lease_s": 90}'})
    [claim], _, _ = handoff_adopt._state(s3, "bucket", key, cfg)
    assert claim.lease_s == 90.0
