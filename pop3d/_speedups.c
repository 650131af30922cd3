/* pop3d._speedups: the bulk byte loops of the mbox scanner and of RETR, in C.
 *
 * Optional: pop3d/bulk.py holds the same six functions in Python (bytes methods, a regex, zlib), with
 * exactly the same results; tests compare the two on random data. These loops are where a
 * session spends its CPU (CPython 3.11 counts a byte at ~2.5 GB/s, and bytes.replace with a longer
 * replacement runs at ~0.5-1 GB/s); here they run at memchr/memcpy speed.
 *
 * count_lf and separators read one buffer (bytes, bytearray, mmap...) within bounds clamped to its
 * length. to_crlf and to_wire take only bytes: they count, allocate, then copy, and a buffer
 * another process can change in between (a MAP_SHARED mapping) would make the copy outgrow the
 * count; each write is bounded by the allocation too. check_headers takes only read-only buffers
 * and bounds every read by the length of the buffer it reads.
 */
#define _GNU_SOURCE /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h> /* x86-64 always has SSE2: 16 octets per step */
#endif

/* [start, end) clamped to [0, len] like a slice; a negative bound is refused (ValueError), never
 * read before the buffer or counted from its end. Returns -1 with the exception set. */
static int
clamp(Py_ssize_t len, Py_ssize_t *start, Py_ssize_t *end)
{
    if (*start < 0 || *end < 0) {
        PyErr_SetString(PyExc_ValueError, "start and end must be >= 0");
        return -1;
    }
    if (*end > len)
        *end = len;
    if (*start > *end)
        *start = *end;
    return 0;
}

/* Occurrences of byte c in s[0:n): eight bytes per step, no branch per byte.
 * For x = word ^ (c repeated): ((x & 0x7f..) + 0x7f..) | x | 0x7f.. has a byte's high bit clear
 * exactly when that byte of x is zero (no carry crosses bytes: 0x7f + 0x7f < 0x100). */
static Py_ssize_t
count_byte(const unsigned char *s, Py_ssize_t n, unsigned char c)
{
    const uint64_t low7 = 0x7f7f7f7f7f7f7f7fULL;
    const uint64_t pattern = 0x0101010101010101ULL * c;
    Py_ssize_t i = 0, total = 0;

#if defined(__SSE2__)
    /* SSE2: a compare gives 0xff (-1) per equal byte; subtracting it counts up each byte lane of
     * acc, for at most 255 blocks of 16; then the lanes are summed (psadbw). */
    const __m128i wanted = _mm_set1_epi8((char)c), zero = _mm_setzero_si128();
    while (n - i >= 16) {
        Py_ssize_t blocks = (n - i) / 16;
        if (blocks > 255)
            blocks = 255;
        __m128i acc = zero;
        for (Py_ssize_t b = 0; b < blocks; b++, i += 16)
            acc = _mm_sub_epi8(acc, _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + i)), wanted));
        __m128i sums = _mm_sad_epu8(acc, zero);
        total += _mm_cvtsi128_si32(sums) + _mm_cvtsi128_si32(_mm_srli_si128(sums, 8));
    }
#endif
    while (n - i >= 8) {
        /* Byte lanes of acc count up to 255 words, then are summed. */
        Py_ssize_t words = (n - i) / 8;
        if (words > 255)
            words = 255;
        uint64_t acc = 0;
        for (Py_ssize_t w = 0; w < words; w++, i += 8) {
            uint64_t x;
            memcpy(&x, s + i, 8);
            x ^= pattern;
            acc += (~(((x & low7) + low7) | x | low7)) >> 7;
        }
        uint64_t pairs = (acc & 0x00ff00ff00ff00ffULL) + ((acc >> 8) & 0x00ff00ff00ff00ffULL);
        total += (Py_ssize_t)((pairs * 0x0001000100010001ULL) >> 48);
    }
    for (; i < n; i++)
        total += s[i] == c;
    return total;
}

PyDoc_STRVAR(count_lf_doc,
"count_lf(buffer, start, end) -> int\n\n"
"buffer.count(b'\\n', start, end) for non-negative bounds.");

static PyObject *
count_lf(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "y*nn:count_lf", &view, &start, &end))
        return NULL;
    if (clamp(view.len, &start, &end) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t k = count_byte((const unsigned char *)view.buf + start, end - start, '\n');
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(k);
}

