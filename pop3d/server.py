"""Standalone mode: listen, accept, fork one session process per connection, reap children.

The child runs exactly the inetd-mode session on the accepted socket, so both modes behave alike.
The listening sockets come from `--listen` (bound here) or from systemd (`Accept=no` socket units:
LISTEN_FDS/LISTEN_PID, sd_listen_fds(3)). `--daemon` detaches through python-daemon, imported only
then: the inetd path must never go through it (it would redirect fd 0/1).

Signals: SIGTERM/SIGINT stop accepting, then end every running session the way a dropped connection
ends (no update; a session already applying its update at QUIT finishes it), wait for them and exit.
SIGHUP re-reads the configuration file for connections accepted afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import time

from pop3d import limits, log, protocol
from pop3d.locking import process_running

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from pop3d.config import Config

EX_OSERR = 71  # sysexits.h: cannot bind, cannot write the pid file, the daemon failed to start
EX_TEMPFAIL = 75  # sysexits.h: the pid file names a running pop3d

_SYSTEMD_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_SD_LISTEN_FDS_START = 3

BUSY_REPLY = protocol.REPLIES["busy"]
BUSY_PEER_REPLY = protocol.REPLIES["busy_address"]


def client_of(address: object, v6_prefix: int) -> str:
    """Which client a connection counts against for max_sessions_per_ip: an IPv4 address, the
    IPv6 network of its first `v6_prefix` bits ("2001:db8:0:1::/64": one site, however many
    addresses it takes), or "local" (a Unix socket). The one place that decides it.
    """
    if not isinstance(address, tuple):
        return "local"
    host = str(address[0]).partition("%")[0]  # a link-local address's zone is not the client
    if host.startswith("::ffff:") and "." in host:
        return host[7:]  # an IPv4 client on a dual-stack socket counts as that IPv4 address
    if ":" not in host:
        return host
    import ipaddress

    return str(ipaddress.IPv6Network((host, v6_prefix), strict=False))


class ListenError(Exception):
    """An address cannot be parsed or bound, or an inherited socket is unusable."""


def parse_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT`, `[v6addr]:PORT`; no host means every IPv4 address."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ListenError(f"listen: {text!r}: bad port")
    return host or "0.0.0.0", int(port)


def bind(text: str) -> socket.socket:
    host, port = parse_address(text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(f"listen: cannot bind {text}: {e.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def systemd_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process (sd_listen_fds(3)), or [].

    LISTEN_PID must be our pid (the variables may have leaked from a parent). The variables are
    removed either way, so nothing this process starts mistakes the sockets for its own.
    """
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    for name in _SYSTEMD_VARS:
        os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        raise ListenError(f"LISTEN_FDS={count!r} is not a number")
    sockets = []
    for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + int(count)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ListenError(f"systemd socket fd {fd}: {e.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenError(
                f"systemd socket fd {fd} is not a listening stream socket "
                "(Accept=yes units run pop3d in inetd mode: StandardInput=socket)"
            )
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def warm_up(config: Config) -> None:
    """Import once, here, what every session imports after its fork: the session and login
    modules, what a session needs after its privilege drop, ctypes with libpam and crypt(3),
    and (auth = system) the PAM modules of the service.

    A session forked from this process then starts with all of it in memory (shared, copy on
    write): measured 53 ms -> 47 ms for a PAM session, against ~41 ms for popa3d. The PAM
    transaction held here is never used: each session starts its own (`auth.hold_pam_modules`).
    Nothing here reads client bytes.
    """
    from pop3d import auth, dispatch, login, privsep, proxied  # noqa: F401

    login.preload(config, every=True)
    try:
        auth.preload_pam()
        if config.auth == "system":
            auth.hold_pam_modules(str(config.pam_service))
    except auth.AuthUnavailableError:
        pass  # a session says it, and answers [SYS/TEMP], at its check
    auth.preload_crypt()


def _describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


