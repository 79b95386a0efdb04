/* A session recording's per-statement lines in C (recording.py's SessionRecorder uses them).
 *
 * Recording a statement cost the fully loaded proxy about a fifth of its CPU end to end: per
 * statement a result object, two dicts, two orjson calls with keyword options, and per row a
 * DataRow parsed into bytes, decoded into a list of str and kept until the result's line. Here a
 * DataRow's payload goes straight into the result's JSON text, and a line is written in one call:
 *
 * - query_line(stmt, t_us, sql, params): the `query` line;
 * - Result(started, max_rows, max_bytes): one result as recorded so far, its rows kept as JSON
 *   text (`add_payload` from a DataRow, `add` from values), capped as recording.py caps them;
 * - result.complete_line(stmt, t_us, ms_us, tag, row_count): the `result` line.
 *
 * The lines are the bytes recording.py's orjson path writes for the same calls (the writer in
 * _json.h; tests/test_recording_native.py holds the two to the same bytes). What a function does
 * not write (a float orjson writes in exponent form, a statement id that is neither str nor int,
 * a lone surrogate) it declines with None and recording.py writes that line with orjson.
 */
#include "_json.h"
#include <structmember.h>

#define KEY(literal) literal, (Py_ssize_t)(sizeof literal - 1)

/* `head` (",\"key\":") and the value after it. 1: written; 0: a value only orjson writes (the
 * line is declined); -1: a Python error. */
static int put_member(Buf *b, const char *head, Py_ssize_t n, PyObject *v) {
    return buf_put(b, head, n) < 0 ? -1 : put_value(b, v, 1, 0);
}

/* `head` and `x` as seconds (x / 1e6) or milliseconds (x / 1e3), as Python divides the integer */
static int put_member_scaled(Buf *b, const char *head, Py_ssize_t n, long long x, double scale) {
    return buf_put(b, head, n) < 0 ? -1 : put_double(b, (double)x / scale);
}

/* A line's first members, the same in every line of a statement: {"k":KIND,"s":stmt,"t":t_us/1e6
 * (`head` holds {"k":KIND,"s":) */
static int put_line_head(Buf *b, const char *head, Py_ssize_t n, PyObject *stmt, long long t_us) {
    int rc = put_member(b, head, n, stmt);
    return rc == 1 ? put_member_scaled(b, KEY(",\"t\":"), t_us, 1e6) : rc;
}

/* The line a writer left in `b` as it came out (`rc`): bytes with "}\n" (written), None
 * (declined) or NULL (a Python error); `b` is freed. */
static PyObject *finish_line(Buf *b, int rc) {
    PyObject *result = NULL;
    if (rc == 1 && buf_put(b, KEY("}\n")) == 0)
        result = PyBytes_FromStringAndSize(b->p, b->len);
    else if (rc == 0)
        result = Py_NewRef(Py_None);
    buf_free(b);
    return result;
}

/* query_line(stmt, t_us, sql, params) -> bytes | None:
 * {"k":"query","s":stmt,"t":t_us/1e6,"sql":sql[,"params":params]} and a newline */
static PyObject *query_line(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "query_line(stmt, t_us, sql, params) takes four arguments");
        return NULL;
    }
    long long t_us = PyLong_AsLongLong(args[1]);
    if (t_us == -1 && PyErr_Occurred())
        return NULL;
    char room[BUF_ROOM];
    Buf b;
    buf_init(&b, room, sizeof room);
    int rc = put_line_head(&b, KEY("{\"k\":\"query\",\"s\":"), args[0], t_us);
    if (rc == 1)
        rc = put_member(&b, KEY(",\"sql\":"), args[2]);
    if (rc == 1 && args[3] != Py_None)
        rc = put_member(&b, KEY(",\"params\":"), args[3]);
    return finish_line(&b, rc);
}

/* -- Result ------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    long long started;    /* time.monotonic_ns() */
    PyObject *columns;    /* what columns() was given (recording.py keeps it as given) */
    PyObject *types;
    PyObject *capped;     /* why rows stopped being kept, "" while they are */
    Py_ssize_t max_rows;
    Py_ssize_t max_bytes;
    Py_ssize_t count;     /* rows kept */
    Py_ssize_t size;      /* their values' length in characters, as recording.py counts */
    Buf rows;             /* the kept rows' JSON, comma-separated, without the brackets */
} ResultObject;

