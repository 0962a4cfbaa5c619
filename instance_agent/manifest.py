"""What the archive holds, what was skipped and why: the manifest written beside it.

Paths are bytes throughout (Linux file names need not be UTF-8). In JSON a path is a
`path` string when it decodes as UTF-8, else a `path_b64` field with the raw bytes.

A termination archive made with continuous shipping (format 2) does not repeat the entries
of the files its segments hold, which made its tail grow with everything shipped before
(issue 21): each segment it names says instead how many of its shipped files belong to the
backup (`held`; all of the segment manifest's `shipped` files, or the `members` listed), the
few renamed since (`renamed`), and `held_sha256`, a digest of those files' names and
content digests (held_digest). Restore and verify rebuild the entries from the segment
manifests and fail, naming the segment, when they do not match (segrefs.py). A format-1
manifest lists every held file as an entry with an `object`; it still restores.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1
HELD_FORMAT = 2  # a final manifest whose segments carry `held` instead of entries
# The first entry of a format-2 manifest. A reader that predates format 2 restores the
# entries it finds and would report a tree without its shipped files as verified; this
# entry names an object no segment key can be, so such a reader refuses the manifest in
# one line that says why (manifest_check), and a reader of format 2 drops it (segrefs).
FORMAT_GUARD = {
    "path": "instance-agent-format-2",
    "type": "file",
    "size": 0,
    "object": "format 2 names shipped files by segment: restore it with a newer instance-agent",
}


def is_guard(entry: object) -> bool:
    return isinstance(entry, dict) and entry.get("object") == FORMAT_GUARD["object"]


# The C string encoder json.dumps uses for str values (with ensure_ascii=False).
_encode_str: Any = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.encode_basestring


def path_fields(path: bytes, name: str = "path") -> dict[str, str]:
    try:
        return {name: path.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_b64": base64.b64encode(path).decode("ascii")}


def path_from_fields(obj: dict[str, Any], name: str = "path") -> bytes:
    if name in obj:
        return str(obj[name]).encode("utf-8")
    return base64.b64decode(obj[f"{name}_b64"])


# "0644" and the like, formatted once per mode seen.
_MODES: dict[int, bytes] = {}


def _plain_entry_json(
    path: bytes, kind: str, size: int, mtime_ns: int, mode: int, sha256: str | None, obj: str | None
) -> bytes:
    """Entry.to_json_bytes of an entry with no target, member or cut_at. A tree of small
    files formats one per file on the thread that walks it, hence one bytes %-format with
    positional arguments (a third faster than an f-string and .encode())."""
    try:
        head = b'{"path":' + _encode_str(path.decode("utf-8")).encode()
    except UnicodeDecodeError:
        head = b'{"path_b64":"' + base64.b64encode(path) + b'"'
    mode_b = _MODES.get(mode)
    if mode_b is None:
        mode_b = _MODES[mode] = b"%04o" % (mode & 0o7777)
    out = b'%s,"type":"%s","size":%d,"mtime":%r,"mode":"%s"' % (
        head,
        kind.encode(),
        size,
        mtime_ns / 1e9,
        mode_b,
    )
    # A termination archive with shipping lists tens of thousands of held files, each
    # with its digest and segment: formatted here too, not through a dict.
    if sha256:
        out += b',"sha256":"' + sha256.encode() + b'"'
    if obj:
        out += b',"object":' + _encode_str(obj).encode()
    return out + b"}"


@dataclass(slots=True)
class Entry:
    path: bytes  # the member name, relative (no leading '/'), dirs without trailing '/'
    type: str  # "file" | "dir" | "symlink"
    size: int
    mtime_ns: int
    mode: int
    target: bytes | None = None
    sha256: str | None = None
    object: str | None = None  # the segment holding the file; None: the archive itself
    member: bytes | None = None  # with `object`: the file's member name in that segment
    cut_at: int | None = None  # --max-duration cut the read here: the rest is zeros

    def to_json_bytes(self) -> bytes:
        """The same object as `to_json`, formatted directly: json.dumps of a dict per entry
        was a tenth of the time spent on 40,000 small files."""
        if self.target is not None or self.member is not None or self.cut_at is not None:
            return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode()
        return _plain_entry_json(
            self.path, self.type, self.size, self.mtime_ns, self.mode, self.sha256, self.object
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = path_fields(self.path)
        out.update(
            type=self.type, size=self.size, mtime=self.mtime_ns / 1e9, mode=f"{self.mode & 0o7777:04o}"
        )
        if self.target is not None:
            out.update(path_fields(self.target, "target"))
        if self.sha256:
            out["sha256"] = self.sha256
        if self.object:
            out["object"] = self.object
        if self.member is not None:
            out.update(path_fields(self.member, "member"))
        if self.cut_at is not None:
            out["cut_at"] = self.cut_at
        return out


@dataclass(frozen=True)
class Held:
    """Where a file left out of the archive is: the segment object shipped earlier."""

    key: str
    sha256: str | None
    member: bytes | None = None  # its name inside the segment (where it was when shipped)
    segment_files: int = 0  # files the segment shipped (its manifest's `shipped`); 0: unknown


def held_line(member: bytes, digest: str) -> bytes:
    """One held file as `held_sha256` hashes it: its member name in the segment, NUL, its
    content SHA-256 in hex and a newline."""
    return member + b"\0" + digest.encode("ascii", "replace") + b"\n"


def held_digest(files: list[tuple[bytes, str]]) -> str:
    """The `held_sha256` of a segment: SHA-256 over its held files' held_line()s, sorted by
    name."""
    return _sorted_digest(sorted(held_line(m, d) for m, d in files))


def _sorted_digest(lines: list[bytes]) -> str:
    # Sorted lines are sorted by (member, digest): a member holds no NUL, and NUL sorts
    # before every other byte, so a name that is a prefix of another sorts first either way.
    return hashlib.sha256(b"".join(lines)).hexdigest()


@dataclass
class HeldFiles:
    """What one segment holds for a termination archive, gathered during the walk."""

    files: list[tuple[bytes, str]] = field(default_factory=list)  # (member, sha256)
    renamed: list[tuple[bytes, bytes]] = field(default_factory=list)  # (path now, member)
    segment_files: int = 0
    # Files held as held_line()s already, a directory at a time (finalprep.py's prepared
    # holds): no tuple or line is made per file at termination.
    lines: list[bytes] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        lines = [held_line(m, d) for m, d in self.files]
        lines.extend(self.lines)
        lines.sort()
        out: dict[str, Any] = {"held": len(lines), "held_sha256": _sorted_digest(lines)}
        members = [line[: line.index(b"\0")] for line in lines]
        if len(lines) != self.segment_files or len(set(members)) != len(lines):
            # Not every file it shipped once each (some gone or changed since, a hard link
            # held twice, or an older ledger line without the count): named one by one.
            out["members"] = [path_fields(m) for m in members]
        if self.renamed:
            out["renamed"] = [
                {**path_fields(now), **path_fields(member, "member")} for now, member in sorted(self.renamed)
            ]
        return out


@dataclass
class Warning:
    path: bytes
    reason: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = path_fields(self.path)
        out["reason"] = self.reason
        return out


@dataclass
class ArchiveReport:
    # Entries are kept as compact JSON text, not objects: 40,000 small files as Entry
    # objects and then as dicts for json.dumps cost about 45 MiB at the end of a 1 GiB run.
    entries_json: bytearray = field(default_factory=bytearray)
    entry_count: int = 0
    warnings: list[Warning] = field(default_factory=list)
    omitted: list[bytes] = field(default_factory=list)  # not reached before --max-duration
    # (path, bytes kept, size): files whose read --max-duration cut short (see Entry.cut_at)
    cut: list[tuple[bytes, int, int]] = field(default_factory=list)
    bytes_read: int = 0
    files: int = 0
    tar_bytes: int = 0
    held_files: int = 0  # left out: already shipped in a segment (Held)
    held_bytes: int = 0
    held: dict[str, HeldFiles] = field(default_factory=dict)  # by segment key
    held_unseen: int = 0  # of held_files, those the journal walk held with no lstat (hold_rows)
    held_prepared: int = 0  # of those, held as worked out before the termination (hold_lines)

    @property
    def stopped_early(self) -> bool:
        return bool(self.omitted or self.cut)

    def add(self, entry: Entry) -> None:
        if self.entry_count:
            self.entries_json += b","
        self.entries_json += entry.to_json_bytes()
        self.entry_count += 1

    def add_file(self, path: bytes, size: int, mtime_ns: int, mode: int, sha256: str | None) -> None:
        """add(Entry(path, "file", ...)) of a file read whole, without the Entry object."""
        if self.entry_count:
            self.entries_json += b","
        self.entries_json += _plain_entry_json(path, "file", size, mtime_ns, mode, sha256, None)
        self.entry_count += 1

    def hold(self, member: bytes, size: int, held: Held) -> None:
        """A file left out of the archive, held by segment `held.key` (format 2: no entry)."""
        self.held_files += 1
        self.held_bytes += size
        files = self.held.get(held.key)
        if files is None:
            files = self.held[held.key] = HeldFiles(segment_files=held.segment_files)
        shipped_as = member if held.member is None else held.member
        files.files.append((shipped_as, held.sha256 or ""))
        if held.member is not None:
            files.renamed.append((member, held.member))

    def hold_rows(self, rows: list[tuple[bytes, int, str, str, int]]) -> None:
        """hold() of many files held at the path they were shipped from, each (member,
        size, segment key, sha256, the segment's file count): the journal walk's, a whole
        directory at a time."""
        held = self.held
        for member, size, key, sha256, segment_files in rows:
            files = held.get(key)
            if files is None:
                files = held[key] = HeldFiles(segment_files=segment_files)
            files.files.append((member, sha256))
            self.held_bytes += size
        self.held_files += len(rows)
        self.held_unseen += len(rows)

    def hold_lines(self, key: str, segment_files: int, lines: list[bytes], size: int) -> None:
        """hold() of a directory's files held by segment `key`, as held_line()s (finalprep.py:
        worked out before the termination; `size` their bytes)."""
        files = self.held.get(key)
        if files is None:
            files = self.held[key] = HeldFiles(segment_files=segment_files)
        files.lines.extend(lines)
        self.held_bytes += size
        self.held_files += len(lines)
        self.held_unseen += len(lines)
        self.held_prepared += len(lines)

    def entries(self) -> list[dict[str, Any]]:
        """The entries as dicts (for tests and small trees; the manifest streams the text)."""
        parsed: list[dict[str, Any]] = json.loads(b"[" + bytes(self.entries_json) + b"]")
        return parsed


def build(
    report: ArchiveReport,
    *,
    key: str,
    compression: str,
    agent_version: str,
    compressed_bytes: int,
    journal: dict[str, Any] | None,
    segments: list[dict[str, Any]] | None = None,
    **meta: Any,
) -> tuple[bytes, memoryview, bytes]:
    """The manifest document as UTF-8 JSON, in three pieces (head, entries, tail) so the
    entries text — tens of MiB for a few hundred thousand files — is never copied to join
    them: the uploader reads the pieces in turn.

    With `segments` (continuous shipping), each segment that holds files for this archive
    says which (HeldFiles, module docstring); the entries are what the archive itself holds."""
    if segments is not None:
        segments = [
            {**s, **report.held[s["key"]].to_json()} if s["key"] in report.held else s for s in segments
        ]
    head = {
        "format": HELD_FORMAT if report.held else FORMAT_VERSION,
        "key": key,
        "agent_version": agent_version,
        "compression": compression,
        **meta,
        "totals": {
            "entries": report.entry_count,
            "files": report.files,
            "bytes_read": report.bytes_read,
            "tar_bytes": report.tar_bytes,
            "compressed_bytes": compressed_bytes,
            "warnings": len(report.warnings),
            "omitted": len(report.omitted),
            "cut_short": len(report.cut),
            **(
                {
                    "held_files": report.held_files,
                    "held_bytes": report.held_bytes,
                    "segment_bytes": sum(int(s.get("compressed_bytes", 0)) for s in segments),
                }
                if segments is not None
                else {}
            ),
        },
        "journal": journal,
        "warnings": [w.to_json() for w in report.warnings],
        "omitted": [path_fields(p) for p in report.omitted],
        "cut_short": [{**path_fields(p), "kept": kept, "size": size} for p, kept, size in report.cut],
        **({"segments": segments} if segments is not None else {}),
    }
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    start = text[:-1] + b',"entries":['
    if report.held:
        guard = json.dumps(FORMAT_GUARD, separators=(",", ":")).encode("utf-8")
        start += guard + (b"," if report.entries_json else b"")
    return start, memoryview(report.entries_json), b"]}"
