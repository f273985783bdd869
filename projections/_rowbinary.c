/* The sink's native fast path: a run of single-object Avro records → one RowBinary block.
 *
 * Why: ClickHouse parses RowBinary at about half the CPU of our Avro container block, and
 * the Avro insert also evaluated a check expression per row. Here one pass over each record
 * both checks it (everything the Avro insert's SQL checks refused, see avro_block.py) and
 * writes its row, so the insert is a plain `INSERT ... FORMAT RowBinary`.
 *
 * `transcode(program, header, event_type, values, offsets, tail, occurred_min, occurred_max)`
 * returns the block (bytes) or, when a record fails a check, the index of the first such
 * record (int): the sink then decodes the run with the Codec, which decides what is a row and
 * what a dead letter. `program` holds one op byte per writer field (avro_block.native_program
 * compiles it): the low 5 bits a kind, 0x20 array of it, 0x40 map string → it, 0x80 the
 * ["null", it] union. Each row is the fields' values, then `tail` (constant bytes: the
 * reader's defaults, `_topic`, `_partition`), then the record's offset as UInt64.
 *
 * Every read is bounds-checked against the record; nothing is global or mutable; the GIL is
 * released only around the loop over the records, whose bytes objects are held (INCREF) for
 * that time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
    K_STRING = 1,  /* string → String: valid UTF-8 */
    K_EVTYPE = 2,  /* string equal to the writer's record name */
    K_TENANT = 3,  /* string, valid UTF-8, holding a byte in [!-~] */
    K_UUID = 4,    /* string, canonical 8-4-4-4-12 hex */
    K_INT32 = 5,   /* int → Int32 */
    K_UINT32 = 6,  /* int → UInt32: not negative */
    K_INT64 = 7,   /* long → Int64 */
    K_TS = 8,      /* timestamp-micros → DateTime64(6): within ClickHouse's range */
    K_TS_ENV = 9,  /* occurred_at: within [occurred_min, occurred_max] */
    K_DOUBLE = 10, /* double → Float64 */
    K_BOOL = 11,   /* boolean → Bool: byte 0 or 1 */
    K_DECIMAL = 12 /* bytes decimal(38, 12) → Decimal(38, 12): |n| <= 10**38 - 1 */
};
#define K_KIND 0x1f
#define K_ARRAY 0x20
#define K_MAP 0x40
#define K_NULLABLE 0x80
#define HEADER_LEN 10
#define MAP_MAX_KEYS 64 /* more keys: refused (a false alarm: the Codec decides) */
/* DateTime64(6) range ClickHouse stores: 1900-01-01 .. 2299-12-31 23:59:59.999999 UTC */
#define TS_LO (-2208988800LL * 1000000LL)
#define TS_HI (10413791999LL * 1000000LL + 999999LL)

/* The output: first the storage of a bytes object sized by an estimate (no copy at the end),
 * moved to a malloc'd buffer if the rows outgrow it. */
typedef struct {
    char *p;
    size_t len, cap;
    int owned; /* p is malloc'd (else it is the bytes object's storage) */
} Buf;

typedef struct {
    const uint8_t *p, *end;
} Rd;

typedef struct {
    const uint8_t *evtype;
    size_t evtype_len;
    int64_t env_lo, env_hi;
} Ctx;

/* 0: ok, 1: the record is refused, -1: out of memory */

static int reserve(Buf *b, size_t n) {
    if (b->cap - b->len >= n)
        return 0;
    size_t cap = b->cap ? b->cap : 65536;
    while (cap - b->len < n) {
        if (cap > SIZE_MAX / 2)
            return -1;
        cap *= 2;
    }
    char *q = b->owned ? realloc(b->p, cap) : malloc(cap);
    if (q == NULL)
        return -1;
    if (!b->owned && b->len)
        memcpy(q, b->p, b->len);
    b->p = q;
    b->cap = cap;
    b->owned = 1;
    return 0;
}

