"""Walk the sources and write a pax tar of them into a byte sink, with no temp file.

Rules for what the filesystem throws at us (each a warning in the manifest, never a failure):
- symlinks are stored as links, never followed (below a source root);
- the walk holds a descriptor of each directory it is in and opens every entry relative to
  it (openat with O_NOFOLLOW, and O_DIRECTORY for directories), so a directory swapped for a
  symlink mid-walk (say, to /etc by a user who owns a directory under a source) is skipped
  with a warning, never followed, and no path is resolved again from the root;
- FIFOs, sockets and devices are skipped without being opened (opening a FIFO blocks);
- unreadable files and files that vanish are skipped;
- past the deadline (--max-duration) no new entry is started; what was not reached is listed.

The tar stream itself (its buffer, and each file's data: shrunk, grown, sparse or cut by the
deadline) is tarstream.py's.
"""

from __future__ import annotations

import errno
import fnmatch
import grp
import os
import pwd
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

from instance_agent import tarheader
from instance_agent.manifest import ArchiveReport, Entry, Held
from instance_agent.tarstream import Sink, TarStream

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SWAPPED = "replaced by a symlink or another file during the backup; not followed"


# Asked of each regular file before it is opened (path, its lstat, and how to open it:
# `name` relative to `dir_fd`): a Held leaves it out, listed in the manifest with its holder.
Skip = Callable[[bytes, os.stat_result, int | None, bytes], Held | None]


# A directory's entry as listed: its name, whether the listing says it is a regular file
# (d_type), and its inode (d_ino).
Listed = tuple[bytes, bool, int]

# Asked of each directory as it is listed, before any lstat (its path, its device, its
# sorted entries, and a test of paths that must be walked whatever the ledger says): the
# files held with no lstat, as ArchiveReport.hold_rows takes them, and the entries left to
# walk (finalwalk.py, the termination archive's journal walk).
Quick = Callable[
    [bytes, int, list[Listed], Callable[[bytes], bool]],
    tuple[list[tuple[bytes, int, str, str, int]], list[Listed]],
]


# Asked of each directory before it is listed (its path, device and inode, as opened): what
# was worked out for it before the termination, when nothing in it changed since
# (finalprep.py): its held files a segment at a time, each (key, the segment's file count,
# held lines as ArchiveReport.hold_lines takes them, their bytes), and the entries to walk.
HeldGroup = tuple[str, int, list[bytes], int]
Recalled = tuple[Sequence[HeldGroup], Sequence[Listed]]
Recall = Callable[[bytes, int, int], Recalled | None]


def list_dir(fd: int) -> list[Listed]:
    """The entries of directory `fd`, sorted, as the walk takes them (and finalprep.py keeps
    them: the two must agree)."""
    with os.scandir(fd) as listing:
        return sorted((os.fsencode(e.name), e.is_file(follow_symlinks=False), e.inode()) for e in listing)


# A directory being walked: its path, its descriptor, and its entries still to do.
_Level = tuple[bytes, int, Iterator[Listed]]


# Owner names as the header fields take them (bytes), looked up once per id.
@lru_cache(maxsize=256)
def _uname(uid: int) -> bytes:
    try:
        return pwd.getpwuid(uid).pw_name.encode(errors="replace")
    except KeyError:
        return b""


@lru_cache(maxsize=256)
def _gname(gid: int) -> bytes:
    try:
        return grp.getgrgid(gid).gr_name.encode(errors="replace")
    except KeyError:
        return b""


@lru_cache(maxsize=1024)
def _owner(mode: int, uid: int, gid: int) -> tarheader.Owner | None:
    """A member's owner fields (tarheader.owner_fields), looked up once per mode and owner."""
    return tarheader.owner_fields(stat.S_IMODE(mode), uid, gid, _uname(uid), _gname(gid))


def _special_kind(mode: int) -> str | None:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return None


