"""Serve one connection on given descriptors: pick the driver for how pop3d was started.

Started as root: `privsep`, the dialogue in a confined child (`preauth_user` may not be empty:
root parses no client byte). Started as
an ordinary user: the session runs here, in this process, as that user. The two drivers share
the transports and the session loop (`transport`, `session`) and never import each other.
"""

from __future__ import annotations

import os

from pop3d import log, protocol
from pop3d.session import Session
from pop3d.transport import Connection, SessionEnd, install_signal_handlers, peer_name, start_tls

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config
    from pop3d.transport import TlsConnection


def serve(config: Config, rfd: int = 0, wfd: int = 1, greeting_sent: bool = False) -> int:
    """Serve one session on these descriptors (inetd mode, or a standalone listener's child);
    the process exit status."""
    conn = Connection(rfd, wfd)
    try:
        if os.geteuid() == 0:  # preauth_user is set: privs.check_accounts
            from pop3d import privsep

            return privsep.serve(config, conn, greeting_sent)
        return _serve_here(config, conn, greeting_sent)
    except SessionEnd:
        return 0
    finally:
        conn.restore()


def _serve_here(config: Config, conn: Connection, greeting_sent: bool) -> int:
    """The whole session in this process (started as the user whose maildrop it serves)."""
    transport: Connection | TlsConnection = conn
    peer = None
    if config.tls == "implicit":
        # RFC 8314 implicit TLS: the handshake comes before the greeting.
        install_signal_handlers()
        peer = peer_name(conn.rfd)
        if not conn.is_socket():
            log.error("tls = implicit needs a socket on standard input and output")
            return 78
        transport = start_tls(config, conn, peer)
    if not greeting_sent:
        transport.write_all(protocol.GREETING)
    install_signal_handlers()
    Session(config, transport, peer or peer_name(conn.rfd)).run()
    return 0
