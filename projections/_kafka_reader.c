/* A Kafka reader for replay that hands Python whole runs of records instead of Message objects.
 *
 * Why (issue 10, replay >= 250k events/s): confluent-kafka's consume() builds a GC-tracked
 * Message per record (plus its topic str, key and value bytes) and the sink then maps its
 * accessors over them: ~2 µs of GIL-holding driver CPU per record, on two cores shared with the
 * inserter. Here librdkafka's messages are grouped in C into runs (consecutive records of one
 * partition whose values share the 10-byte single-object header), so the per-record Python
 * work is the value bytes, the key and the offset int.
 *
 * librdkafka is not linked at build time: `Reader(lib_path, config)` dlopen()s the library
 * confluent-kafka loaded (projections/kafka_reader.py finds it) and dlsym()s the functions
 * below into the Reader (no global mutable state). Only librdkafka's public, ABI-stable API is
 * used; its types are declared here (rdkafka.h: rd_kafka_message_t, the partition list, the
 * metadata structs, the error codes), so the extension builds without librdkafka-dev.
 *
 * `read(max, timeout)` returns a list of items in delivery order:
 *   run:   (topic, partition, header, offsets, keys, values)  6 items, item[0] a str
 *   odd:   (topic, partition, offset, key, value)             5 items: a NULL or < 10-byte value
 *   error: (code, fatal, message, topic | None, partition, offset)  6 items, item[0] an int
 * Every rkmessage is destroyed before read returns; the GIL is released only while librdkafka
 * waits. librdkafka's log lines go to a queue of our own (log.queue) and are handed, after each
 * call that may produce them, to the `logger(level, facility, message)` given to the Reader.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#define HEADER_LEN 10
#define MAX_BATCH 1000000
#define TOPIC_CACHE 64

/* --- librdkafka's public types (rdkafka.h; stable ABI) ----------------------------------- */
typedef struct rd_kafka_s rd_kafka_t;
typedef struct rd_kafka_conf_s rd_kafka_conf_t;
typedef struct rd_kafka_topic_s rd_kafka_topic_t;
typedef struct rd_kafka_queue_s rd_kafka_queue_t;
typedef struct rd_kafka_op_s rd_kafka_event_t;
typedef struct rd_kafka_error_s rd_kafka_error_t;
typedef int rd_kafka_resp_err_t;

#define RD_KAFKA_CONSUMER 1
#define RD_KAFKA_CONF_OK 0
#define RD_KAFKA_EVENT_LOG 0x4
#define ERR_NO_ERROR 0
#define ERR__FATAL (-150)
#define ERR__PARTITION_EOF (-191)

typedef struct {
    rd_kafka_resp_err_t err;
    rd_kafka_topic_t *rkt;
    int32_t partition;
    void *payload;
    size_t len;
    void *key;
    size_t key_len;
    int64_t offset;
    void *_private;
} rd_kafka_message_t;

typedef struct {
    char *topic;
    int32_t partition;
    int64_t offset;
    void *metadata;
    size_t metadata_size;
    void *opaque;
    rd_kafka_resp_err_t err;
    void *_private;
} rd_kafka_topic_partition_t;

typedef struct {
    int cnt;
    int size;
    rd_kafka_topic_partition_t *elems;
} rd_kafka_topic_partition_list_t;

typedef struct {
    int32_t id;
    char *host;
    int port;
} rd_kafka_metadata_broker_t;

typedef struct {
    int32_t id;
    rd_kafka_resp_err_t err;
    int32_t leader;
    int replica_cnt;
    int32_t *replicas;
    int isr_cnt;
    int32_t *isrs;
} rd_kafka_metadata_partition_t;

typedef struct {
    char *topic;
    int partition_cnt;
    rd_kafka_metadata_partition_t *partitions;
    rd_kafka_resp_err_t err;
} rd_kafka_metadata_topic_t;

typedef struct {
    int broker_cnt;
    rd_kafka_metadata_broker_t *brokers;
    int topic_cnt;
    rd_kafka_metadata_topic_t *topics;
    int32_t orig_broker_id;
    char *orig_broker_name;
} rd_kafka_metadata_t;

