"""`pop3d-passwd` (also `python -m pop3d.passwd`): add, update or delete htpasswd users.

New hashes are bcrypt by default (`pop3d.auth.hash_password`), the scheme pop3d verifies at C
speed. The file is rewritten atomically (a temporary file renamed over it, keeping its owner
and mode), so a pop3d reading it at the same moment sees the old or the new version, never half
of one. Not on the path to the greeting: it may import what it likes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sys

from pop3d import auth, names

EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_CANTCREAT = 73

NEW_FILE_MODE = 0o640  # root reads it (pop3d starts as root); group for an admin group if wanted


class PasswdError(Exception):
    """A failure to report on stderr; `status` is the exit status (sysexits.h)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def update_lines(lines: list[bytes], user: str, entry: bytes | None) -> tuple[list[bytes], bool]:
    """Replace the user's first line with `entry` (None: delete it) and drop any later duplicate
    (pop3d uses the first); other lines, comments included, stay as they are. Returns the new
    lines and whether the user was there."""
    name = user.encode("ascii")
    out: list[bytes] = []
    found = False
    for line in lines:
        if line.split(b":", 1)[0].strip() == name and b":" in line:
            if not found and entry is not None:
                out.append(entry)
            found = True
            continue
        out.append(line)
    if not found and entry is not None:
        out.append(entry)
    return out, found


def read_lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    lines = data.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\n"
    return lines


def write_atomically(path: str, lines: list[bytes], like: os.stat_result | None) -> None:
    """Write a temporary file beside `path` with its owner and mode, fsync, rename over it."""
    directory = os.path.dirname(path) or "."
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    mode = (like.st_mode & 0o7777) if like is not None else NEW_FILE_MODE
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if like is not None and os.geteuid() == 0:
            os.fchown(fd, like.st_uid, like.st_gid)
        os.fchmod(fd, mode)
        with os.fdopen(os.dup(fd), "wb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked_directory(path: str):
    """Serialise concurrent pop3d-passwd runs on one file: the file itself is replaced by each
    update, so the lock is on its directory."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Re-type new password: ") != password:
            raise PasswdError("the passwords do not match", EX_DATAERR)
    if not password:
        raise PasswdError("an empty password is not allowed", EX_DATAERR)
    return password


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pop3d-passwd",
        description="Add or update (or with -D delete) a user in a pop3d htpasswd file.",
        epilog="New hashes are bcrypt unless -s says otherwise. Exit status 0 on success.",
    )
    p.add_argument("-c", "--create", action="store_true", help="create FILE if it does not exist")
    p.add_argument("-D", "--delete", action="store_true", help="delete USER instead")
    p.add_argument(
        "-i", "--stdin", action="store_true", help="read the password from standard input (one line)"
    )
    p.add_argument(
        "-s",
        "--scheme",
        choices=("bcrypt", "sha512_crypt"),
        default="bcrypt",
        help="hash scheme for the new password (default: bcrypt)",
    )
    p.add_argument("file", metavar="FILE", help="the htpasswd file (pop3d.conf: htpasswd = FILE)")
    p.add_argument("user", metavar="USER", help="the user name (what the client sends with USER)")
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    user = auth.valid_username(args.user.encode("utf-8", "surrogateescape"))
    if user is None:
        why = names.reserved(args.user) or (
            "a user name is 1-64 of A-Z a-z 0-9 . _ - @ +, not starting with '-' or '.', without '..'"
        )
        raise PasswdError(f"{args.user!r}: {why}", EX_DATAERR)
    path = os.path.abspath(args.file)
    entry = None
    if not args.delete:
        password = read_password(args.stdin)
        try:
            entry = f"{user}:{auth.hash_password(password, args.scheme)}\n".encode("ascii")
        except ValueError as e:
            raise PasswdError(str(e), EX_DATAERR) from None
    with locked_directory(path):
        try:
            like: os.stat_result | None = os.stat(path)
            lines = read_lines(path)
        except FileNotFoundError:
            if not args.create or args.delete:
                raise PasswdError(f"{path}: no such file (-c creates it)", EX_NOINPUT) from None
            like, lines = None, []
        lines, found = update_lines(lines, user, entry)
        if args.delete and not found:
            raise PasswdError(f"{user}: not in {path}", EX_DATAERR)
        try:
            write_atomically(path, lines, like)
        except OSError as e:
            raise PasswdError(f"{path}: {e.strerror}", EX_CANTCREAT) from None
    verb = "deleted" if args.delete else ("updated" if found else "added")
    sys.stderr.write(f"pop3d-passwd: {user} {verb} in {path}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pop3d-passwd`; the exit status."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except PasswdError as e:
        sys.stderr.write(f"pop3d-passwd: {e}\n")
        return e.status
    except OSError as e:
        sys.stderr.write(f"pop3d-passwd: {e.filename or ''}: {e.strerror}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