static void result_dealloc(ResultObject *self) {
    Py_XDECREF(self->columns);
    Py_XDECREF(self->types);
    Py_XDECREF(self->capped);
    buf_free(&self->rows);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Result(started, max_rows, max_bytes), called as a vectorcall (no argument tuple, no format
 * string: one per statement) */
static PyObject *result_make(PyTypeObject *type, long long started, Py_ssize_t max_rows, Py_ssize_t max_bytes) {
    ResultObject *self = (ResultObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->started = started;
    self->max_rows = max_rows;
    self->max_bytes = max_bytes;
    self->columns = PyTuple_New(0);
    self->types = PyTuple_New(0);
    self->capped = PyUnicode_FromStringAndSize("", 0);
    buf_init(&self->rows, NULL, 0);  /* on the heap from the first row */
    if (self->columns == NULL || self->types == NULL || self->capped == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *result_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if ((kwnames != NULL && PyTuple_GET_SIZE(kwnames)) || nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "Result(started, max_rows, max_bytes) takes three positional arguments");
        return NULL;
    }
    long long started = PyLong_AsLongLong(args[0]);
    if (started == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t max_rows = PyLong_AsSsize_t(args[1]);
    if (max_rows == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[2]);
    if (max_bytes == -1 && PyErr_Occurred())
        return NULL;
    return result_make((PyTypeObject *)type, started, max_rows, max_bytes);
}

/* Whether one more row of `size` characters is kept: no, once the result is capped (and it
 * becomes capped here, as recording.py's row() decides: the row count first, then the bytes).
 * 1: keep; 0: not kept; -1: a Python error. */
static int result_admit(ResultObject *self, Py_ssize_t size) {
    if (PyUnicode_GET_LENGTH(self->capped))
        return 0;
    PyObject *why = NULL;
    if (self->count >= self->max_rows)
        why = PyUnicode_FromFormat("maxRowsPerResult %zd", self->max_rows);
    else if (self->size + size > self->max_bytes)
        why = PyUnicode_FromFormat("maxBytesPerResult %zd", self->max_bytes);
    else
        return 1;
    if (why == NULL)
        return -1;
    Py_SETREF(self->capped, why);
    return 0;
}

/* Start keeping a row of `size` characters: 1 (its "[" written), 0 (not kept: the result is
 * capped), -1 (a Python error) */
static int row_begin(ResultObject *self, Py_ssize_t size) {
    int admitted = result_admit(self, size);
    if (admitted != 1)
        return admitted;
    Buf *b = &self->rows;
    return ((self->count && buf_char(b, ',') < 0) || buf_char(b, '[') < 0) ? -1 : 1;
}

/* The row begun is complete: 0, or -1 (a Python error) */
static int row_end(ResultObject *self, Py_ssize_t size) {
    if (buf_char(&self->rows, ']') < 0)
        return -1;
    self->count++;
    self->size += size;
    return 0;
}

/* Valid UTF-8 as Python's decoder takes it (no overlong forms, no surrogates, nothing past
 * U+10FFFF): its length in code points; -1 when not valid (the caller decodes with "replace"). */
static Py_ssize_t utf8_chars(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t chars = 0, i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xc2 && c <= 0xdf) {
            if (i + 1 >= n || (s[i + 1] & 0xc0) != 0x80)
                return -1;
            i += 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            if (i + 2 >= n || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80)
                return -1;
            if ((c == 0xe0 && s[i + 1] < 0xa0) || (c == 0xed && s[i + 1] > 0x9f))
                return -1;  /* overlong, or a surrogate */
            i += 3;
        } else if (c >= 0xf0 && c <= 0xf4) {
            if (i + 3 >= n || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80 ||
                (s[i + 3] & 0xc0) != 0x80)
                return -1;
            if ((c == 0xf0 && s[i + 1] < 0x90) || (c == 0xf4 && s[i + 1] > 0x8f))
                return -1;  /* overlong, or past U+10FFFF */
            i += 4;
        } else {
            return -1;
        }
        chars++;
    }
    return chars;
}

/* One DataRow value as the agent saw it: text (decoded as UTF-8, invalid bytes replaced) or,
 * in binary format, \x and its hex digits. `chars`: its length in characters. */
typedef struct {
    const unsigned char *p;
    Py_ssize_t n;       /* -1: NULL */
    int binary;
    PyObject *decoded;  /* text that was not valid UTF-8, decoded with "replace" (owned) */
    Py_ssize_t chars;
} Value;

#define SMALL_ROW 16

static int put_shown(Buf *b, const Value *v) {
    if (v->n < 0)
        return buf_put(b, "null", 4);
    if (v->binary) {
        if (buf_reserve(b, 4 + 2 * v->n + 1) < 0)
            return -1;
        char *o = b->p + b->len;
        *o++ = '"'; *o++ = '\\'; *o++ = '\\'; *o++ = 'x';
        for (Py_ssize_t i = 0; i < v->n; i++) {
            *o++ = HEX[v->p[i] >> 4];
            *o++ = HEX[v->p[i] & 15];
        }
        *o++ = '"';
        b->len = o - b->p;
        return 0;
    }
    if (v->decoded != NULL) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(v->decoded, &len);  /* U+FFFD for the bad bytes: valid */
        if (s == NULL)
            return -1;
        return put_string(b, s, len);
    }
    return put_string(b, (const char *)v->p, v->n);
}

