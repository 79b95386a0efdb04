/* The audit chain's sealing step in C: one record dict in, its sealed line and hash out.
 *
 * chain.seal_all serializes a record to canonical JSON (orjson, sorted keys), hashes it with
 * SHA-256 and appends the hash as the last member. Measured on the fully loaded proxy, the calls
 * around the two native steps cost more than the steps: an orjson call with keyword options, a
 * hashlib object looked up by name and torn down again, a hex digest, a slice and a join, for
 * two records per statement. This does the same in one call and one buffer.
 *
 * It writes exactly the bytes orjson writes (OPT_SORT_KEYS, no whitespace, UTF-8 unescaped,
 * control characters as \b \t \n \f \r or \u00xx), for the types it knows: dict with str keys,
 * list, tuple, str, int within 64 bits, bool, None, and floats in the range where orjson and
 * Python's repr() agree. For anything else (another type, a lone surrogate, a float outside
 * that range, nesting past 64) seal() returns None and the caller seals the record with
 * orjson as before, so the bytes never depend on which path ran: tests/test_audit_native_seal.py
 * holds the two to the same bytes.
 *
 * SHA-256 is OpenSSL's SHA256_Init/Update/Final, from the libcrypto the interpreter's hashlib already
 * loaded (looked up at import; no headers needed to build). Without it seal() returns None.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* OpenSSL's low-level SHA-256 (SHA256_Init/Update/Final run the block function directly; the
 * one-shot SHA256() of OpenSSL 3 fetches the algorithm from a provider at every call, which costs
 * more than hashing a record). The context is opaque here: 112 bytes in OpenSSL 1.1 and 3. */
typedef int (*sha256_init_fn)(void *ctx);
typedef int (*sha256_update_fn)(void *ctx, const void *d, size_t n);
typedef int (*sha256_final_fn)(unsigned char *md, void *ctx);
static sha256_init_fn sha256_init = NULL;
static sha256_update_fn sha256_update = NULL;
static sha256_final_fn sha256_final = NULL;
#define SHA256_CTX_ROOM 256

static int sha256_oneshot(const char *d, Py_ssize_t n, unsigned char md[32]) {
    _Alignas(16) unsigned char ctx[SHA256_CTX_ROOM];
    return sha256_init(ctx) == 1 && sha256_update(ctx, d, (size_t)n) == 1 && sha256_final(md, ctx) == 1;
}

#define MAX_DEPTH 64  /* records are shallow; deeper ones go the orjson way (C stack: a frame per level) */

typedef struct {
    char *p;
    Py_ssize_t len;
    Py_ssize_t cap;
    char local[2048];  /* most records fit: no allocation */
} Buf;

static void buf_init(Buf *b) {
    b->p = b->local;
    b->len = 0;
    b->cap = (Py_ssize_t)sizeof b->local;
}

static void buf_free(Buf *b) {
    if (b->p != b->local)
        PyMem_Free(b->p);
}

/* 0: ok; -1: out of memory (a Python error is set) */
static int buf_grow(Buf *b, Py_ssize_t more) {
    Py_ssize_t cap = b->cap;
    while (cap < b->len + more)
        cap *= 2;
    char *p;
    if (b->p == b->local) {
        p = PyMem_Malloc((size_t)cap);
        if (p != NULL)
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

/* A float that is a whole number of thousandths below 1e9 (what the records hold: durations in
 * ms to the microsecond), written as repr() writes it: the shortest decimal that reads back as
 * the same double is that one, as the thousandths are far coarser than the double's precision
 * there. 1: written; 0: not such a float. */
static int put_thousandths(Buf *b, double x) {
    double a = fabs(x);
    if (!(a < 1e9))
        return 0;
    long long k = llround(a * 1000.0);
    if ((double)k / 1000.0 != a)
        return 0;
    char num[40];
    char *end = num + sizeof num;
    int frac = (int)(k % 1000);
    char *s = end;
    if (frac == 0) {
        *--s = '0';
    } else {
        char d[3] = {(char)('0' + frac / 100), (char)('0' + frac / 10 % 10), (char)('0' + frac % 10)};
        int keep = d[2] != '0' ? 3 : (d[1] != '0' ? 2 : 1);
        for (int i = keep - 1; i >= 0; i--)
            *--s = d[i];
    }
    *--s = '.';
    s = put_digits(s, (unsigned long long)(k / 1000));
    if (signbit(x))
        *--s = '-';
    return buf_put(b, s, end - s) < 0 ? -1 : 1;
}

/* 1: written; 0: not a value this writer knows (the caller falls back); -1: a Python error */
static int put_value(Buf *b, PyObject *v, int depth);

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

static int put_dict(Buf *b, PyObject *d, int depth) {
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
        rc = put_value(b, ms[i].value, depth + 1);
        if (rc != 1)
            goto done;
    }
    rc = buf_char(b, '}') < 0 ? -1 : 1;
done:
    if (ms != small)
        PyMem_Free(ms);
    return rc;
}

static int put_sequence(Buf *b, PyObject *seq, int depth) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (buf_char(b, '[') < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && buf_char(b, ',') < 0)
            return -1;
        int rc = put_value(b, items[i], depth + 1);
        if (rc != 1)
            return rc;
    }
    return buf_char(b, ']') < 0 ? -1 : 1;
}