PyDoc_STRVAR(separators_doc,
"separators(buffer, start, end) -> list[int]\n\n"
"Ascending offsets r, start <= r < end, of the LFs that end an empty line and are followed by\n"
"'From ': buffer[r:r+6] == b'\\nFrom ' and buffer[r-1] is a LF, or buffer[r-2:r] is CR LF.\n"
"The 'From ' may lie past end (look-ahead), never past the buffer.");

/* The first q in [p, stop - 1) with q[0] == LF and q[1] == 'F', or NULL. Far rarer than a LF
 * alone (a message has a few: its separator, its "From:" header), so candidates are few. */
static const char *
find_lf_f(const char *p, const char *stop)
{
#if defined(__SSE2__)
    const __m128i lf = _mm_set1_epi8('\n'), f = _mm_set1_epi8('F');
    while (stop - p >= 17) { /* p[0..15] and p[1..16] are inside */
        __m128i here = _mm_loadu_si128((const __m128i *)p);
        __m128i next = _mm_loadu_si128((const __m128i *)(p + 1));
        int mask = _mm_movemask_epi8(_mm_and_si128(_mm_cmpeq_epi8(here, lf), _mm_cmpeq_epi8(next, f)));
        if (mask)
            return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
#endif
    while (stop - p >= 2) {
        const char *lf = memchr(p, '\n', (size_t)(stop - p - 1));
        if (lf == NULL)
            return NULL;
        if (lf[1] == 'F')
            return lf;
        p = lf + 1;
    }
    return NULL;
}

static PyObject *
separators(PyObject *module, PyObject *args)
{
    static const char needle[] = "\nFrom ";
    Py_buffer view;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "y*nn:separators", &view, &start, &end))
        return NULL;
    if (clamp(view.len, &start, &end) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const char *s = view.buf;
    /* A match starting before end may run up to 5 octets past it (end <= len: no overflow). */
    Py_ssize_t limit = view.len - end > 5 ? end + 5 : view.len;
    Py_ssize_t pos = start;
    while (limit - pos >= 6) {
        const char *hit = find_lf_f(s + pos, s + limit);
        if (hit == NULL)
            break;
        Py_ssize_t r = hit - s;
        if (limit - r < 6)
            break;
        if (memcmp(hit, needle, 6) == 0 && r >= 1
            && (s[r - 1] == '\n' || (r >= 2 && s[r - 1] == '\r' && s[r - 2] == '\n'))) {
            PyObject *value = PyLong_FromSsize_t(r);
            if (value == NULL || PyList_Append(out, value) < 0) {
                Py_XDECREF(value);
                Py_DECREF(out);
                PyBuffer_Release(&view);
                return NULL;
            }
            Py_DECREF(value);
        }
        pos = r + 1;
    }
    PyBuffer_Release(&view);
    return out;
}

/* Copy s[0:n) to d[0:cap) with every bare LF written as CR LF (a CR LF stays as it is); with
 * `stuff`, also double a dot that starts a line: after a LF, or at s if at_line_start. Returns the
 * end of what was written (at most n + (LFs) octets, or n + 2 * (LFs) + 1 with `stuff`), or NULL
 * if it would not fit in cap: s changed since it was counted. */
static char *
copy_lines(const char *s, Py_ssize_t n, char *d, Py_ssize_t cap, int stuff, int at_line_start)
{
    const char *p = s, *stop = s + n;
    char *dend = d + cap;
    if (stuff && at_line_start && p < stop && *p == '.') {
        if (d == dend)
            return NULL;
        *d++ = '.';
    }
    while (p < stop) {
        const char *lf = memchr(p, '\n', (size_t)(stop - p));
        Py_ssize_t k = (lf == NULL ? stop : lf) - p;
        if (k > dend - d)
            return NULL;
        memcpy(d, p, (size_t)k);
        d += k;
        if (lf == NULL)
            break;
        int cr = lf == s || lf[-1] != '\r';
        p = lf + 1;
        int dot = stuff && p < stop && *p == '.';
        if (cr + 1 + dot > dend - d)
            return NULL;
        if (cr)
            *d++ = '\r';
        *d++ = '\n';
        if (dot)
            *d++ = '.';
    }
    return d;
}