class Server:
    """The accept loop and the set of running session processes."""

    def __init__(
        self, config: Config, sockets: list[socket.socket], argv: Sequence[str] = (), inetd_parent: int = 0
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.argv = list(argv)
        # inetd `wait` mode: the pid of the inetd that started us (0 otherwise), and since when
        # no session has run (see _inetd_done).
        self.inetd_parent = inetd_parent
        self.idle_since = time.monotonic()
        # pid -> client address; None for a session from a proxy until it reports its client.
        self.children: dict[int, str | None] = {}
        # The listener's ends of the report socket pairs of sessions from a proxy -> their pid.
        self.reports: dict[int, int] = {}
        self.stopping = False
        self.reload_requested = False
        self._wake_fds: tuple[int, ...] = ()

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def reap(self) -> None:
        while self.children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.pop(pid, None)

    def serve_forever(self) -> None:
        # Python retries select() after a signal, so handlers only set flags: the wakeup pipe
        # (each signal writes a byte to it) is what makes the loop act on them at once.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        # SIGCHLD only wakes the loop; children are reaped in it.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self._wake_fds = (wake_r, wake_w)
        log.info("listening on " + ", ".join(_describe(s) for s in self.sockets))
        warm_up(self.config)
        try:
            while not self.stopping:
                self.reap()
                if self.reload_requested:
                    self.reload()
                if self.inetd_parent and self._inetd_done():
                    break
                timeout = self._inetd_timeout() if self.inetd_parent else 60.0
                ready, _, _ = select.select([*self.sockets, wake_r, *self.reports], [], [], timeout)
                for sock in ready:
                    if sock == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 4096)
                    elif sock in self.reports:
                        self.admit(sock)  # type: ignore[arg-type]
                    elif not self.stopping:
                        self.accept(sock)
            for sock in self.sockets:
                sock.close()
            self.finish()
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)

    def _inetd_done(self) -> bool:
        """inetd `wait` mode: True when the socket goes back to inetd, and this process ends.

        After `idle_exit` seconds without a session (inetd starts pop3d again at the next
        connection, with the configuration of then). When inetd itself has gone (we were
        reparented), no new connection is accepted and the running sessions end on their own:
        a new inetd wants its port back.
        """
        if os.getppid() != self.inetd_parent:
            if self.sockets:
                log.info(
                    "inetd has exited: accepting no more connections; exiting after the running sessions"
                )
                for sock in self.sockets:
                    sock.close()
                self.sockets = []
            return not self.children and not self.reports
        now = time.monotonic()
        if self.children or self.reports:
            self.idle_since = now
            return False
        idle = float(self.config.idle_exit)  # type: ignore[arg-type]
        if idle and now - self.idle_since >= idle:
            log.info(f"no session for {idle:g} s: exiting (inetd starts pop3d at the next connection)")
            return True
        return False

    def _inetd_timeout(self) -> float:
        """How long the loop may wait: until the next look at inetd, or the idle exit if sooner."""
        timeout = limits.INETD_PARENT_CHECK
        idle = float(self.config.idle_exit)  # type: ignore[arg-type]
        if idle and not self.children and not self.reports:
            timeout = min(timeout, max(0.0, self.idle_since + idle - time.monotonic()) + 0.01)
        return timeout

    def reload(self) -> None:
        """SIGHUP: read the configuration again; sessions started from now on use it."""
        self.reload_requested = False
        from pop3d import config as cfg

        try:
            new = cfg.load(self.argv)
            if os.geteuid() == 0:
                from pop3d import privs

                privs.check_setup(new)
            if new.tls != "none":
                from pop3d import tls

                # Read the certificate and key again (renewed files); children inherit it.
                tls.reload_server_context(new)
        except cfg.ConfigError as e:  # TlsConfigError included
            log.error(f"SIGHUP: configuration error, keeping the previous configuration: {e}")
            return
        for key in ("listen", "daemon", "pidfile"):
            if getattr(new, key, None) != getattr(self.config, key, None):
                log.warning(f"SIGHUP: a change of --{key} takes effect only at a restart")
        log.close()
        log.setup(str(new.log))
        self.config = new
        warm_up(new)  # the PAM service may have changed
        log.info("configuration reloaded")

    def refusal(self, peer: str, per_address: bool = True) -> bytes | None:
        """The reply that turns this connection away, or None when a session may start.
        `per_address` False: a proxy's connection, counted by its client once known (admit)."""
        self.reap()  # a session that has just ended no longer counts
        if len(self.children) >= int(self.config.max_sessions):  # type: ignore[call-overload]
            log.warning(f"refusing {peer}: max_sessions reached")
            return BUSY_REPLY
        if per_address and self.too_many_from(peer):
            return BUSY_PEER_REPLY
        return None

    def too_many_from(self, address: str) -> bool:
        """max_sessions_per_ip: as many sessions from this client run already (logged)."""
        limit = int(self.config.max_sessions_per_ip)  # type: ignore[call-overload]
        if sum(1 for other in self.children.values() if other == address) >= limit:
            log.warning(f"refusing {address}: max_sessions_per_ip reached")
            return True
        return False

    def admit(self, fd: int) -> None:
        """A session from a proxy reports the client its PROXY header named (proxied.admit): count
        it from now on, or answer that it is one too many (the session then says so and ends).
        The report is checked, not trusted: exactly the canonical text of an IP address."""
        from pop3d import proxied

        pid = self.reports.pop(fd)
        try:
            data = os.read(fd, proxied.REPORT_MAX + 1)
        except OSError:
            data = b""
        if data:
            address = proxied.checked_address(data[:-1]) if data.endswith(b"\n") else None
            self.reap()
            if address is None:
                log.error(f"session process {pid} reported a malformed client address")
                verdict = proxied.REFUSED
            else:
                # The same key as a direct connection's: an IPv4 address, an IPv6 client's network.
                client = client_of((address, 0), int(self.config.max_sessions_per_ip_v6_prefix))  # type: ignore[call-overload]
                if self.too_many_from(client):
                    verdict = proxied.REFUSED
                else:
                    if pid in self.children:
                        self.children[pid] = client
                    verdict = proxied.ADMITTED
            with contextlib.suppress(OSError):
                os.write(fd, verdict)
        os.close(fd)  # no data: the session ended before its header

    def accept(self, sock: socket.socket) -> None:
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED):
                log.error(f"accept: {e.strerror}")
                return
            raise
        peer = client_of(address, int(self.config.max_sessions_per_ip_v6_prefix))  # type: ignore[call-overload]
        from_proxy = self._from_proxy(address)
        reply = self.refusal(peer, per_address=not from_proxy)
        if reply is not None:
            try:
                conn.settimeout(1.0)
                if self.config.tls != "implicit":  # a TLS client would take plaintext for a bad record
                    conn.sendall(reply)
            except OSError:
                pass
            conn.close()
            return
        report = socket.socketpair() if from_proxy else None
        try:
            pid = os.fork()
        except OSError as e:
            log.error(f"fork: {e.strerror}")
            conn.close()
            for end in report or ():
                end.close()
            return
        if pid == 0:
            status = 1
            try:
                for listening in self.sockets:
                    listening.close()
                for fd in self.reports:
                    os.close(fd)
                signal.set_wakeup_fd(-1)
                for wake in self._wake_fds:
                    os.close(wake)
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                conn.setblocking(True)
                from pop3d import dispatch

                fd = conn.detach()
                theirs = -1
                if report is not None:
                    report[0].close()
                    theirs = report[1].detach()
                status = dispatch.serve(self.config, fd, fd, report=theirs)
            except BaseException:
                log.exception("session process")
            finally:
                os._exit(status)
        self.children[pid] = None if report else peer
        if report is not None:
            report[1].close()
            self.reports[report[0].detach()] = pid
        conn.close()

    def _from_proxy(self, address: object) -> bool:
        """The connection (accept's address) comes from a proxy `proxy_from` names: its client is
        known only once the session has read the PROXY header."""
        if not self.config.proxy_from or not isinstance(address, tuple):
            return False
        from pop3d import proxied

        host = str(address[0]).partition("%")[0].removeprefix("::ffff:")
        return proxied.in_networks(host, self.config.proxy_from)  # type: ignore[arg-type]

    def finish(self) -> None:
        """Stop: end the running sessions without update (as a dropped connection would) and wait.

        A session applying its update at QUIT blocks SIGTERM until the update is done.
        """
        for fd in self.reports:
            os.close(fd)  # a session still waiting for its verdict goes on, and is ended below
        self.reports.clear()
        self.reap()
        if self.children:
            log.info(f"stopping: ending {len(self.children)} running session(s)")
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            except PermissionError:
                # A session runs as its account: signalling it takes CAP_KILL (the systemd units
                # keep it). Without it the session ends at its own timeout.
                log.error(f"cannot end session process {pid}: no CAP_KILL; waiting for it")
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            self.children.pop(pid, None)
        log.info("stopped")


