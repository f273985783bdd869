/* The audit ledger's per-record work in C, for `ledgerflow audit verify` from the log and for
 * the chaining worker's fold (`ChainBatch`, agents/ledger.py).
 *
 * The pure-Python path (`domain.ledger`, `ledgerflow.audit.from_log` + `verify`) is the
 * reference; this module only decides what it can decide exactly and answers "not handled"
 * for anything else, so the caller gives that record's log (or that chain) to Python.
 *
 * - `audit_canonical(value, header)`: the canonical JSON bytes of an AuditRecorded v1 record
 *   (single-object header + Avro body), as `domain.ledger.audit_canonical_bytes` makes them;
 *   None when the record is not exactly one it handles (another header, malformed Avro,
 *   invalid UTF-8, a time Python's datetime cannot hold, an int outside 32 bits).
 * - `entry_fields(value, header)`: the hashed fields of a LedgerEntryChained v1 record and its
 *   canonical entry bytes (None as above).
 * - `merkle_roots(leaf_hashes, sizes)`: RFC 9162 roots of the first m leaves for each m.
 * - `LogVerifier(audit_header, entry_header)`: batches of Kafka records (their values, or
 *   confluent-kafka Messages) of the audit and ledger topics hashed as they are read, then per
 *   chain "sound" (seq 0..n-1 in log order, one partition, tenant, hashes, links and audit
 *   records all check) or not, and the Merkle roots of sound chains.
 * - `ChainBatch(records, audit_header, entry_header)`: one consumed batch of audit records
 *   chained as the worker's Python fold chains them (entries byte for byte, heads, checkpoint
 *   triggers), leaving to Python every record it does not handle exactly (see "chaining").
 *
 * Every read of a record is bounds-checked; no global mutable state (the interned method
 * names live in the module state); the GIL is released only around loops over C buffers.
 * Written against AuditRecorded v1 and LedgerEntryChained v1 (schemas/fixtures/): the caller
 * passes the header of those writer schemas and uses this module only while they are today's.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256_Init & co.: no per-call algorithm fetch (EVP) */
#include <Python.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HEADER_LEN 10
#define HASH_LEN 32
#define HEX_LEN 64

/* ---- reading Avro ---------------------------------------------------------------------- */

typedef struct {
    const unsigned char *p, *end;
} Reader;

typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
} Span;

/* A raw varint: at most 10 bytes, below 2**64 (as streams.avro_fast._uvarint). 0 on error. */
static int read_uvarint(Reader *r, uint64_t *out) {
    uint64_t n = 0;
    int shift = 0;
    for (;;) {
        if (r->p >= r->end || shift > 63)
            return 0;
        unsigned b = *r->p++;
        if (shift == 63 && (b & 0x7F) > 1)
            return 0;
        n |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80))
            break;
        shift += 7;
    }
    *out = n;
    return 1;
}

static int read_long(Reader *r, int64_t *out) {
    uint64_t n;
    if (!read_uvarint(r, &n))
        return 0;
    *out = (int64_t)(n >> 1) ^ -(int64_t)(n & 1);
    return 1;
}

static int read_int(Reader *r, int64_t *out) {
    return read_long(r, out) && *out >= INT32_MIN && *out <= INT32_MAX;
}

/* Strict UTF-8, as Python's bytes.decode(): no overlongs, no surrogates, nothing past U+10FFFF. */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

static uint64_t load8(const unsigned char *p) {
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}

static int valid_utf8(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        if (n - i >= 8 && !(load8(s + i) & HIGHS)) { /* eight ASCII bytes */
            i += 8;
            continue;
        }
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        Py_ssize_t need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
        } else
            return 0;
        if (n - i - 1 < need)
            return 0;
        unsigned c1 = s[i + 1];
        if (c1 < lo || c1 > hi)
            return 0;
        for (Py_ssize_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
        i += need + 1;
    }
    return 1;
}

/* A string: non-negative length within the record, valid UTF-8. */
static int read_string(Reader *r, Span *out) {
    uint64_t n;
    if (!read_uvarint(r, &n) || (n & 1))
        return 0;
    n >>= 1;
    if (n > (uint64_t)(r->end - r->p))
        return 0;
    out->p = r->p;
    out->n = (Py_ssize_t)n;
    r->p += n;
    return valid_utf8(out->p, out->n);
}

/* A ["null", "string"] union: index 0 (null: out->p NULL) or 1. */
static int read_opt_string(Reader *r, Span *out) {
    uint64_t k;
    if (!read_uvarint(r, &k))
        return 0;
    if (k == 0) {
        out->p = NULL;
        out->n = 0;
        return 1;
    }
    return k == 2 && read_string(r, out);
}

typedef struct {
    Span event_id, event_type, tenant, trace_parent, correlation_id, causation_id, producer;
    int64_t schema_version, occurred_at;
} Envelope;

static int read_envelope(Reader *r, Envelope *e) {
    return read_string(r, &e->event_id) && read_string(r, &e->event_type) && read_int(r, &e->schema_version) &&
           read_string(r, &e->tenant) && read_long(r, &e->occurred_at) && read_opt_string(r, &e->trace_parent) &&
           read_string(r, &e->correlation_id) && read_opt_string(r, &e->causation_id) &&
           read_string(r, &e->producer);
}

typedef struct {
    Span key, value;
    Py_ssize_t index;
} MapItem;

typedef struct {
    Envelope env;
    Span action, actor, subject, outcome;
    MapItem *items; /* the details map, in record order (owned by the caller's buffer) */
    Py_ssize_t n_items;
} Audit;

/* A map of strings into `items` (capacity `cap`, enough for any map in the record: an item
 * takes at least 2 bytes). Block counts as streams.avro_fast: 0 ends, negative is followed by
 * the block's byte size (ignored). */
static int read_details(Reader *r, MapItem *items, Py_ssize_t cap, Py_ssize_t *count) {
    Py_ssize_t n = 0;
    for (;;) {
        int64_t c;
        if (!read_long(r, &c))
            return 0;
        if (c == 0)
            break;
        if (c < 0) {
            int64_t size;
            if (c == INT64_MIN || !read_long(r, &size))
                return 0;
            c = -c;
        }
        if (c > (r->end - r->p) / 2 || c > cap - n)
            return 0;
        for (int64_t k = 0; k < c; k++) {
            if (!read_string(r, &items[n].key) || !read_string(r, &items[n].value))
                return 0;
            items[n].index = n;
            n++;
        }
    }
    *count = n;
    return 1;
}

static int parse_audit(const unsigned char *data, Py_ssize_t len, const unsigned char *header, MapItem *items,
                       Py_ssize_t cap, Audit *a) {
    if (len < HEADER_LEN || memcmp(data, header, HEADER_LEN) != 0)
        return 0;
    Reader r = {data + HEADER_LEN, data + len};
    if (!read_envelope(&r, &a->env) || !read_string(&r, &a->action) || !read_string(&r, &a->actor) ||
        !read_string(&r, &a->subject) || !read_string(&r, &a->outcome))
        return 0;
    a->items = items;
    if (!read_details(&r, items, cap, &a->n_items))
        return 0;
    return r.p == r.end;
}

typedef struct {
    Envelope env;
    Span chain_tenant, entry_hash, prev_hash, audit_event_id, audit_sha256;
    int64_t seq, source_partition, source_offset;
} Entry;

static int parse_entry(const unsigned char *data, Py_ssize_t len, const unsigned char *header, Entry *e) {
    if (len < HEADER_LEN || memcmp(data, header, HEADER_LEN) != 0)
        return 0;
    Reader r = {data + HEADER_LEN, data + len};
    return read_envelope(&r, &e->env) && read_string(&r, &e->chain_tenant) && read_long(&r, &e->seq) &&
           read_string(&r, &e->entry_hash) && read_string(&r, &e->prev_hash) &&
           read_string(&r, &e->audit_event_id) && read_string(&r, &e->audit_sha256) &&
           read_int(&r, &e->source_partition) && read_long(&r, &e->source_offset) && r.p == r.end;
}

/* ---- writing canonical JSON ------------------------------------------------------------ */
/* Callers size the buffer: a string's bytes at most 6x (\u00XX), plus the fixed text. */

static const char HEXDIGITS[] = "0123456789abcdef";

static char *put(char *o, const char *s, size_t n) {
    memcpy(o, s, n);
    return o + n;
}
#define PUT(o, lit) put((o), (lit), sizeof(lit) - 1)

/* A JSON string as json.dumps(ensure_ascii=False) / orjson write it: `"`, `\` and controls
 * escaped (\b \t \n \f \r, else \u00xx), everything else (valid UTF-8 already) as is. */
/* Nonzero if one of the 8 bytes may need escaping (< 0x20, '"' or '\\'); never zero when one does. */
static uint64_t may_escape(uint64_t x) {
    uint64_t quote = x ^ (ONES * '"'), slash = x ^ (ONES * '\\');
    return ((x - ONES * 0x20) | (quote - ONES) | (slash - ONES)) & ~x & HIGHS;
}

static char *put_str(char *o, Span s) {
    *o++ = '"';
    Py_ssize_t i = 0;
    while (s.n - i >= 8 && !may_escape(load8(s.p + i))) {
        memcpy(o, s.p + i, 8);
        o += 8;
        i += 8;
    }
    for (; i < s.n; i++) {
        unsigned char c = s.p[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
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
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = HEXDIGITS[c >> 4];
            *o++ = HEXDIGITS[c & 15];
        }
    }
    *o++ = '"';
    return o;
}

static char *put_opt_str(char *o, Span s) {
    return s.p == NULL ? PUT(o, "null") : put_str(o, s);
}

static char *put_int(char *o, int64_t v) {
    char tmp[24];
    int n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *o++ = '-';
    while (n)
        *o++ = tmp[--n];
    return o;
}

static char *put_digits(char *o, int64_t v, int width) {
    for (int i = width - 1; i >= 0; i--) {
        o[i] = (char)('0' + v % 10);
        v /= 10;
    }
    return o + width;
}

#define US_PER_DAY 86400000000LL
#define MIN_US (-62135596800000000LL)  /* 0001-01-01T00:00:00Z */
#define MAX_US 253402300799999999LL    /* 9999-12-31T23:59:59.999999Z */