/* The functions used, resolved per Reader from the library it was given. */
typedef struct {
    int (*version)(void);
    rd_kafka_conf_t *(*conf_new)(void);
    int (*conf_set)(rd_kafka_conf_t *, const char *, const char *, char *, size_t);
    void (*conf_destroy)(rd_kafka_conf_t *);
    rd_kafka_t *(*new_)(int, rd_kafka_conf_t *, char *, size_t);
    void (*destroy)(rd_kafka_t *);
    rd_kafka_resp_err_t (*consumer_close)(rd_kafka_t *);
    rd_kafka_resp_err_t (*poll_set_consumer)(rd_kafka_t *);
    rd_kafka_queue_t *(*queue_get_consumer)(rd_kafka_t *);
    rd_kafka_queue_t *(*queue_new)(rd_kafka_t *);
    void (*queue_destroy)(rd_kafka_queue_t *);
    rd_kafka_resp_err_t (*set_log_queue)(rd_kafka_t *, rd_kafka_queue_t *);
    rd_kafka_event_t *(*queue_poll)(rd_kafka_queue_t *, int);
    int (*event_type)(const rd_kafka_event_t *);
    int (*event_log)(rd_kafka_event_t *, const char **, const char **, int *);
    void (*event_destroy)(rd_kafka_event_t *);
    ssize_t (*consume_batch_queue)(rd_kafka_queue_t *, int, rd_kafka_message_t **, size_t);
    void (*message_destroy)(rd_kafka_message_t *);
    const char *(*topic_name)(const rd_kafka_topic_t *);
    const char *(*err2str)(rd_kafka_resp_err_t);
    rd_kafka_resp_err_t (*last_error)(void);
    rd_kafka_topic_partition_list_t *(*list_new)(int);
    rd_kafka_topic_partition_t *(*list_add)(rd_kafka_topic_partition_list_t *, const char *, int32_t);
    void (*list_destroy)(rd_kafka_topic_partition_list_t *);
    rd_kafka_resp_err_t (*assign)(rd_kafka_t *, const rd_kafka_topic_partition_list_t *);
    rd_kafka_resp_err_t (*pause_partitions)(rd_kafka_t *, rd_kafka_topic_partition_list_t *);
    rd_kafka_resp_err_t (*resume_partitions)(rd_kafka_t *, rd_kafka_topic_partition_list_t *);
    rd_kafka_error_t *(*seek_partitions)(rd_kafka_t *, rd_kafka_topic_partition_list_t *, int);
    const char *(*error_string)(const rd_kafka_error_t *);
    void (*error_destroy)(rd_kafka_error_t *);
    rd_kafka_resp_err_t (*position)(rd_kafka_t *, rd_kafka_topic_partition_list_t *);
    rd_kafka_resp_err_t (*committed)(rd_kafka_t *, rd_kafka_topic_partition_list_t *, int);
    rd_kafka_resp_err_t (*query_watermark_offsets)(rd_kafka_t *, const char *, int32_t, int64_t *, int64_t *, int);
    rd_kafka_resp_err_t (*metadata)(rd_kafka_t *, int, rd_kafka_topic_t *, const rd_kafka_metadata_t **, int);
    void (*metadata_destroy)(const rd_kafka_metadata_t *);
} Fns;

