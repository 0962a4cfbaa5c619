"""The archive's tar stream as restore reads it: decompressed by the key's extension, read as
a file in chunks and counted, with every way it can break (a cut stream, a bad checksum, a
failed download, a garbled header) turned into one RestoreError line; and tar header parsing
that says why a stream ended, where tarfile would just stop."""

from __future__ import annotations

import contextlib
import gzip
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, cast

from botocore.exceptions import BotoCoreError, ClientError

from instance_agent import tarheader, tarread
from instance_agent.errors import ConfigError
from instance_agent.readahead import ReadAhead
from instance_agent.restore_tree import COPY, RestoreError, UnsafeArchive
from instance_agent.restore_write import BATCH_BYTES, SMALL, Done, Job, Writer
from instance_agent.s3read import ARCHIVE_SUFFIXES

# tarfile's header errors, which typeshed leaves out (CPython has had them since 3.2).
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_TRUNCATED_HEADER: tuple[type[Exception], ...] = (
    tarfile.EmptyHeaderError,  # type: ignore[attr-defined]
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
)
_INVALID_HEADER: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]


def check_key(key: str) -> None:
    if not key.endswith(ARCHIVE_SUFFIXES):
        raise ConfigError(f"{key!r} is not an archive (.tar.zst, .tar.gz or .tar)")


def decompressed(body: IO[bytes], key: str) -> IO[bytes]:
    """A readable stream of the tar inside `body`, by the key's extension."""
    if key.endswith(".zst"):
        import zstandard

        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        return reader
    if key.endswith(".gz"):
        return cast(IO[bytes], gzip.GzipFile(fileobj=body, mode="rb"))
    check_key(key)
    return body


class Counted:
    """The decompressed tar stream as tarfile reads it, counting its bytes, and turning every
    way the stream can break into one line.

    tarfile reads it as a file (mode "r:"), not through its stream mode, which gathers the
    stream 10 KiB at a time and copies what is left of its buffer on every header: here a
    header is a slice of the current chunk and file data goes from the chunk straight into
    the file (`hand_over`, through restore_write's thread). Seeking goes forward only,
    skipping what tarfile does not need; the one step back tarfile takes (to the byte before
    the next header) stays in the chunk."""

    def __init__(self, inner: ReadAhead) -> None:
        self._inner = inner
        self._view = memoryview(b"")
        self._pos = 0  # in the current chunk
        self._base = 0  # stream offset of the current chunk
        self.count = 0  # bytes taken from the stream

    def _pull(self) -> bool:
        try:
            data = self._inner.read(COPY)
        except EOFError:
            raise RestoreError("archive is truncated: the compressed stream ends early") from None
        except zlib.error as err:
            raise RestoreError(f"archive is corrupt: {err}") from None
        except (BotoCoreError, ClientError) as err:
            raise RestoreError(f"download failed: {err}") from None
        except OSError as err:  # gzip.BadGzipFile, and connection errors from the body
            raise RestoreError(f"archive is corrupt or the download failed: {err}") from None
        except Exception as err:
            if type(err).__name__ == "ZstdError":  # zstandard's errors have no public base
                raise RestoreError(f"archive is corrupt: {err}") from None
            raise
        if not data:
            return False
        self._base += len(self._view)
        self._view, self._pos = memoryview(data), 0
        self.count += len(data)
        return True

    def _pieces(self, size: int) -> Iterator[memoryview]:
        """Up to `size` bytes as slices of the chunks, consumed as they are yielded."""
        while size > 0:
            if self._pos == len(self._view) and not self._pull():
                return
            n = min(size, len(self._view) - self._pos)
            piece = self._view[self._pos : self._pos + n]
            self._pos += n
            size -= n
            yield piece

    def read(self, size: int = COPY) -> bytes:
        start = self._pos
        if size >= 0 and start + size <= len(self._view):  # a header: nearly always inside the chunk
            self._pos = start + size
            return self._view[start : self._pos].tobytes()
        pieces = list(self._pieces(size))
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def hand_over(self, writer: Writer, job: Job, size: int, done: Done) -> int:
        """The next `size` bytes of the stream, as slices of its chunks, to `writer` for
        `job`'s file, a job of at most about a MiB at a time, the last one `done` (a small
        file written here, at once: restore_write.SMALL); how many bytes there were (fewer
        at the end of the stream)."""
        start = self._pos
        if start + size <= len(self._view):  # one slice of the chunk
            self._pos = start + size
            job.pieces.append(self._view[start : self._pos])
            if size <= SMALL:
                writer.write_here(job, done)
            else:
                job.done = done
                writer.submit(job, size)
            return size
        if size <= SMALL:  # across the chunk's end
            job.pieces.extend(self._pieces(size))
            writer.write_here(job, done)
            return sum(len(piece) for piece in job.pieces)
        got = held = 0
        for piece in self._pieces(size):
            job.pieces.append(piece)
            got += len(piece)
            held += len(piece)
            if held >= BATCH_BYTES and got < size:
                writer.submit(job, held)
                job, held = Job(job.fd, digest=job.digest), 0
        job.done = done
        writer.submit(job, held)
        return got

    def tell(self) -> int:
        return self._base + self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < self._base:
            raise RestoreError("archive is corrupt: its tar stream asks to be read backwards")
        while offset > self._base + len(self._view):
            self._pos = len(self._view)
            if not self._pull():
                return self.tell()  # the end: the next read says the data is missing
        self._pos = offset - self._base
        return offset