/* "YYYY-MM-DDTHH:MM:SS.ffffffZ" (quoted) for Avro timestamp-micros; 0 outside datetime's years 1..9999. */
static char *put_time(char *o, int64_t us) {
    if (us < MIN_US || us > MAX_US)
        return NULL;
    int64_t days = us / US_PER_DAY, rem = us % US_PER_DAY;
    if (rem < 0) {
        rem += US_PER_DAY;
        days -= 1;
    }
    /* civil_from_days (H. Hinnant), days since 1970-01-01 */
    int64_t z = days + 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t y = yoe + era * 400;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t d = doy - (153 * mp + 2) / 5 + 1;
    int64_t m = mp < 10 ? mp + 3 : mp - 9;
    if (m <= 2)
        y += 1;
    int64_t secs = rem / 1000000, frac = rem % 1000000;
    *o++ = '"';
    o = put_digits(o, y, 4);
    *o++ = '-';
    o = put_digits(o, m, 2);
    *o++ = '-';
    o = put_digits(o, d, 2);
    *o++ = 'T';
    o = put_digits(o, secs / 3600, 2);
    *o++ = ':';
    o = put_digits(o, secs / 60 % 60, 2);
    *o++ = ':';
    o = put_digits(o, secs % 60, 2);
    *o++ = '.';
    o = put_digits(o, frac, 6);
    *o++ = 'Z';
    *o++ = '"';
    return o;
}

static int span_cmp(Span a, Span b) {
    Py_ssize_t n = a.n < b.n ? a.n : b.n;
    int c = n ? memcmp(a.p, b.p, (size_t)n) : 0;
    if (c)
        return c;
    return (a.n > b.n) - (a.n < b.n);
}

/* By key (UTF-8 byte order is code point order, as sorted() on str), then record order. */
static int item_cmp(const void *x, const void *y) {
    const MapItem *a = x, *b = y;
    int c = span_cmp(a->key, b->key);
    if (c)
        return c;
    return (a->index > b->index) - (a->index < b->index);
}

/* The canonical bytes of a parsed audit record into `o` (sized by audit_bound); NULL if its time is out of range. */
static char *put_audit(char *o, Audit *a) {
    Envelope *e = &a->env;
    if (a->n_items > 1)
        qsort(a->items, (size_t)a->n_items, sizeof(MapItem), item_cmp);
    o = PUT(o, "{\"action\":");
    o = put_str(o, a->action);
    o = PUT(o, ",\"actor\":");
    o = put_str(o, a->actor);
    o = PUT(o, ",\"details\":{");
    int first = 1;
    for (Py_ssize_t i = 0; i < a->n_items; i++) {
        if (i + 1 < a->n_items && span_cmp(a->items[i].key, a->items[i + 1].key) == 0)
            continue; /* a key twice: the last one wins, as in a dict */
        if (!first)
            *o++ = ',';
        first = 0;
        o = put_str(o, a->items[i].key);
        *o++ = ':';
        o = put_str(o, a->items[i].value);
    }
    o = PUT(o, "},\"envelope\":{\"causation_id\":");
    o = put_opt_str(o, e->causation_id);
    o = PUT(o, ",\"correlation_id\":");
    o = put_str(o, e->correlation_id);
    o = PUT(o, ",\"event_id\":");
    o = put_str(o, e->event_id);
    o = PUT(o, ",\"event_type\":");
    o = put_str(o, e->event_type);
    o = PUT(o, ",\"occurred_at\":");
    o = put_time(o, e->occurred_at);
    if (o == NULL)
        return NULL;
    o = PUT(o, ",\"producer\":");
    o = put_str(o, e->producer);
    o = PUT(o, ",\"schema_version\":");
    o = put_int(o, e->schema_version);
    o = PUT(o, ",\"tenant\":");
    o = put_str(o, e->tenant);
    o = PUT(o, ",\"trace_parent\":");
    o = put_opt_str(o, e->trace_parent);
    o = PUT(o, "},\"outcome\":");
    o = put_str(o, a->outcome);
    o = PUT(o, ",\"subject\":");
    o = put_str(o, a->subject);
    *o++ = '}';
    return o;
}

static size_t audit_bound(Py_ssize_t len) {
    return 6 * (size_t)len + 1024;
}

static char *put_entry(char *o, const Entry *e) {
    o = PUT(o, "{\"audit_event_id\":");
    o = put_str(o, e->audit_event_id);
    o = PUT(o, ",\"audit_sha256\":");
    o = put_str(o, e->audit_sha256);
    o = PUT(o, ",\"chain_tenant\":");
    o = put_str(o, e->chain_tenant);
    o = PUT(o, ",\"format\":\"ledgerflow.ledger-entry/1\",\"prev_hash\":");
    o = put_str(o, e->prev_hash);
    o = PUT(o, ",\"seq\":");
    o = put_int(o, e->seq);
    *o++ = '}';
    return o;
}

/* ---- hashing --------------------------------------------------------------------------- */

static void sha256(const void *data, size_t n, unsigned char out[HASH_LEN]) {
    SHA256_CTX c;
    SHA256_Init(&c);
    SHA256_Update(&c, data, n);
    SHA256_Final(out, &c);
}

static void sha256_prefixed(unsigned char prefix, const void *data, size_t n, unsigned char out[HASH_LEN]) {
    SHA256_CTX c;
    SHA256_Init(&c);
    SHA256_Update(&c, &prefix, 1);
    SHA256_Update(&c, data, n);
    SHA256_Final(out, &c);
}

static void node_hash(const unsigned char left[HASH_LEN], const unsigned char right[HASH_LEN],
                      unsigned char out[HASH_LEN]) {
    unsigned char buf[1 + 2 * HASH_LEN];
    buf[0] = 1;
    memcpy(buf + 1, left, HASH_LEN);
    memcpy(buf + 1 + HASH_LEN, right, HASH_LEN);
    sha256(buf, sizeof buf, out);
}

static void to_hex(const unsigned char *h, char out[HEX_LEN]) {
    for (int i = 0; i < HASH_LEN; i++) {
        out[2 * i] = HEXDIGITS[h[i] >> 4];
        out[2 * i + 1] = HEXDIGITS[h[i] & 15];
    }
}

/* 64 lowercase hex digits (what hexdigest() gives; anything else can never equal one) → 32 bytes. */
static int hex_digit(unsigned char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static int from_hex(Span s, unsigned char out[HASH_LEN]) {
    if (s.n != HEX_LEN)
        return 0;
    int bad = 0;
    for (int i = 0; i < HASH_LEN; i++) {
        int hi = hex_digit(s.p[2 * i]), lo = hex_digit(s.p[2 * i + 1]);
        bad |= hi | lo;
        out[i] = (unsigned char)(((unsigned)hi << 4 | (unsigned)lo) & 0xFF);
    }
    return bad >= 0;
}

/* RFC 9162 roots of the first sizes[i] leaves, sizes ascending and each in 1..n: one pass
 * keeping the frontier (the perfect subtrees' roots), folded at each size. */
static void roots_of(const unsigned char *leaves, Py_ssize_t n, const Py_ssize_t *sizes, Py_ssize_t n_sizes,
                     unsigned char *out) {
    unsigned char frontier[64][HASH_LEN];
    int depth = 0;
    Py_ssize_t next = 0;
    for (Py_ssize_t i = 0; i < n && next < n_sizes; i++) {
        unsigned char h[HASH_LEN];
        memcpy(h, leaves + (size_t)i * HASH_LEN, HASH_LEN);
        for (Py_ssize_t carry = i; carry & 1; carry >>= 1)
            node_hash(frontier[--depth], h, h);
        memcpy(frontier[depth++], h, HASH_LEN);
        while (next < n_sizes && sizes[next] == i + 1) {
            unsigned char root[HASH_LEN];
            memcpy(root, frontier[depth - 1], HASH_LEN);
            for (int k = depth - 2; k >= 0; k--)
                node_hash(frontier[k], root, root);
            memcpy(out + (size_t)next * HASH_LEN, root, HASH_LEN);
            next++;
        }
    }
}

/* ---- growable buffers and the tables --------------------------------------------------- */

typedef struct {
    unsigned char *p;
    size_t len, cap;
} Buf;

static int buf_reserve(Buf *b, size_t more) {
    if (b->len + more <= b->cap)
        return 1;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) {
        if (cap > SIZE_MAX / 2)
            return 0;
        cap *= 2;
    }
    unsigned char *p = realloc(b->p, cap);
    if (p == NULL)
        return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

static int buf_append(Buf *b, const void *data, size_t n) {
    if (!buf_reserve(b, n))
        return 0;
    if (n)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    return 1;
}

static uint64_t hash_key(const unsigned char *a, size_t na, const unsigned char *b, size_t nb) {
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)na;
    for (size_t i = 0; i < na; i++)
        h = (h ^ a[i]) * 1099511628211ULL;
    h = (h ^ 0xFF) * 1099511628211ULL;
    for (size_t i = 0; i < nb; i++)
        h = (h ^ b[i]) * 1099511628211ULL;
    return h ^ (h >> 29);
}

/* Audit records by (tenant, event id): arena record = u32 tenant len, u32 id len, tenant, id,
 * sha[32], u8 seen twice. A slot holds the key's hash and the arena offset + 1 (0: empty). */
typedef struct {
    uint64_t hash, off;
} Slot;

typedef struct {
    Buf arena;
    Slot *slots;
    size_t cap, used;
    Buf dup_tenants; /* u32 length + tenant, for each audit event id seen twice */
} AuditTable;