static const struct {
    const char *name;
    size_t at;
} SYMBOLS[] = {
#define SYM(field, sym) {sym, offsetof(Fns, field)}
    SYM(version, "rd_kafka_version"),
    SYM(conf_new, "rd_kafka_conf_new"),
    SYM(conf_set, "rd_kafka_conf_set"),
    SYM(conf_destroy, "rd_kafka_conf_destroy"),
    SYM(new_, "rd_kafka_new"),
    SYM(destroy, "rd_kafka_destroy"),
    SYM(consumer_close, "rd_kafka_consumer_close"),
    SYM(poll_set_consumer, "rd_kafka_poll_set_consumer"),
    SYM(queue_get_consumer, "rd_kafka_queue_get_consumer"),
    SYM(queue_new, "rd_kafka_queue_new"),
    SYM(queue_destroy, "rd_kafka_queue_destroy"),
    SYM(set_log_queue, "rd_kafka_set_log_queue"),
    SYM(queue_poll, "rd_kafka_queue_poll"),
    SYM(event_type, "rd_kafka_event_type"),
    SYM(event_log, "rd_kafka_event_log"),
    SYM(event_destroy, "rd_kafka_event_destroy"),
    SYM(consume_batch_queue, "rd_kafka_consume_batch_queue"),
    SYM(message_destroy, "rd_kafka_message_destroy"),
    SYM(topic_name, "rd_kafka_topic_name"),
    SYM(err2str, "rd_kafka_err2str"),
    SYM(last_error, "rd_kafka_last_error"),
    SYM(list_new, "rd_kafka_topic_partition_list_new"),
    SYM(list_add, "rd_kafka_topic_partition_list_add"),
    SYM(list_destroy, "rd_kafka_topic_partition_list_destroy"),
    SYM(assign, "rd_kafka_assign"),
    SYM(pause_partitions, "rd_kafka_pause_partitions"),
    SYM(resume_partitions, "rd_kafka_resume_partitions"),
    SYM(seek_partitions, "rd_kafka_seek_partitions"),
    SYM(error_string, "rd_kafka_error_string"),
    SYM(error_destroy, "rd_kafka_error_destroy"),
    SYM(position, "rd_kafka_position"),
    SYM(committed, "rd_kafka_committed"),
    SYM(query_watermark_offsets, "rd_kafka_query_watermark_offsets"),
    SYM(metadata, "rd_kafka_metadata"),
    SYM(metadata_destroy, "rd_kafka_metadata_destroy"),
#undef SYM
};

typedef struct {
    PyObject_HEAD
    void *dl;
    Fns f;
    rd_kafka_t *rk;
    rd_kafka_queue_t *q;    /* the consumer queue (main queue forwarded to it) */
    rd_kafka_queue_t *logq; /* librdkafka's log lines, drained into `logger` */
    PyObject *logger;       /* callable(level, facility, message) or None */
    rd_kafka_message_t **buf;
    size_t bufcap;
    int busy; /* a call with the GIL released is in progress: no other call may touch rk */
    struct {
        const rd_kafka_topic_t *rkt;
        PyObject *name;
    } topics[TOPIC_CACHE]; /* interned topic names per topic handle */
    int ntopics;
} Reader;

static int
usable(Reader *self)
{
    if (self->rk == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the reader is closed");
        return 0;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the reader is in use by another thread");
        return 0;
    }
    return 1;
}

static PyObject *
kafka_error(Reader *self, const char *what, rd_kafka_resp_err_t err)
{
    PyErr_Format(PyExc_RuntimeError, "%s: %s (%d)", what, self->f.err2str(err), err);
    return NULL;
}

/* librdkafka's queued log lines → logger (a failing logger is reported, never raised; an
 * exception already pending, e.g. from building a read's items, is kept as it is). The reader is
 * marked busy while the logger runs: a logger (or another thread, while the logger does I/O) that
 * calls back into the reader gets "in use" instead of closing it under this loop. */
static void
drain_logs(Reader *self)
{
    if (self->logq == NULL)
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int was_busy = self->busy;
    self->busy = 1;
    rd_kafka_event_t *ev;
    while (self->logq != NULL && (ev = self->f.queue_poll(self->logq, 0)) != NULL) {
        const char *fac = NULL, *str = NULL;
        int level = 6;
        if (self->f.event_type(ev) == RD_KAFKA_EVENT_LOG && self->f.event_log(ev, &fac, &str, &level) == 0 &&
            self->logger != Py_None) {
            PyObject *r = PyObject_CallFunction(self->logger, "iss", level, fac ? fac : "", str ? str : "");
            if (r == NULL)
                PyErr_WriteUnraisable(self->logger);
            Py_XDECREF(r);
        }
        self->f.event_destroy(ev);
    }
    self->busy = was_busy;
    PyErr_Restore(type, value, tb);
}