static int put_value(Buf *b, PyObject *v, int depth) {
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
    if (PyFloat_CheckExact(v)) {
        double x = PyFloat_AS_DOUBLE(v);
        double a = fabs(x);
        /* repr() and orjson agree here (1e-05 / 0.00001 and 1e+16 / 1e16 do not) */
        if (!(x == 0.0 || (a >= 1e-4 && a < 1e16)))
            return 0;
        int fast = put_thousandths(b, x);
        if (fast != 0)
            return fast;
        char *s = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (s == NULL)
            return -1;
        int rc = buf_put(b, s, (Py_ssize_t)strlen(s)) < 0 ? -1 : 1;
        PyMem_Free(s);
        return rc;
    }
    if (PyDict_CheckExact(v))
        return put_dict(b, v, depth);
    if (PyList_CheckExact(v) || PyTuple_CheckExact(v))
        return put_sequence(b, v, depth);
    return 0;
}

static const char HASH_HEAD[] = ",\"hash\":\"";

/* seal(record) -> (line, hash) | None */
static PyObject *seal(PyObject *Py_UNUSED(self), PyObject *record) {
    if (sha256_final == NULL || !PyDict_CheckExact(record) || PyDict_GET_SIZE(record) == 0)
        Py_RETURN_NONE;
    Buf b;
    buf_init(&b);
    PyObject *result = NULL;
    int rc = put_dict(&b, record, 0);
    if (rc < 0)
        goto done;
    if (rc == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    unsigned char md[32];
    if (!sha256_oneshot(b.p, b.len, md)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    char hex[64];
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = HEX[md[i] >> 4];
        hex[2 * i + 1] = HEX[md[i] & 15];
    }
    /* the line: the body without its closing brace, then ,"hash":"<hex>"}\n */
    b.len -= 1;
    if (buf_put(&b, HASH_HEAD, (Py_ssize_t)(sizeof HASH_HEAD - 1)) < 0 || buf_put(&b, hex, 64) < 0 ||
        buf_put(&b, "\"}\n", 3) < 0)
        goto done;
    PyObject *line = PyBytes_FromStringAndSize(b.p, b.len);
    if (line == NULL)
        goto done;
    PyObject *digest = PyUnicode_FromStringAndSize(hex, 64);
    if (digest == NULL) {
        Py_DECREF(line);
        goto done;
    }
    result = PyTuple_Pack(2, line, digest);
    Py_DECREF(line);
    Py_DECREF(digest);
done:
    buf_free(&b);
    return result;
}

/* canonical(record) -> bytes | None: the body alone (the tests compare it with orjson's) */
static PyObject *canonical(PyObject *Py_UNUSED(self), PyObject *record) {
    if (!PyDict_CheckExact(record))
        Py_RETURN_NONE;
    Buf b;
    buf_init(&b);
    PyObject *result = NULL;
    int rc = put_dict(&b, record, 0);
    if (rc == 1)
        result = PyBytes_FromStringAndSize(b.p, b.len);
    else if (rc == 0)
        result = Py_NewRef(Py_None);
    buf_free(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"seal", seal, METH_O,
     "seal(record) -> (line, hash) or None: the sealed line (canonical JSON with \"hash\" last, and a "
     "newline) and the record's SHA-256 hex digest; None for a record only the orjson path can write."},
    {"canonical", canonical, METH_O, "canonical(record) -> bytes or None: the canonical JSON alone."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_seal", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__seal(void) {
    /* hashlib's libcrypto, already loaded (chain.py imports hashlib first); else the usual names */
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so", "libcrypto.dylib", NULL};
    for (int i = 0; names[i] != NULL && sha256_final == NULL; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
        if (h == NULL)
            h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (h == NULL)
            continue;
        sha256_init = (sha256_init_fn)dlsym(h, "SHA256_Init");
        sha256_update = (sha256_update_fn)dlsym(h, "SHA256_Update");
        sha256_final = (sha256_final_fn)dlsym(h, "SHA256_Final");
        if (sha256_init == NULL || sha256_update == NULL)
            sha256_final = NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "available", sha256_final != NULL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
