"""The plain POSIX tar header, read in one struct call: the restore's hot path.

Profiled on a 1 GiB restore of 35,814 files, tarfile's `TarInfo.frombuf` held the GIL for
half of the restore thread's time: it slices every field out, sums the block twice (unsigned
and signed checksums, 8 µs) and parses each number through a decode and a strip. Nearly every
header a backup holds is a plain one: POSIX ustar magic, and a file, directory or link. For
those, `plain` builds the same TarInfo from one `struct` unpack and one C-level checksum sum.

Anything else (GNU or old-style magic, pax and GNU long-name headers, sparse files, base-256
numbers, a checksum only the signed sum matches, a field `int` would not read) returns None,
and the caller hands the block to tarfile's own `frombuf`, which reads it or words the error
exactly as before. So this path may only decline, never accept what tarfile would refuse or
read differently; tests/unit/test_tarread_unit.py holds it to that, field by field.
"""

from __future__ import annotations

import struct
import tarfile

from instance_agent.tarheader import BLOCK

# name mode uid gid size mtime chksum type linkname magic uname gname devmajor devminor prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_POSIX_MAGIC = b"ustar\x0000"
# Files, hard links, symlinks and directories; never AREGTYPE (b"\0"), whose name decides
# its kind, nor anything tarfile's `_proc_member` treats specially.
_PLAIN = frozenset((tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE))
_SPACES = 8 * ord(" ")  # the checksum field counts as eight spaces in its own sum


# The owner fields (mode, uid, gid, uname, gname, device numbers) repeat across a whole
# archive: each distinct set is read once. Keyed by the seven raw fields, then the encoding
# and error handler that decode the names; bounded, for an archive of many owners.
OwnerKey = tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, str, str]
_OWNERS: dict[OwnerKey, tuple[int, int, int, str, str, int, int]] = {}
_OWNERS_MAX = 1024


def _text(field: bytes, encoding: str, errors: str) -> str:
    return field.split(b"\0", 1)[0].decode(encoding, errors) if field[0] else ""


def _number(field: bytes) -> int:
    """An octal field as tarfile's `nti` reads it; ValueError where it would refuse it (or
    where it is base-256, which `int` refuses too, and tarfile then reads)."""
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _owner(fields: OwnerKey) -> tuple[int, int, int, str, str, int, int]:
    """The owner fields read, by the raw fields and the encoding that decodes the names."""
    found = _OWNERS.get(fields)
    if found is None:
        mode, uid, gid, uname, gname, major, minor, encoding, errors = fields
        found = (
            _number(mode),
            _number(uid),
            _number(gid),
            _text(uname, encoding, errors),
            _text(gname, encoding, errors),
            _number(major),
            _number(minor),
        )
        if len(_OWNERS) < _OWNERS_MAX:
            _OWNERS[fields] = found
    return found


def plain(cls: type[tarfile.TarInfo], buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo | None:
    """The TarInfo `cls.frombuf(buf, ...)` would build, for a plain POSIX header; None for
    any other block (including the end-of-archive block and anything malformed)."""
    if len(buf) != BLOCK:
        return None
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, magic, uname, gname, major, minor, prefix) = (
        _HEADER.unpack(buf)
    )
    if magic != _POSIX_MAGIC or kind not in _PLAIN:
        return None
    try:
        # The unsigned sum only: a header that needs tarfile's signed one is left to it.
        checksum = _number(chksum)
        if checksum != sum(buf.translate(None, b"\0")) - sum(chksum) + _SPACES:
            return None
        owner = _owner((mode, uid, gid, uname, gname, major, minor, encoding, errors))
        length, when = _number(size), _number(mtime)
        path = _text(name, encoding, errors)
        target = _text(linkname, encoding, errors)
        head = _text(prefix, encoding, errors)
    except (ValueError, UnicodeError):
        return None
    info = cls()
    info.mode, info.uid, info.gid, info.uname, info.gname, info.devmajor, info.devminor = owner
    info.size, info.mtime, info.chksum, info.type, info.linkname = length, when, checksum, kind, target
    if kind == tarfile.DIRTYPE:
        path = path.rstrip("/")
    info.name = f"{head}/{path}" if head else path
    return info
