/* Compact JSON as orjson writes it, into a growing buffer: the writer shared by the audit chain's
 * sealing step (_seal.c, keys sorted) and the session recordings' lines (_recording.c, in the
 * dicts' own order). Included by both; static throughout.
 *
 * It writes exactly the bytes orjson writes (no whitespace, UTF-8 unescaped, control characters
 * as \b \t \n \f \r or \u00xx), for the types it knows: dict with str keys, list, tuple, str, int
 * within 64 bits, bool, None, and floats in the range where orjson and Python's repr() agree.
 * For anything else (another type, a lone surrogate, a float outside that range, nesting past
 * 64) a writer returns 0 and its caller leaves the value to orjson, so the bytes never depend on
 * which path ran (tests/test_audit_native_seal.py, tests/test_recording_native.py).
 */
#ifndef PGWARDEN_JSON_H
#define PGWARDEN_JSON_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 64  /* records are shallow; deeper ones go the orjson way (C stack: a frame per level) */

typedef struct {
    char *p;
    Py_ssize_t len;
    Py_ssize_t cap;
    char *local;  /* the caller's room (on its stack: most records fit, no allocation), or NULL */
} Buf;

#define BUF_ROOM 2048

/* Writes go to `room` (`size` bytes; NULL and 0: none) until they need more */
static void buf_init(Buf *b, char *room, Py_ssize_t size) {
    b->p = b->local = room;
    b->len = 0;
    b->cap = size;
}

static void buf_free(Buf *b) {
    if (b->p != b->local)
        PyMem_Free(b->p);
}

/* 0: ok; -1: out of memory (a Python error is set) */
static int buf_grow(Buf *b, Py_ssize_t more) {
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more)
        cap *= 2;
    char *p;
    if (b->p == b->local) {
        p = PyMem_Malloc((size_t)cap);
        if (p != NULL && b->len)
            memcpy(p, b->local, (size_t)b->len);
    } else {
        p = PyMem_Realloc(b->p, (size_t)cap);
    }
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int buf_reserve(Buf *b, Py_ssize_t more) {
    return b->len + more <= b->cap ? 0 : buf_grow(b, more);
}

static inline int buf_put(Buf *b, const char *s, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

static inline int buf_char(Buf *b, char c) {
    if (buf_reserve(b, 1) < 0)
        return -1;
    b->p[b->len++] = c;
    return 0;
}

static const char HEX[] = "0123456789abcdef";

/* Does any of the 8 bytes in `w` need an escape (below 0x20, '"' or '\\')? (bit tricks from
 * "Bit Twiddling Hacks": haszero / hasless) */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
static inline int word_needs_escape(uint64_t w) {
    uint64_t quote = w ^ (ONES * '"'), slash = w ^ (ONES * '\\');
    uint64_t t = ((w - ONES * 0x20) & ~w) | ((quote - ONES) & ~quote) | ((slash - ONES) & ~slash);
    return (t & HIGHS) != 0;
}

/* A JSON string as orjson writes it: `"` and `\` escaped, control characters as short escapes
 * or \u00xx (lowercase hex), everything else (DEL, non-ASCII) as the UTF-8 bytes themselves. */
static int put_string(Buf *b, const char *s, Py_ssize_t n) {
    /* room for the text as it is; an escape makes room for itself (a statement may be megabytes:
     * reserving the worst case, six bytes per byte, would ask for several times that) */
    if (buf_reserve(b, n + 2) < 0)
        return -1;
    char *o = b->p + b->len;
    *o++ = '"';
    Py_ssize_t i = 0;
    while (i < n) {
        /* copy the run of bytes that need nothing, eight at a time */
        Py_ssize_t start = i;
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (word_needs_escape(w))
                break;
            i += 8;
        }
        while (i < n) {
            unsigned char c = (unsigned char)s[i];
            if (c < 0x20 || c == '"' || c == '\\')
                break;
            i++;
        }
        memcpy(o, s + start, (size_t)(i - start));
        o += i - start;
        if (i >= n)
            break;
        /* an escape: up to 6 bytes where the text had 1, and the rest and the closing quote after */
        b->len = o - b->p;
        if (buf_reserve(b, 6 + (n - i - 1) + 1) < 0)
            return -1;
        o = b->p + b->len;
        unsigned char c = (unsigned char)s[i++];
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default:
            *o++ = 'u'; *o++ = '0'; *o++ = '0';
            *o++ = HEX[c >> 4]; *o++ = HEX[c & 15];
        }
    }
    *o++ = '"';
    b->len = o - b->p;
    return 0;
}

