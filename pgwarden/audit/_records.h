/* A statement's two audit records built in C, from the values the gate holds (included by _seal.c).
 *
 * records.statement() and records.outcome() build a dict per record: a copy of the session's
 * members, a decision dict, a list of scrubbed parameters, the time formatted in Python, then the
 * sealing step sorts the keys again and writes it. Here the same members go straight into the
 * canonical JSON (keys sorted, as orjson's OPT_SORT_KEYS writes them), with `prev` and `seq` left
 * out and their places noted: the body is sealed later, in chain order, by seal_body() or
 * seal_block() (_seal.c).
 *
 * A body is a tuple (text, prev_at, seq_at): `text` is the canonical JSON without the two chain
 * members, and `,"prev":"<hash>"` and `,"seq":<n>` go in at those offsets (each follows a member:
 * in sorted order something always precedes "prev"). Whatever a builder does not write exactly as
 * the dict path would (a key given twice, a parameter or message past its clip, a type the writer
 * does not know, a duration under 1e-4 ms) makes it return None, and the caller builds the dict:
 * tests/test_audit_native_records.py holds both paths to the same sealed lines.
 */
#ifndef PGWARDEN_RECORDS_H
#define PGWARDEN_RECORDS_H
#include "_json.h"
#include <time.h>

#define MAX_PARAM_CHARS 4096   /* records.MAX_PARAM_CHARS */
#define MAX_MESSAGE_CHARS 2000 /* records.outcome's clip */
#define MAX_FIELDS 48

enum {
    F_OBJ,      /* a Python value, written by put_value */
    F_RAW,      /* JSON text as it is (a C literal) */
    F_TIME,     /* the record's time, 2026-11-29T23:41:24.123456Z */
    F_DECISION, /* {"action": .., "reason": .., "rule": ..}: the empty ones left out */
    F_APPROVAL, /* {"approver": .., "id": ..}: no approver, no member */
    F_PARAMS,   /* the parameters through mask_text, binary ones by size */
    F_DOUBLE,   /* a duration in ms, already rounded to the microsecond */
    F_LONG,
    F_PREV,     /* the chain's places, written by seal_body */
    F_SEQ,
    F_CHUNK,    /* a session member, key and value, as Members rendered it */
};

typedef struct {
    const char *key;
    Py_ssize_t len;
    int kind;
    PyObject *obj;   /* F_OBJ, F_DECISION (action), F_APPROVAL (id), F_PARAMS (the values) */
    PyObject *aux;   /* F_DECISION (reason), F_APPROVAL (approver), F_PARAMS (mask_text or None) */
    PyObject *aux2;  /* F_DECISION (rule) */
    const char *raw; /* F_RAW, F_CHUNK (its text, `"key":value`) */
    Py_ssize_t raw_len; /* F_CHUNK */
    int plain;       /* the key is a C literal that needs no escapes */
    double d;
    long long n;
} Field;

typedef struct {
    Field f[MAX_FIELDS];
    int n;
} Fields;

static inline int field_less(const Field *x, const Field *y) {
    Py_ssize_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->key, y->key, (size_t)n);
    return c != 0 ? c < 0 : x->len < y->len;
}

/* 0: added; -1: no room (the caller declines). `key` is a C literal. */
static int add(Fields *fs, const char *key, int kind) {
    if (fs->n >= MAX_FIELDS)
        return -1;
    Field *f = &fs->f[fs->n++];
    memset(f, 0, sizeof *f);
    f->key = key;
    f->len = (Py_ssize_t)strlen(key);
    f->kind = kind;
    f->plain = 1;
    return 0;
}

static int add_obj(Fields *fs, const char *key, PyObject *v) {
    if (add(fs, key, F_OBJ) < 0)
        return -1;
    fs->f[fs->n - 1].obj = v;
    return 0;
}

/* A dict's members (a statement's extra ones) as fields; 0, or -1: a key the writer cannot take
 * (not a str, a lone surrogate) or no room */
