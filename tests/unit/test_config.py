"""instance_agent.config.load: flags, environment and file in, one Config or one clear line out.

In-process, with the environment and flags as plain dicts: each test is what an operator
writes (a flag, an `INSTANCE_AGENT_*` variable, a line of agent.toml) and what they get back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from instance_agent import config
from instance_agent.errors import EXIT_USAGE, ConfigError

BUCKET = {"INSTANCE_AGENT_BUCKET": "my-backups"}


def load(
    flags: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    toml: str | None = None,
    tmp_path: Path | None = None,
    command: str = config.BACKUP,
) -> config.Config:
    file = None
    if toml is not None:
        assert tmp_path is not None
        file = tmp_path / "agent.toml"
        file.write_text(toml)
    # The guard's default path (in this test's tmp dir) rides along, unless a test sets its own:
    # an in-memory environment must not fall back to the host's /etc/instance-agent.
    base = {"INSTANCE_AGENT_DEFAULT_CONFIG": os.environ["INSTANCE_AGENT_DEFAULT_CONFIG"]}
    return config.load(
        flags or {},
        {**base, **(env if env is not None else BUCKET)},
        config_file=str(file) if file else None,
        command=command,
    )


def refused(**kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kw)
    assert info.value.exit_code == EXIT_USAGE  # nothing was done: exit 2
    return str(info.value)


def test_defaults_are_what_the_readme_documents() -> None:
    cfg = load()
    assert cfg.source == ("/var/log",)
    assert (cfg.compression, cfg.upload_workers, cfg.on_success, cfg.on_failure) == (
        "zstd",
        3,
        "CONTINUE",
        "ABANDON",
    )
    assert cfg.key_template == "{prefix}{group}/{instance_id}/{timestamp}"


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    toml = 'bucket = "from-file"\nprefix = "file/"\nupload_workers = 5\n'
    cfg = load(
        {"bucket": "from-flag"},
        {"INSTANCE_AGENT_BUCKET": "from-env", "INSTANCE_AGENT_PREFIX": "env/"},
        toml,
        tmp_path,
    )
    assert (cfg.bucket, cfg.prefix, cfg.upload_workers) == ("from-flag", "env/", 5)
    assert cfg.config_file == str(tmp_path / "agent.toml")


def test_a_flag_list_replaces_the_file_list_rather_than_adding(tmp_path: Path) -> None:
    cfg = load({"source": ["/srv/app"]}, toml='source = ["/var/log", "/etc"]\n', tmp_path=tmp_path)
    assert cfg.source == ("/srv/app",)


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    cfg = load(env={"INSTANCE_AGENT_BUCKET": ""}, toml='bucket = "from-file"\n', tmp_path=tmp_path)
    assert cfg.bucket == "from-file"


def test_environment_lists_split_on_colons_for_paths_and_commas_otherwise() -> None:
    cfg = load(
        env={
            **BUCKET,
            "INSTANCE_AGENT_SOURCE": "/var/log:/srv/app logs",
            "INSTANCE_AGENT_EXCLUDE": "*.tmp, *.swp",
        }
    )
    assert cfg.source == ("/var/log", "/srv/app logs")
    assert cfg.exclude == ("*.tmp", "*.swp")


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("true", True), ("FALSE", False), ("0", False)])
def test_environment_booleans(text: str, expected: bool) -> None:
    assert load(env={**BUCKET, "INSTANCE_AGENT_COMPLETE": text}).complete is expected


def test_an_unclear_boolean_is_refused_naming_the_variable() -> None:
    message = refused(env={**BUCKET, "INSTANCE_AGENT_COMPLETE": "yes"})
    assert message.startswith("$INSTANCE_AGENT_COMPLETE:") and "'yes'" in message


@pytest.mark.parametrize(
    ("text", "size"), [("500MiB", 500 * 1024**2), ("1TiB", 1024**4), ("2 GB", 2 * 1000**3), ("4096", 4096)]
)
def test_sizes_take_binary_and_decimal_units(text: str, size: int) -> None:
    assert load(env={**BUCKET, "INSTANCE_AGENT_MAX_ARCHIVE_SIZE": text}).max_archive_size == size


def test_a_size_without_a_known_unit_is_refused() -> None:
    assert "not a size" in refused(env={**BUCKET, "INSTANCE_AGENT_MAX_ARCHIVE_SIZE": "5 parsecs"})


def test_backup_needs_a_bucket_but_the_operator_commands_do_not() -> None:
    assert "no bucket" in refused(env={})
    assert load(env={}, command="ops").bucket is None


def test_a_bad_value_names_where_it_came_from(tmp_path: Path) -> None:
    assert refused(flags={"bucket": "My_Bucket"}).startswith("--bucket: invalid bucket name")
    message = refused(env={}, toml='bucket = "192.168.1.1"\n', tmp_path=tmp_path)
    assert message.startswith(f"config file {tmp_path / 'agent.toml'}: bucket:")
    assert "IP address" in message


def test_a_choice_lists_the_accepted_values() -> None:
    message = refused(flags={"compression": "lz4"})
    assert "expected one of zstd, gzip, none" in message


def test_toml_types_are_strict(tmp_path: Path) -> None:
    assert "expected an integer" in refused(toml="upload_workers = true\n", tmp_path=tmp_path)
    assert "expected true or false" in refused(toml='complete = "no"\n', tmp_path=tmp_path)


def test_the_file_refuses_unknown_keys_and_tables(tmp_path: Path) -> None:
    assert "unknown key 'buckett'" in refused(toml='buckett = "x"\n', tmp_path=tmp_path)
    assert "must be a value, not a table" in refused(toml="[bucket]\nname = 'x'\n", tmp_path=tmp_path)
    assert "invalid TOML" in refused(toml="bucket = \n", tmp_path=tmp_path)


def test_a_missing_config_file_named_on_the_command_line_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load({}, BUCKET, config_file=str(tmp_path / "absent.toml"))


def test_rules_across_options() -> None:
    assert "needs --sse aws:kms" in refused(flags={"kms_key_id": "alias/backups"})
    assert "must be an absolute path" in refused(flags={"source": ["var/log"]})
    assert refused(flags={"key_template": "{group}/{timestamp}"}).startswith("key_template: template")


def test_the_config_variable_and_the_default_path(tmp_path: Path) -> None:
    named = tmp_path / "named.toml"
    named.write_text('bucket = "named"\n')
    default = tmp_path / "default.toml"
    # The suite's guard points the default into the test's tmp dir, where no file is.
    assert load(env={}, command="ops").config_file is None
    default.write_text('bucket = "default"\n')
    env = {"INSTANCE_AGENT_DEFAULT_CONFIG": str(default)}
    assert load(env=env).bucket == "default"
    assert load(env={**env, "INSTANCE_AGENT_CONFIG": str(named)}).bucket == "named"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('prefix = "./"', "prefix"),
        ('prefix = "a/./b/"', "prefix"),
        ('prefix = "a//b/"', "prefix"),
        ('prefix = "a/../b/"', "prefix"),
        ('key_template = "{prefix}{group:/>30}/{instance_id}/{timestamp}"', "key_template"),
        ('key_template = "{prefix}{group!r}/{instance_id}/{timestamp}"', "key_template"),
        ('prefix = "segments/"', "prefix"),
        ('prefix = "team/segments/"', "prefix"),
        ('key_template = "{prefix}segments/{instance_id}/{timestamp}"', "key_template"),
        ('key_template = "{prefix}{group}/segments/{instance_id}-{timestamp}"', "key_template"),
        ('bucket = "xn--backups"', "bucket"),
        ('bucket = "sthree-backups"', "bucket"),
        ('bucket = "amzn-s3-demo-backups"', "bucket"),
        ('bucket = "backups-s3alias"', "bucket"),
        ('bucket = "backups--ol-s3"', "bucket"),
        ('bucket = "backups.mrap"', "bucket"),
        ('bucket = "backups--x-s3"', "bucket"),
        ('bucket = "backups--table-s3"', "bucket"),
    ],
)
def test_values_that_would_make_odd_keys_or_name_a_reserved_bucket_are_refused(
    tmp_path: Path, toml: str, key: str
) -> None:
    # The bucket from the file, not the environment's, must be the one checked.
    message = refused(toml=toml + "\n", tmp_path=tmp_path, env={} if key == "bucket" else None)
    assert key in message and "\n" not in message


def test_ordinary_prefixes_and_buckets_still_load(tmp_path: Path) -> None:
    cfg = load(toml='prefix = "backups/web/"\nbucket = "my.backups-2"\n', tmp_path=tmp_path, env={})
    assert (cfg.prefix, cfg.bucket) == ("backups/web/", "my.backups-2")
    # Only a whole component named `segments` is the shipped segments' namespace.
    cfg = load(toml='prefix = "my-segments/segmentsx/"\n', tmp_path=tmp_path)
    assert cfg.prefix == "my-segments/segmentsx/"
