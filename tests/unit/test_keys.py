"""instance_agent.keys: the object key an operator's template renders to, in-process.

Every assertion is on the key a user would find in the bucket, or the message they would
read when their template is refused.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from instance_agent import keys

DEFAULT = "{prefix}{group}/{instance_id}/{timestamp}"
VALUES = {
    "prefix": "backups/",
    "group": "web",
    "instance_id": "i-0abc",
    "region": "eu-west-1",
    "timestamp": "20260131T120000Z",
    "hostname": "ip-10-0-0-1",
}


def test_the_default_template_gives_the_documented_layout() -> None:
    assert keys.render(DEFAULT, VALUES, "zstd") == "backups/web/i-0abc/20260131T120000Z.tar.zst"


@pytest.mark.parametrize(
    ("compression", "extension"), [("zstd", ".tar.zst"), ("gzip", ".tar.gz"), ("none", ".tar")]
)
def test_the_extension_follows_the_compression(compression: str, extension: str) -> None:
    assert keys.render("{instance_id}", VALUES, compression) == "i-0abc" + extension


def test_a_hostile_group_name_cannot_climb_out_of_the_prefix() -> None:
    key = keys.render(DEFAULT, dict(VALUES, group="../../etc/passwd"), "none")
    assert key.startswith("backups/")
    assert ".." not in key
    assert key.count("/") == 3  # prefix, group, instance: the group stays one component


def test_unicode_and_spaces_in_a_group_become_underscores() -> None:
    key = keys.render(DEFAULT, dict(VALUES, group="prod web ☃"), "none")
    assert key == "backups/prod_web__/i-0abc/20260131T120000Z.tar"


def test_control_characters_never_reach_a_key() -> None:
    key = keys.render(DEFAULT, dict(VALUES, hostname="a\nb", group="x\x00y"), "none")
    assert "\n" not in key and "\x00" not in key


def test_an_empty_value_still_leaves_a_component() -> None:
    assert keys.render(DEFAULT, dict(VALUES, group=""), "none").split("/")[1] == "_"


def test_the_prefix_keeps_its_slashes() -> None:
    key = keys.render(DEFAULT, dict(VALUES, prefix="team/a/"), "none")
    assert key.startswith("team/a/web/")


def test_timestamps_are_utc_and_sort_in_time_order() -> None:
    paris = timezone(timedelta(hours=1))
    earlier = keys.timestamp(datetime(2026, 1, 31, 13, 0, 0, tzinfo=paris))
    later = keys.timestamp(datetime(2026, 1, 31, 12, 30, 0, tzinfo=timezone.utc))
    assert earlier == "20260131T120000Z"
    assert sorted([later, earlier]) == [earlier, later]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{prefix}{group}/{timestamp}", "must contain {instance_id}"),
        ("{prefix}{colour}/{instance_id}", "unknown variable {colour}"),
        ("{prefix}{instance_id", "invalid template"),
    ],
)
def test_a_bad_template_is_refused_with_its_reason(template: str, message: str) -> None:
    problem = keys.check_template(template)
    assert problem is not None and message in problem


def test_a_template_that_would_start_with_a_slash_is_refused() -> None:
    # With an empty prefix, "{prefix}/{instance_id}" renders "/i-…": S3 would hold a "" folder.
    problem = keys.check_template("{prefix}/{instance_id}", prefix="")
    assert problem is not None and "starts with '/'" in problem


def test_a_key_too_long_for_s3_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than"):
        keys.render("{prefix}{instance_id}", dict(VALUES, prefix="p/" * 600), "zstd")


def test_the_listing_prefix_stops_at_the_first_per_run_variable() -> None:
    # `list --instance-id` narrows the S3 listing to this: everything of the instance, any run.
    assert keys.listing_prefix(DEFAULT, VALUES) == "backups/web/i-0abc/"
    assert keys.listing_prefix("{prefix}{hostname}/{instance_id}", VALUES) == "backups/"


@pytest.mark.parametrize("field", ["group", "instance_id", "hostname", "region"])
def test_a_value_named_segments_never_makes_a_segments_component(field: str) -> None:
    # `list` and `restore --latest` take any key with a /segments/ component for a shipped
    # segment, so an archive key with one would be a backup nothing shows (issue 19 item 4).
    template = "{prefix}{group}/{instance_id}/{region}/{hostname}/{timestamp}"
    key = keys.render(template, dict(VALUES, **{field: "segments"}), "none")
    assert f"/{keys.SEGMENT_DIR}/" not in key
    assert "segments_" in key  # still recognisable, one component, as documented
