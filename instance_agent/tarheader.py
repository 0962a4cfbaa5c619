"""POSIX pax tar headers, encoded by hand so the writer stays a plain byte stream.

Why not `tarfile`? Its pax writer marks non-UTF-8 names with `hdrcharset=BINARY`, which GNU
tar 1.34 reports as an unknown keyword on every extraction; and its `addfile` copies data in
16 KiB steps. Here names are bytes end to end: a pax `path` record carries the exact bytes
(GNU tar and Python's tarfile both read them back unchanged), and data is written by the
caller in large blocks.
"""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache

BLOCK = 512
REGTYPE = b"0"
SYMTYPE = b"2"
DIRTYPE = b"5"
PAXTYPE = b"x"

_USTAR_NAME = 100
_USTAR_PREFIX = 155
_MAX_OCTAL_11 = 8**11 - 1  # size/mtime fields hold 11 octal digits: 8 GiB - 1
_MAX_OCTAL_7 = 8**7 - 1  # uid/gid fields


def padding(size: int) -> int:
    """Zero bytes needed after `size` bytes of data to reach a block boundary."""
    return -size % BLOCK


def _pax_record(keyword: str, value: bytes) -> bytes:
    # "%d %s=%s\n" where %d counts the whole record, itself included.
    body = b" " + keyword.encode() + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) when the path fits ustar's two fields as ASCII, else None."""
    if not name.isascii():
        return None
    if len(name) <= _USTAR_NAME:
        return b"", name
    cut = name.rfind(b"/", 0, _USTAR_PREFIX + 1)
    while cut > 0:
        if len(name) - cut - 1 <= _USTAR_NAME:
            return name[:cut], name[cut + 1 :]
        cut = name.rfind(b"/", 0, cut)
    return None


# name mode uid gid size mtime chksum type linkname magic+version uname gname devmajor devminor
# prefix, padded to 512: one C-level pack per header instead of a dozen slice assignments.
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_ZERO8 = b"0000000\0"


# mode, uid, gid, uname and gname as the header's fields.
Owner = tuple[bytes, bytes, bytes, bytes, bytes]


@lru_cache(maxsize=1024)
def _owner_fields(mode: int, uid: int, gid: int, uname: bytes, gname: bytes) -> Owner:
    """mode, uid, gid, uname, gname as header fields: the same few owners and modes recur
    across a whole tree, so they are formatted once each, not once per member."""
    return (
        b"%07o\0" % (mode & 0o7777),
        b"%07o\0" % min(uid, _MAX_OCTAL_7),
        b"%07o\0" % min(gid, _MAX_OCTAL_7),
        uname[:31],
        gname[:31],
    )


def _ustar_block(
    name: bytes,
    prefix: bytes,
    *,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes,
    uname: bytes,
    gname: bytes,
) -> bytes:
    block = bytearray(BLOCK)
    owner = _owner_fields(mode, uid, gid, uname, gname)
    _ustar_into(block, 0, name, prefix, owner, size, mtime, typeflag, linkname)
    return bytes(block)


def _ustar_into(
    buf: bytearray,
    off: int,
    name: bytes,
    prefix: bytes,
    owner: Owner,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes,
) -> None:
    """One ustar block packed at buf[off:off + 512], its checksum summed in place: no bytes
    object per field join or per checksum splice (positional, since this runs per member)."""
    _USTAR.pack_into(
        buf,
        off,
        name,
        owner[0],
        owner[1],
        owner[2],
        b"%011o\0" % min(size, _MAX_OCTAL_11),
        b"%011o\0" % min(max(mtime, 0), _MAX_OCTAL_11),
        b"        ",
        typeflag,
        linkname,
        b"ustar\x0000",
        owner[3],
        owner[4],
        _ZERO8,
        _ZERO8,
        prefix,
    )
    view = memoryview(buf)
    buf[off + 148 : off + 156] = b"%06o\0 " % _byte_sum(view[off : off + BLOCK])


