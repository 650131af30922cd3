"""The maildrop index: a cache of each spool's listing, kept between sessions, never trusted.

Knows nothing of POP3. A `Record` is what a scan found (the listing's arrays, see
`mbox.Listing.parts`: with each message's header check, what `maildrop` proves a grown spool
with) and the spool's identity and state when it was scanned (device, inode, size, mtime,
ctime). `load` gives the record stored for a spool, or None (with a log line) when the file is
missing, not ours, not a plain file, too big, damaged or of another version, reading it straight
into the arrays (never the whole file twice); `save` replaces it atomically (temporary file +
rename; no fsync: losing it costs one scan). `maildrop` proves a record against the spool before
using it (docs/INTERNALS.md, docs/DATA-SAFETY.md).

Where the files live: `index_dir/UID/USER`, one directory per account (the uid the session runs
as: htpasswd users share mail_user's), created by root before the privilege drop, owned by the
account, mode 0700, so no account reaches another's; in it one file per user, named as `names`
names every file kept for a user elsewhere than beside the spool (`names.user_file`, its
temporary `names.own(..., names.INDEX_TEMP)`), so no user name reaches another user's file.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import zlib
from array import array

from . import limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

_MAGIC = b"pop3didx"
# 2: each message's header check in its digest record; no check of a stretch of the spool.
_VERSION = 2
# magic, version, flags, dev, ino, size, mtime_ns, ctime_ns, unproved, number of parts, kind
# length, spool path length
_HEADER = struct.Struct("<8sIIQQQqqQIHH")
_PART = struct.Struct("<c7xQ")  # typecode ("B": a bytearray), then the part's length in octets
_BIG_ENDIAN = 1  # flag: the arrays were written by a big-endian host
_MAX_PARTS = 16
_READ = 1 << 20  # a part is read this much at a time (a multiple of every item size)


class Record:
    """One spool's listing arrays as a scan left them, and the spool's state at that scan."""

    __slots__ = ("kind", "parts", "spool", "state", "unproved")

    def __init__(
        self,
        kind: bytes,
        spool: str,
        state: tuple[int, int, int, int, int],
        parts: Sequence[array | bytearray],
        unproved: int = 0,
    ) -> None:
        self.kind = kind  # what produced the arrays (scanner version, mbox format): must match
        self.spool = spool
        self.state = state  # the spool's (dev, ino, size, mtime_ns, ctime_ns): see `state`
        self.parts = list(parts)
        # How many of the first entries the arrays describe were taken on trust, not scanned:
        # the maildrop proves them before use (docs/DATA-SAFETY.md, "What it trusts").
        self.unproved = unproved


def state(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What a record remembers of a spool's stat: identity, size, and the two times."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_for(directory: str, user: str) -> str:
    """The index file of `user` (a name valid_username accepted) in an account's directory."""
    from . import names

    return names.user_file(directory, user)