static PyObject *
topic_str(Reader *self, const rd_kafka_topic_t *rkt)
{
    const char *name = rkt ? self->f.topic_name(rkt) : NULL;
    for (int i = 0; name != NULL && i < self->ntopics; i++) {
        /* the name is compared too: a handle freed after an unassign may be reused for another topic */
        const char *cached = PyUnicode_AsUTF8(self->topics[i].name);
        if (self->topics[i].rkt == rkt && cached != NULL && strcmp(cached, name) == 0) {
            Py_INCREF(self->topics[i].name);
            return self->topics[i].name;
        }
    }
    PyObject *s = PyUnicode_DecodeUTF8(name ? name : "", name ? (Py_ssize_t)strlen(name) : 0, "replace");
    if (s == NULL)
        return NULL;
    PyUnicode_InternInPlace(&s);
    if (rkt != NULL && self->ntopics < TOPIC_CACHE) {
        self->topics[self->ntopics].rkt = rkt;
        Py_INCREF(s);
        self->topics[self->ntopics].name = s;
        self->ntopics++;
    }
    return s;
}

static PyObject *
bytes_or_none(const void *p, size_t len)
{
    if (p == NULL)
        Py_RETURN_NONE;
    if (len > (size_t)PY_SSIZE_T_MAX) {
        PyErr_SetString(PyExc_OverflowError, "record too large");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)len);
}

/* --- construction ------------------------------------------------------------------------ */

static void
release(Reader *self)
{
    if (self->q) {
        self->f.queue_destroy(self->q);
        self->q = NULL;
    }
    if (self->rk) {
        Py_BEGIN_ALLOW_THREADS self->f.consumer_close(self->rk);
        Py_END_ALLOW_THREADS drain_logs(self);
        if (self->logq) {
            self->f.queue_destroy(self->logq);
            self->logq = NULL;
        }
        rd_kafka_t *rk = self->rk;
        self->rk = NULL;
        Py_BEGIN_ALLOW_THREADS self->f.destroy(rk);
        Py_END_ALLOW_THREADS
    }
    else if (self->logq) {
        self->f.queue_destroy(self->logq);
        self->logq = NULL;
    }
}

static int
Reader_init(Reader *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"lib_path", "config", "logger", NULL};
    const char *path;
    PyObject *config, *logger = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sO!|O", kwlist, &path, &PyDict_Type, &config, &logger))
        return -1;
    if (self->dl != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Reader already initialised");
        return -1;
    }
    if (logger != Py_None && !PyCallable_Check(logger)) {
        PyErr_SetString(PyExc_TypeError, "logger must be callable or None");
        return -1;
    }
    self->dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (self->dl == NULL) {
        const char *e = dlerror();
        PyErr_Format(PyExc_OSError, "cannot load librdkafka from %s: %s", path, e ? e : "?");
        return -1;
    }
    for (size_t i = 0; i < sizeof(SYMBOLS) / sizeof(SYMBOLS[0]); i++) {
        void *sym = dlsym(self->dl, SYMBOLS[i].name);
        if (sym == NULL) {
            PyErr_Format(PyExc_OSError, "%s lacks %s", path, SYMBOLS[i].name);
            return -1;
        }
        memcpy((char *)&self->f + SYMBOLS[i].at, &sym, sizeof(sym));
    }
    Py_INCREF(logger);
    Py_XSETREF(self->logger, logger);

    char errstr[512];
    rd_kafka_conf_t *conf = self->f.conf_new();
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(config, &pos, &k, &v)) {
        const char *ks = PyUnicode_Check(k) ? PyUnicode_AsUTF8(k) : NULL;
        const char *vs = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
        if (ks == NULL || vs == NULL) {
            self->f.conf_destroy(conf);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "config keys and values must be str");
            return -1;
        }
        if (self->f.conf_set(conf, ks, vs, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK) {
            self->f.conf_destroy(conf);
            PyErr_Format(PyExc_ValueError, "%s: %s", ks, errstr);
            return -1;
        }
    }
    if (self->f.conf_set(conf, "log.queue", "true", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK) {
        self->f.conf_destroy(conf);
        PyErr_Format(PyExc_ValueError, "log.queue: %s", errstr);
        return -1;
    }
    rd_kafka_t *rk = self->f.new_(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
    if (rk == NULL) {
        self->f.conf_destroy(conf);
        PyErr_Format(PyExc_RuntimeError, "rd_kafka_new: %s", errstr);
        return -1;
    }
    self->rk = rk;
    self->logq = self->f.queue_new(rk);
    rd_kafka_resp_err_t err = self->f.set_log_queue(rk, self->logq);
    if (err == ERR_NO_ERROR)
        err = self->f.poll_set_consumer(rk);
    if (err != ERR_NO_ERROR) {
        kafka_error(self, "rd_kafka_poll_set_consumer", err);
        release(self);
        return -1;
    }
    self->q = self->f.queue_get_consumer(rk);
    if (self->q == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "rd_kafka_queue_get_consumer: no consumer queue");
        release(self);
        return -1;
    }
    return 0;
}

