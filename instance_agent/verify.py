"""`instance-agent verify`: compare a restored tree with the manifest of its backup.

For every manifest entry under DEST (member names as archived, e.g. `var/log/syslog`):
- it exists, with the same type (file, directory, symlink);
- a file has the same size, and the same SHA-256 when the manifest has one (`--hash
  sha256` at backup time). Without a digest, a same-size change is caught only by the
  modification time, which restore sets from the archive: to the second, it must match;
- a symlink has the same target.
`restore --verify` does not read its files back: restore hashed each file's bytes as it wrote
them (restore.Written), so a file with a digest is compared by that digest, and then checked
on disk by an lstat only: the same inode restore wrote (not another file put at its path), the
same size, and the modification time restore set (a write since moves it). What that leaves
out, and `verify` still catches: a same-size change made after the restore wrote the file
whose modification time was then set back, or damage below the page cache.
Anything under DEST that the manifest does not list (other than the parents of what it lists)
is a difference too. Modes and owners are not compared: restore drops setuid bits and does not
restore owners.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from instance_agent import segrefs
from instance_agent.errors import AgentError, ConfigError
from instance_agent.manifest import path_from_fields
from instance_agent.manifest_check import UnsafeManifest, relative_inside
from instance_agent.restore import Selection, Written
from instance_agent.s3read import S3Reader, archive_key_of, parse_s3_url, read_manifest

READ = 1 << 20
MTIME_SLACK = 1  # seconds: tar stores whole seconds, the manifest nanoseconds


class VerifyFailed(AgentError):
    """The tree differs from the manifest."""


@dataclass(frozen=True)
class Difference:
    path: bytes  # relative to DEST
    problem: str

    def display(self) -> str:
        return f"{os.fsdecode(self.path)!s}: {self.problem}".encode("utf-8", "backslashreplace").decode(
            "utf-8"
        )

    def to_json(self) -> dict[str, str]:
        return {
            "path": os.fsdecode(self.path).encode("utf-8", "backslashreplace").decode(),
            "problem": self.problem,
        }


@dataclass
class VerifyReport:
    checked: int
    differences: list[Difference]

    def raise_if_different(self) -> None:
        if self.differences:
            first = self.differences[0]
            more = f" (and {len(self.differences) - 1} more)" if len(self.differences) > 1 else ""
            raise VerifyFailed(
                f"{len(self.differences)} difference(s) against the manifest; first: {first.display()}{more}"
            )


def load_manifest(where: str, s3: S3Reader | None, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest from `s3://bucket/key` (the archive's or the manifest's key) or a file."""
    if where.startswith("s3://"):
        if s3 is None:
            raise ConfigError("an s3:// manifest needs S3 access")
        bucket, key = parse_s3_url(where)
        key = archive_key_of(key)
        return segrefs.expand(
            s3, bucket, key, read_manifest(s3, bucket, key + ".manifest.json", extra), extra
        )
    try:
        with open(where, "rb") as fh:
            doc = json.load(fh)
    except OSError as err:
        raise ConfigError(f"manifest {where}: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError(f"manifest {where} is not JSON: {err}") from None
    if not isinstance(doc, dict) or "entries" not in doc:
        raise ConfigError(f"{where} is not a manifest (no entries)")
    if segrefs.held_segments(doc):
        raise ConfigError(
            f"{where} names the shipped segments that hold its files: give it as "
            "s3://BUCKET/KEY, so that their manifests can be read"
        )
    return doc


def _digest(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(READ):
            h.update(chunk)
    return h.hexdigest()


# An lstat's file type as the manifest names it; anything else is a "special file".
_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def _entry_problem(full: bytes, entry: Mapping[str, Any], done: Written | None) -> str | None:
    want = str(entry.get("type"))
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"cannot read: {err.strerror}"
    have = _kind(st.st_mode)
    if have != want:
        return f"is a {have}, the backup has a {want}"
    if want == "symlink":
        target = (
            path_from_fields(dict(entry), "target") if ("target" in entry or "target_b64" in entry) else None
        )
        found = os.readlink(full)
        if target is not None and found != target:
            return f"points to {os.fsdecode(found)!r}, the backup has {os.fsdecode(target)!r}"
        return None
    if want != "file":
        return None
    size = int(entry.get("size", -1))
    if st.st_size != size:
        return f"size {st.st_size:,} bytes, the backup has {size:,}"
    digest = entry.get("sha256")
    if digest and done is None:
        try:
            found_digest = _digest(full)
        except OSError as err:
            return f"cannot read: {err.strerror}"
        return None if found_digest == digest else "content differs (sha256)"
    if digest and done is not None:
        if done.sha256 != digest:
            return "content differs (sha256)"
        if st.st_ino != done.ino:
            return "replaced since it was restored: another file is at its path"
    mtime = entry.get("mtime")
    if isinstance(mtime, (int, float)) and abs(int(st.st_mtime) - int(mtime)) > MTIME_SLACK:
        if digest:
            return (
                "modified since it was restored: its modification time differs "
                "(`instance-agent verify` compares its content)"
            )
        return (
            "modified since the backup: its modification time differs, and the manifest "
            "has no digest to compare the content (back up with --hash sha256 for one)"
        )
    return None


def _extras(root: bytes, prefix: bytes, known: set[bytes]) -> Iterator[bytes]:
    """Paths under `root` (relative) that are not in `known`; an unknown directory is named
    once, not with everything in it. Symlinks are not followed."""
    # os.walk's paths all start with `prefix` (compare's): the relative path is a slice,
    # where os.path.relpath took about a third of a verify of 36,000 files.
    for dirpath, dirnames, filenames in os.walk(root):
        here = b"" if dirpath == root else dirpath[len(prefix) :] + b"/"
        for name in filenames:
            rel = here + name
            if rel not in known:
                yield rel
        for name in list(dirnames):
            rel = here + name
            if rel not in known:
                dirnames.remove(name)
                yield rel


def compare(
    dest: str,
    manifest: Mapping[str, Any],
    select: Selection | None = None,
    written: Mapping[bytes, Written] | None = None,
) -> VerifyReport:
    """Differences between the tree at `dest` and `manifest` (module docstring); `written`,
    restore's record of the files it has just written there, by path under `dest`."""
    if not os.path.isdir(dest):
        raise ConfigError(f"{dest} is not a directory")
    root = os.fsencode(os.path.abspath(dest))
    entries = manifest.get("entries")
    if not isinstance(entries, list):
        raise ConfigError("the manifest has no entries list")
    differences: list[Difference] = []
    expected: set[bytes] = set()
    checked = 0
    # root is absolute and normalised, and rel has no leading "/": a path is prefix + rel,
    # where os.path.join's checks took a sixth of a verify of 36,000 entries.
    prefix = root.rstrip(b"/") + b"/"
    # Asked once, not once per entry: a Selection's truth is a method call.
    pick = select if select else None
    done = written if written else {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        rel = path_from_fields(entry).strip(b"/")
        if not rel or (pick is not None and not pick(os.fsdecode(rel))):
            continue
        if not relative_inside(rel):  # the manifest is the instance's: never look outside root
            raise UnsafeManifest(f"refusing the manifest: entry {os.fsdecode(rel)!r} has an unsafe path")
        expected.add(rel)
        checked += 1
        problem = _entry_problem(prefix + rel, entry, done.get(rel))
        if problem and entry.get("object"):
            problem += f" (held in segment {entry['object']})"
        if problem:
            differences.append(Difference(rel, problem))
    parents: set[bytes] = set()
    # A directory's files share its chain of parents: walk it once per directory, not once
    # per file (rel and its directory followed by "/" have the same ancestors).
    for head in {rel.rpartition(b"/")[0] for rel in expected}:
        for parent in _ancestors(head + b"/"):
            if parent in parents:
                break  # and so are its own parents
            parents.add(parent)
    known = expected | parents
    differences.extend(Difference(rel, "not in the backup") for rel in _extras(root, prefix, known))
    return VerifyReport(checked, differences)


def _ancestors(rel: bytes) -> Iterator[bytes]:
    """os.path.dirname's parents of `rel`, innermost first, found by one rfind each."""
    cut = rel.rfind(b"/")
    while cut > 0:
        parent = rel[:cut].rstrip(b"/")
        if not parent:
            return
        yield parent
        cut = parent.rfind(b"/")


def render_text(report: VerifyReport) -> str:
    """Each difference on a line of its own, then the verdict."""
    lines = [f"differs: {d.display()}" for d in report.differences]
    verdict = (
        f"verified {report.checked} entries against the manifest: identical"
        if not report.differences
        else f"{len(report.differences)} difference(s) in {report.checked} entries"
    )
    return "".join(line + "\n" for line in [*lines, verdict])