def prepare(index_dir: str, uid: int, gid: int, log: Callable[[str], None]) -> str | None:
    """The account's index directory, `index_dir/UID`, made if needed; None (logged) if unusable.

    As root (before the privilege drop): `index_dir` is created mode 0711 if missing (not its
    parents) and must be root's and writable by nobody else; the account's directory is created
    and given to the account (uid, gid, mode 0700). Not as root: the same with our own uid in
    place of root's, so tests and unprivileged setups keep their index where they are allowed to.
    Only directories are opened, never followed through a symbolic link.
    """
    me = os.geteuid()
    try:
        try:
            os.mkdir(index_dir, 0o711 if me == 0 else 0o700)
        except FileExistsError:
            pass
        top = os.open(index_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(top)
            if st.st_uid not in (0, me) or st.st_mode & 0o022:
                log(f"index_dir {index_dir}: owned by uid {st.st_uid} or writable by others; no index")
                return None
            name = str(uid)
            try:
                os.mkdir(name, 0o700, dir_fd=top)
            except FileExistsError:
                pass
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
        finally:
            os.close(top)
        try:
            st = os.fstat(sub)
            if st.st_uid != uid and me == 0 and st.st_uid == 0:
                os.fchown(sub, uid, gid)  # made by us just now (or before a crash)
            elif st.st_uid != uid:
                log(f"index_dir {index_dir}/{name}: owned by uid {st.st_uid}, not {uid}; no index")
                return None
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(sub, 0o700)
        finally:
            os.close(sub)
    except OSError as e:
        log(f"index_dir {index_dir}: {e.strerror or e}; no index")
        return None
    return os.path.join(index_dir, name)


def load(path: str, log: Callable[[str], None]) -> Record | None:
    """The record in `path`, or None (logged): any doubt about the file means no record."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        log(f"index {path}: none yet; scanning the whole spool")
        return None
    except OSError as e:
        log(f"index {path}: cannot open ({e.strerror or e}); ignored")
        return None
    try:
        st = os.fstat(fd)
        why = _unusable(st)
        if why:
            log(f"index {path}: {why}; ignored")
            return None
        return _decode(lambda n: _read(fd, n), st.st_size)
    except OSError as e:
        log(f"index {path}: cannot read ({e.strerror or e}); ignored")
        return None
    except Exception as e:  # whatever the bytes are, the session goes on with a scan
        log(f"index {path}: {e}; ignored")
        return None
    finally:
        os.close(fd)


def save(path: str, record: Record, log: Callable[[str], None]) -> bool:
    """Replace the record in `path` (a temporary file renamed into place); False if not done.

    The temporary file is `names.own(path, INDEX_TEMP)` in the account's own directory, created
    afresh (O_EXCL, never through a link). No fsync: after a crash the index is missing or whole.
    """
    from . import names

    blobs = _serialize(record)
    total = sum(len(blob) for blob in blobs)
    if total > limits.INDEX_MAX_BYTES:
        log(f"index {path}: would take {total} octets (over {limits.INDEX_MAX_BYTES}); not written")
        return False
    temporary = names.own(path, names.INDEX_TEMP)
    try:
        try:
            os.unlink(temporary)  # left by a session that died writing it
        except FileNotFoundError:
            pass
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        try:
            views = [memoryview(blob).cast("B") for blob in blobs]
            while views:
                written = os.writev(fd, views)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]
        finally:
            os.close(fd)
        # The old file goes first: a rename over it makes ext4 (auto_da_alloc) write the new
        # file's data out before it returns, ~5 ms a save and tens of ms when the disk is busy.
        # In between there is no index at all, which costs one scan at worst.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.rename(temporary, path)
    except OSError as e:
        log(f"index {path}: cannot write ({e.strerror or e}); not written")
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return False
    return True


# ----------------------------------------------------------------------------- the file format


def _unusable(st: os.stat_result) -> str:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} links"
    if st.st_size > limits.INDEX_MAX_BYTES:
        return f"{st.st_size} octets, over {limits.INDEX_MAX_BYTES}"
    if st.st_size < _HEADER.size + 4:
        return "truncated"
    return ""


def _read(fd: int, size: int) -> bytes:
    """The next `size` octets of fd; fewer only at its end."""
    data = os.read(fd, size)
    if len(data) < size and data:
        pieces = [data]
        got = len(data)
        while got < size:
            more = os.read(fd, size - got)
            if not more:
                break
            pieces.append(more)
            got += len(more)
        data = b"".join(pieces)
    return data


def _flags() -> int:
    return _BIG_ENDIAN if sys.byteorder == "big" else 0


def _serialize(record: Record) -> list[bytes | array | bytearray]:
    kind, spool = record.kind, os.fsencode(record.spool)
    head = [
        _HEADER.pack(
            _MAGIC,
            _VERSION,
            _flags(),
            *record.state,
            record.unproved,
            len(record.parts),
            len(kind),
            len(spool),
        ),
        kind,
        spool,
    ]
    for part in record.parts:
        code = part.typecode if isinstance(part, array) else "B"
        head.append(_PART.pack(code.encode(), len(part) * (part.itemsize if isinstance(part, array) else 1)))
    blobs: list[bytes | array | bytearray] = [b"".join(head), *record.parts]
    checksum = 0
    for blob in blobs:
        checksum = zlib.crc32(blob, checksum)
    blobs.append(struct.pack("<I", checksum))
    return blobs


def _parse(data: bytes | bytearray) -> Record:
    """The record in `data`, a whole index file (ValueError if it is not one)."""
    at = 0

    def read(n: int) -> bytes:
        nonlocal at
        at += n
        return bytes(data[at - n : at])

    return _decode(read, len(data))


def _decode(read: Callable[[int], bytes], total: int) -> Record:
    """The record in a file of `total` octets, read in order with `read(n)` (the next n octets,
    fewer at the end): the header, then each part straight into its array, a piece at a time;
    ValueError if it is not a whole record of this version."""
    head = read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise ValueError("truncated")
    (magic, version, flags, dev, ino, size, mtime_ns, ctime_ns, unproved, nparts, kind_len, spool_len) = (
        _HEADER.unpack(head)
    )
    if magic != _MAGIC:
        raise ValueError("not a pop3d index")
    if version != _VERSION or flags != _flags():
        raise ValueError(f"version {version}, flags {flags}: not this version's")
    if nparts > _MAX_PARTS:
        raise ValueError("too many parts")
    names = read(kind_len + spool_len + nparts * _PART.size)
    if len(names) < kind_len + spool_len + nparts * _PART.size:
        raise ValueError("truncated")
    checksum = zlib.crc32(names, zlib.crc32(head))
    kind = names[:kind_len]
    spool = os.fsdecode(names[kind_len : kind_len + spool_len])
    layout = []
    for k in range(nparts):
        code, length = _PART.unpack_from(names, kind_len + spool_len + k * _PART.size)
        if code not in (b"B", b"I", b"Q") or length % array(code.decode()).itemsize:
            raise ValueError(f"a part of type {code!r} and {length} octets")
        layout.append((code.decode(), length))
    whole = _HEADER.size + len(names) + sum(length for _, length in layout) + 4
    if whole != total:
        raise ValueError("truncated" if whole > total else "trailing data")
    parts: list[array | bytearray] = []
    for code, length in layout:
        part = bytearray() if code == "B" else array(code)
        while length:
            piece = read(min(length, _READ))
            if not piece:
                raise ValueError("truncated")
            checksum = zlib.crc32(piece, checksum)
            if code == "B":
                part += piece  # type: ignore[operator]
            else:
                part.frombytes(piece)  # type: ignore[union-attr]
            length -= len(piece)
        parts.append(part)
    stored = read(4)
    if len(stored) != 4 or checksum != struct.unpack("<I", stored)[0]:
        raise ValueError("checksum mismatch (damaged)")
    return Record(kind, spool, (dev, ino, size, mtime_ns, ctime_ns), parts, unproved)
