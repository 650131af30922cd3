"""Write the Debian package's /etc/pop3d.conf: every key of pop3d.config.KEYS, commented out
with its default, under the text pop3d.conf(5) gives it. Run at build time (debian/rules), so a
key added to config.py and the manual page reaches the conffile without a second copy.

Usage: PYTHONPATH=. python3 debian/conffile.py > debian/pop3d/etc/pop3d.conf
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

from pop3d import config

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "man" / "man5" / "pop3d.conf.5"

# The package's own values: set (not commented out), each with the reason.
PACKAGE_VALUES = {
    "preauth_user": (
        "_pop3d",
        "The package made this account for it (adduser --system; removed on purge): nobody is "
        "shared with other daemons, _pop3d runs nothing but pop3d's pre-login children.",
    ),
}

# Debian notes under a key's own text.
NOTES = {
    "tls_cert": "pop3s (port 995) is registered with inetd disabled: after setting tls_cert, run "
    "update-inetd --enable pop3s (or enable /etc/xinetd.d/pop3s).",
    "log": "For log = /var/log/pop3d.log, /etc/logrotate.d/pop3d rotates it. syslog goes to the "
    "journal (journalctl -t pop3d) or rsyslog's /var/log/mail.log, which need no rotation here.",
}

HEADER = """\
# /etc/pop3d.conf: the configuration of pop3d, read by every pop3d started without -c.
# See pop3d.conf(5). Installed by the Debian package pop3d, which keeps your changes on
# upgrade (a conffile) and removes the file on purge.
#
# Every key is listed with its default value, commented out: remove the "#" to change one.
# Under inetd (the package's default) each connection reads this file, so a change applies to
# the next connection; pop3d --listen reads it at start and on SIGHUP (systemctl reload).
"""


def unescape(text: str) -> str:
    """roff escapes to plain text."""
    text = re.sub(r"\\f[BIRP]", "", text)
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\&", "")
    return text


def macro_text(line: str) -> str:
    """The words of one roff line: font-alternating macros join their arguments without spaces."""
    if not line.startswith("."):
        return unescape(line)
    name, _, rest = line.partition(" ")
    rest = rest.replace("\\ ", "\0")  # an escaped space belongs to its word
    args = [quoted if quoted or not bare else bare for quoted, bare in re.findall(r'"([^"]*)"|(\S+)', rest)]
    if name in (".B", ".I"):
        return unescape(" ".join(args)).replace("\0", " ")
    if name in (".BR", ".RB", ".BI", ".IB", ".IR", ".RI"):
        return unescape("".join(args)).replace("\0", " ")
    return ""  # .PP, .EX and the like: no words


def key_entries(page: str) -> dict[str, tuple[str, str]]:
    """key -> (syntax, description) from the tagged paragraphs (.TP) of pop3d.conf(5)."""
    entries: dict[str, tuple[str, str]] = {}
    lines = page.splitlines()
    for i, line in enumerate(lines):
        if line != ".TP" or i + 1 >= len(lines):
            continue
        tag = lines[i + 1]
        match = re.match(r"\.B[IR]? (\w+) ", tag)
        if not match:
            continue
        body = []
        for following in lines[i + 2 :]:
            if following.startswith((".TP", ".SS", ".SH")):
                break
            body.append(macro_text(following))
        text = " ".join(word for word in body if word).replace(" ,", ",").replace(" .", ".")
        entries[match.group(1)] = (macro_text(tag), " ".join(text.split()))
    return entries


def value_text(value: object) -> str:
    """A default as the file writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def comment(text: str, width: int = 96) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        lines += textwrap.wrap(paragraph, width - 2, break_on_hyphens=False, break_long_words=False) or [""]
    return [f"# {line}".rstrip() for line in lines]


def render() -> str:
    entries = key_entries(PAGE.read_text(encoding="utf-8"))
    out = [HEADER, "[pop3d]"]
    for key, (default, _parse) in config.KEYS.items():
        syntax, description = entries[key]  # a key without its man page entry fails the build
        out += ["", *comment(f"{syntax}: {description}")]
        if key in NOTES:
            out += comment(NOTES[key])
        if key in PACKAGE_VALUES:
            value, reason = PACKAGE_VALUES[key]
            out += [*comment(reason), f"{key} = {value}"]
        else:
            out.append(f"#{key} = {value_text(default)}".rstrip())
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
