"""Logging for an administrator: syslog (facility mail, ident pop3d, with the pid), stderr or a file.

Deliberately not the `logging` package: it costs start-up time on every connection, and one
process logs a handful of lines. Client-supplied text goes through `escape` before it is logged.
"""

from __future__ import annotations

import os
import sys
import time

from pop3d import limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_target = "stderr"
_file = None
_prefix = ""
_sink = None  # redirect(): where lines go instead of the log

INFO = 6  # syslog.LOG_INFO
WARNING = 4  # syslog.LOG_WARNING
ERR = 3  # syslog.LOG_ERR


def setup(target: str) -> None:
    """Choose where lines go: "syslog", "stderr" or an absolute file path."""
    global _target, _file
    _target = target
    if target == "syslog":
        import syslog

        syslog.openlog("pop3d", syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_MAIL)
    elif target != "stderr":
        try:
            _file = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            sys.stderr.write(f"pop3d: cannot open log file {target}: {e.strerror}\n")
            _target = "stderr"


def reopen() -> None:
    """Restore pop3d's syslog identity (a PAM module may have called openlog or closelog)."""
    if _target == "syslog":
        import syslog

        syslog.openlog("pop3d", syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_MAIL)


def close() -> None:
    """Let go of the log's descriptor (before daemonizing closes every descriptor; SIGHUP reopens)."""
    global _file
    if _target == "syslog":
        import syslog

        syslog.closelog()
    elif _file is not None:
        try:
            _file.close()
        except OSError:
            pass
        _file = None


def redirect(sink: Callable[[int, str], None]) -> None:
    """Send every line to `sink(level, line)` instead, and let go of the log's descriptor (the
    file; syslog's socket; stderr is the caller's to replace).

    For the confined pre-authentication process: it must hold nothing it could truncate or
    write forged lines to; root writes what it sends, escaped and attributed (privsep).
    """
    global _sink
    close()
    _sink = sink


def forwarded(level: int, source: str, text: bytes) -> None:
    """A line another process sent (`redirect`): escaped, bounded, attributed to `source`,
    without this process's prefix."""
    if level not in (INFO, WARNING, ERR):
        level = ERR
    _write(level, f"{source}: {escape(text, limits.MAX_FORWARDED_LOG_LINE)}")


def set_prefix(prefix: str) -> None:
    """Text put before every line (e.g. the session's user and address)."""
    global _prefix
    _prefix = prefix


def escape(data: bytes | str, limit: int = 64) -> str:
    """Client text made safe for a log line: printable ASCII only, bounded length."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    text = data[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(data) > limit else "")


def log(level: int, message: str) -> None:
    line = _prefix + message
    if _sink is not None:
        _sink(level, line)
        return
    _write(level, line)


def _write(level: int, line: str) -> None:
    try:
        if _target == "syslog":
            import syslog

            syslog.syslog(level, line)
        elif _file is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            _file.write(f"{stamp} pop3d[{os.getpid()}]: {line}\n")
        else:
            sys.stderr.write(f"pop3d[{os.getpid()}]: {line}\n")
            sys.stderr.flush()
    except (OSError, ValueError):
        pass  # logging must never take the session down


def info(message: str) -> None:
    log(INFO, message)


def warning(message: str) -> None:
    log(WARNING, message)


def error(message: str) -> None:
    log(ERR, message)


def exception(message: str) -> None:
    """Log an unexpected exception with its traceback (to the log only, never the wire)."""
    log(ERR, message + ": " + format_exception())


def format_exception() -> str:
    """The exception being handled, as one line: its frames (file:line in function) and repr.

    Not `traceback`: it costs ~2.5 ms to import, and the session would have to import it before
    dropping privileges on every connection; source lines would often be unreadable by then anyway.
    """
    kind, value, tb = sys.exc_info()
    if kind is None:
        return "no exception"
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}")
        tb = tb.tb_next
    return " | ".join(["Traceback (most recent call last)", *frames, f"{kind.__name__}: {value}"])