/* result.add_payload(payload, formats) -> bool: a DataRow's payload, each column shown as the
 * agent saw it (format code 0 or none: text; else binary). False once the result is capped. */
static PyObject *result_add_payload(ResultObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add_payload(payload, formats) takes two arguments");
        return NULL;
    }
    if (PyUnicode_GET_LENGTH(self->capped))
        Py_RETURN_FALSE;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *formats = PySequence_Fast(args[1], "formats must be a sequence");
    if (formats == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t nformats = PySequence_Fast_GET_SIZE(formats);
    const unsigned char *s = view.buf;
    Py_ssize_t n = view.len, pos = 2, count = 0, size = 0;
    Value small[SMALL_ROW];
    Value *vs = small;
    PyObject *result = NULL;
    if (n < 2)
        goto malformed;
    count = (s[0] << 8) | s[1];
    if (count > SMALL_ROW) {
        vs = PyMem_Calloc((size_t)count, sizeof(Value));
        if (vs == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    } else {
        memset(small, 0, sizeof small);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (pos + 4 > n)
            goto malformed;
        int32_t len = (int32_t)(((uint32_t)s[pos] << 24) | ((uint32_t)s[pos + 1] << 16) |
                                ((uint32_t)s[pos + 2] << 8) | (uint32_t)s[pos + 3]);
        pos += 4;
        Value *v = &vs[i];
        if (len < 0) {
            v->n = -1;
            continue;
        }
        if (pos + len > n)
            goto malformed;
        v->p = s + pos;
        v->n = len;
        pos += len;
        int code = 0;
        if (i < nformats) {
            code = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(formats, i));
            if (code == -1 && PyErr_Occurred())
                goto done;
        }
        if (code != 0) {
            v->binary = 1;
            v->chars = 2 + 2 * (Py_ssize_t)len;
        } else {
            v->chars = utf8_chars(v->p, len);
            if (v->chars < 0) {
                v->decoded = PyUnicode_DecodeUTF8((const char *)v->p, len, "replace");
                if (v->decoded == NULL)
                    goto done;
                v->chars = PyUnicode_GET_LENGTH(v->decoded);
            }
        }
        size += v->chars;
    }
    int begun = row_begin(self, size);
    if (begun < 0)
        goto done;
    if (!begun) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        if ((i && buf_char(&self->rows, ',') < 0) || put_shown(&self->rows, &vs[i]) < 0)
            goto done;
    if (row_end(self, size) < 0)
        goto done;
    result = Py_NewRef(Py_True);
    goto done;
malformed:
    PyErr_SetString(PyExc_ValueError, "a DataRow message that is cut short");
done:
    for (Py_ssize_t i = 0; i < count && vs != NULL; i++)
        Py_XDECREF(vs[i].decoded);
    if (vs != small)
        PyMem_Free(vs);
    Py_DECREF(formats);
    PyBuffer_Release(&view);
    return result;
}

/* result.add(values) -> bool: a row of str (or None) values. False once the result is capped;
 * ValueError for a value the writer does not write (not str, or a lone surrogate). */
static PyObject *result_add(ResultObject *self, PyObject *values) {
    if (PyUnicode_GET_LENGTH(self->capped))
        Py_RETURN_FALSE;
    PyObject *row = PySequence_Fast(values, "a row is a sequence of values");
    if (row == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(row), size = 0;
    PyObject **items = PySequence_Fast_ITEMS(row);
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (items[i] == Py_None)
            continue;
        if (!PyUnicode_CheckExact(items[i])) {
            PyErr_SetString(PyExc_ValueError, "a recorded value is str or None");
            goto done;
        }
        size += PyUnicode_GET_LENGTH(items[i]);
    }
    Buf *b = &self->rows;
    Py_ssize_t mark = b->len;
    int begun = row_begin(self, size);
    if (begun < 0)
        goto done;
    if (!begun) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && buf_char(b, ',') < 0)
            goto done;
        int rc = put_value(b, items[i], 1, 0);
        if (rc < 0)
            goto done;
        if (rc == 0) {
            b->len = mark;
            PyErr_SetString(PyExc_ValueError, "a recorded value holds a lone surrogate");
            goto done;
        }
    }
    if (row_end(self, size) < 0)
        goto done;
    result = Py_NewRef(Py_True);
done:
    Py_DECREF(row);
    return result;
}

/* result.rows_json() -> bytes: the kept rows as a JSON array (recording.py's orjson path reads it) */
static PyObject *result_rows_json(ResultObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, self->rows.len + 2);
    if (out == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(out);
    o[0] = '[';
    if (self->rows.len)  /* no row yet: no buffer either */
        memcpy(o + 1, self->rows.p, (size_t)self->rows.len);
    o[self->rows.len + 1] = ']';
    return out;
}