static int audit_grow(AuditTable *t) {
    size_t cap = t->cap ? t->cap * 2 : 1024;
    Slot *slots = calloc(cap, sizeof(Slot));
    if (slots == NULL)
        return 0;
    for (size_t i = 0; i < t->cap; i++) {
        if (!t->slots[i].off)
            continue;
        size_t j = t->slots[i].hash & (cap - 1);
        while (slots[j].off)
            j = (j + 1) & (cap - 1);
        slots[j] = t->slots[i];
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 1;
}

/* The arena offset of (tenant, id)'s record, or (size_t)-1. */
static size_t audit_find(const AuditTable *t, uint64_t h, Span tenant, Span id) {
    if (t->cap == 0)
        return (size_t)-1;
    for (size_t j = h & (t->cap - 1); t->slots[j].off; j = (j + 1) & (t->cap - 1)) {
        if (t->slots[j].hash != h)
            continue;
        size_t off = t->slots[j].off - 1;
        const unsigned char *rec = t->arena.p + off;
        uint32_t nt, ni;
        memcpy(&nt, rec, 4);
        memcpy(&ni, rec + 4, 4);
        if (nt == (uint64_t)tenant.n && ni == (uint64_t)id.n && memcmp(rec + 8, tenant.p, nt) == 0 &&
            memcmp(rec + 8 + nt, id.p, ni) == 0)
            return off;
    }
    return (size_t)-1;
}

static int audit_put(AuditTable *t, Span tenant, Span id, const unsigned char sha[HASH_LEN]) {
    if (tenant.n > UINT32_MAX || id.n > UINT32_MAX)
        return 0;
    uint64_t h = hash_key(tenant.p, (size_t)tenant.n, id.p, (size_t)id.n);
    size_t off = audit_find(t, h, tenant, id);
    if (off != (size_t)-1) { /* seen twice: Python keeps the last; the C code judges neither, nor that chain */
        uint32_t nt = (uint32_t)tenant.n;
        t->arena.p[off + 8 + tenant.n + id.n + HASH_LEN] = 1;
        return buf_append(&t->dup_tenants, &nt, 4) && buf_append(&t->dup_tenants, tenant.p, nt);
    }
    if ((t->used + 1) * 2 > t->cap && !audit_grow(t))
        return 0;
    off = t->arena.len;
    uint32_t nt = (uint32_t)tenant.n, ni = (uint32_t)id.n;
    unsigned char twice = 0;
    if (!buf_reserve(&t->arena, 8 + (size_t)nt + ni + HASH_LEN + 1))
        return 0;
    buf_append(&t->arena, &nt, 4);
    buf_append(&t->arena, &ni, 4);
    buf_append(&t->arena, tenant.p, nt);
    buf_append(&t->arena, id.p, ni);
    buf_append(&t->arena, sha, HASH_LEN);
    buf_append(&t->arena, &twice, 1);
    size_t j = h & (t->cap - 1);
    while (t->slots[j].off)
        j = (j + 1) & (t->cap - 1);
    t->slots[j].off = off + 1;
    t->slots[j].hash = h;
    t->used++;
    return 1;
}

/* One tenant's chain as the log holds it. `pending`: per entry, u32 id length, the audit event
 * id, the claimed audit SHA-256 (32 bytes), checked against the audit table at the end. */
typedef struct {
    unsigned char *tenant;
    Py_ssize_t tenant_len;
    Py_ssize_t n;
    long partition;
    int unsound;
    char prev_hex[HEX_LEN];
    Buf levels[64]; /* the Merkle tree's nodes level by level as leaves arrive: levels[0] the leaf hashes */
    Buf pending;
    size_t pending_pos; /* claims before it were found in the audit table and matched */
} Chain;

/* Append a leaf and every node it completes (RFC 9162: a node hashes two complete subtrees). */
static int chain_push_leaf(Chain *ch, const unsigned char leaf[HASH_LEN]) {
    unsigned char h[HASH_LEN];
    memcpy(h, leaf, HASH_LEN);
    for (int k = 0; k < 64; k++) {
        Buf *level = &ch->levels[k];
        if (!buf_append(level, h, HASH_LEN))
            return 0;
        size_t j = level->len / HASH_LEN - 1;
        if (!(j & 1))
            break;
        node_hash(level->p + (j - 1) * HASH_LEN, level->p + j * HASH_LEN, h);
    }
    return 1;
}

/* Roots of the first sizes[i] leaves (each in 1..leaves): for each bit b set in m, node
 * (m >> b) - 1 of level b is a perfect subtree; folded from the smallest, right to left. */
static void roots_from_levels(const Buf *levels, const Py_ssize_t *sizes, Py_ssize_t n_sizes, unsigned char *out) {
    for (Py_ssize_t i = 0; i < n_sizes; i++) {
        uint64_t m = (uint64_t)sizes[i];
        unsigned char root[HASH_LEN];
        int first = 1;
        for (int b = 0; b < 64; b++) {
            if (!(m >> b & 1))
                continue;
            const unsigned char *node = levels[b].p + ((m >> b) - 1) * HASH_LEN;
            if (first)
                memcpy(root, node, HASH_LEN);
            else
                node_hash(node, root, root);
            first = 0;
        }
        memcpy(out + (size_t)i * HASH_LEN, root, HASH_LEN);
    }
}

typedef struct {
    Chain *items;
    Py_ssize_t n, cap;
    Py_ssize_t *slots; /* index + 1 */
    uint64_t *hashes;
    size_t n_slots;
} Chains;

static void chains_free(Chains *c) {
    for (Py_ssize_t i = 0; i < c->n; i++) {
        free(c->items[i].tenant);
        for (int k = 0; k < 64; k++)
            free(c->items[i].levels[k].p);
        free(c->items[i].pending.p);
    }
    free(c->items);
    free(c->slots);
    free(c->hashes);
    memset(c, 0, sizeof *c);
}

static int chains_rehash(Chains *c, size_t n_slots) {
    Py_ssize_t *slots = calloc(n_slots, sizeof(Py_ssize_t));
    uint64_t *hashes = calloc(n_slots, sizeof(uint64_t));
    if (slots == NULL || hashes == NULL) {
        free(slots);
        free(hashes);
        return 0;
    }
    for (Py_ssize_t i = 0; i < c->n; i++) {
        uint64_t h = hash_key(c->items[i].tenant, (size_t)c->items[i].tenant_len, NULL, 0);
        size_t j = h & (n_slots - 1);
        while (slots[j])
            j = (j + 1) & (n_slots - 1);
        slots[j] = i + 1;
        hashes[j] = h;
    }
    free(c->slots);
    free(c->hashes);
    c->slots = slots;
    c->hashes = hashes;
    c->n_slots = n_slots;
    return 1;
}

/* The chain of `tenant`, made if new; NULL when out of memory. */
static Chain *chain_of(Chains *c, Span tenant, long partition) {
    uint64_t h = hash_key(tenant.p, (size_t)tenant.n, NULL, 0);
    if (c->n_slots) {
        for (size_t j = h & (c->n_slots - 1); c->slots[j]; j = (j + 1) & (c->n_slots - 1)) {
            Chain *ch = &c->items[c->slots[j] - 1];
            if (c->hashes[j] == h && ch->tenant_len == tenant.n && memcmp(ch->tenant, tenant.p, (size_t)tenant.n) == 0)
                return ch;
        }
    }
    if (c->n == c->cap) {
        Py_ssize_t cap = c->cap ? c->cap * 2 : 16;
        Chain *items = realloc(c->items, (size_t)cap * sizeof(Chain));
        if (items == NULL)
            return NULL;
        c->items = items;
        c->cap = cap;
    }
    Chain *ch = &c->items[c->n];
    memset(ch, 0, sizeof *ch);
    ch->tenant = malloc(tenant.n ? (size_t)tenant.n : 1);
    if (ch->tenant == NULL)
        return NULL;
    if (tenant.n)
        memcpy(ch->tenant, tenant.p, (size_t)tenant.n);
    ch->tenant_len = tenant.n;
    ch->partition = partition;
    memset(ch->prev_hex, '0', HEX_LEN);
    c->n++;
    if ((size_t)c->n * 2 > c->n_slots) { /* the rehash slots every chain, the new one too */
        if (!chains_rehash(c, c->n_slots ? c->n_slots * 2 : 64)) {
            c->n--;
            free(ch->tenant);
            return NULL;
        }
    } else {
        size_t j = h & (c->n_slots - 1);
        while (c->slots[j])
            j = (j + 1) & (c->n_slots - 1);
        c->slots[j] = c->n;
        c->hashes[j] = h;
    }
    return ch;
}

/* Match the chain's pending audit claims against the audit table, in order: each record must be
 * there, seen once, with the claimed SHA-256, else the chain is unsound. A claim whose record is
 * not (yet) there stops the walk, unless `final`, when it makes the chain unsound. */
static void resolve_claims(const AuditTable *t, Chain *ch, int final) {
    Span tenant = {ch->tenant, ch->tenant_len};
    size_t pos = ch->pending_pos;
    while (!ch->unsound && pos < ch->pending.len) {
        uint32_t id_len;
        memcpy(&id_len, ch->pending.p + pos, 4);
        Span id = {ch->pending.p + pos + 4, (Py_ssize_t)id_len};
        const unsigned char *claim = id.p + id_len;
        size_t off = audit_find(t, hash_key(tenant.p, (size_t)tenant.n, id.p, (size_t)id.n), tenant, id);
        if (off == (size_t)-1) {
            if (final)
                ch->unsound = 1;
            break;
        }
        const unsigned char *sha = t->arena.p + off + 8 + tenant.n + id_len;
        if (sha[HASH_LEN] || memcmp(sha, claim, HASH_LEN) != 0)
            ch->unsound = 1;
        pos += 4 + (size_t)id_len + HASH_LEN;
    }
    if (pos == ch->pending.len) { /* all matched: the buffer is reused */
        ch->pending.len = 0;
        pos = 0;
    } else if (pos > ch->pending.len / 2) {
        memmove(ch->pending.p, ch->pending.p + pos, ch->pending.len - pos);
        ch->pending.len -= pos;
        pos = 0;
    }
    ch->pending_pos = pos;
}

static int tenant_had_dup(const AuditTable *t, const Chain *ch) {
    size_t pos = 0;
    while (pos < t->dup_tenants.len) {
        uint32_t n;
        memcpy(&n, t->dup_tenants.p + pos, 4);
        if (n == (uint64_t)ch->tenant_len && memcmp(t->dup_tenants.p + pos + 4, ch->tenant, n) == 0)
            return 1;
        pos += 4 + (size_t)n;
    }
    return 0;
}

/* ---- the Python types ------------------------------------------------------------------ */

typedef struct {
    PyObject *value, *partition, *key, *error, *offset;
} ModState;

typedef struct {
    PyObject_HEAD
    unsigned char audit_header[HEADER_LEN], entry_header[HEADER_LEN];
    PyThread_type_lock audit_lock, entry_lock;
    AuditTable audits;
    Chains chains;
    const char *unhandled; /* why the first record not handled was not (a static string), or NULL */
    Py_ssize_t audit_count, entry_count;
    PyObject *names;       /* the module's interned method names (a tuple), for Messages */
} LogVerifier;

/* A batch's records, collected with the GIL held, worked on without it. */
typedef struct {
    PyObject *owner; /* the bytes object (a new reference) */
    const unsigned char *p;
    Py_ssize_t n;
    long partition;
} Rec;

static void lock_hard(PyThread_type_lock lock) {
    if (!PyThread_acquire_lock(lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

static void free_recs(Rec *recs, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(recs[i].owner);
    PyMem_Free(recs);
}

/* The records of `items` (bytes, partition 0; or Messages: errors and tombstones left out,
 * and with `key` only those with that Kafka key). NULL with an exception set on error. */
static Rec *collect(LogVerifier *self, PyObject *items, PyObject *key, Py_ssize_t *count) {
    PyObject *seq = PySequence_Fast(items, "records must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), k = 0;
    Rec *recs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Rec));
    if (recs == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    PyObject **it = PySequence_Fast_ITEMS(seq);
    PyObject *m_value = PyTuple_GET_ITEM(self->names, 0), *m_partition = PyTuple_GET_ITEM(self->names, 1),
             *m_key = PyTuple_GET_ITEM(self->names, 2), *m_error = PyTuple_GET_ITEM(self->names, 3);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = it[i], *value;
        long partition = 0;
        if (PyBytes_CheckExact(item)) {
            Py_INCREF(item);
            value = item;
        } else {
            PyObject *err = PyObject_CallMethodNoArgs(item, m_error);
            if (err == NULL)
                goto fail;
            int is_error = err != Py_None;
            Py_DECREF(err);
            if (is_error)
                continue;
            if (key != Py_None) {
                PyObject *k2 = PyObject_CallMethodNoArgs(item, m_key);
                if (k2 == NULL)
                    goto fail;
                int same = PyBytes_Check(k2) && PyBytes_GET_SIZE(k2) == PyBytes_GET_SIZE(key) &&
                           memcmp(PyBytes_AS_STRING(k2), PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key)) == 0;
                Py_DECREF(k2);
                if (!same)
                    continue;
            }
            value = PyObject_CallMethodNoArgs(item, m_value);
            if (value == NULL)
                goto fail;
            if (value == Py_None) {
                Py_DECREF(value);
                continue;
            }
            if (!PyBytes_Check(value)) {
                Py_DECREF(value);
                PyErr_SetString(PyExc_TypeError, "a record's value() must be bytes or None");
                goto fail;
            }
            PyObject *p = PyObject_CallMethodNoArgs(item, m_partition);
            if (p == NULL) {
                Py_DECREF(value);
                goto fail;
            }
            partition = p == Py_None ? 0 : PyLong_AsLong(p);
            Py_DECREF(p);
            if (partition == -1 && PyErr_Occurred()) {
                Py_DECREF(value);
                goto fail;
            }
        }
        recs[k].owner = value;
        recs[k].p = (const unsigned char *)PyBytes_AS_STRING(value);
        recs[k].n = PyBytes_GET_SIZE(value);
        recs[k].partition = partition;
        k++;
    }
    Py_DECREF(seq);
    *count = k;
    return recs;
fail:
    free_recs(recs, k);
    Py_DECREF(seq);
    return NULL;
}

static int tenant_filter(PyObject *arg, Span *out) {
    if (arg == Py_None) {
        out->p = NULL;
        out->n = -1;
        return 1;
    }
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "tenant must be bytes (UTF-8) or None");
        return 0;
    }
    out->p = (const unsigned char *)PyBytes_AS_STRING(arg);
    out->n = PyBytes_GET_SIZE(arg);
    return 1;
}