/* Positions i with s[i] == first and s[i + 1] == second, found with memchr on `first`. */
static Py_ssize_t
count_pairs(const char *s, Py_ssize_t n, char first, char second)
{
    const char *stop = s + n;
    Py_ssize_t k = 0;
    for (const char *p = s; (p = memchr(p, first, (size_t)(stop - p))) != NULL; p++) {
        if (p + 1 < stop && p[1] == second)
            k++;
    }
    return k;
}

/* The result of copy_lines: `out` cut to what was written, or an error if it did not fit. */
static PyObject *
copied(PyObject *out, const char *end)
{
    if (end == NULL) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_SystemError, "pop3d._speedups: the input changed while copied");
        return NULL;
    }
    Py_ssize_t written = end - PyBytes_AS_STRING(out);
    if (written != PyBytes_GET_SIZE(out) && _PyBytes_Resize(&out, written) < 0)
        return NULL;
    return out;
}

PyDoc_STRVAR(to_crlf_doc,
"to_crlf(chunk: bytes) -> bytes\n\n"
"chunk.replace(b'\\r\\n', b'\\n').replace(b'\\n', b'\\r\\n'): every bare LF becomes CR LF;\n"
"a CR LF, and a bare CR, stay as they are. Only bytes: a buffer that can change between the\n"
"count and the copy is refused (TypeError).");

static PyObject *
to_crlf(PyObject *module, PyObject *args)
{
    PyObject *chunk;
    if (!PyArg_ParseTuple(args, "S:to_crlf", &chunk))
        return NULL;
    const char *s = PyBytes_AS_STRING(chunk);
    Py_ssize_t n = PyBytes_GET_SIZE(chunk);
    Py_ssize_t bare = count_byte((const unsigned char *)s, n, '\n');
    if (memchr(s, '\r', (size_t)n) != NULL) /* rare: take out the LFs after a CR */
        bare -= count_pairs(s, n, '\r', '\n');
    if (bare > PY_SSIZE_T_MAX - n)
        return PyErr_NoMemory();
    PyObject *out = PyBytes_FromStringAndSize(NULL, n + bare);
    if (out == NULL)
        return NULL;
    return copied(out, copy_lines(s, n, PyBytes_AS_STRING(out), n + bare, 0, 0));
}

PyDoc_STRVAR(to_wire_doc,
"to_wire(chunk: bytes, at_line_start) -> bytes\n\n"
"to_crlf(chunk) with every dot that starts a line doubled (the first octet's only if\n"
"at_line_start): message octets as RETR sends them, in one pass. Only bytes, as to_crlf.");

static PyObject *
to_wire(PyObject *module, PyObject *args)
{
    PyObject *chunk;
    int at_line_start;
    if (!PyArg_ParseTuple(args, "Sp:to_wire", &chunk, &at_line_start))
        return NULL;
    const char *s = PyBytes_AS_STRING(chunk);
    Py_ssize_t n = PyBytes_GET_SIZE(chunk);
    /* Each LF adds at most a CR and a dot: allocate for that, then shrink to what was written. */
    Py_ssize_t lfs = count_byte((const unsigned char *)s, n, '\n');
    if (lfs > (PY_SSIZE_T_MAX - 1 - n) / 2)
        return PyErr_NoMemory();
    Py_ssize_t cap = n + 2 * lfs + 1;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL)
        return NULL;
    return copied(out, copy_lines(s, n, PyBytes_AS_STRING(out), cap, 1, at_line_start));
}

/* The headers local MUAs add or rewrite (lower case): left out of a message's UID digest. */
static const char *const volatile_names[] = {
    "status", "x-status", "x-keywords", "x-uid", "x-imap", "x-imapbase", "content-length", "lines",
};

/* 1 if s[q:n) starts with one of volatile_names (ASCII case ignored), blanks, then ':'. */
static int
volatile_header_at(const unsigned char *s, Py_ssize_t n, Py_ssize_t q)
{
    for (size_t k = 0; k < sizeof volatile_names / sizeof volatile_names[0]; k++) {
        const char *name = volatile_names[k];
        Py_ssize_t len = (Py_ssize_t)strlen(name), i = 0;
        if (n - q < len)
            continue;
        for (; i < len; i++) {
            unsigned char c = s[q + i];
            if (c >= 'A' && c <= 'Z')
                c += 'a' - 'A';
            if (c != (unsigned char)name[i])
                break;
        }
        if (i < len)
            continue;
        Py_ssize_t r = q + len;
        while (r < n && (s[r] == ' ' || s[r] == '\t'))
            r++;
        if (r < n && s[r] == ':')
            return 1;
    }
    return 0;
}