static int put(Buf *b, const void *src, size_t n) {
    if (reserve(b, n))
        return -1;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

static size_t uleb(uint8_t *out, uint64_t n) {
    size_t k = 0;
    while (n > 0x7f) {
        out[k++] = (uint8_t)((n & 0x7f) | 0x80);
        n >>= 7;
    }
    out[k++] = (uint8_t)n;
    return k;
}

static int put_le(Buf *b, uint64_t v, size_t width) {
    uint8_t tmp[8];
    for (size_t i = 0; i < width; i++)
        tmp[i] = (uint8_t)(v >> (8 * i));
    return put(b, tmp, width);
}

/* Avro's zigzag varint of a long: at most 10 bytes and 64 bits. */
static int rd_long(Rd *r, int64_t *out) {
    if (r->p < r->end && !(*r->p & 0x80)) { /* the usual one-byte varint */
        uint64_t n = *r->p++;
        *out = (int64_t)((n >> 1) ^ (~(n & 1) + 1));
        return 0;
    }
    uint64_t n = 0;
    for (int i = 0; i < 10; i++) {
        if (r->p >= r->end)
            return 1;
        uint8_t byte = *r->p++;
        if (i == 9 && byte > 1)
            return 1;
        n |= (uint64_t)(byte & 0x7f) << (7 * i);
        if (!(byte & 0x80)) {
            *out = (int64_t)((n >> 1) ^ (~(n & 1) + 1));
            return 0;
        }
    }
    return 1;
}

static int rd_bytes(Rd *r, const uint8_t **s, size_t *n) {
    int64_t len;
    if (rd_long(r, &len) || len < 0 || (uint64_t)len > (uint64_t)(r->end - r->p))
        return 1;
    *s = r->p;
    *n = (size_t)len;
    r->p += len;
    return 0;
}

/* Strict UTF-8, as Python's decoder: no overlongs, no surrogates, nothing above U+10FFFF. */
static int utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (n - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xC2 && c <= 0xDF) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (n - i < 3 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] > 0x9F))
                return 0;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (n - i < 4 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && s[i + 1] < 0x90) || (c == 0xF4 && s[i + 1] > 0x8F))
                return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* byte → 1 for a hex digit (a constant table) */