# Headers whose data tarfile reads whole into memory: pax (per member and global) and GNU
# long names. Ours hold a path or a link target (PATH_MAX is 4 KiB); 1 MiB leaves room for
# other tools' records (xattrs, ACLs) and bounds what one header can make restore allocate.
_METADATA = frozenset(
    (
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    )
)
MAX_METADATA = 1 << 20


class Tar(tarfile.TarFile):
    ended_cleanly = False  # set when the stream ended at an end-of-archive block


class Info(tarfile.TarInfo):
    """Header parsing that says why a tar stream ended, where tarfile would just stop."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Info:
        try:
            return cls._read(tf)
        except _EOF_HEADER:
            if isinstance(tf, Tar):
                tf.ended_cleanly = True
            raise
        except _TRUNCATED_HEADER:
            raise RestoreError("archive is truncated: it ends before its end-of-archive marker") from None
        except _INVALID_HEADER as err:
            raise RestoreError(f"archive is corrupt: a tar header is invalid ({err})") from None

    @classmethod
    def _read(cls, tf: tarfile.TarFile) -> Info:
        """tarfile's own `fromtarfile`, with a plain header read by tarread (its docstring),
        and then taken as `_proc_builtin` would take it: its data follows, and the next
        header after the data's last block."""
        source = cast(Counted, tf.fileobj)
        buf = source.read(tarheader.BLOCK)
        info = tarread.plain(cls, buf, tf.encoding, tf.errors)
        if info is None:
            info = cls.frombuf(buf, tf.encoding, tf.errors)
            if info.type in _METADATA and info.size > MAX_METADATA:
                # tarfile reads such a header's data whole into memory before parsing it:
                # gigabytes of it compress to a few hundred KB, so refuse it by its header.
                raise UnsafeArchive(
                    f"refusing the archive: a metadata header (pax or GNU long name) of "
                    f"{info.size} bytes, more than {MAX_METADATA}"
                )
            info.offset = source.tell() - tarheader.BLOCK
            return cast(Info, info._proc_member(tf))  # type: ignore[attr-defined]
        info.offset_data = source.tell()
        info.offset = info.offset_data - tarheader.BLOCK
        tf.offset = info.offset_data
        if info.type == tarfile.REGTYPE:
            tf.offset += info.size + tarheader.padding(info.size)
        if tf.pax_headers:  # global pax headers (a backup never writes them)
            info._apply_pax_info(tf.pax_headers, tf.encoding, tf.errors)  # type: ignore[attr-defined]
        if info.type == tarfile.DIRTYPE:
            info.name = info.name.rstrip("/")
        return cast(Info, info)


@contextlib.contextmanager
def failures() -> Iterator[None]:
    """Every way a stream or a write can break, as one RestoreError line."""
    try:
        yield
    except tarfile.TarError as err:
        raise RestoreError(f"archive is truncated or corrupt: {err}") from None
    except EOFError:
        raise RestoreError("archive is truncated: the stream ends early") from None
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        raise RestoreError(f"restore failed{where}: {err.strerror or err}") from None