PyDoc_STRVAR(strip_volatile_doc,
"strip_volatile(block: bytes) -> bytes\n\n"
"block without the headers local MUAs rewrite: each LF followed by Status, X-Status,\n"
"X-Keywords, X-UID, X-IMAP, X-IMAPbase, Content-Length or Lines (ASCII case ignored), blanks\n"
"and a colon, up to the end of that line and of its continuation lines, is taken out; the LF\n"
"that ends them stays. The same as pop3d.bulk.py_strip_volatile's regular expression. Only\n"
"bytes, as to_crlf; block itself when there is nothing to take out.");

static PyObject *
strip_volatile(PyObject *module, PyObject *args)
{
    PyObject *block, *out = NULL;
    if (!PyArg_ParseTuple(args, "S:strip_volatile", &block))
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(block);
    Py_ssize_t n = PyBytes_GET_SIZE(block);
    char *w = NULL;
    Py_ssize_t kept = 0; /* s[kept:p) is yet to be copied */
    Py_ssize_t p = 0;
    while (p < n) {
        const unsigned char *lf = memchr(s + p, '\n', (size_t)(n - p));
        if (lf == NULL)
            break;
        p = lf - s;
        if (!volatile_header_at(s, n, p + 1)) {
            p++;
            continue;
        }
        /* Taken out: [p, e), e the LF ending the header's last line (or n). */
        Py_ssize_t e = p + 1;
        for (;;) {
            const unsigned char *eol = memchr(s + e, '\n', (size_t)(n - e));
            if (eol == NULL) {
                e = n;
                break;
            }
            e = eol - s;
            if (e + 1 < n && (s[e + 1] == ' ' || s[e + 1] == '\t')) {
                e++; /* a continuation line */
                continue;
            }
            break;
        }
        if (out == NULL) {
            out = PyBytes_FromStringAndSize(NULL, n); /* what is kept is at most all of it */
            if (out == NULL)
                return NULL;
            w = PyBytes_AS_STRING(out);
        }
        memcpy(w, s + kept, (size_t)(p - kept));
        w += p - kept;
        kept = p = e;
    }
    if (out == NULL) {
        Py_INCREF(block);
        return block;
    }
    memcpy(w, s + kept, (size_t)(n - kept));
    w += n - kept;
    if (_PyBytes_Resize(&out, w - PyBytes_AS_STRING(out)) < 0)
        return NULL;
    return out;
}

/* CRC-32 as zlib.crc32 computes it (ISO-HDLC: reflected polynomial 0xEDB88320), eight octets a
 * step (slicing-by-8). The tables are made at the first use: 8 KiB, ~20 us. */
static uint32_t crc_table[8][256];
static int crc_ready;

static void
crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (int i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
    crc_ready = 1;
}

static uint32_t
crc32_of(const unsigned char *p, Py_ssize_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n >= 8) {
        /* The low four octets take the running CRC: assembled little-endian, whatever the host. */
        uint32_t lo = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        lo ^= c;
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff]
            ^ crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]]
            ^ crc_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n-- > 0)
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static uint32_t
le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* A message's record in the listing's digests (mbox._DIGEST_STRIDE): the UID digest, then at
 * CHECK_AT a 32-bit word (length of the From_ line + header block, and in its top two bits the
 * empty line that ends it: 0 none, 1 LF, 2 CR LF) and the CRC-32 of that block, little-endian. */
#define RECORD 24
#define CHECK_AT 16
#define CHECK_LENGTH 0x3FFFFFFFu

/* Read-only, contiguous: what check_headers accepts (TypeError otherwise). */
static int
readonly_buffer(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (!view->readonly) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s must be a read-only buffer (bytes, a read-only mmap)", what);
        return -1;
    }
    return 0;
}

