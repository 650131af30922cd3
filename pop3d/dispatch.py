"""Serve one connection on given descriptors: pick the driver for how pop3d was started.

Started as root: `privsep`, the dialogue in a confined child (`preauth_user` may not be empty:
root parses no client byte). Started as an ordinary user: the session runs here, in this
process, as that user. The two drivers share
the transports and the session loop (`transport`, `session`) and never import each other.
"""

from __future__ import annotations

import os

from pop3d import log, protocol
from pop3d.session import Session
from pop3d.transport import (
    Connection,
    SessionEnd,
    ignore_stop_signals,
    install_signal_handlers,
    peer_name,
    start_tls,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pop3d.config import Config
    from pop3d.transport import TlsConnection


def serve(config: Config, rfd: int = 0, wfd: int = 1, greeting_sent: bool = False, report: int = -1) -> int:
    """Serve one session on these descriptors (inetd mode, or a standalone listener's child);
    the process exit status. `report`: for a connection from a proxy, the listener's end of the
    socket pair on which it learns the client (proxied.admit)."""
    conn = Connection(rfd, wfd)
    try:
        if os.geteuid() == 0:  # preauth_user is set: privs.check_setup
            from pop3d import privsep

            return privsep.serve(config, conn, greeting_sent, report)
        return _serve_here(config, conn, greeting_sent, report)
    except SessionEnd:
        return 0
    finally:
        try:
            ignore_stop_signals()
        except SessionEnd:
            pass  # a signal that arrived as the session ended: it is ending
        conn.restore()


def _serve_here(config: Config, conn: Connection, greeting_sent: bool, report: int) -> int:
    """The whole session in this process (started as the user whose maildrop it serves)."""
    transport: Connection | TlsConnection = conn
    peer = None
    local = None
    if config.proxy_from:
        from pop3d import proxied

        proxy = proxied.proxy_peer(config, conn.rfd)
        if proxy is not None:
            # The header first, with nothing sent (greeting_sent is False: cli does not greet
            # early when proxy_from is set); then the listener's verdict on the real client.
            install_signal_handlers()
            client = proxied.read_header(config, conn.rfd, proxy)
            if report >= 0 and not proxied.admit(report, client):
                proxied.refuse(config, conn)
                return 0
            peer, local = client.address, client.local
    if config.tls == "implicit":
        # RFC 8314 implicit TLS: the handshake comes before the greeting.
        install_signal_handlers()
        peer = peer or peer_name(conn.rfd)
        if not conn.is_socket():
            log.error("tls = implicit needs a socket on standard input and output")
            return 78
        transport = start_tls(config, conn, peer)
    if not greeting_sent:
        transport.write_all(protocol.GREETING)
    install_signal_handlers()
    Session(config, transport, peer or peer_name(conn.rfd), local).run()
    return 0