static int add_members(Fields *fs, PyObject *d) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k) || fs->n >= MAX_FIELDS)
            return -1;
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(k, &len);
        if (s == NULL) {
            PyErr_Clear();
            return -1;
        }
        Field *f = &fs->f[fs->n++];
        memset(f, 0, sizeof *f);
        f->key = s;
        f->len = len;
        f->kind = F_OBJ;
        f->obj = v;
        f->aux = k;
    }
    return 0;
}

static void sort_fields(Field *f, int n) {
    for (int i = 1; i < n; i++) {
        Field x = f[i];
        int j = i;
        while (j > 0 && field_less(&x, &f[j - 1])) {
            f[j] = f[j - 1];
            j--;
        }
        f[j] = x;
    }
}

/* `a` and `b` (each sorted) merged into `out`, as orjson sorts (UTF-8 byte order); the count, or -1:
 * a key in both (the dict path keeps the last one given; the caller leaves that record to it) */
static int merge_fields(const Field *a, int na, const Field *b, int nb, Field *out) {
    int i = 0, j = 0, k = 0;
    while (i < na && j < nb) {
        if (field_less(&a[i], &b[j]))
            out[k++] = a[i++];
        else if (field_less(&b[j], &a[i]))
            out[k++] = b[j++];
        else
            return -1;
    }
    while (i < na)
        out[k++] = a[i++];
    while (j < nb)
        out[k++] = b[j++];
    return k;
}

/* The session's members (SessionInfo.common) rendered once: `"key":value` each, sorted by key. */
#define MAX_MEMBERS 16
typedef struct {
    PyObject_HEAD
    PyObject *keys[MAX_MEMBERS];  /* sorted, held: their UTF-8 is what the fields point at */
    const char *key[MAX_MEMBERS];
    Py_ssize_t key_len[MAX_MEMBERS];
    PyObject *text;               /* bytes: the chunks, one after another */
    Py_ssize_t at[MAX_MEMBERS + 1];
    int n;
} Members;

static void members_dealloc(Members *m) {
    for (int i = 0; i < m->n; i++)
        Py_XDECREF(m->keys[i]);
    Py_XDECREF(m->text);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyTypeObject MembersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgwarden.audit._seal.Members",
    .tp_basicsize = sizeof(Members),
    .tp_dealloc = (destructor)members_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A session's members, rendered once for its statement records (members(common)).",
};

/* members(common) -> Members | None: None for members the writer does not take (the statement
 * records of that session are then built as dicts) */
static PyObject *members_new(PyObject *Py_UNUSED(self), PyObject *common) {
    if (!PyDict_CheckExact(common) || PyDict_GET_SIZE(common) > MAX_MEMBERS)
        Py_RETURN_NONE;
    Fields fs;
    fs.n = 0;
    if (add_members(&fs, common) < 0)
        Py_RETURN_NONE;
    sort_fields(fs.f, fs.n);
    Members *m = PyObject_New(Members, &MembersType);
    if (m == NULL)
        return NULL;
    m->n = 0;
    m->text = NULL;
    char room[BUF_ROOM];
    Buf b;
    buf_init(&b, room, sizeof room);
    int rc = 1;
    for (int i = 0; i < fs.n && rc == 1; i++) {
        if (i && fs.f[i].len == fs.f[i - 1].len && memcmp(fs.f[i].key, fs.f[i - 1].key, (size_t)fs.f[i].len) == 0) {
            rc = 0;
            break;
        }
        m->at[i] = b.len;
        if (put_string(&b, fs.f[i].key, fs.f[i].len) < 0 || buf_char(&b, ':') < 0)
            rc = -1;
        else
            rc = put_value(&b, fs.f[i].obj, 1, 1);
    }
    PyObject *out = NULL;
    if (rc == 1) {
        m->at[fs.n] = b.len;
        m->text = PyBytes_FromStringAndSize(b.p, b.len);
        if (m->text != NULL) {
            for (int i = 0; i < fs.n; i++) {
                m->keys[i] = Py_NewRef(fs.f[i].aux);
                m->key[i] = fs.f[i].key;
                m->key_len[i] = fs.f[i].len;
            }
            m->n = fs.n;
            out = Py_NewRef((PyObject *)m);
        }
    } else if (rc == 0) {
        out = Py_NewRef(Py_None);
    }
    buf_free(&b);
    Py_DECREF(m);
    return out;
}