# ------------------------------------------------------------------------------ pid file


class PidFileError(Exception):
    """The pid file names a running process, or cannot be written."""


def check_pidfile(path: str) -> None:
    """Refuse to start when the pid file names a live process; a stale one is overwritten later."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return
    except OSError as e:
        raise PidFileError(f"pidfile {path}: {e.strerror}") from None
    if text.isdigit() and int(text) != os.getpid() and process_running(int(text)):
        raise PidFileError(f"pidfile {path}: pop3d is already running as pid {text}")


def write_pidfile(path: str) -> None:
    """Write our pid atomically (a reader never sees an empty or partial file)."""
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.rename(temp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise PidFileError(f"pidfile {path}: {e.strerror}") from None


def remove_pidfile(path: str) -> None:
    """Remove the pid file if it is still ours (a successor may have written its own)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            if f.read(64).strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


# ------------------------------------------------------------------------------ daemon


def _wait_for_daemon(ready: int, child: int) -> int:
    """In the starting process: the exit status, once the daemon is ready or has failed."""
    chunks = []
    while True:
        try:
            chunk = os.read(ready, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
    os.close(ready)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)
    message = b"".join(chunks).decode("utf-8", "replace")
    if message == "ready\n":
        return 0
    import sys

    sys.stderr.write(f"pop3d: {message.strip() or 'the daemon exited during start-up'}\n")
    return EX_OSERR