static int span_eq(Span a, Span b) {
    return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, (size_t)a.n) == 0);
}

/* Hash a batch of audit records into the table (no GIL). Returns a static reason or NULL; "" for out of memory. */
static const char *audits_work(LogVerifier *self, Rec *recs, Py_ssize_t n, Span want) {
    MapItem *items = NULL;
    size_t items_cap = 0;
    char *out = NULL;
    size_t out_cap = 0;
    const char *why = NULL;
    for (Py_ssize_t i = 0; i < n && why == NULL; i++) {
        size_t need_items = (size_t)recs[i].n / 2 + 1, need_out = audit_bound(recs[i].n);
        if (need_items > items_cap) {
            free(items);
            items_cap = need_items < 64 ? 64 : need_items;
            items = malloc(items_cap * sizeof(MapItem));
            if (items == NULL) {
                why = "";
                break;
            }
        }
        if (need_out > out_cap) {
            free(out);
            out_cap = need_out < 4096 ? 4096 : need_out;
            out = malloc(out_cap);
            if (out == NULL) {
                why = "";
                break;
            }
        }
        Audit a;
        if (!parse_audit(recs[i].p, recs[i].n, self->audit_header, items, (Py_ssize_t)items_cap, &a)) {
            why = "an audit-topic record that is not a well-formed AuditRecorded v1";
            break;
        }
        if (want.n >= 0 && !span_eq(want, a.env.tenant))
            continue;
        char *end = put_audit(out, &a);
        if (end == NULL) {
            why = "an audit record whose occurred_at is outside years 1..9999";
            break;
        }
        unsigned char sha[HASH_LEN];
        sha256(out, (size_t)(end - out), sha);
        if (!audit_put(&self->audits, a.env.tenant, a.env.event_id, sha))
            why = "";
        self->audit_count++;
    }
    free(items);
    free(out);
    return why;
}

static const char *entries_work(LogVerifier *self, Rec *recs, Py_ssize_t n, Span want) {
    char *out = NULL;
    size_t out_cap = 0;
    const char *why = NULL;
    for (Py_ssize_t i = 0; i < n && why == NULL; i++) {
        Entry e;
        if (!parse_entry(recs[i].p, recs[i].n, self->entry_header, &e)) {
            why = "a ledger-topic record that is not a well-formed LedgerEntryChained v1";
            break;
        }
        if (want.n >= 0 && !span_eq(want, e.env.tenant))
            continue;
        Chain *ch = chain_of(&self->chains, e.env.tenant, recs[i].partition);
        if (ch == NULL) {
            why = "";
            break;
        }
        self->entry_count++;
        Py_ssize_t at = ch->n++;
        if (ch->unsound)
            continue;
        unsigned char claim[HASH_LEN];
        /* what verify_chain checks, in its order; any failure leaves the chain to Python */
        if (recs[i].partition != ch->partition || e.seq != at || !span_eq(e.chain_tenant, e.env.tenant) ||
            e.prev_hash.n != HEX_LEN || memcmp(e.prev_hash.p, ch->prev_hex, HEX_LEN) != 0 ||
            e.entry_hash.n != HEX_LEN || !from_hex(e.audit_sha256, claim) || e.audit_event_id.n > UINT32_MAX) {
            ch->unsound = 1;
            continue;
        }
        size_t need = 6 * (size_t)recs[i].n + 256;
        if (need > out_cap) {
            free(out);
            out_cap = need < 4096 ? 4096 : need;
            out = malloc(out_cap);
            if (out == NULL) {
                why = "";
                break;
            }
        }
        char *end = put_entry(out, &e);
        unsigned char h[HASH_LEN], leaf[HASH_LEN];
        char hex[HEX_LEN];
        sha256(out, (size_t)(end - out), h);
        to_hex(h, hex);
        if (memcmp(hex, e.entry_hash.p, HEX_LEN) != 0) {
            ch->unsound = 1;
            continue;
        }
        sha256_prefixed(0, out, (size_t)(end - out), leaf);
        uint32_t id_len = (uint32_t)e.audit_event_id.n;
        if (!chain_push_leaf(ch, leaf) || !buf_reserve(&ch->pending, 4 + id_len + HASH_LEN)) {
            why = "";
            break;
        }
        buf_append(&ch->pending, &id_len, 4);
        buf_append(&ch->pending, e.audit_event_id.p, id_len);
        buf_append(&ch->pending, claim, HASH_LEN);
        memcpy(ch->prev_hex, hex, HEX_LEN);
    }
    free(out);
    /* the claims so far against the audit records so far, if the audit table is not being
     * written just now (never waiting: the rest is matched at the end, in chains()) */
    if (why == NULL && PyThread_acquire_lock(self->audit_lock, NOWAIT_LOCK)) {
        for (Py_ssize_t c = 0; c < self->chains.n; c++)
            if (!self->chains.items[c].unsound)
                resolve_claims(&self->audits, &self->chains.items[c], 0);
        PyThread_release_lock(self->audit_lock);
    }
    return why;
}

typedef const char *(*Work)(LogVerifier *, Rec *, Py_ssize_t, Span);