/* 1 if message i of the listing is where and what it was: see check_headers_doc. */
static int
header_holds(const unsigned char *s, uint64_t n, const unsigned char *ends, int width,
             const unsigned char *seplen, const unsigned char *records, Py_ssize_t i)
{
    uint64_t at = 0; /* the From_ line */
    if (i > 0) {
        uint64_t end;
        if (width == 4) {
            uint32_t e32;
            memcpy(&e32, ends + (i - 1) * 4, 4);
            end = e32;
        }
        else
            memcpy(&end, ends + (i - 1) * 8, 8);
        unsigned sep = seplen[i - 1];
        if (end < 1 || end > n || n - end < sep || (sep != 1 && sep != 2))
            return 0;
        if (s[end - 1] != '\n' || (sep == 1 ? s[end] != '\n' : s[end] != '\r' || s[end + 1] != '\n'))
            return 0;
        at = end + sep;
    }
    if (n - at < 5 || memcmp(s + at, "From ", 5) != 0)
        return 0;
    uint32_t word = le32(records + i * RECORD + CHECK_AT);
    uint64_t length = word & CHECK_LENGTH, blank = word >> 30;
    if (blank == 3 || n - at < length + blank)
        return 0;
    if (blank == 1 && s[at + length] != '\n')
        return 0;
    if (blank == 2 && (s[at + length] != '\r' || s[at + length + 1] != '\n'))
        return 0;
    return crc32_of(s + at, (Py_ssize_t)length) == le32(records + i * RECORD + CHECK_AT + 4);
}

PyDoc_STRVAR(check_headers_doc,
"check_headers(buffer, ends, width, seplen, records, first, stop) -> int\n\n"
"The first message i, first <= i < stop, that is no longer where and what a listing says, or\n"
"stop if none: its From_ line at ends[i-1] + seplen[i-1] (0 for the first) after the listed\n"
"separator (a LF, then LF or CR LF), and its From_ line + header block the length, followed by\n"
"the empty line, and of the CRC-32 its record holds (a 24-octet record a message: the check at\n"
"octet 16). ends: offsets of `width` (4 or 8) octets each, in the host's order; seplen: one octet\n"
"each. All read-only buffers (TypeError otherwise); ValueError if they are too short for stop.");

static PyObject *
check_headers(PyObject *module, PyObject *args)
{
    PyObject *objs[4];
    int width;
    Py_ssize_t first, stop;
    if (!PyArg_ParseTuple(args, "OOiOOnn:check_headers", &objs[0], &objs[1], &width, &objs[2], &objs[3],
                          &first, &stop))
        return NULL;
    if (width != 4 && width != 8) {
        PyErr_SetString(PyExc_ValueError, "width must be 4 or 8");
        return NULL;
    }
    static const char *const what[4] = {"buffer", "ends", "seplen", "records"};
    Py_buffer views[4];
    int got = 0;
    for (; got < 4; got++)
        if (readonly_buffer(objs[got], &views[got], what[got]) < 0)
            break;
    Py_ssize_t failed = -1;
    if (got == 4) {
        if (first < 0 || stop < first || stop > views[3].len / RECORD
            || (stop > 0 && (stop - 1 > views[1].len / width || stop - 1 > views[2].len)))
            PyErr_SetString(PyExc_ValueError, "first and stop must be 0 <= first <= stop <= messages");
        else {
            if (!crc_ready)
                crc_init();
            const unsigned char *s = views[0].buf;
            Py_ssize_t i = first;
            while (i < stop && header_holds(s, (uint64_t)views[0].len, views[1].buf, width, views[2].buf,
                                            views[3].buf, i))
                i++;
            failed = i;
        }
    }
    while (got > 0)
        PyBuffer_Release(&views[--got]);
    return failed < 0 ? NULL : PyLong_FromSsize_t(failed);
}

static PyMethodDef methods[] = {
    {"count_lf", count_lf, METH_VARARGS, count_lf_doc},
    {"separators", separators, METH_VARARGS, separators_doc},
    {"to_crlf", to_crlf, METH_VARARGS, to_crlf_doc},
    {"to_wire", to_wire, METH_VARARGS, to_wire_doc},
    {"strip_volatile", strip_volatile, METH_VARARGS, strip_volatile_doc},
    {"check_headers", check_headers, METH_VARARGS, check_headers_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pop3d._speedups",
    "C versions of pop3d.bulk's byte loops (same results).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
