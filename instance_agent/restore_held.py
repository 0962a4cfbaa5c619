"""What one segment of a shipped backup holds for the restored tree, written straight to
its place as the segment streams in (assemble.py).

A segment packs many files under the names they had when shipped; the final manifest says
which of them the backup holds, and under which names now (a file renamed by a rotation
since is restored under its new name). So each member is known, before its bytes arrive, to
be either the backup's, and written at its path in the tree, or not, and skipped: nothing is
extracted to one side and moved afterwards. Every member is still checked as any archive's
are (restore.py: names, links, kinds, setuid), so a forged segment fails as it did; the
files go through the same descriptors of the staged tree, never through a symlink, and a
path the final archive already holds (a file, or a symlink it will make) fails the restore.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field

from instance_agent.restore import (
    Extraction,
    Extractor,
    both_error,
    check_link,
    file_mode,
    member_parts,
    refuse_kind,
    tree_path,
    write_file,
)
from instance_agent.restore_tree import COPY, Parts, RestoreError, Staged, UnsafeArchive, Written


@dataclass
class Held:
    """restore.Members for one segment: each member the backup takes from it, by its name in
    the segment, with its names in the tree (the last takes the bytes, earlier ones copies).
    Every other member is checked, then skipped."""

    label: str  # "segment s3://bucket/key": every error of this segment names it
    names: dict[Parts, list[Parts]]
    # A one-file segment of an older agent, renamed since, may not name its member: then
    # its only regular file is the one held.
    any_name: bool = False
    placed: dict[Parts, Parts] = field(default_factory=dict)  # member -> the file with its bytes
    sizes: dict[Parts, int] = field(default_factory=dict)  # by path in the tree
    spare: Parts | None = None  # where a file taken on `any_name` went
    regular: int = 0  # regular files in the segment

    def member(self, run: Extraction, member: tarfile.TarInfo) -> None:
        name = member.name.rstrip("/")
        parts = member_parts(name)
        if member.isdir():
            return  # the tree's directories are the final archive's, or made for its files
        if member.issym():
            check_link(run.links, parts, member.linkname)
            run.links[parts] = member.linkname
            return
        if member.islnk():
            if parts in self.names:
                source = self.placed.get(member_parts(member.linkname.rstrip("/")))
                if source is None:
                    raise UnsafeArchive(
                        f"refusing hard link {name!r} -> {member.linkname!r}: its target is "
                        "not a file restored before it"
                    )
                self.placed[parts] = source
            return
        if not member.isreg():
            refuse_kind(member, name)
        mode = file_mode(run, member, name)
        self.regular += 1
        targets = self.names.get(parts)
        if targets is not None:
            last = targets[-1]
            replace = self.placed.get(parts) == last or self.spare == last  # held twice: the last wins
            self.placed[parts] = last
        elif self.any_name and not self.placed and self.spare is None:
            (targets,) = self.names.values()
            self.spare = last = targets[-1]
            replace = False
        else:
            return  # not the backup's: never written
        if last in run.into.tree.links:
            raise both_error(last)
        write_file(run, member, last, mode, replace=replace, count=False)
        self.sizes[last] = member.size

    def done(self, into: Extractor) -> None:
        """Every file held is in place; copied to its other names (hard links, or one
        content shipped once and found under two names)."""
        if self.any_name and not self.placed and self.regular == 1 and self.spare is not None:
            (member,) = self.names
            self.placed[member] = self.spare
        copies = []
        for member, targets in self.names.items():
            source = self.placed.get(member)
            if source is None:
                raise RestoreError(
                    f"it does not hold {'/'.join(member)!r}, which the backup's manifest says it does"
                )
            copies += [(source, t) for t in targets if t != source]
            into.report.files += len(targets)
            into.report.bytes += self.sizes[source] * len(targets)
        if not copies:
            return
        into.writer.sync()  # the copies read what the writer wrote
        written = into.report.written
        for source, target in copies:
            if target in into.tree.links:
                raise both_error(target)
            done = copy_file(into.tree, source, target, digest=written is not None)
            if written is not None and done is not None:
                written[tree_path(target)] = done


def copy_file(tree: Staged, source: Parts, target: Parts, *, digest: bool) -> Written | None:
    """Copy the tree's file `source` to the new file `target`, with its mode and times, both
    reached through the tree's descriptors; with `digest`, what was written into the copy."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    src = os.open(source[-1], flags, dir_fd=tree.parent(source))
    try:
        st = os.fstat(src)
        try:
            out = os.open(
                target[-1],
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=tree.parent(target),
            )
        except FileExistsError:
            raise both_error(target) from None
        try:
            h = hashlib.sha256() if digest else None
            while chunk := os.read(src, COPY):
                if h is not None:
                    h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            os.fchmod(out, st.st_mode & 0o7777)
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            return Written(h.hexdigest(), os.fstat(out).st_ino) if h is not None else None
        finally:
            os.close(out)
    finally:
        os.close(src)
