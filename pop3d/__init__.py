"""pop3d: a POP3 server for mbox spools, run by inetd, xinetd, systemd or standalone."""

__version__ = "0.1.0"
