/* The audit chain's sealing step in C: one record dict in, its sealed line and hash out.
 *
 * chain.seal_all serializes a record to canonical JSON (orjson, sorted keys), hashes it with
 * SHA-256 and appends the hash as the last member. Measured on the fully loaded proxy, the calls
 * around the two native steps cost more than the steps: an orjson call with keyword options, a
 * hashlib object looked up by name and torn down again, a hex digest, a slice and a join, for
 * two records per statement. This does the same in one call and one buffer.
 *
 * It writes exactly the bytes orjson writes with OPT_SORT_KEYS (the writer in _json.h, shared with
 * the session recordings' lines), for the types it knows. For anything else seal() returns None
 * and the caller seals the record with orjson as before, so the bytes never depend on which path
 * ran: tests/test_audit_native_seal.py holds the two to the same bytes.
 *
 * A statement's decision and outcome records are built here too, without a dict (_records.h:
 * statement_body, outcome_body); seal_body() and seal_block() put them in the chain, the latter a
 * whole batch of bodies and dicts as one block of lines (tests/test_audit_native_records.py).
 *
 * SHA-256 is OpenSSL's SHA256_Init/Update/Final, from the libcrypto the interpreter's hashlib already
 * loaded (looked up at import; no headers needed to build). Without it seal() returns None.
 */
#include "_records.h"
#include <dlfcn.h>

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


static const char HASH_HEAD[] = ",\"hash\":\"";
static PyObject *HASH_KEY, *SEQ_KEY, *PREV_KEY;  /* interned at import */

/* The line for the canonical body in `b`: the hash appended as its last member, and a newline;
 * returns (line, hash), None when libcrypto's SHA-256 failed, or NULL (a Python error) */
static PyObject *sealed(Buf *b) {
    unsigned char md[32];
    if (!sha256_oneshot(b->p, b->len, md))
        Py_RETURN_NONE;
    char hex[64];
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = HEX[md[i] >> 4];
        hex[2 * i + 1] = HEX[md[i] & 15];
    }
    /* the line: the body without its closing brace, then ,"hash":"<hex>"}\n */
    b->len -= 1;
    if (buf_put(b, HASH_HEAD, (Py_ssize_t)(sizeof HASH_HEAD - 1)) < 0 || buf_put(b, hex, 64) < 0 ||
        buf_put(b, "\"}\n", 3) < 0)
        return NULL;
    PyObject *line = PyBytes_FromStringAndSize(b->p, b->len);
    if (line == NULL)
        return NULL;
    PyObject *digest = PyUnicode_FromStringAndSize(hex, 64);
    if (digest == NULL) {
        Py_DECREF(line);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, line, digest);
    Py_DECREF(line);
    Py_DECREF(digest);
    return result;
}

/* seal(record) -> (line, hash) | None */
static PyObject *seal(PyObject *Py_UNUSED(self), PyObject *record) {
    if (sha256_final == NULL || !PyDict_CheckExact(record) || PyDict_GET_SIZE(record) == 0)
        Py_RETURN_NONE;
    char room[BUF_ROOM];
    Buf b;
    buf_init(&b, room, sizeof room);
    PyObject *result = NULL;
    int rc = put_dict(&b, record, 0, 1);
    if (rc == 1)
        result = sealed(&b);
    else if (rc == 0)
        result = Py_NewRef(Py_None);
    buf_free(&b);
    return result;
}

/* seal_body((text, prev_at, seq_at), seq, prev) -> (line, hash): a body from statement_body() or
 * outcome_body() with its place in the chain, sealed as seal() seals the same record's dict */
