"""Write the seed corpora (tests/fuzz/corpus/{protocol,mbox,proxy}/): small, readable, each a known path.

python tests/fuzz/make_seeds.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

LOGIN = b"USER alice\r\nPASS s3cret pass\r\n"
TRANSCRIPTS = [
    b"CAPA\r\nQUIT\r\n",
    LOGIN + b"STAT\r\nLIST\r\nUIDL\r\nQUIT\r\n",
    LOGIN + b"LIST 1\r\nUIDL 2\r\nRETR 1\r\nTOP 2 0\r\nTOP 1 5\r\nDELE 1\r\nQUIT\r\n",
    LOGIN + b"DELE 1\r\nDELE 1\r\nRSET\r\nDELE 2\r\nNOOP\r\nSTAT\r\nQUIT\r\n",
    LOGIN + b"RETR 0\r\nRETR -1\r\nRETR 99999999999\r\nTOP 1 -1\r\nTOP 1 99999999999\r\nDELE x\r\n",
    b"user alice\npass s3cret pass\nstat\nlist\nquit\n",
    b"USER alice\r\nUSER bob\r\nPASS wrong\r\nPASS again\r\nUSER x\r\nPASS y\r\nQUIT\r\n",
    b"STLS\r\nUSER injected\r\nCAPA\r\n",
    b"AUTH\r\nAUTH PLAIN\r\nAGFsaWNlAHMzY3JldCBwYXNz\r\nSTAT\r\nQUIT\r\n",
    b"AUTH PLAIN AGFsaWNlAHMzY3JldCBwYXNz\r\nLIST\r\nQUIT\r\n",
    b"AUTH LOGIN\r\nYWxpY2U=\r\nczNjcmV0IHBhc3M=\r\nUIDL\r\nQUIT\r\n",
    b"AUTH LOGIN\r\n*\r\nAUTH PLAIN\r\n=\r\nAUTH PLAIN !!!!\r\n",
    b"A" * 300 + b"\r\nNOOP\r\n" + b"B" * 5000 + b"\nQUIT\r\n",
    b"DELE 1\x00junk\r\n\x7f\r\n\r\n \r\nAPOP a b\r\nRETR 1\r\nXTND\r\n",
    LOGIN + b"NOOP\r\n" * 50 + b"QUIT\r\n",
    LOGIN + b"LIST 1 2\r\nSTAT x\r\nRSET x\r\nNOOP x\r\nRETR\r\nTOP 1\r\nQUIT now\r\n",
    LOGIN + b"PASS again\r\nUSER again\r\nSTLS\r\nAUTH PLAIN\r\nCAPA\r\nQUIT\r\n",
    LOGIN + b"RETR 1\r\nRETR 2\r\nRETR 3",
]


def mbox(*messages: bytes, sep: bytes = b"\n") -> bytes:
    return b"".join(b"From MAILER-DAEMON Thu Nov 26 10:00:00 2026" + sep + m + sep for m in messages)


SPOOLS = [
    b"",
    b"From ",
    b"From x",
    b"From x\n",
    b"From x\n\n",
    b"From x\n\r\n",
    b"not an mbox\n",
    mbox(b"Subject: a\n\nbody\n"),
    mbox(b"Subject: a\n\nbody\n", b"Subject: b\n\n>From quoted\n>>From twice\nFrom unquoted\n"),
    mbox(b"Subject: crlf\r\n\r\nbody\r\n", sep=b"\r\n"),
    mbox(b"Subject: mixed\r\nX: lf\n\nline\r\nline\n"),
    mbox(b"Subject: bare cr\rstill\r\n\rbody\r"),
    mbox(b"Subject: nul\x00\n\n\x00\x00body\n"),
    mbox(b"Subject: no final newline\n\nbody"),
    mbox(b"Subject: blank lines\n\nbody\n\n\n\n"),
    mbox(b"Status: RO\nX-UID: 5\nContent-Length: 3\nSubject: v\n\nabc\n", b"Status: RO\nSubject: v\n\nabc\n"),
    mbox(b"Subject: dup\n\nsame\n", b"Subject: dup\n\nsame\n", b"Subject: dup\n\nsame\n"),
    mbox(b"Subject: dots\n\n.\n..\n.x\n"),
    mbox(b"Subject: top\n\n1\n2\n3\n4\n5\n6\n7\n"),
    mbox(b"No header end at all\nline\nline"),
    mbox(b"\nbody right away\n"),
    b"From a\n\nFrom b\n\nFrom c\n",
    b"From a\nFrom b\nFrom c\n",
    b"From a\n\n\nFrom b\n\r\n\r\nFrom c\r\n\r\n",
    b"From a\r\nSubject: x\r\n\r\n>From \r\n\r\nFrom b\r\n",
    mbox(b"Subject: long\n\n" + b"x" * 600 + b"\n" + b">" * 40 + b"From y\n"),
    mbox(b"Subject: " + b"h" * 200 + b"\n\tcontinued\n\n" + b"\r\n" * 10),
]


V2 = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_HEADERS = [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\nUSER alice\r\n",
    b"PROXY TCP6 2001:db8::7 ::1 56324 110\r\n\x16\x03\x01",
    b"PROXY TCP6 ::ffff:192.0.2.9 ::ffff:127.0.0.1 7 110\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ::1 65535 65535\r\n",
    b"PROXY TCP4 192.0.2.07 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
    V2 + b"\x20\x00\x00\x00",
    V2 + b"\x21\x11\x00\x0c\xc0\x00\x02\x07\x7f\x00\x00\x01\xdc\x04\x00\x6eCAPA\r\n",
    V2
    + b"\x21\x21\x00\x24"
    + b"\x20\x01\x0d\xb8"
    + bytes(11)
    + b"\x07"
    + bytes(15)
    + b"\x01\x00\x07\x00\x6e",
    V2 + b"\x21\x11\x00\x13" + bytes(12) + b"\x05\x00\x04abcd",
    V2 + b"\x21\x31\x00\xd8" + bytes(216),
    V2 + b"\x21\x00\x00\x00",
    V2 + b"\x21\x11\xff\xff",
]


def main() -> None:
    for name, items, prefix in (
        ("protocol", TRANSCRIPTS, [b"\0\0\0\0", b"\x01\0\0\0", b"\x07\x00\x01\x00"]),
        ("mbox", SPOOLS, [b"\0\0", b"\x01\x01", b"\x82\x42", b"\xe7\x5b"]),
        ("proxy", PROXY_HEADERS, [b""]),
    ):
        out = HERE / "corpus" / name
        out.mkdir(parents=True, exist_ok=True)
        for item in items:
            for head in prefix:
                data = head + item
                (out / hashlib.sha1(data).hexdigest()).write_bytes(data)


if __name__ == "__main__":
    main()