/* The session's members as sorted fields */
static void member_fields(Members *m, Field *out) {
    const char *text = PyBytes_AS_STRING(m->text);
    for (int i = 0; i < m->n; i++) {
        Field *f = &out[i];
        memset(f, 0, sizeof *f);
        f->kind = F_CHUNK;
        f->key = m->key[i];
        f->len = m->key_len[i];
        f->raw = text + m->at[i];
        f->raw_len = m->at[i + 1] - m->at[i];
    }
}

/* The time as records.now_iso() writes it; the date and time of day formatted once a second. */
static long long time_second = -1;
static char time_head[32];
static Py_ssize_t time_head_len;

static int put_time(Buf *b, long long us) {
    long long sec = us / 1000000, frac = us % 1000000;
    if (frac < 0) {
        frac += 1000000;
        sec -= 1;
    }
    if (sec != time_second) {
        time_t t = (time_t)sec;
        struct tm tm;
        if (gmtime_r(&t, &tm) == NULL)
            return 0;
        size_t n = strftime(time_head, sizeof time_head - 1, "%Y-%m-%dT%H:%M:%S.", &tm);
        if (n == 0)
            return 0;
        time_head_len = (Py_ssize_t)n;
        time_second = sec;
    }
    char text[48];
    memcpy(text + 1, time_head, (size_t)time_head_len);
    text[0] = '"';
    char *o = text + 1 + time_head_len;
    for (int i = 5; i >= 0; i--, frac /= 10)
        o[i] = (char)('0' + frac % 10);
    o[6] = 'Z';
    o[7] = '"';
    return buf_put(b, text, 1 + time_head_len + 8) < 0 ? -1 : 1;
}

/* A str value; 0 if it is not a str the writer takes (the caller declines) */
static int put_str_obj(Buf *b, PyObject *s) {
    if (!PyUnicode_CheckExact(s))
        return 0;
    Py_ssize_t len;
    const char *t = PyUnicode_AsUTF8AndSize(s, &len);
    if (t == NULL) {
        PyErr_Clear();
        return 0;
    }
    return put_string(b, t, len) < 0 ? -1 : 1;
}

static inline int nonempty(PyObject *s) {
    return PyUnicode_CheckExact(s) && PyUnicode_GET_LENGTH(s) > 0;
}

/* records.mask_params: None as null, text through mask_text (clipped past MAX_PARAM_CHARS: the
 * dict path does that), binary as "<binary N bytes>" */
static int put_params(Buf *b, PyObject *params, PyObject *mask_text) {
    if (!PyList_CheckExact(params) && !PyTuple_CheckExact(params))
        return 0;
    if (buf_char(b, '[') < 0)
        return -1;
    /* the size and items read again each time: mask_text is Python code */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(params); i++) {
        if (i && buf_char(b, ',') < 0)
            return -1;
        PyObject *p = PySequence_Fast_GET_ITEM(params, i);
        int rc;
        if (p == Py_None) {
            rc = buf_put(b, "null", 4) < 0 ? -1 : 1;
        } else if (PyUnicode_CheckExact(p)) {
            Py_INCREF(p);
            PyObject *shown = mask_text == Py_None ? Py_NewRef(p) : PyObject_CallOneArg(mask_text, p);
            Py_DECREF(p);
            if (shown == NULL)
                return -1;
            rc = PyUnicode_CheckExact(shown) && PyUnicode_GET_LENGTH(shown) <= MAX_PARAM_CHARS
                     ? put_str_obj(b, shown) : 0;
            Py_DECREF(shown);
        } else if (PyBytes_CheckExact(p) || PyByteArray_CheckExact(p) || PyMemoryView_Check(p)) {
            Py_ssize_t size = PyObject_Length(p);
            if (size < 0)
                return -1;
            char text[48];
            int k = snprintf(text, sizeof text, "\"<binary %zd bytes>\"", size);
            rc = buf_put(b, text, k) < 0 ? -1 : 1;
        } else {
            rc = 0;
        }
        if (rc != 1)
            return rc;
    }
    return buf_char(b, ']') < 0 ? -1 : 1;
}