static void
Reader_dealloc(Reader *self)
{
    release(self);
    for (int i = 0; i < self->ntopics; i++)
        Py_CLEAR(self->topics[i].name);
    self->ntopics = 0;
    PyMem_Free(self->buf);
    Py_CLEAR(self->logger);
    if (self->dl)
        dlclose(self->dl);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* --- partition lists ----------------------------------------------------------------------- */

/* [(topic, partition[, offset]), ...] → a new list (offset -1001, RD_KAFKA_OFFSET_INVALID, when absent) */
static rd_kafka_topic_partition_list_t *
to_list(Reader *self, PyObject *seq, int with_offset)
{
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of tuples");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > INT32_MAX) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many partitions");
        return NULL;
    }
    rd_kafka_topic_partition_list_t *list = self->f.list_new((int)(n > 0 ? n : 1));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        const char *topic;
        int partition;
        long long offset = -1001;
        int ok = with_offset ? PyArg_ParseTuple(item, "si|L", &topic, &partition, &offset)
                             : PyArg_ParseTuple(item, "si", &topic, &partition);
        if (!ok) {
            self->f.list_destroy(list);
            Py_DECREF(fast);
            return NULL;
        }
        rd_kafka_topic_partition_t *tp = self->f.list_add(list, topic, (int32_t)partition);
        tp->offset = offset;
    }
    Py_DECREF(fast);
    return list;
}

static PyObject *
Reader_assign(Reader *self, PyObject *seq)
{
    if (!usable(self))
        return NULL;
    rd_kafka_topic_partition_list_t *list = to_list(self, seq, 1);
    if (list == NULL)
        return NULL;
    rd_kafka_resp_err_t err = self->f.assign(self->rk, list);
    self->f.list_destroy(list);
    if (err != ERR_NO_ERROR)
        return kafka_error(self, "assign", err);
    Py_RETURN_NONE;
}

static PyObject *
pause_or_resume(Reader *self, PyObject *seq, int pause)
{
    if (!usable(self))
        return NULL;
    rd_kafka_topic_partition_list_t *list = to_list(self, seq, 0);
    if (list == NULL)
        return NULL;
    rd_kafka_resp_err_t err =
        pause ? self->f.pause_partitions(self->rk, list) : self->f.resume_partitions(self->rk, list);
    for (int i = 0; err == ERR_NO_ERROR && i < list->cnt; i++)
        err = list->elems[i].err;
    self->f.list_destroy(list);
    if (err != ERR_NO_ERROR)
        return kafka_error(self, pause ? "pause" : "resume", err);
    Py_RETURN_NONE;
}

static PyObject *
Reader_pause(Reader *self, PyObject *seq)
{
    return pause_or_resume(self, seq, 1);
}

static PyObject *
Reader_resume(Reader *self, PyObject *seq)
{
    return pause_or_resume(self, seq, 0);
}

