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


def set_system_password() -> None:
    method = ["-c", "YESCRYPT"]
    r = subprocess.run(["chpasswd", *method], input=f"{USER}:{PASSWORD}\n".encode(), capture_output=True)
    if r.returncode:
        subprocess.run(["chpasswd"], input=f"{USER}:{PASSWORD}\n".encode(), check=True)
