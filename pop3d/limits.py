"""Every bound and default in one place, each with the reason it has that value.

Kept import-free: it is loaded on the path to the greeting.
"""

# RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND_LINE = 255
# RFC 2449 section 4: each argument is at most 40 octets (PASS takes the rest of the line).
MAX_ARGUMENT = 40
# Dovecot and popa3d end a session after a handful of junk commands: a scanner costs us little.
MAX_BAD_COMMANDS = 10
# Message numbers beyond this many digits cannot be valid (and must not build huge ints).
MAX_MSGNO_DIGITS = 10
# RFC 1939 section 3: the autologout timer must be at least 10 minutes.
DEFAULT_IDLE_TIMEOUT = 600.0
# The whole AUTHORIZATION phase must end within this, whatever the client sends (CAPA, bad
# commands): an unauthenticated connection costs two processes (~10 MB) under inetd.
DEFAULT_LOGIN_TIMEOUT = 60.0
# A whole command line must arrive within this (a byte-per-second trickle must not pin a lock).
COMMAND_LINE_TIMEOUT = 60.0
# A client that stops reading must not hold the maildrop lock for ever.
WRITE_TIMEOUT = 120.0
# Flush output once this much is buffered (large writes; fewer syscalls and packets).
OUTPUT_FLUSH = 256 * 1024
# Bytes read from the client per read(2).
READ_SIZE = 64 * 1024
# Pipelined input buffered but not yet processed: beyond this, stop reading until it drains.
MAX_PENDING_INPUT = 64 * 1024
# Seconds to wait for the maildrop lock before answering [IN-USE] (issue default).
DEFAULT_LOCK_TIMEOUT = 10.0
# A dotlock untouched this long is stale (liblockfile: 5 min; Postfix 500 s).
DEFAULT_STALE_LOCK = 300.0
# Refresh our own dotlock's mtime this often, well inside every MDA's stale limit (Dovecot: 2 min).
LOCK_REFRESH_INTERVAL = 60.0
# Delay before answering any failed authentication (slows guessing; hides which check failed).
DEFAULT_AUTH_FAILURE_DELAY = 2.0
# ... and never less than this, whatever the setting: the failure paths do not cost the same
# (measured with a delay of 0, Debian 12, pam_unix + yescrypt: locked account 2 ms, unknown user
# and uid below first_uid 14 ms, wrong password 44 ms, as pam_unix hashes twice) and cannot be
# made to (a PAM stack may return early or ask a directory server): only the answer's time can be
# the same. Ten times the slowest path measured, with room for slower machines.
AUTH_FAILURE_FLOOR = 0.5
# Failed authentications allowed in one session before it ends.
DEFAULT_MAX_AUTH_FAILURES = 3
# RFC 5034 bounds the AUTH command by RFC 2449's 255 octets, not the SASL responses after it:
# a base64 PLAIN response with a long password needs more, but still a bound.
MAX_SASL_LINE = 4096
# auth: longest user name: RFC 5321's local-part bound; ample for Linux (32) and most user@domain.
MAX_USERNAME = 64
# auth: longest password verified; libxcrypt refuses more (CRYPT_MAX_PASSPHRASE_SIZE) and
# sha-crypt time grows with length, so longer ones are refused before any hashing.
MAX_PASSWORD = 512
# auth: an htpasswd file larger than this (~100k entries) is a misconfiguration: refuse, not slurp.
MAX_HTPASSWD_BYTES = 16 * 1024 * 1024
# auth: bcrypt cost for new hashes: OWASP's minimum; ~50 ms in C here, like Debian's yescrypt.
BCRYPT_COST = 10
# auth: sha512-crypt rounds for new hashes: ~25 ms in C here; glibc's 5000 (~1 ms) is too cheap.
SHA512_CRYPT_ROUNDS = 100_000
# locking: a dotlock larger than this is no lock (a pid and a host name fit); it is never broken.
DOTLOCK_MAX_SIZE = 256
# locking: first pause between lock rounds (an MDA's append usually takes milliseconds).
LOCK_RETRY_MIN = 0.05
# locking: longest pause between lock rounds (doubling from the minimum; a freed lock is seen fast).
LOCK_RETRY_MAX = 0.5
# maildrop update: bytes per read/write while journalling and moving messages (few syscalls, flat RSS).
UPDATE_CHUNK = 1024 * 1024
# mbox: most octets in one chunk of a message stream (RETR/TOP): few syscalls, bounded memory.
RETR_CHUNK = 256 * 1024
# mbox: bytes per bulk search/count window of the scanner: amortises Python's per-call cost, stays
# in cache, and bounds RSS (scanned pages of the mapping are released behind the window).
MBOX_SCAN_WINDOW = 512 * 1024
# mbox: spools this large are scanned in two halves at once (a forked helper takes the second):
# login+STAT of a big spool is bound by CPython's ~1.5 GB/s bytes.count; a fork costs ~1 ms.
MBOX_PARALLEL_SCAN = 32 * 1024 * 1024
# mbox: octets of From_ line + header block hashed into a UID (bounded work for a giant header).
# Changing it renames the UIDs of messages whose headers are longer: clients re-download those.
UID_HEADER_CAP = 64 * 1024
# Spools from this size on hash their UID digests with hashlib's SHA-256 (OpenSSL: ~5x faster per
# octet with SHA extensions, ~2 ms to import); smaller ones with CPython's built-in one, which
# costs nothing to import: short sessions on small spools are most sessions.
MBOX_OPENSSL_SHA_MIN = 1024 * 1024
# tls: TLS 1.2 suites offered by default (tls_ciphers): Mozilla's "intermediate" profile (v5.7),
# AEAD and forward-secret only (no CBC: LUCKY13 and kin). Its DHE-RSA suites are left out: pop3d
# loads no DH parameters, so OpenSSL could never choose them. TLS 1.3 suites are all AEAD already.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# tls: the whole handshake (STLS or implicit) must finish within this, or within the idle timeout
# if shorter: a client that connects and never completes it must not hold a process.
TLS_HANDSHAKE_TIMEOUT = 60.0
# privsep: a log line the confined child sends to root, at most (a frame within PIPE_BUF, so it is
# written whole or not at all); root escapes it and cuts it here.
MAX_FORWARDED_LOG_LINE = 3072
# proxyheader: longest PROXY protocol version 2 header accepted: the AF_UNIX address block (216
# octets) and the TLVs a proxy may add (SSL details, a unique ID of up to 128, an authority of up to
# 255), with room to spare; the whole header is still one small read.
PROXY_HEADER_MAX = 2048
# A proxy sends its header at once, as the connection opens (HAProxy's specification: wait "at
# least 3 seconds to cover a TCP retransmit"; Postfix waits 5 s, Dovecot 3 s): 5 s, then close.
DEFAULT_PROXY_TIMEOUT = 5.0
# index: the default index_dir (docs/DATA-SAFETY.md): a cache, rebuilt by one scan when lost.
DEFAULT_INDEX_DIR = "/var/cache/pop3d"
# index: largest index file read or written (37 octets a message: ~1.8 million messages). Read
# straight into the listing's arrays: a session holds it once.
INDEX_MAX_BYTES = 64 * 1024 * 1024
# index: longest wait, after pop3d's own update, for the clock to pass the spool's new ctime so
# that the fresh index can be trusted (one kernel tick, 4 ms at HZ=250; more: no index written).
INDEX_SETTLE_WAIT = 0.02
# inetd `wait` mode: seconds without a session before the listener inetd started exits
# (config key idle_exit); inetd starts another at the next connection.
DEFAULT_IDLE_EXIT = 300.0
# inetd `wait` mode: how often (seconds) the listener looks whether inetd, its parent, is gone.
INETD_PARENT_CHECK = 5.0