def owner_fields(mode: int, uid: int, gid: int, uname: bytes, gname: bytes) -> Owner | None:
    """The owner fields `encode_into` takes; None when uid or gid need a pax record."""
    if uid > _MAX_OCTAL_7 or gid > _MAX_OCTAL_7:
        return None
    return _owner_fields(mode, uid, gid, uname, gname)


def encode_into(
    buf: bytearray, off: int, name: bytes, typeflag: bytes, size: int, mtime: int, owner: Owner
) -> bool:
    """The common member, a regular file or directory whose header is one ustar block, packed
    at buf[off:off + 512]: the same block `encode` gives it. False, writing nothing, when the
    member needs a pax header (then `encode`). On a tree of small files this is per-file work
    on the one thread that walks the tree, so it skips encode's general path."""
    if len(name) > _USTAR_NAME or not name.isascii():
        split = _split_ustar(name)
        if split is None:
            return False
        prefix, name = split
    else:
        prefix = b""
    if size > _MAX_OCTAL_11 or not 0 <= mtime <= _MAX_OCTAL_11:
        return False
    _ustar_into(buf, off, name, prefix, owner, size, mtime, typeflag, b"")
    return True


def _byte_sum(block: bytes | memoryview) -> int:
    """The ustar checksum: the plain sum of the block's 512 bytes.

    `sum(block)` walks the bytes in the interpreter, about 4 µs a header, a third of the cost
    of encoding one. Adler-32's low half is 1 + the byte sum modulo 65521, and 256 bytes
    sum to at most 65280, so over each half of the block it is the exact sum, computed in C.
    """
    return ((zlib.adler32(block[:256]) & 0xFFFF) - 1) + ((zlib.adler32(block[256:]) & 0xFFFF) - 1)


def encode(
    name: bytes,
    *,
    typeflag: bytes,
    size: int = 0,
    mode: int = 0o644,
    mtime: int = 0,
    uid: int = 0,
    gid: int = 0,
    linkname: bytes = b"",
    uname: bytes = b"",
    gname: bytes = b"",
) -> bytes:
    """Header block(s) for one member: a pax extended header when ustar cannot hold it.

    mtime is whole seconds, as GNU tar's default format stores it; the manifest keeps the
    nanoseconds, and a pax record per file just for them would cost 1 KiB per small file.
    """
    pax: list[bytes] = []
    split = _split_ustar(name)
    if split is None:
        pax.append(_pax_record("path", name))
        split = (b"", name[:_USTAR_NAME] if name.isascii() else b"non-ascii-name")
    if linkname and (len(linkname) > 100 or not linkname.isascii()):
        pax.append(_pax_record("linkpath", linkname))
        linkname = linkname[:100] if linkname.isascii() else b"non-ascii-link"
    if size > _MAX_OCTAL_11:
        pax.append(_pax_record("size", str(size).encode()))
    if mtime > _MAX_OCTAL_11 or mtime < 0:
        pax.append(_pax_record("mtime", str(mtime).encode()))
    if uid > _MAX_OCTAL_7:
        pax.append(_pax_record("uid", str(uid).encode()))
    if gid > _MAX_OCTAL_7:
        pax.append(_pax_record("gid", str(gid).encode()))
    out = b""
    if pax:
        records = b"".join(pax)
        base = name.rstrip(b"/").rsplit(b"/", 1)[-1][:80]
        pax_name = b"PaxHeaders/" + (base if base.isascii() else b"entry")
        out = _ustar_block(
            pax_name,
            b"",
            mode=0o644,
            uid=0,
            gid=0,
            size=len(records),
            mtime=max(mtime, 0),
            typeflag=PAXTYPE,
            linkname=b"",
            uname=b"",
            gname=b"",
        )
        out += records + b"\0" * padding(len(records))
    return out + _ustar_block(
        split[1],
        split[0],
        mode=mode,
        uid=uid,
        gid=gid,
        size=size,
        mtime=mtime,
        typeflag=typeflag,
        linkname=linkname,
        uname=uname,
        gname=gname,
    )


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros to GNU tar's 10 KiB record size (it warns otherwise)."""
    total = written + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-total % (20 * BLOCK)))
