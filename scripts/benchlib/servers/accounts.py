"""The system test account every server serves (pop3d's htpasswd user has the same name).

As root, the run creates it (`useradd --system`) and sets its password with chpasswd (yescrypt):
popa3d and pop3d's `auth = system` check that password through PAM.
"""

from __future__ import annotations

import os
import pwd
import subprocess

USER = "pop3bench"
PASSWORD = "bench pass 1"


def ensure_account(create: bool) -> pwd.struct_passwd | None:
    """The system test account (yescrypt password), created as root when asked."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    if not create or os.geteuid() != 0:
        return None
    add_system_account(USER, "/nonexistent")
    return pwd.getpwnam(USER)


def add_system_account(name: str, home: str) -> None:
    """A system account and its group, no login shell (as root)."""
    argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--home-dir", home]
    subprocess.run([*argv, "--user-group", name], check=True)
    print(f"# created system account {name}", flush=True)


def set_system_password(names: list[str] | None = None) -> None:
    """The benchmark password (yescrypt) for these system accounts (default: the test account)."""
    lines = "".join(f"{name}:{PASSWORD}\n" for name in names or [USER]).encode()
    r = subprocess.run(["chpasswd", "-c", "YESCRYPT"], input=lines, capture_output=True)
    if r.returncode:
        subprocess.run(["chpasswd"], input=lines, check=True)


def system_password_hash(name: str = USER) -> str | None:
    """The account's password hash from /etc/shadow (root only), e.g. to give another server
    the very hash popa3d checks through PAM; None if it cannot be read."""
    try:
        with open("/etc/shadow") as f:
            for line in f:
                fields = line.split(":")
                if fields[0] == name and fields[1][:1] == "$":
                    return fields[1]
    except OSError:
        pass
    return None


def client_users(count: int) -> list[str]:
    """One account name per concurrent client (pop3bench, pop3bench2, ...): concurrent sessions
    of one account would wait for each other's maildrop lock, which no real host's users do."""
    return [USER] + [f"{USER}{i}" for i in range(2, count + 1)]


def ensure_client_accounts(count: int) -> list[pwd.struct_passwd]:
    """The system accounts of `client_users(count)`, created as root, each with the benchmark
    password (yescrypt)."""
    ensure_account(create=True)
    entries = []
    for name in client_users(count):
        try:
            entries.append(pwd.getpwnam(name))
        except KeyError:
            add_system_account(name, "/nonexistent")
            entries.append(pwd.getpwnam(name))
    set_system_password([e.pw_name for e in entries])
    return entries