/* The body of `fs` (sorted) into `b`; 1, 0 (declined) or -1 (a Python error). Notes where the
 * chain's members go. */
static int put_fields(Buf *b, const Field *fs, int n, long long now_us, Py_ssize_t *prev_at, Py_ssize_t *seq_at) {
    if (buf_char(b, '{') < 0)
        return -1;
    int first = 1;
    for (int i = 0; i < n; i++) {
        const Field *f = &fs[i];
        if (f->kind == F_PREV || f->kind == F_SEQ) {
            if (first)
                return 0;  /* nothing before it to follow: not a record these builders make */
            *(f->kind == F_PREV ? prev_at : seq_at) = b->len;
            continue;
        }
        if (!first && buf_char(b, ',') < 0)
            return -1;
        first = 0;
        if (f->kind == F_CHUNK) {
            if (buf_put(b, f->raw, f->raw_len) < 0)
                return -1;
            continue;
        }
        if (f->plain) {  /* a C literal: no escapes to look for */
            if (buf_reserve(b, f->len + 3) < 0)
                return -1;
            char *o = b->p + b->len;
            *o++ = '"';
            memcpy(o, f->key, (size_t)f->len);
            o += f->len;
            *o++ = '"';
            *o++ = ':';
            b->len = o - b->p;
        } else if (put_string(b, f->key, f->len) < 0 || buf_char(b, ':') < 0) {
            return -1;
        }
        int rc = 1;
        switch (f->kind) {
        case F_OBJ:
            rc = put_value(b, f->obj, 1, 1);
            break;
        case F_RAW:
            rc = buf_put(b, f->raw, (Py_ssize_t)strlen(f->raw)) < 0 ? -1 : 1;
            break;
        case F_TIME:
            rc = put_time(b, now_us);
            break;
        case F_DECISION:
            if (buf_put(b, "{\"action\":", 10) < 0)
                return -1;
            rc = put_str_obj(b, f->obj);
            if (rc == 1 && nonempty(f->aux)) {
                rc = buf_put(b, ",\"reason\":", 10) < 0 ? -1 : put_str_obj(b, f->aux);
            }
            if (rc == 1 && nonempty(f->aux2)) {
                rc = buf_put(b, ",\"rule\":", 8) < 0 ? -1 : put_str_obj(b, f->aux2);
            }
            if (rc == 1)
                rc = buf_char(b, '}') < 0 ? -1 : 1;
            break;
        case F_APPROVAL:
            if (buf_char(b, '{') < 0)
                return -1;
            if (nonempty(f->aux)) {
                rc = buf_put(b, "\"approver\":", 11) < 0 ? -1 : put_str_obj(b, f->aux);
                if (rc == 1)
                    rc = buf_char(b, ',') < 0 ? -1 : 1;
            }
            if (rc == 1)
                rc = buf_put(b, "\"id\":", 5) < 0 ? -1 : put_str_obj(b, f->obj);
            if (rc == 1)
                rc = buf_char(b, '}') < 0 ? -1 : 1;
            break;
        case F_PARAMS:
            rc = put_params(b, f->obj, f->aux);
            break;
        case F_DOUBLE:
            rc = put_double(b, f->d);
            break;
        case F_LONG:
            rc = put_int(b, f->n) < 0 ? -1 : 1;
            break;
        }
        if (rc != 1)
            return rc;
    }
    return buf_char(b, '}') < 0 ? -1 : 1;
}

/* The clock as records.now_iso() reads it (time.time_ns() // 1000), or the caller's `now_ns` */
static int now_of(PyObject *now_ns, long long *ns) {
    if (now_ns == Py_None) {
        struct timespec ts;
        if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        *ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        return 0;
    }
    *ns = PyLong_AsLongLong(now_ns);
    return *ns == -1 && PyErr_Occurred() ? -1 : 0;
}

