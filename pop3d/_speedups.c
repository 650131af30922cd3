/* pop3d._speedups: the bulk byte loops of the mbox scanner and of RETR, in C.
 *
 * Optional: pop3d/bulk.py holds the same four functions in Python (CPython's bytes methods), with
 * exactly the same results; tests compare the two on random data. These loops are where a
 * session spends its CPU (CPython 3.11 counts a byte at ~2.5 GB/s, and bytes.replace with a longer
 * replacement runs at ~0.5-1 GB/s); here they run at memchr/memcpy speed.
 *
 * Every function reads one buffer (bytes, bytearray, mmap...) within bounds clamped to its length
 * and writes only into an object it allocated at the exact size it counted first.
 */
#define _GNU_SOURCE /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* [start, end) clamped to [0, len] like a slice with non-negative bounds. */
static void
clamp(Py_ssize_t len, Py_ssize_t *start, Py_ssize_t *end)
{
    if (*start < 0)
        *start = 0;
    if (*end > len)
        *end = len;
    if (*start > *end)
        *start = *end;
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
    clamp(view.len, &start, &end);
    Py_ssize_t k = count_byte((const unsigned char *)view.buf + start, end - start, '\n');
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(k);
}

PyDoc_STRVAR(separators_doc,
"separators(buffer, start, end) -> list[int]\n\n"
"Ascending offsets r, start <= r < end, of the LFs that end an empty line and are followed by\n"
"'From ': buffer[r:r+6] == b'\\nFrom ' and buffer[r-1] is a LF, or buffer[r-2:r] is CR LF.\n"
"The 'From ' may lie past end (look-ahead), never past the buffer.");

static PyObject *
separators(PyObject *module, PyObject *args)
{
    static const char needle[] = "\nFrom ";
    Py_buffer view;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "y*nn:separators", &view, &start, &end))
        return NULL;
    clamp(view.len, &start, &end);
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const char *s = view.buf;
    /* A match starting before end may run up to 5 octets past it. */
    Py_ssize_t limit = end + 5 < view.len ? end + 5 : view.len;
    Py_ssize_t pos = start;
    while (limit - pos >= 6) {
        const char *hit = memmem(s + pos, (size_t)(limit - pos), needle, 6);
        if (hit == NULL)
            break;
        Py_ssize_t r = hit - s;
        if (r >= 1 && (s[r - 1] == '\n' || (r >= 2 && s[r - 1] == '\r' && s[r - 2] == '\n'))) {
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

/* Copy s[0:n) to d with every bare LF written as CR LF (a CR LF stays as it is); with `stuff`,
 * also double a dot that starts a line: after a LF, or at s if at_line_start. Returns the end of
 * what was written: at most n + (LFs) octets, or n + 2 * (LFs) + 1 with `stuff`. */
static char *
copy_lines(const char *s, Py_ssize_t n, char *d, int stuff, int at_line_start)
{
    const char *p = s, *stop = s + n;
    if (stuff && at_line_start && p < stop && *p == '.')
        *d++ = '.';
    while (p < stop) {
        const char *lf = memchr(p, '\n', (size_t)(stop - p));
        if (lf == NULL) {
            memcpy(d, p, (size_t)(stop - p));
            return d + (stop - p);
        }
        memcpy(d, p, (size_t)(lf - p));
        d += lf - p;
        if (lf == s || lf[-1] != '\r')
            *d++ = '\r';
        *d++ = '\n';
        p = lf + 1;
        if (stuff && p < stop && *p == '.')
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

PyDoc_STRVAR(to_crlf_doc,
"to_crlf(buffer) -> bytes\n\n"
"bytes(buffer).replace(b'\\r\\n', b'\\n').replace(b'\\n', b'\\r\\n'): every bare LF becomes CR LF;\n"
"a CR LF, and a bare CR, stay as they are.");

static PyObject *
to_crlf(PyObject *module, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*:to_crlf", &view))
        return NULL;
    const char *s = view.buf;
    Py_ssize_t bare = count_byte((const unsigned char *)s, view.len, '\n');
    if (memchr(s, '\r', (size_t)view.len) != NULL) /* rare: take out the LFs after a CR */
        bare -= count_pairs(s, view.len, '\r', '\n');
    PyObject *out = PyBytes_FromStringAndSize(NULL, view.len + bare);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    copy_lines(s, view.len, PyBytes_AS_STRING(out), 0, 0);
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(to_wire_doc,
"to_wire(buffer, at_line_start) -> bytes\n\n"
"to_crlf(buffer) with every dot that starts a line doubled (the first octet's only if\n"
"at_line_start): message octets as RETR sends them, in one pass.");

static PyObject *
to_wire(PyObject *module, PyObject *args)
{
    Py_buffer view;
    int at_line_start;
    if (!PyArg_ParseTuple(args, "y*p:to_wire", &view, &at_line_start))
        return NULL;
    const char *s = view.buf;
    /* Each LF adds at most a CR and a dot: allocate for that, then shrink to what was written. */
    Py_ssize_t lfs = count_byte((const unsigned char *)s, view.len, '\n');
    PyObject *out = PyBytes_FromStringAndSize(NULL, view.len + 2 * lfs + 1);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    char *start = PyBytes_AS_STRING(out);
    char *end = copy_lines(s, view.len, start, 1, at_line_start);
    PyBuffer_Release(&view);
    if (_PyBytes_Resize(&out, end - start) < 0)
        return NULL;
    return out;
}

static PyMethodDef methods[] = {
    {"count_lf", count_lf, METH_VARARGS, count_lf_doc},
    {"separators", separators, METH_VARARGS, separators_doc},
    {"to_crlf", to_crlf, METH_VARARGS, to_crlf_doc},
    {"to_wire", to_wire, METH_VARARGS, to_wire_doc},
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