static PyObject *
Reader_seek(Reader *self, PyObject *args)
{
    const char *topic;
    int partition;
    long long offset;
    if (!PyArg_ParseTuple(args, "siL", &topic, &partition, &offset) || !usable(self))
        return NULL;
    rd_kafka_topic_partition_list_t *list = self->f.list_new(1);
    self->f.list_add(list, topic, (int32_t)partition)->offset = offset;
    rd_kafka_error_t *error;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS error = self->f.seek_partitions(self->rk, list, -1);
    Py_END_ALLOW_THREADS self->busy = 0;
    rd_kafka_resp_err_t err = list->elems[0].err;
    self->f.list_destroy(list);
    if (error != NULL) {
        PyErr_Format(PyExc_RuntimeError, "seek: %s", self->f.error_string(error));
        self->f.error_destroy(error);
        return NULL;
    }
    if (err != ERR_NO_ERROR)
        return kafka_error(self, "seek", err);
    Py_RETURN_NONE;
}

/* position (no wait) or committed (asks the group coordinator, GIL released) → [offset, ...] */
static PyObject *
offsets_of(Reader *self, PyObject *args, int committed)
{
    PyObject *seq;
    double timeout = 10.0;
    if (!PyArg_ParseTuple(args, committed ? "O|d" : "O", &seq, &timeout) || !usable(self))
        return NULL;
    rd_kafka_topic_partition_list_t *list = to_list(self, seq, 0);
    if (list == NULL)
        return NULL;
    rd_kafka_resp_err_t err;
    if (committed) {
        int ms = timeout < 0 ? -1 : (timeout > 3600.0 ? 3600000 : (int)(timeout * 1000.0));
        self->busy = 1;
        Py_BEGIN_ALLOW_THREADS err = self->f.committed(self->rk, list, ms);
        Py_END_ALLOW_THREADS self->busy = 0;
    }
    else
        err = self->f.position(self->rk, list);
    if (err != ERR_NO_ERROR) {
        self->f.list_destroy(list);
        return kafka_error(self, committed ? "committed" : "position", err);
    }
    PyObject *out = PyList_New(list->cnt);
    for (int i = 0; out != NULL && i < list->cnt; i++) {
        PyObject *o = PyLong_FromLongLong(list->elems[i].offset);
        if (o == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, o);
    }
    self->f.list_destroy(list);
    return out;
}

static PyObject *
Reader_position(Reader *self, PyObject *args)
{
    return offsets_of(self, args, 0);
}

static PyObject *
Reader_committed(Reader *self, PyObject *args)
{
    return offsets_of(self, args, 1);
}

static int
timeout_ms(double timeout)
{
    if (timeout < 0)
        return -1;
    return timeout > 3600.0 ? 3600000 : (int)(timeout * 1000.0);
}

static PyObject *
Reader_watermarks(Reader *self, PyObject *args)
{
    const char *topic;
    int partition;
    double timeout;
    if (!PyArg_ParseTuple(args, "sid", &topic, &partition, &timeout) || !usable(self))
        return NULL;
    int64_t low = -1, high = -1;
    rd_kafka_resp_err_t err;
    int ms = timeout_ms(timeout);
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS err = self->f.query_watermark_offsets(self->rk, topic, (int32_t)partition, &low, &high, ms);
    Py_END_ALLOW_THREADS self->busy = 0;
    drain_logs(self);
    if (err != ERR_NO_ERROR)
        return kafka_error(self, "watermarks", err);
    return Py_BuildValue("(LL)", (long long)low, (long long)high);
}

/* every topic the cluster has → its partition ids (one metadata request) */
static PyObject *
Reader_topics(Reader *self, PyObject *args)
{
    double timeout;
    if (!PyArg_ParseTuple(args, "d", &timeout) || !usable(self))
        return NULL;
    const rd_kafka_metadata_t *md = NULL;
    rd_kafka_resp_err_t err;
    int ms = timeout_ms(timeout);
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS err = self->f.metadata(self->rk, 1, NULL, &md, ms);
    Py_END_ALLOW_THREADS self->busy = 0;
    drain_logs(self);
    if (err != ERR_NO_ERROR)
        return kafka_error(self, "metadata", err);
    PyObject *out = PyDict_New();
    for (int i = 0; out != NULL && md != NULL && i < md->topic_cnt; i++) {
        const rd_kafka_metadata_topic_t *t = &md->topics[i];
        if (t->topic == NULL || t->err != ERR_NO_ERROR || t->partition_cnt < 0)
            continue;
        PyObject *ids = PyList_New(t->partition_cnt);
        for (int j = 0; ids != NULL && j < t->partition_cnt; j++) {
            PyObject *id = PyLong_FromLong(t->partitions[j].id);
            if (id == NULL)
                Py_CLEAR(ids);
            else
                PyList_SET_ITEM(ids, j, id);
        }
        if (ids == NULL || PyDict_SetItemString(out, t->topic, ids) < 0)
            Py_CLEAR(out);
        Py_XDECREF(ids);
    }
    if (md != NULL)
        self->f.metadata_destroy(md);
    return out;
}