static PyObject *seal_body(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    PyObject *text;
    Py_ssize_t prev_at, seq_at;
    long long seq;
    if (nargs != 3 || !PyArg_ParseTuple(args[0], "Snn", &text, &prev_at, &seq_at)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "seal_body takes a body, seq and prev");
        return NULL;
    }
    seq = PyLong_AsLongLong(args[1]);
    if (seq == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(text), prev_len;
    const char *t = PyBytes_AS_STRING(text);
    const char *prev = PyUnicode_Check(args[2]) ? PyUnicode_AsUTF8AndSize(args[2], &prev_len) : NULL;
    if (prev == NULL || prev_at < 1 || seq_at < prev_at || seq_at >= n || sha256_final == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "seal_body: not a body from statement_body or outcome_body");
        return NULL;
    }
    char room[BUF_ROOM];
    Buf b;
    buf_init(&b, room, sizeof room);
    PyObject *result = NULL;
    if (buf_put(&b, t, prev_at) < 0 || buf_put(&b, ",\"prev\":", 8) < 0 || put_string(&b, prev, prev_len) < 0 ||
        buf_put(&b, t + prev_at, seq_at - prev_at) < 0 || buf_put(&b, ",\"seq\":", 7) < 0 || put_int(&b, seq) < 0 ||
        buf_put(&b, t + seq_at, n - seq_at) < 0)
        goto done;
    result = sealed(&b);
done:
    buf_free(&b);
    return result;
}

/* The record `r` (a body, or a dict without "hash") sealed at `seq` after `prev` (64 hex digits,
 * replaced by this record's hash), its line appended to `out`. 1, 0 (a record only the orjson
 * path writes) or -1 (a Python error). A dict gets `seq` and `prev` set in it, as
 * chain.seal_all(owned=True) sets them. */
static int seal_one(Buf *out, PyObject *r, long long seq, char prev[64]) {
    Py_ssize_t start = out->len;
    if (PyTuple_CheckExact(r) && PyTuple_GET_SIZE(r) == 3) {
        PyObject *text = PyTuple_GET_ITEM(r, 0);
        Py_ssize_t prev_at = PyLong_AsSsize_t(PyTuple_GET_ITEM(r, 1));
        Py_ssize_t seq_at = PyLong_AsSsize_t(PyTuple_GET_ITEM(r, 2));
        if (PyErr_Occurred())
            return -1;
        if (!PyBytes_CheckExact(text) || prev_at < 1 || seq_at < prev_at || seq_at >= PyBytes_GET_SIZE(text))
            return 0;
        const char *t = PyBytes_AS_STRING(text);
        Py_ssize_t n = PyBytes_GET_SIZE(text);
        if (buf_reserve(out, n + 8 + 66 + 7 + 24 + 9 + 64 + 3) < 0)
            return -1;
        if (buf_put(out, t, prev_at) < 0 || buf_put(out, ",\"prev\":\"", 9) < 0 || buf_put(out, prev, 64) < 0 ||
            buf_char(out, '"') < 0 || buf_put(out, t + prev_at, seq_at - prev_at) < 0 ||
            buf_put(out, ",\"seq\":", 7) < 0 || put_int(out, seq) < 0 || buf_put(out, t + seq_at, n - seq_at) < 0)
            return -1;
    } else if (PyDict_CheckExact(r) && PyDict_GET_SIZE(r) > 0) {
        int has = PyDict_Contains(r, HASH_KEY);
        if (has != 0)
            return has < 0 ? -1 : 0;
        PyObject *seq_obj = PyLong_FromLongLong(seq);
        PyObject *prev_obj = seq_obj == NULL ? NULL : PyUnicode_FromStringAndSize(prev, 64);
        int set = prev_obj != NULL && PyDict_SetItem(r, SEQ_KEY, seq_obj) == 0 && PyDict_SetItem(r, PREV_KEY, prev_obj) == 0;
        Py_XDECREF(seq_obj);
        Py_XDECREF(prev_obj);
        if (!set)
            return -1;
        int rc = put_dict(out, r, 0, 1);
        if (rc != 1)
            return rc;
    } else {
        return 0;
    }
    unsigned char md[32];
    if (!sha256_oneshot(out->p + start, out->len - start, md))
        return 0;
    for (int i = 0; i < 32; i++) {
        prev[2 * i] = HEX[md[i] >> 4];
        prev[2 * i + 1] = HEX[md[i] & 15];
    }
    out->len -= 1;  /* the closing brace: the hash goes in as the last member */
    if (buf_put(out, HASH_HEAD, (Py_ssize_t)(sizeof HASH_HEAD - 1)) < 0 || buf_put(out, prev, 64) < 0 ||
        buf_put(out, "\"}\n", 3) < 0)
        return -1;
    return 1;
}

