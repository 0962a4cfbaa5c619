"""Rules for the names the configuration puts into S3 requests and keys: bucket, prefix and
key template. Pure functions returning an error message, or None when the value is fine."""

from __future__ import annotations

import string

# S3 refuses these at CreateBucket, and an alias or access point name with them is not a
# bucket at all: "General purpose bucket naming rules",
# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
# (docs/aws-behaviour.md, "S3").
RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def reserved_bucket(value: str) -> str | None:
    for start in RESERVED_BUCKET_PREFIXES:
        if value.startswith(start):
            return f"invalid bucket name {value!r}: the prefix {start!r} is reserved by S3"
    for end in RESERVED_BUCKET_SUFFIXES:
        if value.endswith(end):
            return f"invalid bucket name {value!r}: the suffix {end!r} is reserved by S3"
    return None


def prefix_components(value: str) -> str | None:
    """A prefix whose path components include '.', '..' or an empty one ('a//b') names keys
    that `restore` and the S3 console show under a different, or no, folder."""
    parts = value.split("/")
    if value.endswith("/"):
        parts = parts[:-1]  # 'backups/' is one component and a separator
    for part in parts:
        if part in ("", ".", ".."):
            return (
                f"invalid prefix {value!r}: no empty, '.' or '..' component "
                "(write 'a/b/', not './a/', 'a/./b/' or 'a//b/')"
            )
    return None


def template_format_spec(template: str) -> str | None:
    """A format spec or conversion (`{group:/>30}`, `{group!r}`) pads or quotes a value
    after it was made key-safe, so the key gets slashes or quotes nobody wrote."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None  # keys.check_template reports the syntax error itself
    for _, field, spec, conversion in parsed:
        if field is not None and (spec or conversion):
            shown = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            return f"{{{shown}}} in {template!r}: plain {{{field}}} only, no format spec or conversion"
    return None


_RESERVED_FOR = {"segments": "shipped segments", "handoff": "state hand-offs"}


def segment_component(what: str, value: str, reserved: str = "segments") -> str | None:
    """A prefix or key template with a `segments` path component puts archive keys in
    the namespace of shipped segments (keys.SEGMENT_DIR), where `list` and `restore
    --latest` never look for a backup."""
    # `{prefix}` ends in '/' or is empty (checked on its own), so text after it starts a
    # component: "{prefix}segments/" is such a component too.
    if reserved in value.replace("{prefix}", "/").split("/"):
        return (
            f"invalid {what} {value!r}: no {reserved!r} path component "
            f"(that name is reserved for {_RESERVED_FOR.get(reserved, reserved)}, which list does not "
            "show as backups)"
        )
    return None