/* result.complete_line(stmt, t_us, ms_us, tag, row_count) -> bytes | None: the `result` line,
 * {"k":"result","s":..,"t":..,"ms":..[,"columns":..,"types":..][,"rows":[..]][,"truncated":
 * {"recordedRows":..,"reason":..}],"tag":..[,"rowCount":..]} and a newline */
static PyObject *result_complete_line(ResultObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "complete_line(stmt, t_us, ms_us, tag, row_count) takes five arguments");
        return NULL;
    }
    long long t_us = PyLong_AsLongLong(args[1]);
    if (t_us == -1 && PyErr_Occurred())
        return NULL;
    long long ms_us = PyLong_AsLongLong(args[2]);
    if (ms_us == -1 && PyErr_Occurred())
        return NULL;
    int has_columns = PyObject_IsTrue(self->columns);
    if (has_columns < 0)
        return NULL;
    char room[BUF_ROOM];
    Buf b;
    buf_init(&b, room, sizeof room);
    int rc = put_line_head(&b, KEY("{\"k\":\"result\",\"s\":"), args[0], t_us);
    if (rc == 1)
        rc = put_member_scaled(&b, KEY(",\"ms\":"), ms_us, 1e3);
    if (rc == 1 && has_columns) {
        rc = put_member(&b, KEY(",\"columns\":"), self->columns);
        if (rc == 1)
            rc = put_member(&b, KEY(",\"types\":"), self->types);
    }
    if (rc == 1 && (self->count || has_columns)) {
        if (buf_put(&b, KEY(",\"rows\":[")) < 0 || (self->rows.len && buf_put(&b, self->rows.p, self->rows.len) < 0) ||
            buf_char(&b, ']') < 0)
            rc = -1;
    }
    if (rc == 1 && PyUnicode_GET_LENGTH(self->capped)) {
        if (buf_put(&b, KEY(",\"truncated\":{\"recordedRows\":")) < 0 || put_int(&b, self->count) < 0)
            rc = -1;
        else
            rc = put_member(&b, KEY(",\"reason\":"), self->capped);
        if (rc == 1 && buf_char(&b, '}') < 0)
            rc = -1;
    }
    if (rc == 1)
        rc = put_member(&b, KEY(",\"tag\":"), args[3]);
    if (rc == 1 && args[4] != Py_None)
        rc = put_member(&b, KEY(",\"rowCount\":"), args[4]);
    return finish_line(&b, rc);
}

static PyObject *result_get_rows(ResultObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->count);
}

static PyMemberDef result_members[] = {
    {"started", T_LONGLONG, offsetof(ResultObject, started), 0, "time.monotonic_ns() when the statement started"},
    {"columns", T_OBJECT_EX, offsetof(ResultObject, columns), 0, "the result's column names"},
    {"types", T_OBJECT_EX, offsetof(ResultObject, types), 0, "the result's column type OIDs"},
    {"capped", T_OBJECT_EX, offsetof(ResultObject, capped), READONLY, "why rows stopped being kept, or \"\""},
    {"bytes", T_PYSSIZET, offsetof(ResultObject, size), READONLY, "the kept values' length in characters"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef result_getset[] = {
    {"kept", (getter)result_get_rows, NULL, "how many rows are kept", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef result_methods[] = {
    {"add_payload", (PyCFunction)(void (*)(void))result_add_payload, METH_FASTCALL,
     "add_payload(payload, formats) -> bool: keep a DataRow's values as the agent saw them."},
    {"add", (PyCFunction)result_add, METH_O, "add(values) -> bool: keep a row of str or None values."},
    {"rows_json", (PyCFunction)result_rows_json, METH_NOARGS, "rows_json() -> bytes: the kept rows as JSON."},
    {"complete_line", (PyCFunction)(void (*)(void))result_complete_line, METH_FASTCALL,
     "complete_line(stmt, t_us, ms_us, tag, row_count) -> bytes or None: the result line."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ResultType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgwarden.audit._recording.Result",
    .tp_basicsize = sizeof(ResultObject),
    .tp_dealloc = (destructor)result_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Result(started, max_rows, max_bytes): one statement's result as recorded so far.",
    .tp_methods = result_methods,
    .tp_members = result_members,
    .tp_getset = result_getset,
    .tp_vectorcall = result_vectorcall,
};

static PyMethodDef methods[] = {
    {"query_line", (PyCFunction)(void (*)(void))query_line, METH_FASTCALL,
     "query_line(stmt, t_us, sql, params) -> bytes or None: the query line of a session recording."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_recording", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__recording(void) {
    if (PyType_Ready(&ResultType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Result", (PyObject *)&ResultType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