/* Decimal digits of `u` into the end of `end` (backwards); returns where they start. */
static char *put_digits(char *end, unsigned long long u) {
    do {
        *--end = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    return end;
}

static int put_int(Buf *b, long long x) {
    char num[24];
    char *end = num + sizeof num;
    unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    char *s = put_digits(end, u);
    if (x < 0)
        *--s = '-';
    return buf_put(b, s, end - s);
}

/* A float that is a whole number of millionths below 1e9 (what records and recordings hold:
 * durations in ms and times in s, to the microsecond), written as repr() writes it. Such a
 * decimal has at most 15 significant digits, and every decimal of 15 digits or fewer reads back
 * as a double of its own (DBL_DIG), so no shorter decimal gives the same double: the shortest,
 * repr()'s, is this one without its trailing zeros. 1: written; 0: not such a float (dtoa
 * writes it, at many times the cost); -1: out of memory. */
static int put_millionths(Buf *b, double x) {
    double a = fabs(x);
    if (!(a < 1e9))
        return 0;
    long long k = llround(a * 1e6);
    if ((double)k / 1e6 != a)
        return 0;
    char num[40];
    char *end = num + sizeof num;
    char d[6];
    int frac = (int)(k % 1000000);
    for (int i = 5; i >= 0; i--, frac /= 10)
        d[i] = (char)('0' + frac % 10);
    int keep = 6;  /* trailing zeros off, one digit at least */
    while (keep > 1 && d[keep - 1] == '0')
        keep--;
    char *s = end;
    for (int i = keep - 1; i >= 0; i--)
        *--s = d[i];
    *--s = '.';
    s = put_digits(s, (unsigned long long)(k / 1000000));
    if (signbit(x))
        *--s = '-';
    return buf_put(b, s, end - s) < 0 ? -1 : 1;
}

/* A float as orjson writes it, where orjson and repr() agree (1e-05 / 0.00001 and 1e+16 / 1e16
 * do not). 1: written; 0: not such a float; -1: a Python error. */
static int put_double(Buf *b, double x) {
    double a = fabs(x);
    if (!(x == 0.0 || (a >= 1e-4 && a < 1e16)))
        return 0;
    int fast = put_millionths(b, x);
    if (fast != 0)
        return fast;
    char *s = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (s == NULL)
        return -1;
    int rc = buf_put(b, s, (Py_ssize_t)strlen(s)) < 0 ? -1 : 1;
    PyMem_Free(s);
    return rc;
}

/* 1: written; 0: not a value this writer knows (the caller falls back); -1: a Python error */
static int put_value(Buf *b, PyObject *v, int depth, int sorted);

typedef struct {
    const char *key;
    Py_ssize_t len;
    PyObject *value;
} Member;

/* UTF-8 byte order is code point order, as orjson sorts; keys are short and mostly differ early,
 * so a plain loop beats a call to memcmp */
static inline int member_less(const Member *x, const Member *y) {
    Py_ssize_t n = x->len < y->len ? x->len : y->len;
    const unsigned char *a = (const unsigned char *)x->key, *c = (const unsigned char *)y->key;
    for (Py_ssize_t i = 0; i < n; i++)
        if (a[i] != c[i])
            return a[i] < c[i];
    return x->len < y->len;
}

/* Records have a few dozen members at most: insertion sort, no allocation, no callback. */
static void sort_members(Member *ms, Py_ssize_t n) {
    for (Py_ssize_t i = 1; i < n; i++) {
        Member m = ms[i];
        Py_ssize_t j = i;
        while (j > 0 && member_less(&m, &ms[j - 1])) {
            ms[j] = ms[j - 1];
            j--;
        }
        ms[j] = m;
    }
}

static int put_dict(Buf *b, PyObject *d, int depth, int sorted) {
    Py_ssize_t n = PyDict_GET_SIZE(d);
    if (n == 0)
        return buf_put(b, "{}", 2) < 0 ? -1 : 1;
    Member small[32];
    Member *ms = n <= 32 ? small : PyMem_Malloc(sizeof(Member) * (size_t)n);
    if (ms == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = 1;
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k)) {
            rc = 0;
            goto done;
        }
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(k, &len);
        if (s == NULL) {  /* a lone surrogate: orjson refuses it too; the caller's path decides */
            PyErr_Clear();
            rc = 0;
            goto done;
        }
        ms[i].key = s;
        ms[i].len = len;
        ms[i].value = v;
        i++;
    }
    if (sorted)
        sort_members(ms, n);
    if (buf_char(b, '{') < 0) {
        rc = -1;
        goto done;
    }
    for (i = 0; i < n; i++) {
        if (i && buf_char(b, ',') < 0) {
            rc = -1;
            goto done;
        }
        if (put_string(b, ms[i].key, ms[i].len) < 0 || buf_char(b, ':') < 0) {
            rc = -1;
            goto done;
        }
        rc = put_value(b, ms[i].value, depth + 1, sorted);
        if (rc != 1)
            goto done;
    }
    rc = buf_char(b, '}') < 0 ? -1 : 1;
done:
    if (ms != small)
        PyMem_Free(ms);
    return rc;
}

static int put_sequence(Buf *b, PyObject *seq, int depth, int sorted) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (buf_char(b, '[') < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && buf_char(b, ',') < 0)
            return -1;
        int rc = put_value(b, items[i], depth + 1, sorted);
        if (rc != 1)
            return rc;
    }
    return buf_char(b, ']') < 0 ? -1 : 1;
}

static int put_value(Buf *b, PyObject *v, int depth, int sorted) {
    if (depth > MAX_DEPTH)
        return 0;
    if (PyUnicode_CheckExact(v)) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(v, &len);
        if (s == NULL) {
            PyErr_Clear();
            return 0;
        }
        return put_string(b, s, len) < 0 ? -1 : 1;
    }
    if (v == Py_None)
        return buf_put(b, "null", 4) < 0 ? -1 : 1;
    if (v == Py_True)
        return buf_put(b, "true", 4) < 0 ? -1 : 1;
    if (v == Py_False)
        return buf_put(b, "false", 5) < 0 ? -1 : 1;
    if (PyLong_CheckExact(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (overflow == 0)
            return put_int(b, x) < 0 ? -1 : 1;
        if (overflow < 0)
            return 0;
        unsigned long long u = PyLong_AsUnsignedLongLong(v);  /* orjson writes up to 2**64 - 1 */
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        char num[24];
        char *end = num + sizeof num;
        char *s = put_digits(end, u);
        return buf_put(b, s, end - s) < 0 ? -1 : 1;
    }
    if (PyFloat_CheckExact(v))
        return put_double(b, PyFloat_AS_DOUBLE(v));
    if (PyDict_CheckExact(v))
        return put_dict(b, v, depth, sorted);
    if (PyList_CheckExact(v) || PyTuple_CheckExact(v))
        return put_sequence(b, v, depth, sorted);
    return 0;
}

#endif