static PyObject *add_batch(LogVerifier *self, PyObject *args, PyObject *kwargs, int audits) {
    static char *kwlist[] = {"records", "tenant", NULL};
    PyObject *items, *tenant = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O", kwlist, &items, &tenant))
        return NULL;
    Span want;
    if (!tenant_filter(tenant, &want))
        return NULL;
    Py_ssize_t n;
    Rec *recs = collect(self, items, tenant, &n);
    if (recs == NULL)
        return NULL;
    PyThread_type_lock lock = audits ? self->audit_lock : self->entry_lock;
    Work work = audits ? audits_work : entries_work;
    lock_hard(lock);
    const char *why = self->unhandled;
    if (why == NULL) {
        Py_BEGIN_ALLOW_THREADS
        why = work(self, recs, n, want);
        Py_END_ALLOW_THREADS
        if (why != NULL && why[0] != '\0' && self->unhandled == NULL)
            self->unhandled = why;
    }
    PyThread_release_lock(lock);
    free_recs(recs, n);
    if (why != NULL && why[0] == '\0')
        return PyErr_NoMemory();
    if (why == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(why);
}

static PyObject *LogVerifier_add_audits(LogVerifier *self, PyObject *args, PyObject *kwargs) {
    return add_batch(self, args, kwargs, 1);
}

static PyObject *LogVerifier_add_entries(LogVerifier *self, PyObject *args, PyObject *kwargs) {
    return add_batch(self, args, kwargs, 0);
}

/* Each chain's audit claims against the table (no GIL): unsound when a record is missing, seen twice or differs. */
static void check_audits(LogVerifier *self) {
    for (Py_ssize_t c = 0; c < self->chains.n; c++) {
        Chain *ch = &self->chains.items[c];
        resolve_claims(&self->audits, ch, 1);
        if (tenant_had_dup(&self->audits, ch)) /* a record matched before its twin arrived */
            ch->unsound = 1;
    }
}

static PyObject *LogVerifier_chains(LogVerifier *self, PyObject *Py_UNUSED(ignored)) {
    lock_hard(self->audit_lock);
    lock_hard(self->entry_lock);
    Py_BEGIN_ALLOW_THREADS
    check_audits(self);
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(0);
    for (Py_ssize_t c = 0; out != NULL && c < self->chains.n; c++) {
        Chain *ch = &self->chains.items[c];
        PyObject *row = Py_BuildValue("(s#nO)", (const char *)ch->tenant, ch->tenant_len, ch->n,
                                      ch->unsound ? Py_False : Py_True);
        if (row == NULL || PyList_Append(out, row) < 0)
            Py_CLEAR(out);
        Py_XDECREF(row);
    }
    PyThread_release_lock(self->entry_lock);
    PyThread_release_lock(self->audit_lock);
    return out;
}

/* Sizes (ascending, each 1..n) from a Python sequence of ints; NULL with an exception set. */
static Py_ssize_t *sizes_from(PyObject *obj, Py_ssize_t n, Py_ssize_t *count) {
    PyObject *seq = PySequence_Fast(obj, "sizes must be a sequence of ints");
    if (seq == NULL)
        return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t *sizes = PyMem_Malloc((size_t)(k ? k : 1) * sizeof(Py_ssize_t));
    if (sizes == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        Py_ssize_t s = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (s == -1 && PyErr_Occurred())
            goto fail;
        if (s < 1 || s > n || (i > 0 && s <= sizes[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "sizes must ascend strictly, each within 1..the number of leaves");
            goto fail;
        }
        sizes[i] = s;
    }
    Py_DECREF(seq);
    *count = k;
    return sizes;
fail:
    PyMem_Free(sizes);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *roots_list(const unsigned char *leaves, Py_ssize_t n, PyObject *sizes_obj) {
    Py_ssize_t k;
    Py_ssize_t *sizes = sizes_from(sizes_obj, n, &k);
    if (sizes == NULL)
        return NULL;
    unsigned char *out = PyMem_Malloc((size_t)(k ? k : 1) * HASH_LEN);
    if (out == NULL) {
        PyMem_Free(sizes);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    roots_of(leaves, n, sizes, k, out);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(k);
    for (Py_ssize_t i = 0; list != NULL && i < k; i++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)out + (size_t)i * HASH_LEN, HASH_LEN);
        if (b == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, b);
    }
    PyMem_Free(out);
    PyMem_Free(sizes);
    return list;
}

static PyObject *LogVerifier_roots(LogVerifier *self, PyObject *args) {
    Py_ssize_t index;
    const char *tenant;
    Py_ssize_t tenant_len;
    PyObject *sizes;
    if (!PyArg_ParseTuple(args, "ns#O", &index, &tenant, &tenant_len, &sizes))
        return NULL;
    lock_hard(self->entry_lock);
    PyObject *out = NULL;
    Chain *found = NULL; /* by its row in chains(), not a scan: one lookup per chain, not one per pair */
    if (index >= 0 && index < self->chains.n) {
        Chain *ch = &self->chains.items[index];
        if (ch->tenant_len == tenant_len && memcmp(ch->tenant, tenant, (size_t)tenant_len) == 0)
            found = ch;
    }
    Py_ssize_t k = 0, *wanted = NULL;
    if (found == NULL || found->unsound)
        PyErr_SetString(PyExc_KeyError, "no sound chain of that tenant");
    else
        wanted = sizes_from(sizes, found->n, &k);
    unsigned char *roots = wanted == NULL ? NULL : PyMem_Malloc((size_t)(k ? k : 1) * HASH_LEN);
    if (wanted != NULL && roots == NULL)
        PyErr_NoMemory();
    if (roots != NULL) {
        Py_BEGIN_ALLOW_THREADS
        roots_from_levels(found->levels, wanted, k, roots);
        Py_END_ALLOW_THREADS
        out = PyList_New(k);
        for (Py_ssize_t i = 0; out != NULL && i < k; i++) {
            PyObject *b = PyBytes_FromStringAndSize((const char *)roots + (size_t)i * HASH_LEN, HASH_LEN);
            if (b == NULL)
                Py_CLEAR(out);
            else
                PyList_SET_ITEM(out, i, b);
        }
    }
    PyMem_Free(roots);
    PyMem_Free(wanted);
    PyThread_release_lock(self->entry_lock);
    return out;
}

static PyObject *LogVerifier_unhandled(LogVerifier *self, void *Py_UNUSED(closure)) {
    if (self->unhandled == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(self->unhandled);
}

static PyObject *LogVerifier_counts(LogVerifier *self, void *Py_UNUSED(closure)) {
    return Py_BuildValue("(nn)", self->audit_count, self->entry_count);
}

static int header_arg(PyObject *obj, unsigned char out[HEADER_LEN]) {
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) != HEADER_LEN) {
        PyErr_SetString(PyExc_ValueError, "a header is 10 bytes (C3 01 + 8-byte fingerprint)");
        return 0;
    }
    memcpy(out, PyBytes_AS_STRING(obj), HEADER_LEN);
    return 1;
}

static PyObject *LogVerifier_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"audit_header", "entry_header", NULL};
    PyObject *ah, *eh;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO", kwlist, &ah, &eh))
        return NULL;
    LogVerifier *self = (LogVerifier *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    ModState *st = PyType_GetModuleState(type);
    if (st == NULL || !header_arg(ah, self->audit_header) || !header_arg(eh, self->entry_header)) {
        Py_DECREF(self);
        return NULL;
    }
    self->names = PyTuple_Pack(4, st->value, st->partition, st->key, st->error);
    self->audit_lock = PyThread_allocate_lock();
    self->entry_lock = PyThread_allocate_lock();
    if (self->names == NULL || self->audit_lock == NULL || self->entry_lock == NULL) {
        Py_DECREF(self);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void LogVerifier_dealloc(LogVerifier *self) {
    PyTypeObject *tp = Py_TYPE(self);
    free(self->audits.arena.p);
    free(self->audits.slots);
    free(self->audits.dup_tenants.p);
    chains_free(&self->chains);
    if (self->audit_lock)
        PyThread_free_lock(self->audit_lock);
    if (self->entry_lock)
        PyThread_free_lock(self->entry_lock);
    Py_XDECREF(self->names);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef LogVerifier_methods[] = {
    {"add_audits", (PyCFunction)(void (*)(void))LogVerifier_add_audits, METH_VARARGS | METH_KEYWORDS,
     "Hash a batch of audit-topic records; the reason the first one not handled was not, or None."},
    {"add_entries", (PyCFunction)(void (*)(void))LogVerifier_add_entries, METH_VARARGS | METH_KEYWORDS,
     "Chain a batch of ledger-topic records; the reason the first one not handled was not, or None."},
    {"chains", (PyCFunction)LogVerifier_chains, METH_NOARGS,
     "[(tenant, entries, sound)] in first-seen order; checks the audit records (call once, after every batch)."},
    {"roots", (PyCFunction)LogVerifier_roots, METH_VARARGS,
     "roots(index, tenant, sizes): Merkle roots of the sound chain in row `index` of chains() at ascending sizes."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef LogVerifier_getset[] = {
    {"unhandled", (getter)LogVerifier_unhandled, NULL, "why the first record not handled was not, or None", NULL},
    {"counts", (getter)LogVerifier_counts, NULL, "(audit records, entries) taken", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot LogVerifier_slots[] = {
    {Py_tp_new, LogVerifier_new},
    {Py_tp_dealloc, LogVerifier_dealloc},
    {Py_tp_methods, LogVerifier_methods},
    {Py_tp_getset, LogVerifier_getset},
    {Py_tp_doc, "Audit and ledger records hashed batch by batch; sound chains and their Merkle roots."},
    {0, NULL},
};

static PyType_Spec LogVerifier_spec = {
    "domain._ledger_native.LogVerifier", sizeof(LogVerifier), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    LogVerifier_slots,
};

/* ---- chaining: the ledger worker's fold (agents/ledger.py: LedgerWorker._chain) ------------ */
/* `ChainBatch(records, audit_header, entry_header)` holds one consumed batch of audit-topic
 * records (their values, partitions and offsets, taken once with the GIL); `run(start, ...)`
 * chains them from `start`, as `Codec.decode` + `ChainHead.append` + `Codec.encode` +
 * `ChainHead.due` do record by record in Python, and stops at the first record it does not
 * handle exactly (Python chains or dead-letters that one, then runs again from the next) or
 * after an entry whose chain is due for a checkpoint (Python signs it, then runs again).
 *
 * Handled exactly, else "not handled": an AuditRecorded v1 record (parse_audit) that
 * `Codec.decode` takes as it is: event_type "AuditRecorded"; a tenant with an ASCII byte that
 * str.isspace() does not take (so not blank) and no control character; an event id in
 * canonical lowercase form (what `domain.ledger.derived_id` splices) and a canonical correlation id (what the codec's fast id
 * check passes); occurred_at from 2020-01-01 to `max_us` (the caller's now + 1 day). Anything
 * else (another writer, poison, an id uuid.UUID() would still take...) goes to Python.
 *
 * Chain heads stay Python objects (`domain.ledger.ChainHead`): the first time a run meets a
 * (partition, tenant) it asks `head_for(partition, tenant)` for the head's state (None: the
 * partition is not ours any more, skip its records; False: leave the record to Python), works
 * on a C copy, and returns every changed head's new state for the caller to store. The GIL is
 * released while records are parsed, hashed and encoded, and taken again only for `head_for`. */

#define MIN_EVENT_US 1577836800000000LL /* 2020-01-01T00:00:00Z, streams.codec's _MIN_TIME */
#define EXACT_DOUBLE (1LL << 53)
#define MAX_SIZE (1LL << 62)
#define ID_LEN 36

enum { SLOT_SKIP, SLOT_LIVE, SLOT_PYTHON };

typedef struct {
    PyObject *owner; /* the record's value (bytes, a new reference), or NULL: not handled */
    const unsigned char *p;
    Py_ssize_t n;
    int64_t partition, offset;
} ChainRec;

typedef struct {
    PyObject_HEAD
    unsigned char audit_header[HEADER_LEN], entry_header[HEADER_LEN];
    ChainRec *recs;
    Py_ssize_t n, max_len;
    int busy; /* a run is on (the GIL is released in it): a second one at once is refused */
} ChainBatch;

/* One chain met by a run: its head's state, worked on in C and handed back at the end. */
typedef struct {
    int64_t partition;
    Span tenant; /* points into a record of the batch */
    uint64_t hash;
    int state;
    PyObject *info; /* head_for's answer (a new reference); info[0] is the head */
    PyObject *key;  /* the tenant's UTF-8 bytes: the entries' Kafka key */
    int64_t size, checkpoint_size, last_offset, pending_us, occurred_us;
    int has_offset, has_pending, depth;
    Py_ssize_t appended;
    char last_hash[HEX_LEN];
    char last_event_id[ID_LEN];
    unsigned char frontier[64][HASH_LEN];
} ChainSlot;

typedef struct {
    ChainSlot *items;
    Py_ssize_t n, cap;
    Py_ssize_t *table; /* slot index + 1, 0: empty */
    size_t table_cap;
} ChainSlots;

typedef struct {
    Py_ssize_t slot;
    size_t start, len; /* the encoded entry in the run's buffer */
    Span trace;        /* the audit's trace_parent (p NULL: none) */
} OutRec;

static int is_id(Span s, int upper_ok) {
    if (s.n != ID_LEN)
        return 0;
    for (int i = 0; i < ID_LEN; i++) {
        unsigned c = s.p[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return 0;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (upper_ok && c >= 'A' && c <= 'F')))
            return 0;
    }
    return 1;
}

/* An ASCII byte str.isspace() does not take, so the tenant is not blank (others: Python decides),
 * and no control character (below 0x20), which no checkpoint note could name: Python refuses
 * those (domain.ledger._link). */
static int tenant_ok(Span s) {
    int not_blank = 0;
    for (Py_ssize_t i = 0; i < s.n; i++) {
        unsigned c = s.p[i];
        if (c < 0x20)
            return 0;
        if (c < 0x80 && c != ' ')
            not_blank = 1;
    }
    return not_blank;
}

/* What `Codec.decode` accepts (streams.codec: _envelope_check) and `derived_id` splices. */
static int chainable(const Audit *a, int64_t max_us) {
    const Envelope *e = &a->env;
    return e->event_type.n == 13 && memcmp(e->event_type.p, "AuditRecorded", 13) == 0 && tenant_ok(e->tenant) &&
           is_id(e->event_id, 0) && is_id(e->correlation_id, 1) && e->occurred_at >= MIN_EVENT_US &&
           e->occurred_at <= max_us;
}

/* Avro: a zigzag varint, a string, a ["null", "string"] union. */
static unsigned char *avro_long(unsigned char *o, int64_t v) {
    uint64_t u = ((uint64_t)v << 1) ^ (0 - ((uint64_t)v >> 63));
    while (u >= 0x80) {
        *o++ = (unsigned char)(u | 0x80);
        u >>= 7;
    }
    *o++ = (unsigned char)u;
    return o;
}

static unsigned char *avro_str(unsigned char *o, const void *p, size_t n) {
    o = avro_long(o, (int64_t)n);
    memcpy(o, p, n);
    return o + n;
}

static unsigned char *avro_opt_str(unsigned char *o, Span s) {
    if (s.p == NULL) {
        *o++ = 0;
        return o;
    }
    *o++ = 2;
    return avro_str(o, s.p, (size_t)s.n);
}

#define AVRO_LIT(o, lit) avro_str((o), (lit), sizeof(lit) - 1)

/* `domain.ledger.derived_id(parent, "LedgerEntryChained", str(seq))` for a canonical lowercase parent. */
static void entry_id(const unsigned char *parent, int64_t seq, char out[ID_LEN]) {
    char buf[ID_LEN + 1 + 18 + 1 + 24];
    char *o = put(buf, (const char *)parent, ID_LEN);
    *o++ = 0x1f;
    o = PUT(o, "LedgerEntryChained");
    *o++ = 0x1f;
    o = put_int(o, seq);
    unsigned char h[HASH_LEN];
    char d[HEX_LEN];
    sha256(buf, (size_t)(o - buf), h);
    to_hex(h, d);
    memcpy(out, parent, 8);
    out[8] = '-';
    memcpy(out + 9, parent + 9, 4);
    out[13] = '-';
    out[14] = '7';
    memcpy(out + 15, d, 3);
    out[18] = '-';
    out[19] = "89ab"[hex_digit((unsigned char)d[4]) & 3];
    memcpy(out + 20, d + 5, 3);
    out[23] = '-';
    memcpy(out + 24, d + 8, 12);
}

/* The canonical entry bytes (`domain.ledger.entry_bytes`); `o` holds 6 * tenant + 512. */
static char *put_link(char *o, Span event_id, const char sha_hex[HEX_LEN], Span tenant, const char prev[HEX_LEN],
                      int64_t seq) {
    o = PUT(o, "{\"audit_event_id\":");
    o = put_str(o, event_id);
    o = PUT(o, ",\"audit_sha256\":\"");
    o = put(o, sha_hex, HEX_LEN);
    o = PUT(o, "\",\"chain_tenant\":");
    o = put_str(o, tenant);
    o = PUT(o, ",\"format\":\"ledgerflow.ledger-entry/1\",\"prev_hash\":\"");
    o = put(o, prev, HEX_LEN);
    o = PUT(o, "\",\"seq\":");
    o = put_int(o, seq);
    *o++ = '}';
    return o;
}

/* The LedgerEntryChained v1 record (`Codec.encode` of `domain.ledger._entry_event`): header,
 * envelope (derived id, type, version 1, the audit's tenant, time, trace and correlation, the
 * audit as cause, the ledger as producer), then the entry's fields. Sized by entry_bound. */
static unsigned char *put_entry_record(unsigned char *o, const unsigned char header[HEADER_LEN], const Audit *a,
                                       const char id[ID_LEN], int64_t seq, const char e_hash[HEX_LEN],
                                       const char prev[HEX_LEN], const char sha_hex[HEX_LEN], int64_t partition,
                                       int64_t offset) {
    const Envelope *e = &a->env;
    memcpy(o, header, HEADER_LEN);
    o += HEADER_LEN;
    o = avro_str(o, id, ID_LEN);
    o = AVRO_LIT(o, "LedgerEntryChained");
    o = avro_long(o, 1);
    o = avro_str(o, e->tenant.p, (size_t)e->tenant.n);
    o = avro_long(o, e->occurred_at);
    o = avro_opt_str(o, e->trace_parent);
    o = avro_str(o, e->correlation_id.p, (size_t)e->correlation_id.n);
    o = avro_opt_str(o, e->event_id);
    o = AVRO_LIT(o, "agent:audit-ledger");
    o = avro_str(o, e->tenant.p, (size_t)e->tenant.n);
    o = avro_long(o, seq);
    o = avro_str(o, e_hash, HEX_LEN);
    o = avro_str(o, prev, HEX_LEN);
    o = avro_str(o, e->event_id.p, (size_t)e->event_id.n);
    o = avro_str(o, sha_hex, HEX_LEN);
    o = avro_long(o, partition);
    o = avro_long(o, offset);
    return o;
}

static size_t entry_bound(Py_ssize_t record_len) {
    return 2 * (size_t)record_len + 512;
}

/* `ChainHead.due(occurred_at, every_n, every_s)` after an entry; the wait as timedelta.total_seconds()
 * computes it (an exact int over 1e6, correctly rounded: |wait| < 2**53 µs, see load_slot). */
static int slot_due(const ChainSlot *s, int64_t now_us, int64_t every_n, double every_s) {
    int64_t pending = s->size - s->checkpoint_size;
    if (pending <= 0)
        return 0;
    if (pending >= every_n)
        return 1;
    return s->has_pending && (double)(now_us - s->pending_us) / 1e6 >= every_s;
}

static void slots_free(ChainSlots *ss) {
    for (Py_ssize_t i = 0; i < ss->n; i++) {
        Py_XDECREF(ss->items[i].info);
        Py_XDECREF(ss->items[i].key);
    }
    free(ss->items);
    free(ss->table);
    memset(ss, 0, sizeof *ss);
}

static uint64_t slot_hash(int64_t partition, Span tenant) {
    return hash_key((const unsigned char *)&partition, sizeof partition, tenant.p, (size_t)tenant.n);
}

static Py_ssize_t slot_find(const ChainSlots *ss, int64_t partition, Span tenant, uint64_t h) {
    if (ss->table_cap == 0)
        return -1;
    for (size_t j = h & (ss->table_cap - 1); ss->table[j]; j = (j + 1) & (ss->table_cap - 1)) {
        const ChainSlot *s = &ss->items[ss->table[j] - 1];
        if (s->hash == h && s->partition == partition && span_eq(s->tenant, tenant))
            return ss->table[j] - 1;
    }
    return -1;
}

/* Room for one more slot, its table entry included (no GIL needed). */
static int slots_reserve(ChainSlots *ss) {
    if (ss->n == ss->cap) {
        Py_ssize_t cap = ss->cap ? ss->cap * 2 : 8;
        ChainSlot *items = realloc(ss->items, (size_t)cap * sizeof(ChainSlot));
        if (items == NULL)
            return 0;
        ss->items = items;
        ss->cap = cap;
    }
    if ((size_t)(ss->n + 1) * 2 > ss->table_cap) {
        size_t cap = ss->table_cap ? ss->table_cap * 2 : 16;
        Py_ssize_t *table = calloc(cap, sizeof(Py_ssize_t));
        if (table == NULL)
            return 0;
        for (Py_ssize_t i = 0; i < ss->n; i++) {
            size_t j = ss->items[i].hash & (cap - 1);
            while (table[j])
                j = (j + 1) & (cap - 1);
            table[j] = i + 1;
        }
        free(ss->table);
        ss->table = table;
        ss->table_cap = cap;
    }
    return 1;
}

/* An int attribute of head_for's answer within [lo, hi]; 0 if it is not (no exception left set). */
static int int_in(PyObject *obj, int64_t lo, int64_t hi, int64_t *out) {
    if (!PyLong_Check(obj))
        return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    if (v < lo || v > hi)
        return 0;
    *out = v;
    return 1;
}

/* Read head_for's (head, size, last_hash, frontier, last_offset, checkpoint_size, pending_since_us)
 * into the slot: SLOT_LIVE, or SLOT_PYTHON when a value is outside what the C code does exactly. */
static int slot_state(ChainSlot *s, PyObject *info, int64_t max_us) {
    PyObject **v = &PyTuple_GET_ITEM(info, 0);
    if (!int_in(v[1], 0, MAX_SIZE - 1, &s->size) || !int_in(v[5], -MAX_SIZE, MAX_SIZE, &s->checkpoint_size))
        return SLOT_PYTHON;
    if (!PyUnicode_Check(v[2]))
        return SLOT_PYTHON;
    Py_ssize_t hn;
    const char *hash = PyUnicode_AsUTF8AndSize(v[2], &hn);
    unsigned char raw[HASH_LEN];
    if (hash == NULL) {
        PyErr_Clear();
        return SLOT_PYTHON;
    }
    if (!from_hex((Span){(const unsigned char *)hash, hn}, raw))
        return SLOT_PYTHON;
    memcpy(s->last_hash, hash, HEX_LEN);
    if (!PyList_Check(v[3]) || PyList_GET_SIZE(v[3]) != __builtin_popcountll((unsigned long long)s->size))
        return SLOT_PYTHON;
    s->depth = (int)PyList_GET_SIZE(v[3]);
    for (int k = 0; k < s->depth; k++) {
        PyObject *node = PyList_GET_ITEM(v[3], k);
        if (!PyBytes_CheckExact(node) || PyBytes_GET_SIZE(node) != HASH_LEN)
            return SLOT_PYTHON;
        memcpy(s->frontier[k], PyBytes_AS_STRING(node), HASH_LEN);
    }
    s->has_offset = v[4] != Py_None;
    if (s->has_offset && !int_in(v[4], INT64_MIN, INT64_MAX, &s->last_offset))
        return SLOT_PYTHON;
    /* a wait within 2**53 µs for every entry this run may chain (their times are 2020..max_us) */
    s->has_pending = v[6] != Py_None;
    if (s->has_pending &&
        !int_in(v[6], max_us - (EXACT_DOUBLE >> 1), MIN_EVENT_US + (EXACT_DOUBLE >> 1), &s->pending_us))
        return SLOT_PYTHON;
    return SLOT_LIVE;
}

/* The slot of (partition, tenant), asking head_for (GIL held); -1 with an exception set. */
static Py_ssize_t slot_load(ChainSlots *ss, int64_t partition, Span tenant, uint64_t h, PyObject *head_for,
                            int64_t max_us) {
    if (!slots_reserve(ss)) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *name = PyUnicode_DecodeUTF8((const char *)tenant.p, tenant.n, "strict");
    PyObject *p = PyLong_FromLongLong(partition);
    PyObject *info = NULL;
    if (name != NULL && p != NULL) {
        PyObject *argv[2] = {p, name};
        info = PyObject_Vectorcall(head_for, argv, 2, NULL);
    }
    Py_XDECREF(name);
    Py_XDECREF(p);
    if (info == NULL)
        return -1;
    ChainSlot *s = &ss->items[ss->n];
    memset(s, 0, offsetof(ChainSlot, frontier));
    s->partition = partition;
    s->tenant = tenant;
    s->hash = h;
    s->info = info;
    if (info == Py_None)
        s->state = SLOT_SKIP;
    else if (info == Py_False)
        s->state = SLOT_PYTHON;
    else if (!PyTuple_Check(info) || PyTuple_GET_SIZE(info) != 7) {
        Py_DECREF(info);
        PyErr_SetString(PyExc_TypeError, "head_for must answer None, False or a 7-tuple");
        return -1;
    } else {
        s->state = slot_state(s, info, max_us);
        if (s->state == SLOT_LIVE) {
            s->key = PyBytes_FromStringAndSize((const char *)tenant.p, tenant.n);
            if (s->key == NULL) {
                Py_DECREF(info);
                return -1;
            }
        }
    }
    size_t j = h & (ss->table_cap - 1);
    while (ss->table[j])
        j = (j + 1) & (ss->table_cap - 1);
    ss->table[j] = ++ss->n;
    return ss->n - 1;
}

/* Grow `b` to hold `more` bytes beyond its length (no GIL needed). */
#define RESERVE(b, more) buf_reserve((b), (more))

static int outs_push(OutRec **outs, Py_ssize_t *n, Py_ssize_t *cap, OutRec rec) {
    if (*n == *cap) {
        Py_ssize_t c = *cap ? *cap * 2 : 256;
        OutRec *p = realloc(*outs, (size_t)c * sizeof(OutRec));
        if (p == NULL)
            return 0;
        *outs = p;
        *cap = c;
    }
    (*outs)[(*n)++] = rec;
    return 1;
}

enum { RUN_END, RUN_DUE, RUN_PYTHON, RUN_ERROR, RUN_NOMEM };

typedef struct {
    ChainSlots slots;
    Buf buf; /* the encoded entries, one after another */
    OutRec *outs;
    Py_ssize_t n_outs, cap_outs;
    Py_ssize_t due_slot;
} Run;

/* Chain records from `i` until one is not handled, a chain is due, or the end; `*at` gets the
 * index of the next record to look at. Called without the GIL; takes it only for head_for. */
static int run_records(ChainBatch *self, Run *run, Py_ssize_t i, PyObject *head_for, int64_t every_n, double every_s,
                       int64_t max_us, Py_ssize_t *at, PyThreadState **ts) {
    size_t items_cap = (size_t)self->max_len / 2 + 1;
    MapItem *items = malloc(items_cap * sizeof(MapItem));
    char *canon = malloc(audit_bound(self->max_len));
    char *link = malloc(6 * (size_t)self->max_len + 512);
    int status = RUN_END;
    if (items == NULL || canon == NULL || link == NULL)
        status = RUN_NOMEM;
    for (; status == RUN_END && i < self->n; i++) {
        const ChainRec *r = &self->recs[i];
        Audit a;
        if (r->owner == NULL || !parse_audit(r->p, r->n, self->audit_header, items, (Py_ssize_t)items_cap, &a) ||
            !chainable(&a, max_us)) {
            status = RUN_PYTHON;
            break;
        }
        uint64_t h = slot_hash(r->partition, a.env.tenant);
        Py_ssize_t k = slot_find(&run->slots, r->partition, a.env.tenant, h);
        if (k < 0) {
            PyEval_RestoreThread(*ts);
            k = slot_load(&run->slots, r->partition, a.env.tenant, h, head_for, max_us);
            *ts = PyEval_SaveThread();
            if (k < 0) {
                status = RUN_ERROR;
                break;
            }
        }
        ChainSlot *s = &run->slots.items[k];
        if (s->state == SLOT_SKIP) /* its partition was revoked while the batch was fetched */
            continue;
        if (s->state == SLOT_PYTHON) {
            status = RUN_PYTHON;
            break;
        }
        if (s->has_offset && r->offset <= s->last_offset) /* a redelivery: already chained */
            continue;
        /* ChainHead.append: the audit record's hash, the entry, its hash, id and leaf */
        char *end = put_audit(canon, &a); /* never NULL: the time is 2020..max_us */
        unsigned char digest[HASH_LEN], leaf[HASH_LEN];
        char sha_hex[HEX_LEN], e_hash[HEX_LEN], id[ID_LEN];
        sha256(canon, (size_t)(end - canon), digest);
        to_hex(digest, sha_hex);
        int64_t seq = s->size;
        end = put_link(link, a.env.event_id, sha_hex, a.env.tenant, s->last_hash, seq);
        sha256(link, (size_t)(end - link), digest);
        to_hex(digest, e_hash);
        sha256_prefixed(0, link, (size_t)(end - link), leaf);
        entry_id(a.env.event_id.p, seq, id);
        if (!RESERVE(&run->buf, entry_bound(r->n))) {
            status = RUN_NOMEM;
            break;
        }
        unsigned char *o = run->buf.p + run->buf.len;
        unsigned char *done =
            put_entry_record(o, self->entry_header, &a, id, seq, e_hash, s->last_hash, sha_hex, r->partition, r->offset);
        OutRec out = {k, run->buf.len, (size_t)(done - o), a.env.trace_parent};
        if (!outs_push(&run->outs, &run->n_outs, &run->cap_outs, out)) {
            status = RUN_NOMEM;
            break;
        }
        run->buf.len += (size_t)(done - o);
        for (int64_t carry = seq; carry & 1; carry >>= 1)
            node_hash(s->frontier[--s->depth], leaf, leaf);
        memcpy(s->frontier[s->depth++], leaf, HASH_LEN);
        s->has_offset = 1;
        s->last_offset = r->offset;
        s->size = seq + 1;
        memcpy(s->last_hash, e_hash, HEX_LEN);
        memcpy(s->last_event_id, id, ID_LEN);
        s->occurred_us = a.env.occurred_at;
        if (!s->has_pending) {
            s->has_pending = 1;
            s->pending_us = a.env.occurred_at;
        }
        s->appended++;
        if (slot_due(s, a.env.occurred_at, every_n, every_s)) {
            run->due_slot = k;
            status = RUN_DUE;
            i++;
            break;
        }
    }
    free(items);
    free(canon);
    free(link);
    *at = i;
    return status;
}

/* [(partition, [values], [keys], [trace_parent] or None)] in the order partitions first appear. */
static PyObject *run_entries(const Run *run, int trace) {
    PyObject *groups = PyList_New(0);
    Py_ssize_t last = -1;
    int64_t last_partition = 0;
    for (Py_ssize_t i = 0; groups != NULL && i < run->n_outs; i++) {
        const OutRec *o = &run->outs[i];
        const ChainSlot *s = &run->slots.items[o->slot];
        if (last < 0 || s->partition != last_partition) {
            last = -1;
            for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); g++) {
                PyObject *p = PyTuple_GET_ITEM(PyList_GET_ITEM(groups, g), 0);
                if (PyLong_AsLongLong(p) == s->partition) {
                    last = g;
                    break;
                }
            }
            if (last < 0) {
                PyObject *row = Py_BuildValue("(LNNN)", (long long)s->partition, PyList_New(0), PyList_New(0),
                                              trace ? PyList_New(0) : Py_NewRef(Py_None));
                if (row == NULL || PyList_Append(groups, row) < 0) {
                    Py_XDECREF(row);
                    Py_CLEAR(groups);
                    break;
                }
                Py_DECREF(row);
                last = PyList_GET_SIZE(groups) - 1;
            }
            last_partition = s->partition;
        }
        PyObject *row = PyList_GET_ITEM(groups, last);
        PyObject *value = PyBytes_FromStringAndSize((const char *)run->buf.p + o->start, (Py_ssize_t)o->len);
        int bad = value == NULL || PyList_Append(PyTuple_GET_ITEM(row, 1), value) < 0 ||
                  PyList_Append(PyTuple_GET_ITEM(row, 2), s->key) < 0;
        Py_XDECREF(value);
        if (!bad && trace) {
            PyObject *tp = o->trace.p == NULL ? Py_NewRef(Py_None)
                                              : PyUnicode_DecodeUTF8((const char *)o->trace.p, o->trace.n, "strict");
            bad = tp == NULL || PyList_Append(PyTuple_GET_ITEM(row, 3), tp) < 0;
            Py_XDECREF(tp);
        }
        if (bad)
            Py_CLEAR(groups);
    }
    return groups;
}

/* [(head, partition, size, last_hash, frontier, last_offset, last_event_id, last_occurred_us,
 * pending_since_us)] of every chain that got entries. */
static PyObject *run_heads(const Run *run) {
    PyObject *heads = PyList_New(0);
    for (Py_ssize_t k = 0; heads != NULL && k < run->slots.n; k++) {
        const ChainSlot *s = &run->slots.items[k];
        if (s->state != SLOT_LIVE || s->appended == 0)
            continue;
        PyObject *frontier = PyList_New(s->depth);
        for (int d = 0; frontier != NULL && d < s->depth; d++) {
            PyObject *node = PyBytes_FromStringAndSize((const char *)s->frontier[d], HASH_LEN);
            if (node == NULL)
                Py_CLEAR(frontier);
            else
                PyList_SET_ITEM(frontier, d, node);
        }
        PyObject *row = frontier == NULL ? NULL
                                         : Py_BuildValue("(OLLs#NLs#LL)", PyTuple_GET_ITEM(s->info, 0),
                                                         (long long)s->partition, (long long)s->size, s->last_hash,
                                                         (Py_ssize_t)HEX_LEN, frontier, (long long)s->last_offset,
                                                         s->last_event_id, (Py_ssize_t)ID_LEN,
                                                         (long long)s->occurred_us, (long long)s->pending_us);
        if (row == NULL || PyList_Append(heads, row) < 0)
            Py_CLEAR(heads);
        Py_XDECREF(row);
    }
    return heads;
}

static PyObject *ChainBatch_run(ChainBatch *self, PyObject *args) {
    Py_ssize_t start;
    PyObject *head_for;
    long long every_n, max_us;
    double every_s;
    int trace;
    if (!PyArg_ParseTuple(args, "nOLdLp", &start, &head_for, &every_n, &every_s, &max_us, &trace))
        return NULL;
    if (!PyCallable_Check(head_for)) {
        PyErr_SetString(PyExc_TypeError, "head_for must be callable");
        return NULL;
    }
    if (start < 0 || start > self->n) {
        PyErr_SetString(PyExc_IndexError, "start is outside the batch");
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a run of this batch is already on");
        return NULL;
    }
    if (max_us > MAX_US) /* then every time taken has its text (put_time) */
        max_us = MAX_US;
    if (max_us < MIN_EVENT_US) /* nothing is chainable, and no bound below overflows */
        max_us = MIN_EVENT_US - 1;
    self->busy = 1;
    Run run;
    memset(&run, 0, sizeof run);
    run.due_slot = -1;
    Py_ssize_t next = start;
    PyThreadState *ts = PyEval_SaveThread();
    int status = run_records(self, &run, start, head_for, every_n, every_s, max_us, &next, &ts);
    PyEval_RestoreThread(ts);
    PyObject *result = NULL;
    if (status == RUN_NOMEM)
        PyErr_NoMemory();
    else if (status != RUN_ERROR) {
        PyObject *entries = run_entries(&run, trace);
        PyObject *heads = entries == NULL ? NULL : run_heads(&run);
        PyObject *due = NULL;
        if (heads != NULL) {
            if (status == RUN_DUE) {
                const ChainSlot *s = &run.slots.items[run.due_slot];
                due = Py_BuildValue("(OL)", PyTuple_GET_ITEM(s->info, 0), (long long)s->partition);
            } else
                due = Py_NewRef(Py_None);
        }
        if (due != NULL)
            result = Py_BuildValue("(nNNN)", next, due, entries, heads);
        else {
            Py_XDECREF(entries);
            Py_XDECREF(heads);
        }
    }
    slots_free(&run.slots);
    free(run.buf.p);
    free(run.outs);
    self->busy = 0;
    return result;
}

static void chain_recs_free(ChainRec *recs, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(recs[i].owner);
    PyMem_Free(recs);
}

/* One record: a (value, partition, offset) tuple, or a confluent-kafka Message (value(),
 * partition(), offset(); `offset() or 0` as the worker). A value that is not bytes, or no
 * partition, leaves the record to Python. 0 with an exception set on error. */
static int chain_rec(ModState *st, PyObject *item, ChainRec *r) {
    PyObject *value, *partition, *offset;
    memset(r, 0, sizeof *r);
    if (PyTuple_Check(item)) {
        if (PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_TypeError, "a record is a Message or a (value, partition, offset) tuple");
            return 0;
        }
        value = Py_NewRef(PyTuple_GET_ITEM(item, 0));
        partition = Py_NewRef(PyTuple_GET_ITEM(item, 1));
        offset = Py_NewRef(PyTuple_GET_ITEM(item, 2));
    } else {
        value = PyObject_CallMethodNoArgs(item, st->value);
        partition = value == NULL ? NULL : PyObject_CallMethodNoArgs(item, st->partition);
        offset = partition == NULL ? NULL : PyObject_CallMethodNoArgs(item, st->offset);
        if (offset == NULL) {
            Py_XDECREF(value);
            Py_XDECREF(partition);
            return 0;
        }
    }
    int ok = 1;
    int64_t p = 0, off = 0;
    int handled = PyBytes_CheckExact(value) && partition != Py_None;
    if (handled) {
        ok = (p = PyLong_AsLongLong(partition)) != -1 || !PyErr_Occurred();
        if (ok && offset != Py_None)
            ok = (off = PyLong_AsLongLong(offset)) != -1 || !PyErr_Occurred();
        if (ok && (p < INT32_MIN || p > INT32_MAX)) /* an Avro int in the entry */
            handled = 0;
    }
    if (ok && handled) {
        r->owner = Py_NewRef(value);
        r->p = (const unsigned char *)PyBytes_AS_STRING(value);
        r->n = PyBytes_GET_SIZE(value);
        r->partition = p;
        r->offset = off;
    }
    Py_DECREF(value);
    Py_DECREF(partition);
    Py_DECREF(offset);
    return ok;
}

static PyObject *ChainBatch_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"records", "audit_header", "entry_header", NULL};
    PyObject *items, *ah, *eh;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO", kwlist, &items, &ah, &eh))
        return NULL;
    ModState *st = PyType_GetModuleState(type);
    if (st == NULL)
        return NULL;
    ChainBatch *self = (ChainBatch *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (!header_arg(ah, self->audit_header) || !header_arg(eh, self->entry_header)) {
        Py_DECREF(self);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(items, "records must be a sequence");
    if (seq == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    self->recs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(ChainRec));
    if (self->recs == NULL) {
        Py_DECREF(seq);
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    PyObject **it = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!chain_rec(st, it[i], &self->recs[i])) {
            Py_DECREF(seq);
            Py_DECREF(self);
            return NULL;
        }
        self->n = i + 1;
        if (self->recs[i].n > self->max_len)
            self->max_len = self->recs[i].n;
    }
    Py_DECREF(seq);
    return (PyObject *)self;
}

static void ChainBatch_dealloc(ChainBatch *self) {
    PyTypeObject *tp = Py_TYPE(self);
    if (self->recs != NULL)
        chain_recs_free(self->recs, self->n);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *ChainBatch_len(ChainBatch *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->n);
}

static PyMethodDef ChainBatch_methods[] = {
    {"run", (PyCFunction)ChainBatch_run, METH_VARARGS,
     "run(start, head_for, every_n, every_s, max_us, trace) -> (next, due, entries, heads): chain from `start` "
     "until a record is not handled (next < len, due None), a chain is due ((head, partition)) or the end."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ChainBatch_getset[] = {
    {"size", (getter)ChainBatch_len, NULL, "records in the batch", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot ChainBatch_slots[] = {
    {Py_tp_new, ChainBatch_new},
    {Py_tp_dealloc, ChainBatch_dealloc},
    {Py_tp_methods, ChainBatch_methods},
    {Py_tp_getset, ChainBatch_getset},
    {Py_tp_doc, "One batch of audit-topic records, chained into LedgerEntryChained records (see the C source)."},
    {0, NULL},
};

static PyType_Spec ChainBatch_spec = {
    "domain._ledger_native.ChainBatch", sizeof(ChainBatch), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    ChainBatch_slots,
};

/* ---- module functions (the differential tests' handles) --------------------------------- */

static PyObject *audit_canonical(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer value, header;
    if (!PyArg_ParseTuple(args, "y*y*", &value, &header))
        return NULL;
    PyObject *result = NULL;
    if (header.len != HEADER_LEN) {
        PyErr_SetString(PyExc_ValueError, "a header is 10 bytes (C3 01 + 8-byte fingerprint)");
        goto done;
    }
    size_t cap = (size_t)value.len / 2 + 1;
    MapItem *items = PyMem_Malloc(cap * sizeof(MapItem));
    char *out = PyMem_Malloc(audit_bound(value.len));
    if (items == NULL || out == NULL) {
        PyMem_Free(items);
        PyMem_Free(out);
        PyErr_NoMemory();
        goto done;
    }
    Audit a;
    char *end = NULL;
    if (parse_audit(value.buf, value.len, header.buf, items, (Py_ssize_t)cap, &a))
        end = put_audit(out, &a);
    if (end == NULL) {
        Py_INCREF(Py_None);
        result = Py_None;
    } else
        result = PyBytes_FromStringAndSize(out, end - out);
    PyMem_Free(items);
    PyMem_Free(out);
done:
    PyBuffer_Release(&value);
    PyBuffer_Release(&header);
    return result;
}

static PyObject *entry_fields(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer value, header;
    if (!PyArg_ParseTuple(args, "y*y*", &value, &header))
        return NULL;
    PyObject *result = NULL;
    if (header.len != HEADER_LEN) {
        PyErr_SetString(PyExc_ValueError, "a header is 10 bytes (C3 01 + 8-byte fingerprint)");
        goto done;
    }
    Entry e;
    if (!parse_entry(value.buf, value.len, header.buf, &e)) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    char *out = PyMem_Malloc(6 * (size_t)value.len + 256);
    if (out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    char *end = put_entry(out, &e);
    result = Py_BuildValue("(s#s#Ls#s#s#s#y#)", (const char *)e.env.tenant.p, e.env.tenant.n,
                           (const char *)e.chain_tenant.p, e.chain_tenant.n, (long long)e.seq,
                           (const char *)e.prev_hash.p, e.prev_hash.n, (const char *)e.audit_event_id.p,
                           e.audit_event_id.n, (const char *)e.audit_sha256.p, e.audit_sha256.n,
                           (const char *)e.entry_hash.p, e.entry_hash.n, out, (Py_ssize_t)(end - out));
    PyMem_Free(out);
done:
    PyBuffer_Release(&value);
    PyBuffer_Release(&header);
    return result;
}

static PyObject *merkle_roots(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer leaves;
    PyObject *sizes;
    if (!PyArg_ParseTuple(args, "y*O", &leaves, &sizes))
        return NULL;
    PyObject *out = NULL;
    if (leaves.len % HASH_LEN)
        PyErr_SetString(PyExc_ValueError, "leaf hashes are 32 bytes each");
    else
        out = roots_list(leaves.buf, leaves.len / HASH_LEN, sizes);
    PyBuffer_Release(&leaves);
    return out;
}

static PyMethodDef module_methods[] = {
    {"audit_canonical", audit_canonical, METH_VARARGS,
     "audit_canonical(value, header) -> canonical bytes of an AuditRecorded v1 record, or None if not handled."},
    {"entry_fields", entry_fields, METH_VARARGS,
     "entry_fields(value, header) -> (tenant, chain_tenant, seq, prev_hash, audit_event_id, audit_sha256, "
     "entry_hash, entry bytes) of a LedgerEntryChained v1 record, or None if not handled."},
    {"merkle_roots", merkle_roots, METH_VARARGS,
     "merkle_roots(leaf_hashes, sizes) -> RFC 9162 roots of the first m leaves for each m (ascending, 1..n)."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module) {
    ModState *st = PyModule_GetState(module);
    st->value = PyUnicode_InternFromString("value");
    st->partition = PyUnicode_InternFromString("partition");
    st->key = PyUnicode_InternFromString("key");
    st->error = PyUnicode_InternFromString("error");
    st->offset = PyUnicode_InternFromString("offset");
    if (!st->value || !st->partition || !st->key || !st->error || !st->offset)
        return -1;
    PyObject *type = PyType_FromModuleAndSpec(module, &LogVerifier_spec, NULL);
    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, "LogVerifier", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    type = PyType_FromModuleAndSpec(module, &ChainBatch_spec, NULL);
    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, "ChainBatch", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

static int module_traverse(PyObject *module, visitproc visit, void *arg) {
    ModState *st = PyModule_GetState(module);
    if (st) {
        Py_VISIT(st->value);
        Py_VISIT(st->partition);
        Py_VISIT(st->key);
        Py_VISIT(st->error);
        Py_VISIT(st->offset);
    }
    return 0;
}

static int module_clear(PyObject *module) {
    ModState *st = PyModule_GetState(module);
    if (st) {
        Py_CLEAR(st->value);
        Py_CLEAR(st->partition);
        Py_CLEAR(st->key);
        Py_CLEAR(st->error);
        Py_CLEAR(st->offset);
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_ledger_native",
    "The audit ledger's per-record hashing for `audit verify` from the log (see the C source's header).",
    sizeof(ModState), module_methods, module_slots, module_traverse, module_clear, NULL,
};

PyMODINIT_FUNC PyInit__ledger_native(void) {
    return PyModuleDef_Init(&module_def);
}