/* seal_block(records, seq, prev) -> (data, hash) | None: the lines of `records` (a list of bodies
 * and dicts) sealed in chain order from `seq` after `prev`, as one bytes, and the last hash; None
 * when one of them only the orjson path writes (chain.seal_all then seals them all) */
static PyObject *seal_block(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_CheckExact(args[0]) || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "seal_block takes a list of records, seq and prev");
        return NULL;
    }
    long long seq = PyLong_AsLongLong(args[1]);
    if (seq == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t prev_len;
    const char *prev_text = PyUnicode_AsUTF8AndSize(args[2], &prev_len);
    if (prev_text == NULL)
        return NULL;
    if (prev_len != 64 || sha256_final == NULL)
        Py_RETURN_NONE;
    for (int i = 0; i < 64; i++)  /* a hash as the chain writes it (a tail read back could hold anything) */
        if (!((prev_text[i] >= '0' && prev_text[i] <= '9') || (prev_text[i] >= 'a' && prev_text[i] <= 'f')))
            Py_RETURN_NONE;
    char prev[64];
    memcpy(prev, prev_text, 64);
    char room[BUF_ROOM * 2];
    Buf b;
    buf_init(&b, room, sizeof room);
    PyObject *result = NULL;
    PyObject *records = args[0];
    int rc = 1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records) && rc == 1; i++)
        rc = seal_one(&b, PyList_GET_ITEM(records, i), seq + i, prev);
    if (rc == 1) {
        PyObject *data = PyBytes_FromStringAndSize(b.p, b.len);
        PyObject *last = data == NULL ? NULL : PyUnicode_FromStringAndSize(prev, 64);
        if (last != NULL)
            result = PyTuple_Pack(2, data, last);
        Py_XDECREF(data);
        Py_XDECREF(last);
    } else if (rc == 0) {
        result = Py_NewRef(Py_None);
    }
    buf_free(&b);
    return result;
}

/* canonical(record) -> bytes | None: the body alone (the tests compare it with orjson's) */
static PyObject *canonical(PyObject *Py_UNUSED(self), PyObject *record) {
    if (!PyDict_CheckExact(record))
        Py_RETURN_NONE;
    char room[BUF_ROOM];
    Buf b;
    buf_init(&b, room, sizeof room);
    PyObject *result = NULL;
    int rc = put_dict(&b, record, 0, 1);
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
    {"seal_body", (PyCFunction)(void (*)(void))seal_body, METH_FASTCALL,
     "seal_body(body, seq, prev) -> (line, hash): a statement_body() or outcome_body() body sealed at seq after prev."},
    {"members", members_new, METH_O,
     "members(common) -> Members or None: a session's members (SessionInfo.common) rendered once for statement_body()."},
    {"statement_body", (PyCFunction)(void (*)(void))statement_body, METH_FASTCALL,
     "statement_body(members, now_ns, stmt, protocol, sql, action, rule, reason, params, mask_text, approval_id, "
     "approver, masked_columns, extra) -> (text, prev_at, seq_at) or None: records.statement()'s record, unsealed."},
    {"outcome_body", (PyCFunction)(void (*)(void))outcome_body, METH_FASTCALL,
     "outcome_body(session, now_ns, stmt, started, tag, rows, sqlstate, message, masked_values, decision, undone) "
     "-> (text, prev_at, seq_at) or None: records.outcome()'s record, unsealed."},
    {"seal_block", (PyCFunction)(void (*)(void))seal_block, METH_FASTCALL,
     "seal_block(records, seq, prev) -> (data, hash) or None: a list of bodies and dicts sealed in chain order as "
     "one block of lines, and the last hash; None for a record only the orjson path writes."},
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
    if (PyType_Ready(&MembersType) < 0)
        return NULL;
    HASH_KEY = PyUnicode_InternFromString("hash");
    SEQ_KEY = PyUnicode_InternFromString("seq");
    PREV_KEY = PyUnicode_InternFromString("prev");
    if (HASH_KEY == NULL || SEQ_KEY == NULL || PREV_KEY == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "available", sha256_final != NULL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