static long long floor_div(long long a, long long b) {
    long long q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* The body of the sorted fields `f` at `ns` (the record's time): the tuple (text, prev_at,
 * seq_at), None when a field declined, or NULL (a Python error) */
static PyObject *body(const Field *f, int n, long long ns) {
    char room[BUF_ROOM];
    Buf b;
    buf_init(&b, room, sizeof room);
    Py_ssize_t prev_at = -1, seq_at = -1;
    int rc = put_fields(&b, f, n, floor_div(ns, 1000), &prev_at, &seq_at);
    PyObject *out = NULL;
    if (rc == 0 || (rc == 1 && (prev_at < 0 || seq_at < prev_at))) {
        out = Py_NewRef(Py_None);
    } else if (rc == 1) {
        PyObject *text = PyBytes_FromStringAndSize(b.p, b.len);
        if (text != NULL)
            out = Py_BuildValue("(Nnn)", text, prev_at, seq_at);
    }
    buf_free(&b);
    return out;
}

#define STATEMENT_ARGS 14

/* statement_body(members, now_ns, stmt, protocol, sql, action, rule, reason, params, mask_text,
 *                approval_id, approver, masked_columns, extra) -> (text, prev_at, seq_at) | None
 * records.statement()'s record: {"time", "event": "statement", **common, "stmt", "protocol",
 * "sql", "decision", ["params"], ["approval"], ["maskedColumns"], **extra}; `members` is
 * members(common) */
static PyObject *statement_body(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != STATEMENT_ARGS) {
        PyErr_Format(PyExc_TypeError, "statement_body takes %d arguments", STATEMENT_ARGS);
        return NULL;
    }
    PyObject *stmt = args[2], *protocol = args[3], *sql = args[4], *action = args[5],
             *rule = args[6], *reason = args[7], *params = args[8], *mask_text = args[9],
             *approval_id = args[10], *approver = args[11], *masked = args[12], *extra = args[13];
    if (Py_TYPE(args[0]) != &MembersType) {
        PyErr_SetString(PyExc_TypeError, "statement_body: members must come from members()");
        return NULL;
    }
    Members *members = (Members *)args[0];
    long long ns;
    if (now_of(args[1], &ns) < 0)
        return NULL;
    if ((extra != Py_None && !PyDict_CheckExact(extra)) ||
        !PyUnicode_CheckExact(rule) || !PyUnicode_CheckExact(reason) || !PyUnicode_CheckExact(approval_id) ||
        !PyUnicode_CheckExact(approver) || !(PyList_CheckExact(masked) || PyTuple_CheckExact(masked)))
        Py_RETURN_NONE;
    /* the record's own members, added in key order (bytewise: approval, decision, event,
     * maskedColumns, params, prev, protocol, seq, sql, stmt, time) */
    Fields own;
    own.n = 0;
    if (PyUnicode_GET_LENGTH(approval_id) > 0) {
        add(&own, "approval", F_APPROVAL);
        own.f[own.n - 1].obj = approval_id;
        own.f[own.n - 1].aux = approver;
    }
    add(&own, "decision", F_DECISION);
    own.f[own.n - 1].obj = action;
    own.f[own.n - 1].aux = reason;
    own.f[own.n - 1].aux2 = rule;
    add(&own, "event", F_RAW);
    own.f[own.n - 1].raw = "\"statement\"";
    if (PySequence_Fast_GET_SIZE(masked) > 0)
        add_obj(&own, "maskedColumns", masked);
    if (params != Py_None) {
        add(&own, "params", F_PARAMS);
        own.f[own.n - 1].obj = params;
        own.f[own.n - 1].aux = mask_text;
    }
    add(&own, "prev", F_PREV);
    add_obj(&own, "protocol", protocol);
    add(&own, "seq", F_SEQ);
    add_obj(&own, "sql", sql);
    add_obj(&own, "stmt", stmt);
    add(&own, "time", F_TIME);
    /* then the session's (sorted when rendered) and the extra ones (a few; sorted here) */
    Field session[MAX_MEMBERS], merged[MAX_FIELDS], all[MAX_FIELDS];
    member_fields(members, session);
    int n = merge_fields(own.f, own.n, session, members->n, merged);
    if (n < 0)
        Py_RETURN_NONE;
    if (extra == Py_None || PyDict_GET_SIZE(extra) == 0)
        return body(merged, n, ns);
    Fields more;
    more.n = 0;
    if (PyDict_GET_SIZE(extra) > MAX_FIELDS - n || add_members(&more, extra) < 0)
        Py_RETURN_NONE;
    sort_fields(more.f, more.n);
    n = merge_fields(merged, n, more.f, more.n, all);
    if (n < 0)
        Py_RETURN_NONE;
    return body(all, n, ns);
}

