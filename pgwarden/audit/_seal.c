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
 * SHA-256 is OpenSSL's SHA256_Init/Update/Final, from the libcrypto the interpreter's hashlib already
 * loaded (looked up at import; no headers needed to build). Without it seal() returns None.
 */
#include "_json.h"
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

/* seal(record) -> (line, hash) | None */
static PyObject *seal(PyObject *Py_UNUSED(self), PyObject *record) {
    if (sha256_final == NULL || !PyDict_CheckExact(record) || PyDict_GET_SIZE(record) == 0)
        Py_RETURN_NONE;
    char room[BUF_ROOM];
    Buf b;
    buf_init(&b, room, sizeof room);
    PyObject *result = NULL;
    int rc = put_dict(&b, record, 0, 1);
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