static PyObject *
Reader_close(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the reader is in use by another thread");
        return NULL;
    }
    self->busy = 1;
    release(self);
    self->busy = 0;
    Py_RETURN_NONE;
}

/* --- read ------------------------------------------------------------------------------------ */

static int
is_run_record(const rd_kafka_message_t *m)
{
    return m->err == ERR_NO_ERROR && m->payload != NULL && m->len >= HEADER_LEN;
}

/* messages [i, j) (same partition, same header, ascending offsets) → a run tuple */
static PyObject *
make_run(Reader *self, rd_kafka_message_t **ms, Py_ssize_t i, Py_ssize_t j)
{
    Py_ssize_t k = j - i;
    PyObject *topic = topic_str(self, ms[i]->rkt);
    PyObject *offsets = PyList_New(k), *keys = PyList_New(k), *values = PyList_New(k);
    PyObject *header = PyBytes_FromStringAndSize((const char *)ms[i]->payload, HEADER_LEN);
    if (topic == NULL || offsets == NULL || keys == NULL || values == NULL || header == NULL)
        goto fail;
    for (Py_ssize_t x = 0; x < k; x++) {
        const rd_kafka_message_t *m = ms[i + x];
        PyObject *o = PyLong_FromLongLong(m->offset);
        if (o == NULL)
            goto fail;
        PyList_SET_ITEM(offsets, x, o);
        PyObject *key = bytes_or_none(m->key, m->key_len);
        if (key == NULL)
            goto fail;
        PyList_SET_ITEM(keys, x, key);
        PyObject *v = bytes_or_none(m->payload, m->len);
        if (v == NULL)
            goto fail;
        PyList_SET_ITEM(values, x, v);
    }
    return Py_BuildValue("(NiNNNN)", topic, (int)ms[i]->partition, header, offsets, keys, values);
fail:
    Py_XDECREF(topic);
    Py_XDECREF(offsets);
    Py_XDECREF(keys);
    Py_XDECREF(values);
    Py_XDECREF(header);
    return NULL;
}

static PyObject *
make_other(Reader *self, const rd_kafka_message_t *m)
{
    if (m->err != ERR_NO_ERROR) {
        /* an error's payload, when set, is its message (rd_kafka_message_errstr) */
        PyObject *text = m->payload != NULL && m->len <= (size_t)PY_SSIZE_T_MAX
                             ? PyUnicode_DecodeUTF8((const char *)m->payload, (Py_ssize_t)m->len, "replace")
                             : PyUnicode_FromString(self->f.err2str(m->err));
        PyObject *topic = m->rkt ? topic_str(self, m->rkt) : (Py_INCREF(Py_None), Py_None);
        if (text == NULL || topic == NULL) {
            Py_XDECREF(text);
            Py_XDECREF(topic);
            return NULL;
        }
        return Py_BuildValue("(iONNiL)", m->err, m->err == ERR__FATAL ? Py_True : Py_False, text, topic,
                             (int)m->partition, (long long)m->offset);
    }
    PyObject *topic = topic_str(self, m->rkt);
    PyObject *key = bytes_or_none(m->key, m->key_len);
    PyObject *value = bytes_or_none(m->payload, m->len);
    if (topic == NULL || key == NULL || value == NULL) {
        Py_XDECREF(topic);
        Py_XDECREF(key);
        Py_XDECREF(value);
        return NULL;
    }
    return Py_BuildValue("(NiLNN)", topic, (int)m->partition, (long long)m->offset, key, value);
}