_ready_fd: int | None = None  # in the daemon: the pipe to the starting process, until announced


def daemonize(sockets: list[socket.socket]) -> int | None:
    """Detach through python-daemon. Returns an exit status in the starting process (once the
    daemon has written its pid file, or failed), None in the daemon, with the readiness pipe's
    write end stored in `_ready_fd` (see `announce`)."""
    global _ready_fd
    import daemon  # python-daemon: only ever imported here

    ready, done = os.pipe()
    child = os.fork()
    if child:
        os.close(done)
        for sock in sockets:
            sock.close()
        return _wait_for_daemon(ready, child)
    os.close(ready)
    # Every descriptor not preserved is closed: let the log module drop its own first.
    log.close()
    context = daemon.DaemonContext(
        detach_process=True,
        files_preserve=[*sockets, done],
        umask=0o022,
        working_directory="/",
        # SIGTERM and SIGHUP are the server's; python-daemon would map SIGTERM to SystemExit.
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    context.open()
    _ready_fd = done
    return None


def announce(message: str) -> None:
    """Tell the starting process we are ready ("ready") or why we failed; no-op in the foreground."""
    global _ready_fd
    if _ready_fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(_ready_fd, message.encode("utf-8", "replace")[:4000])
    os.close(_ready_fd)
    _ready_fd = None


def inetd_socket() -> socket.socket:
    """inetd `wait` mode: the listening socket inetd passed as fd 0 (and 1 and 2), moved to a
    descriptor of its own; 0, 1 and 2 then read and write /dev/null. So no session process,
    which runs as a user, holds the service's socket, and nothing written to stdout or stderr
    goes to it."""
    fd = os.dup(0)  # not inheritable; the sessions' child side closes it too (accept)
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    if null > 2:
        os.close(null)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def run(config: Config, argv: Sequence[str] = (), inetd_wait: bool = False) -> int:
    """Run the standalone server until SIGTERM/SIGINT; the exit status.

    `inetd_wait`: inetd (`stream ... wait`) or xinetd (`wait = yes`) started us with the
    service's listening socket as fd 0: serve it like a systemd socket, until `idle_exit`
    seconds pass without a session or inetd goes away.
    """
    import sys

    pidfile = getattr(config, "pidfile", None)
    try:
        if pidfile:
            pidfile = os.path.abspath(str(pidfile))
            check_pidfile(pidfile)
        sockets = systemd_sockets()
        if inetd_wait:
            sockets.append(inetd_socket())
        sockets += [bind(text) for text in config.listen]  # type: ignore[attr-defined]
    except (ListenError, PidFileError) as e:
        sys.stderr.write(f"pop3d: {e}\n")
        return EX_TEMPFAIL if isinstance(e, PidFileError) else EX_OSERR
    if not sockets:
        sys.stderr.write("pop3d: nothing to listen on (--listen, or a systemd socket unit)\n")
        return EX_OSERR
    # SIGHUP re-reads the same file: name it absolutely (the daemon runs in /).
    argv = list(argv)
    path = getattr(config, "config", None)
    if path:
        argv += ["--config", os.path.abspath(str(path))]
    if getattr(config, "daemon", False):
        status = daemonize(sockets)
        if status is not None:
            return status
        log.setup(str(config.log))
    try:
        if pidfile:
            write_pidfile(pidfile)
    except PidFileError as e:
        log.error(str(e))
        announce(str(e))
        if not getattr(config, "daemon", False):
            sys.stderr.write(f"pop3d: {e}\n")
        return EX_OSERR
    announce("ready\n")
    try:
        Server(config, sockets, argv, os.getppid() if inetd_wait else 0).serve_forever()
    finally:
        if pidfile:
            remove_pidfile(pidfile)
    return 0