static const uint8_t HEX[256] = {
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1, ['8'] = 1, ['9'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1,
    ['E'] = 1, ['F'] = 1,
};

static int uuid_ok(const uint8_t *s, size_t n) {
    if (n != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-')
        return 0;
    unsigned ok = 1;
    for (size_t i = 0; i < 8; i++)
        ok &= HEX[s[i]];
    for (size_t i = 9; i < 13; i++)
        ok &= HEX[s[i]];
    for (size_t i = 14; i < 18; i++)
        ok &= HEX[s[i]];
    for (size_t i = 19; i < 23; i++)
        ok &= HEX[s[i]];
    for (size_t i = 24; i < 36; i++)
        ok &= HEX[s[i]];
    return (int)ok;
}

static int put_string(Buf *b, const uint8_t *s, size_t n) {
    uint8_t tmp[10];
    size_t k = uleb(tmp, n);
    if (reserve(b, k + n))
        return -1;
    memcpy(b->p + b->len, tmp, k);
    memcpy(b->p + b->len + k, s, n);
    b->len += k + n;
    return 0;
}

static int scalar(Rd *r, Buf *b, int kind, const Ctx *ctx) {
    const uint8_t *s;
    size_t n;
    int64_t v;
    switch (kind) {
    case K_STRING:
    case K_EVTYPE:
    case K_TENANT:
    case K_UUID:
        if (rd_bytes(r, &s, &n))
            return 1;
        if (kind == K_EVTYPE) {
            if (n != ctx->evtype_len || memcmp(s, ctx->evtype, n) != 0)
                return 1;
        } else if (kind == K_UUID) {
            if (!uuid_ok(s, n))
                return 1;
        } else {
            if (!utf8_ok(s, n))
                return 1;
            if (kind == K_TENANT) {
                size_t i = 0;
                while (i < n && !(s[i] >= 0x21 && s[i] <= 0x7e))
                    i++;
                if (i == n)
                    return 1;
            }
        }
        return put_string(b, s, n);
    case K_INT32:
    case K_UINT32:
        if (rd_long(r, &v) || v < (kind == K_UINT32 ? 0 : INT32_MIN) || v > INT32_MAX)
            return 1;
        return put_le(b, (uint64_t)v, 4);
    case K_INT64:
    case K_TS:
    case K_TS_ENV:
        if (rd_long(r, &v))
            return 1;
        if (kind == K_TS && (v < TS_LO || v > TS_HI))
            return 1;
        if (kind == K_TS_ENV && (v < ctx->env_lo || v > ctx->env_hi))
            return 1;
        return put_le(b, (uint64_t)v, 8);
    case K_DOUBLE:
        if (r->end - r->p < 8)
            return 1;
        if (put(b, r->p, 8))
            return -1;
        r->p += 8;
        return 0;
    case K_BOOL:
        if (r->p >= r->end || *r->p > 1)
            return 1;
        if (put(b, r->p, 1))
            return -1;
        r->p += 1;
        return 0;
    case K_DECIMAL: {
        if (rd_bytes(r, &s, &n) || n < 1 || n > 16)
            return 1;
        uint8_t le[16];
        uint8_t fill = (s[0] & 0x80) ? 0xff : 0x00;
        memset(le, fill, 16);
        for (size_t i = 0; i < n; i++)
            le[i] = s[n - 1 - i];
        if (n == 16) { /* up to 15 bytes: |n| < 2**119 < 10**38, within precision 38 */
            unsigned __int128 u = 0;
            for (int i = 15; i >= 0; i--)
                u = (u << 8) | le[i];
            const unsigned __int128 max = (unsigned __int128)10000000000000000000ULL * 10000000000000000000ULL - 1;
            unsigned __int128 mag = fill ? (~u + 1) : u;
            if (mag > max)
                return 1;
        }
        return put(b, le, 16);
    }
    default:
        return 1; /* checked by valid_program: never reached */
    }
}

/* An Avro array or map: blocks of a count (no negative counts: refused), then a 0 count.
 * RowBinary wants the total count first: 10 bytes are reserved and closed up afterwards. */
static int container(Rd *r, Buf *b, int op, const Ctx *ctx) {
    int kind = op & K_KIND, is_map = op & K_MAP, rc;
    const uint8_t *keys[MAP_MAX_KEYS];
    size_t key_lens[MAP_MAX_KEYS];
    uint64_t total = 0;
    if (reserve(b, 10))
        return -1;
    size_t start = b->len;
    b->len += 10;
    for (;;) {
        int64_t count;
        if (rd_long(r, &count) || count < 0 || (uint64_t)count > (uint64_t)(r->end - r->p))
            return 1; /* every item takes at least one byte */
        if (count == 0)
            break;
        for (int64_t i = 0; i < count; i++) {
            if (is_map) {
                const uint8_t *k;
                size_t kn;
                if (total >= MAP_MAX_KEYS || rd_bytes(r, &k, &kn) || !utf8_ok(k, kn))
                    return 1;
                for (uint64_t j = 0; j < total; j++)
                    if (key_lens[j] == kn && memcmp(keys[j], k, kn) == 0)
                        return 1; /* a duplicate key: a Python dict would keep only the last */
                keys[total] = k;
                key_lens[total] = kn;
                if ((rc = put_string(b, k, kn)))
                    return rc;
            }
            if ((rc = scalar(r, b, kind, ctx)))
                return rc;
            total++;
        }
    }
    uint8_t tmp[10];
    size_t k = uleb(tmp, total);
    memmove(b->p + start + k, b->p + start + 10, b->len - start - 10);
    memcpy(b->p + start, tmp, k);
    b->len -= 10 - k;
    return 0;
}

static int field(Rd *r, Buf *b, int op, const Ctx *ctx) {
    if (op & K_NULLABLE) {
        int64_t branch;
        if (rd_long(r, &branch) || (branch != 0 && branch != 1))
            return 1;
        uint8_t flag = branch == 0;
        if (put(b, &flag, 1))
            return -1;
        if (branch == 0)
            return 0;
    }
    if (op & (K_ARRAY | K_MAP))
        return container(r, b, op, ctx);
    return scalar(r, b, op & K_KIND, ctx);
}

static int valid_op(int op) {
    int kind = op & K_KIND;
    if (kind < K_STRING || kind > K_DECIMAL)
        return 0;
    if ((op & K_ARRAY) && (op & K_MAP))
        return 0;
    if (op & (K_ARRAY | K_MAP))
        return !(op & K_NULLABLE) && (kind == K_STRING || kind == K_INT32 || kind == K_INT64 || kind == K_DOUBLE || kind == K_BOOL);
    return 1;
}

/* One record: header, fields, exact end; then the tail and the offset. */
static int record(const uint8_t *v, size_t n, uint64_t offset, const uint8_t *prog, size_t prog_len,
                  const uint8_t *header, const uint8_t *tail, size_t tail_len, const Ctx *ctx, Buf *b) {
    if (n < HEADER_LEN || memcmp(v, header, HEADER_LEN) != 0)
        return 1;
    Rd r = {v + HEADER_LEN, v + n};
    for (size_t i = 0; i < prog_len; i++) {
        int rc = field(&r, b, prog[i], ctx);
        if (rc)
            return rc;
    }
    if (r.p != r.end)
        return 1;
    if (put(b, tail, tail_len))
        return -1;
    return put_le(b, offset, 8);
}

static PyObject *transcode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer prog, header, evtype, tail;
    PyObject *values, *offsets;
    long long occ_lo, occ_hi;
    if (!PyArg_ParseTuple(args, "y*y*y*OOy*LL:transcode", &prog, &header, &evtype, &values, &offsets, &tail, &occ_lo,
                          &occ_hi))
        return NULL;
    PyObject *result = NULL, *vals = NULL, *offs = NULL;
    const uint8_t **ptrs = NULL;
    size_t *lens = NULL;
    uint64_t *coords = NULL;
    Buf b = {NULL, 0, 0, 0};
    PyObject *out = NULL;
    Py_ssize_t count = 0;
    if (header.len != HEADER_LEN) {
        PyErr_SetString(PyExc_ValueError, "header must be 10 bytes");
        goto done;
    }
    for (Py_ssize_t i = 0; i < prog.len; i++) {
        if (!valid_op(((const uint8_t *)prog.buf)[i])) {
            PyErr_Format(PyExc_ValueError, "invalid op %d at %zd", ((const uint8_t *)prog.buf)[i], i);
            goto done;
        }
    }
    /* tuples of our own: the loop below runs without the GIL, so nobody may change them */
    vals = PySequence_Tuple(values);
    offs = vals ? PySequence_Tuple(offsets) : NULL;
    if (offs == NULL)
        goto done;
    count = PyTuple_GET_SIZE(vals);
    if (PyTuple_GET_SIZE(offs) != count) {
        PyErr_SetString(PyExc_ValueError, "one offset per record");
        goto done;
    }
    ptrs = PyMem_Malloc(sizeof(*ptrs) * (size_t)(count ? count : 1));
    lens = PyMem_Malloc(sizeof(*lens) * (size_t)(count ? count : 1));
    coords = PyMem_Malloc(sizeof(*coords) * (size_t)(count ? count : 1));
    if (!ptrs || !lens || !coords) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *v = PyTuple_GET_ITEM(vals, i);
        if (!PyBytes_Check(v)) {
            PyErr_Format(PyExc_TypeError, "record %zd is not bytes", i);
            goto done;
        }
        ptrs[i] = (const uint8_t *)PyBytes_AS_STRING(v);
        lens[i] = (size_t)PyBytes_GET_SIZE(v);
        total += lens[i];
        coords[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(offs, i));
        if (coords[i] == (uint64_t)-1 && PyErr_Occurred())
            goto done;
    }
    Ctx ctx = {evtype.buf, (size_t)evtype.len, occ_lo, occ_hi};
    Py_ssize_t refused = -1;
    int rc = 0;
    /* rows are rarely more than 1.5x their records: written straight into a bytes object */
    size_t estimate = total + total / 2 + (size_t)count * (size_t)(tail.len + 8) + 4096;
    if (estimate > (size_t)PY_SSIZE_T_MAX) {
        PyErr_NoMemory();
        goto done;
    }
    if ((out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)estimate)) == NULL)
        goto done;
    b.p = PyBytes_AS_STRING(out);
    b.cap = estimate;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t i = 0; i < count && rc == 0; i++) {
        rc = record(ptrs[i], lens[i], coords[i], prog.buf, (size_t)prog.len, header.buf, tail.buf, (size_t)tail.len,
                    &ctx, &b);
        if (rc == 1)
            refused = i;
    }
    Py_END_ALLOW_THREADS;
    if (rc < 0) {
        PyErr_NoMemory();
    } else if (refused >= 0) {
        result = PyLong_FromSsize_t(refused);
    } else if (b.owned) {
        result = PyBytes_FromStringAndSize(b.p, (Py_ssize_t)b.len);
    } else if (_PyBytes_Resize(&out, (Py_ssize_t)b.len) == 0) {
        result = out; /* out is NULL on failure: _PyBytes_Resize freed it */
        out = NULL;
    }
done:
    if (b.owned)
        free(b.p);
    Py_XDECREF(out);
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    PyMem_Free(coords);
    Py_XDECREF(vals);
    Py_XDECREF(offs);
    PyBuffer_Release(&prog);
    PyBuffer_Release(&header);
    PyBuffer_Release(&evtype);
    PyBuffer_Release(&tail);
    return result;
}

static PyMethodDef methods[] = {
    {"transcode", transcode, METH_VARARGS,
     "transcode(program, header, event_type, values, offsets, tail, occurred_min, occurred_max) -> bytes | int\n\n"
     "The RowBinary rows of `values` (single-object Avro records), or the index of the first record refused."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "projections._rowbinary",
    .m_doc = "Avro records → RowBinary rows for the sink (see avro_block.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__rowbinary(void) {
    return PyModule_Create(&module);
}