static PyObject *
build_items(Reader *self, rd_kafka_message_t **ms, Py_ssize_t n)
{
    PyObject *out = PyList_New(0);
    Py_ssize_t i = 0;
    while (out != NULL && i < n) {
        const rd_kafka_message_t *m = ms[i];
        PyObject *item;
        if (is_run_record(m)) {
            Py_ssize_t j = i + 1;
            while (j < n) {
                const rd_kafka_message_t *x = ms[j];
                if (!is_run_record(x) || x->rkt != m->rkt || x->partition != m->partition ||
                    x->offset <= ms[j - 1]->offset || memcmp(x->payload, m->payload, HEADER_LEN) != 0)
                    break;
                j++;
            }
            item = make_run(self, ms, i, j);
            i = j;
        }
        else {
            item = make_other(self, m);
            i++;
        }
        if (item == NULL || PyList_Append(out, item) < 0)
            Py_CLEAR(out);
        Py_XDECREF(item);
    }
    return out;
}

static PyObject *
Reader_read(Reader *self, PyObject *args)
{
    Py_ssize_t max;
    double timeout;
    if (!PyArg_ParseTuple(args, "nd", &max, &timeout) || !usable(self))
        return NULL;
    if (max < 1 || max > MAX_BATCH) {
        PyErr_Format(PyExc_ValueError, "max_messages must be in [1, %d]", MAX_BATCH);
        return NULL;
    }
    if ((size_t)max > self->bufcap) {
        rd_kafka_message_t **buf = PyMem_Realloc(self->buf, (size_t)max * sizeof(*buf));
        if (buf == NULL)
            return PyErr_NoMemory();
        self->buf = buf;
        self->bufcap = (size_t)max;
    }
    int ms = timeout_ms(timeout);
    ssize_t n;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS n = self->f.consume_batch_queue(self->q, ms, self->buf, (size_t)max);
    Py_END_ALLOW_THREADS self->busy = 0;
    if (n < 0) {
        drain_logs(self);
        return kafka_error(self, "consume", self->f.last_error());
    }
    if (n > max)
        n = max; /* never trust more than we gave room for */
    PyObject *out = build_items(self, self->buf, (Py_ssize_t)n);
    for (ssize_t i = 0; i < n; i++)
        self->f.message_destroy(self->buf[i]);
    drain_logs(self);
    return out;
}

static PyObject *
Reader_version(Reader *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(self->f.version ? self->f.version() : 0);
}

static PyMethodDef Reader_methods[] = {
    {"assign", (PyCFunction)Reader_assign, METH_O, "assign([(topic, partition, offset), ...])"},
    {"pause", (PyCFunction)Reader_pause, METH_O, "pause([(topic, partition), ...])"},
    {"resume", (PyCFunction)Reader_resume, METH_O, "resume([(topic, partition), ...])"},
    {"seek", (PyCFunction)Reader_seek, METH_VARARGS, "seek(topic, partition, offset)"},
    {"position", (PyCFunction)Reader_position, METH_VARARGS, "position([(topic, partition)]) -> [offset]"},
    {"committed", (PyCFunction)Reader_committed, METH_VARARGS, "committed([(topic, partition)], timeout) -> [offset]"},
    {"watermarks", (PyCFunction)Reader_watermarks, METH_VARARGS, "watermarks(topic, partition, timeout) -> (low, high)"},
    {"topics", (PyCFunction)Reader_topics, METH_VARARGS, "topics(timeout) -> {topic: [partition, ...]}"},
    {"read", (PyCFunction)Reader_read, METH_VARARGS, "read(max_messages, timeout_s) -> [run | odd | error]"},
    {"close", (PyCFunction)Reader_close, METH_NOARGS, "leave, destroy the handle (idempotent)"},
    {"version", (PyCFunction)Reader_version, METH_NOARGS, "librdkafka's version int"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "projections._kafka_reader.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A librdkafka consumer (dlopen'd) that reads records as runs (see module doc).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kafka_reader", "Kafka reader handing runs of records to the sink (replay).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__kafka_reader(void)
{
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_LEN", HEADER_LEN) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