#define OUTCOME_ARGS 11

/* records.to_microsecond: round(x * 1000) / 1000 with ties to even */
static double to_microsecond(double duration_ms) {
    double x = duration_ms * 1000.0;
    double whole = floor(x);
    double rest = x - whole;
    if (rest > 0.5 || (rest == 0.5 && whole - 2.0 * floor(whole / 2.0) == 1.0))
        whole += 1.0;
    return whole / 1000.0;
}

/* outcome_body(session, now_ns, stmt, started, tag, rows, sqlstate, message, masked_values, decision,
 *              undone) -> (text, prev_at, seq_at) | None
 * records.outcome()'s record, its duration (now_ns / 1e9 - started) * 1000 */
static PyObject *outcome_body(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != OUTCOME_ARGS) {
        PyErr_Format(PyExc_TypeError, "outcome_body takes %d arguments", OUTCOME_ARGS);
        return NULL;
    }
    PyObject *session = args[0], *stmt = args[2], *tag = args[4], *rows = args[5], *sqlstate = args[6],
             *message = args[7], *masked_values = args[8], *decision = args[9], *undone = args[10];
    long long ns;
    if (now_of(args[1], &ns) < 0)
        return NULL;
    if (!PyFloat_CheckExact(args[3]) || !PyUnicode_CheckExact(tag) || !PyUnicode_CheckExact(sqlstate) ||
        !PyUnicode_CheckExact(message) || PyUnicode_GET_LENGTH(message) > MAX_MESSAGE_CHARS ||
        !PyUnicode_CheckExact(decision) || !PyLong_CheckExact(masked_values) ||
        (rows != Py_None && !PyLong_CheckExact(rows)) || (undone != Py_True && undone != Py_False))
        Py_RETURN_NONE;
    double duration = to_microsecond(((double)ns / 1e9 - PyFloat_AS_DOUBLE(args[3])) * 1000);
    int overflow = 0;
    long long masked_n = PyLong_AsLongLongAndOverflow(masked_values, &overflow);
    if (overflow || (masked_n == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    /* added in key order (bytewise: decision, durationMs, event, maskedValues, message, prev, rows,
     * seq, session, sqlstate, stmt, tag, time, undone) */
    Fields fs;
    fs.n = 0;
    if (PyUnicode_GET_LENGTH(decision) > 0)
        add_obj(&fs, "decision", decision);
    add(&fs, "durationMs", F_DOUBLE);
    fs.f[fs.n - 1].d = duration;
    add(&fs, "event", F_RAW);
    fs.f[fs.n - 1].raw = "\"statement.outcome\"";
    if (masked_n != 0) {  /* the dict path: `if masked_values:` */
        add(&fs, "maskedValues", F_LONG);
        fs.f[fs.n - 1].n = masked_n;
    }
    if (PyUnicode_GET_LENGTH(message) > 0)
        add_obj(&fs, "message", message);
    add(&fs, "prev", F_PREV);
    if (rows != Py_None)
        add_obj(&fs, "rows", rows);
    add(&fs, "seq", F_SEQ);
    add_obj(&fs, "session", session);
    if (PyUnicode_GET_LENGTH(sqlstate) > 0)
        add_obj(&fs, "sqlstate", sqlstate);
    add_obj(&fs, "stmt", stmt);
    if (PyUnicode_GET_LENGTH(tag) > 0)
        add_obj(&fs, "tag", tag);
    add(&fs, "time", F_TIME);
    if (undone == Py_True) {
        add(&fs, "undone", F_RAW);
        fs.f[fs.n - 1].raw = "true";
    }
    return body(fs.f, fs.n, ns);
}

#endif