class Excluder:
    """Globs: with a '/' they match the whole path, without one the base name."""

    def __init__(self, patterns: Sequence[str]) -> None:
        # One compiled alternation per kind: a single regex match per path, not one per glob.
        full = [p for p in patterns if "/" in p]
        self.full = self._compile(full)
        self.base = self._compile([p for p in patterns if "/" not in p])
        # A whole-path glob matches only paths that begin with its text before the first
        # wildcard ("/var/log/journal/" for the default): one C-level startswith tells most
        # paths apart, not a decode and a regex match per file walked.
        self._prefixes = tuple(os.fsencode(re.split(r"[*?\[]", p, maxsplit=1)[0]) for p in full)

    @staticmethod
    def _compile(globs: list[str]) -> re.Pattern[str] | None:
        if not globs:
            return None
        return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs), re.DOTALL)

    def __call__(self, path: bytes) -> bool:
        if self.base is None and (self.full is None or not path.startswith(self._prefixes)):
            return False
        text = os.fsdecode(path)
        if self.full is not None and self.full.match(text):
            return True
        return self.base is not None and self.base.match(text.rsplit("/", 1)[-1]) is not None


class Archiver(TarStream):
    def __init__(
        self,
        sink: Sink,
        *,
        excludes: Sequence[str] = (),
        deadline: float | None = None,
        clock: Callable[[], float],
        hash_name: str = "none",
        progress: Callable[[ArchiveReport], None] | None = None,
        max_file_size: int | None = None,
        one_file_system: bool = False,
        before_open: Callable[[bytes], None] | None = None,
        skip: Skip | None = None,
        quick: Quick | None = None,
        recall: Recall | None = None,
    ) -> None:
        super().__init__(sink, deadline=deadline, clock=clock, hash_name=hash_name)
        self._max_file_size = max_file_size
        self._one_fs = one_file_system
        self._root_dev = 0
        self._excluded = Excluder(excludes)
        self._progress = progress
        self._seen_dirs: set[tuple[int, int]] = set()
        self._root_files: set[bytes] = set()  # members given as sources (see _add_root)
        # Called with each entry's path after it was listed and stat'ed, before it is opened:
        # tests use it to swap a directory at exactly that moment.
        self._before_open = before_open
        self._skip = skip
        self._quick = quick
        self._recall = recall

    # -- public -------------------------------------------------------------------------
    def add_sources(self, sources: Sequence[str]) -> None:
        for i, source in enumerate(sources):
            if self._past_deadline():
                self.report.omitted.extend(os.fsencode(s) for s in sources[i:])
                return
            self._add_root(os.fsencode(source))

    def add_file_at(self, dir_fd: int, name: bytes, path: bytes) -> os.stat_result | None:
        """Archive the one entry `name` of directory `dir_fd` as `path`, never following a
        symlink in its place; its lstat, or None when it is gone (a segment)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as err:
            self._warn(path, f"cannot stat: {err.strerror}")
            return None
        self._add_entry(path, st, dir_fd, name)
        return st

    # -- walking ------------------------------------------------------------------------
    def _add_root(self, root: bytes) -> None:
        root = os.path.normpath(root)
        try:
            st = os.stat(root)  # a source given as a symlink is followed: that is the intent
        except OSError as err:
            self._warn(root, f"source not readable: {err.strerror}")
            return
        if self._excluded(root):
            return
        if not stat.S_ISDIR(st.st_mode):
            member = root.lstrip(b"/")
            if member not in self._root_files and not self._under_archived_dir(root):
                self._add_entry(root, st, None, root)
                self._root_files.add(member)
            return
        self._root_dev = st.st_dev
        if not self._add_dir_header(root, st):
            return
        # Depth-first with explicit iterators, so the deadline can list what is left. Each
        # level holds its directory's descriptor; everything below is opened relative to it.
        stack: list[_Level] = []
        try:
            self._push_dir(stack, root, None, root, st)
            self._walk(stack)
        finally:
            for _, fd, _ in stack:
                os.close(fd)

    def _walk(self, stack: list[_Level]) -> None:
        while stack:
            parent, dir_fd, names = stack[-1]
            item = next(names, None)
            if item is None:
                stack.pop()
                os.close(dir_fd)
                continue
            name, regular, _ = item
            path = parent.rstrip(b"/") + b"/" + name
            if self._past_deadline():
                self.report.omitted.append(path)
                for p, _, rest in reversed(stack):
                    self.report.omitted.extend(p.rstrip(b"/") + b"/" + n for n, _, _ in rest)
                return
            if self._excluded(path):
                continue
            if regular and self._skip is None:
                # The listing says a regular file: open it (O_NOFOLLOW, never blocking) and
                # take its metadata from the descriptor, with no lstat first. What the lstat
                # guarded against is checked on the descriptor: a symlink swapped in fails the
                # open, anything else but a regular file is skipped after fstat (_add_file).
                # One syscall and one stat result fewer a file, on trees of small files.
                if self._before_open is not None:
                    self._before_open(path)
                member = path.lstrip(b"/")
                if not (self._root_files and member in self._root_files):
                    self._add_file(path, member, dir_fd, name)
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                self._warn(path, "vanished before it was read")
                continue
            except OSError as err:
                self._warn(path, f"cannot stat: {err.strerror}")
                continue
            if self._before_open is not None:
                self._before_open(path)
            if stat.S_ISDIR(st.st_mode):
                if self._add_dir_header(path, st):
                    if self._one_fs and st.st_dev != self._root_dev:
                        self._warn(path, "on another file system (--one-file-system); not descended")
                    else:
                        self._push_dir(stack, path, dir_fd, name, st)
            else:
                self._add_entry(path, st, dir_fd, name)

    def _push_dir(
        self,
        stack: list[_Level],
        path: bytes,
        parent_fd: int | None,
        name: bytes,
        st: os.stat_result,
    ) -> None:
        """Open directory `name` (relative to `parent_fd`; a source root by its path, where a
        symlink is followed on purpose), check it is the one stat'ed, and list it."""
        try:
            fd = os.open(
                name, DIR_FLAGS if parent_fd is not None else DIR_FLAGS & ~os.O_NOFOLLOW, dir_fd=parent_fd
            )
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                self._warn(path, _SWAPPED)
            else:
                self._warn(path, f"directory not listable: {err.strerror}")
            return
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                self._warn(path, _SWAPPED)  # another directory renamed into its place
                os.close(fd)
                return
            if self._recall is not None and not self._root_files:
                # Unchanged since it was worked out ahead (finalprep.py, which knows no
                # root files): no listing, nothing made per file.
                recalled = self._recall(path, now.st_dev, now.st_ino)
                if recalled is not None:
                    segments, rest = recalled
                    for key, segment_files, lines, size in segments:
                        self.report.hold_lines(key, segment_files, lines, size)
                    stack.append((path, fd, iter(rest)))
                    return
            entries = list_dir(fd)
        except OSError as err:
            os.close(fd)
            self._warn(path, f"directory not listable: {err.strerror}")
            return
        if self._quick is not None:
            # Shipped and, by the journal, unchanged since: held with no lstat.
            held, entries = self._quick(path, now.st_dev, entries, self._must_walk)
            self.report.hold_rows(held)
        stack.append((path, fd, iter(entries)))

    def _must_walk(self, path: bytes) -> bool:
        """Excluded, or given as a source of its own: the walk's own rules decide."""
        return self._excluded(path) or bool(self._root_files and path.lstrip(b"/") in self._root_files)

    def _add_dir_header(self, path: bytes, st: os.stat_result) -> bool:
        ident = (st.st_dev, st.st_ino)
        if ident in self._seen_dirs:
            return False  # overlapping sources: archived already
        self._seen_dirs.add(ident)
        member = path.lstrip(b"/")
        if member:
            self._header(member + b"/", st, tarheader.DIRTYPE)
            self.report.add(Entry(member, "dir", 0, st.st_mtime_ns, stat.S_IMODE(st.st_mode)))
        return True

    def _under_archived_dir(self, path: bytes) -> bool:
        """True when an earlier source directory already holds `path` (overlapping sources)."""
        parent = os.path.dirname(path)
        while parent and parent != b"/":
            try:
                st = os.stat(parent)
            except OSError:
                return False
            if (st.st_dev, st.st_ino) in self._seen_dirs:
                return True
            parent = os.path.dirname(parent)
        return False

    def _add_entry(self, path: bytes, st: os.stat_result, dir_fd: int | None, name: bytes) -> None:
        """`name` relative to `dir_fd` (None: a source given by its path) is at `path`."""
        member = path.lstrip(b"/")
        if self._root_files and member in self._root_files:
            return  # given as a source of its own, earlier
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError as err:
                self._warn(path, f"cannot read link: {err.strerror}")
                return
            self._header(member, st, tarheader.SYMTYPE, linkname=target)
            self.report.add(
                Entry(member, "symlink", 0, st.st_mtime_ns, stat.S_IMODE(st.st_mode), target=target)
            )
            return
        special = _special_kind(st.st_mode)
        if special:
            self._warn(path, f"skipped {special}")
            return
        if self._skip is not None and stat.S_ISREG(st.st_mode):
            held = self._skip(path, st, dir_fd, name)
            if held is not None:
                # No entry: the segment's own manifest has it (manifest.HeldFiles).
                self.report.hold(member, st.st_size, held)
                return
        self._add_file(path, member, dir_fd, name)

    def _header(
        self, member: bytes, st: os.stat_result, typeflag: bytes, *, size: int = 0, linkname: bytes = b""
    ) -> None:
        mtime = int(st.st_mtime)
        if not linkname:
            # Most members' header is one ustar block: packed straight into the stream's
            # buffer (see tarheader.encode_into), no bytes object made and copied per member.
            owner = _owner(st.st_mode, st.st_uid, st.st_gid)
            if owner is not None:
                if self._fill + tarheader.BLOCK > len(self._buf):
                    self._flush()
                if tarheader.encode_into(self._buf, self._fill, member, typeflag, size, mtime, owner):
                    self._fill += tarheader.BLOCK
                    self.report.tar_bytes += tarheader.BLOCK
                    return
        self._write(
            tarheader.encode(
                member,
                typeflag=typeflag,
                size=size,
                mode=stat.S_IMODE(st.st_mode),
                mtime=mtime,
                uid=st.st_uid,
                gid=st.st_gid,
                linkname=linkname,
                uname=_uname(st.st_uid),
                gname=_gname(st.st_gid),
            )
        )

    def _add_file(self, path: bytes, member: bytes, dir_fd: int | None, name: bytes) -> None:
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            self._warn(path, "vanished before it was read")
            return
        except OSError as err:
            reason = "symlink swapped in" if err.errno == errno.ELOOP else err.strerror
            self._warn(path, f"cannot open: {reason}")
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._warn(path, "changed type during backup; skipped")
                return
            if self._max_file_size is not None and st.st_size > self._max_file_size:
                self._warn(path, f"{st.st_size} bytes is over --max-file-size; skipped")
                return
            self._header(member, st, tarheader.REGTYPE, size=st.st_size)
            # A file with fewer allocated blocks than its size has holes: copy it by extents
            # (SEEK_DATA/SEEK_HOLE), writing zeros for holes without reading them.
            sparse = st.st_blocks * 512 < st.st_size
            digest, cut_at = self._copy(fd, path, st.st_size, sparse)
        finally:
            os.close(fd)
        self.report.files += 1
        if cut_at is None:
            self.report.add_file(member, st.st_size, st.st_mtime_ns, st.st_mode, digest)
        else:
            mode = stat.S_IMODE(st.st_mode)
            self.report.add(
                Entry(member, "file", st.st_size, st.st_mtime_ns, mode, sha256=digest, cut_at=cut_at)
            )
        if self._progress:
            self._progress(self.report)
