"""`pop3d`: read the configuration, set up logging, serve one session (inetd) or listen."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType
    from typing import NoReturn

CONFIG_ERROR_REPLY = b"-ERR [SYS/PERM] Server configuration error; contact the administrator.\r\n"
GREETING = b"+OK POP3 server ready\r\n"  # protocol.GREETING, without importing the protocol


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pop3d` command; returns the exit status (78 on a configuration error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    inetd_mode = not any(a == "--listen" or a.startswith("--listen=") for a in args)
    inetd_mode = inetd_mode and not _systemd_listening()
    # inetd `wait` (xinetd `wait = yes`): fd 0 is the service's listening socket, not a client.
    inetd_wait = inetd_mode and _listening_on_stdin()
    stderr_is_client = inetd_mode and _stderr_is_the_client()
    inetd_mode = inetd_mode and not inetd_wait
    if stderr_is_client:
        # inetd hands the socket over as fd 0, 1 *and* 2: nothing meant for stderr may reach the
        # client (a traceback on the wire would leak paths and code).
        _silence_stderr()
    from pop3d import config as cfg

    try:
        conf = cfg.load(args)
        if os.geteuid() == 0:
            from pop3d import privs

            privs.check_setup(conf)
        if conf.tls != "none":
            from pop3d import tls

            # Certificate, key and settings are checked now: a configuration error at start,
            # never a failure mid-session. Imported only here: `ssl` costs start-up time.
            tls.server_context(conf)
    except cfg.ConfigError as e:
        if e.status == 0:  # --help, --version
            sys.stdout.write(f"{e}\n")
            return 0
        _report_config_error(str(e), to_syslog=stderr_is_client)
        if inetd_mode and not os.isatty(1):
            try:
                os.write(1, CONFIG_ERROR_REPLY)
            except OSError:
                pass
        return e.status
    # inetd mode: the greeting is all the client waits for, so it leaves before the session's
    # modules are even imported (not with implicit TLS: the handshake comes first; not when a
    # proxy may be at the other end: its PROXY header comes first).
    greeted = inetd_mode and conf.tls != "implicit" and not conf.proxy_from and _greet()
    from pop3d import log

    log.setup(str(conf.log))
    if not inetd_mode:
        from pop3d import server

        return server.run(conf, args, inetd_wait=inetd_wait)
    from pop3d import dispatch

    return _exit_now(dispatch.serve(conf, greeting_sent=greeted), log)


def _exit_now(status: int, log: ModuleType) -> NoReturn:
    """End an inetd session's process without the interpreter's teardown.

    The process served one connection and is done: freeing every module and object one by one
    (~4 ms of CPU) serves nothing, the kernel takes the memory back at once, and on a busy host
    that CPU is taken from the next connection. The log is flushed and closed first.
    """
    log.close()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _greet() -> bool:
    """Send the greeting on fd 1; False if it could not leave now (the session sends it then)."""
    try:
        return os.write(1, GREETING) == len(GREETING)
    except BlockingIOError:
        return False
    except OSError:
        return True  # the client is gone: the session finds out at its first read


def _systemd_listening() -> bool:
    """True when systemd passed listening sockets (`Accept=no`): run the accept loop on them.

    An `Accept=yes` unit passes the connection itself as fd 3 (and as fd 0/1 with
    StandardInput=socket): that is inetd mode. Cheap on purpose: it runs before every greeting.
    """
    if not os.environ.get("LISTEN_FDS") or os.environ.get("LISTEN_PID") != str(os.getpid()):
        return False
    try:
        listening = os.fstat(3)
    except OSError:
        return False
    try:
        connection = os.fstat(0)
    except OSError:
        return True
    return (listening.st_dev, listening.st_ino) != (connection.st_dev, connection.st_ino)


def _listening_on_stdin() -> bool:
    """True when fd 0 is a listening socket: inetd's `stream ... wait` and xinetd's `wait = yes`
    hand the server the service's socket, to accept connections on until it exits."""
    try:
        from _socket import SO_ACCEPTCONN, SOL_SOCKET, socket
    except ImportError:  # pragma: no cover - a build without sockets
        return False
    try:
        sock = socket(fileno=0)
    except OSError:
        return False  # not a socket (a pipe, a terminal): not inetd's `wait`
    try:
        return bool(sock.getsockopt(SOL_SOCKET, SO_ACCEPTCONN))
    except OSError:
        return False
    finally:
        sock.detach()


def _report_config_error(message: str, to_syslog: bool) -> None:
    if to_syslog:
        import syslog

        syslog.openlog("pop3d", syslog.LOG_PID, syslog.LOG_MAIL)
        syslog.syslog(syslog.LOG_ERR, f"configuration error: {message}")
    else:
        sys.stderr.write(f"pop3d: {message}\n")


def _stderr_is_the_client() -> bool:
    """True when fd 2 is the same socket as fd 0 (inetd, xinetd; systemd with StandardError=socket)."""
    import stat

    try:
        err, inp = os.fstat(2), os.fstat(0)
    except OSError:
        return False
    return stat.S_ISSOCK(err.st_mode) and (err.st_dev, err.st_ino) == (inp.st_dev, inp.st_ino)


def _silence_stderr() -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
