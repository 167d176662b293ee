/* aioshm._speedups: the uncontended hot path of a slot queue, in C (optional).
 *
 * One critical section per call, on the same shared-memory layout and the same robust
 * mutex as aioshm/_slotqueue.py, so that processes with and without this module share a
 * channel. Each call does exactly what the Python critical section does in the common
 * case, or nothing at all: whenever the mutex is not free at once (held by another
 * thread or process, or by this thread's own critical section), or anything is out of
 * the ordinary (a corrupt ring entry or free stack, a message that is not small and well
 * formed), it leaves everything as it found it and returns FALLBACK, and the caller
 * takes the Python path, which handles every case. A mutex whose owner died holding it
 * (EOWNERDEAD) is repaired by the Python repair, called from here (see lock()).
 *
 * Apart from that repair, no Python code runs between the lock and the unlock (the GIL
 * is held throughout, and no object is allocated but a bytearray, which the garbage
 * collector does not track), so no signal handler, finalizer or other thread can
 * interrupt the section: the KeyboardInterrupt-safety of SharedObject.locked holds here
 * trivially.
 *
 * The field numbers below must equal those of aioshm/_layout.py and the outcome codes
 * those of aioshm/_slotqueue.py; the module exports them (LAYOUT) and the Python side
 * refuses to use the module if any differs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>

/* Control fields (aioshm/_layout.py). */
#define HEAD 4
#define TAIL 5
#define NFREE 6
#define OPEN 8
#define SLEEPERS 10
#define ENDED 13
/* Slot table fields. */
#define SLOT_STATE 0
#define SLOT_OWNER 1
#define SLOT_START 2
#define SLOT_LENGTH 3
#define SLOT_FIELDS 4
/* Slot states (aioshm/_slotqueue.py). */
#define S_FREE 0
#define S_READY 2
#define S_READING 3
/* Sides (aioshm/_shared.py). */
#define SEND 0
#define RECV 1
/* Outcomes (aioshm/_slotqueue.py); FALLBACK: nothing done, take the Python path. */
#define O_DONE 0
#define O_FULL 1
#define O_BROKEN 2
#define O_EMPTY 3
#define O_ENDED 4
#define O_CLOSED 6
#define FALLBACK (-1)
#define LOCKED_COPY_LIMIT (64 * 1024)
/* The most messages one put_many or get_many call moves, in one locked round: their
 * references are kept on the C stack or in a list made beforehand. A longer batch takes
 * several calls. */
#define BATCH_CHUNK 256

static PyObject *str_image, *str_start, *str_length; /* interned attribute names */

typedef struct {
    PyObject_HEAD
    int64_t *ctl;
    pthread_mutex_t *mutex;
    sem_t *bells[2];
    int64_t *ring;
    int64_t *free_;
    int64_t *slots;
    char *payloads;
    int64_t stride;
    int64_t capacity;
    int64_t low_water;
    int64_t small;
    PyObject *keepalive;
    PyObject *owner_died; /* a weakref.WeakMethod of SlotQueue._owner_died_locked */
} FastQueue;

/* Lock if the mutex is free at once: 1 if locked, 0 if not (nothing changed), -1 with
 * an exception set (the mutex released). A previous owner that died holding it
 * (EOWNERDEAD) is dealt with as SharedObject._lock_contended does: the mutex is marked
 * consistent and the Python repair runs under it (SlotQueue._owner_died_locked, which
 * also defers a sweep); if the repair raises (a KeyboardInterrupt, say), it runs once
 * more, as SharedObject.locked repairs after an exception, and the mutex is released. */
static int
lock(FastQueue *q)
{
    int result = pthread_mutex_trylock(q->mutex);
    if (result == 0) {
        return 1;
    }
    if (result != EOWNERDEAD) {
        return 0; /* EBUSY (held, perhaps by this thread), ENOTRECOVERABLE, ... */
    }
    if (pthread_mutex_consistent(q->mutex) != 0) {
        pthread_mutex_unlock(q->mutex);
        return 0;
    }
    PyObject *method = PyObject_CallNoArgs(q->owner_died);
    PyObject *done = NULL;
    if (method != NULL && method != Py_None) {
        done = PyObject_CallNoArgs(method);
        if (done == NULL) {
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyObject *again = PyObject_CallNoArgs(method);
            Py_XDECREF(again);
            PyErr_Clear();
            PyErr_Restore(type, value, traceback);
        }
    }
    else if (method == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "aioshm._speedups: the queue is gone");
    }
    Py_XDECREF(method);
    if (done == NULL) {
        pthread_mutex_unlock(q->mutex);
        return -1;
    }
    Py_DECREF(done);
    return 1;
}

static void
ring_one(FastQueue *q, int side)
{
    int64_t *ctl = q->ctl;
    if (ctl[SLEEPERS + side] > 0) {
        ctl[SLEEPERS + side] -= 1;
        sem_post(q->bells[side]);
    }
}

/* SlotQueue._free_locked, once its preconditions were checked (0 <= NFREE < capacity). */
static void
free_slot(FastQueue *q, int64_t slot)
{
    int64_t *ctl = q->ctl;
    int64_t n = ctl[NFREE];
    q->slots[slot * SLOT_FIELDS + SLOT_STATE] = S_FREE;
    q->free_[n] = slot;
    ctl[NFREE] = n + 1;
    if (ctl[SLEEPERS + SEND] && n + 1 >= q->low_water) {
        ring_one(q, SEND);
    }
}

static int
FastQueue_init(FastQueue *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"address",  "mutex",    "bells",     "sem_size", "ring",
                             "free",     "slots",    "payloads",  "stride",   "capacity",
                             "low_water", "small",   "keepalive", "owner_died", NULL};
    unsigned long long address;
    long long mutex, bells, sem_size, ring, free_, slots, payloads;
    long long stride, capacity, low_water, small;
    PyObject *keepalive, *owner_died;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KLLLLLLLLLLLOO", kwlist, &address, &mutex,
                                     &bells, &sem_size, &ring, &free_, &slots, &payloads,
                                     &stride, &capacity, &low_water, &small, &keepalive,
                                     &owner_died)) {
        return -1;
    }
    if (capacity <= 0 || stride <= 0 || small < 0 || small > stride || low_water < 1) {
        PyErr_SetString(PyExc_ValueError, "aioshm._speedups: a nonsensical layout");
        return -1;
    }
    char *base = (char *)(uintptr_t)address;
    self->ctl = (int64_t *)base;
    self->mutex = (pthread_mutex_t *)(base + mutex);
    self->bells[0] = (sem_t *)(base + bells);
    self->bells[1] = (sem_t *)(base + bells + sem_size);
    self->ring = (int64_t *)(base + ring);
    self->free_ = (int64_t *)(base + free_);
    self->slots = (int64_t *)(base + slots);
    self->payloads = base + payloads;
    self->stride = stride;
    self->capacity = capacity;
    self->low_water = low_water;
    self->small = small;
    Py_XSETREF(self->keepalive, Py_NewRef(keepalive));
    Py_XSETREF(self->owner_died, Py_NewRef(owner_died));
    return 0;
}

static int
FastQueue_traverse(FastQueue *self, visitproc visit, void *arg)
{
    Py_VISIT(self->keepalive);
    Py_VISIT(self->owner_died);
    return 0;
}

static int
FastQueue_clear(FastQueue *self)
{
    Py_CLEAR(self->keepalive);
    Py_CLEAR(self->owner_died);
    return 0;
}

static void
FastQueue_dealloc(FastQueue *self)
{
    PyObject_GC_UnTrack(self);
    FastQueue_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* put(image, start, length) -> outcome: SlotQueue._put_locked for a small message
 * whose bytes (header and payload) are ``image``, to be written at slot[start:length]. */
static PyObject *
FastQueue_put(FastQueue *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "put(image: bytes, start: int, length: int)");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    long long start = PyLong_AsLongLong(args[1]);
    long long length = PyLong_AsLongLong(args[2]);
    if ((start == -1 || length == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0 || length - start != size || length > q->stride ||
        length > LOCKED_COPY_LIMIT) {
        return PyLong_FromLong(FALLBACK); /* the Python path raises what it raises */
    }
    int64_t *ctl = q->ctl;
    int outcome;
    int locked = lock(q);
    if (locked <= 0) {
        return locked < 0 ? NULL : PyLong_FromLong(FALLBACK);
    }
    if (ctl[OPEN + RECV] <= 0) {
        outcome = O_BROKEN;
    }
    else if (ctl[OPEN + SEND] <= 0 || ctl[ENDED]) {
        outcome = O_CLOSED;
    }
    else {
        int64_t n = ctl[NFREE] - 1;
        int64_t tail = ctl[TAIL];
        if (n < 0) {
            outcome = O_FULL;
        }
        else if (n >= q->capacity || tail < 0) {
            outcome = FALLBACK; /* corrupt: the Python path repairs */
        }
        else {
            int64_t slot = q->free_[n];
            if (slot < 0 || slot >= q->capacity) {
                outcome = FALLBACK;
            }
            else {
                int64_t base = slot * SLOT_FIELDS;
                memcpy(q->payloads + slot * q->stride + start, PyBytes_AS_STRING(args[0]),
                       (size_t)size);
                ctl[NFREE] = n;
                q->slots[base + SLOT_START] = start;
                q->slots[base + SLOT_LENGTH] = length;
                q->slots[base + SLOT_STATE] = S_READY;
                q->ring[tail % q->capacity] = slot;
                ctl[TAIL] = tail + 1;
                if (ctl[SLEEPERS + RECV]) {
                    ring_one(q, RECV);
                }
                outcome = O_DONE;
            }
        }
    }
    pthread_mutex_unlock(q->mutex);
    return PyLong_FromLong(outcome);
}

static int
reading(FastQueue *q)
{
    for (int64_t slot = 0; slot < q->capacity; slot++) {
        if (q->slots[slot * SLOT_FIELDS + SLOT_STATE] == S_READING) {
            return 1;
        }
    }
    return 0;
}

/* SlotQueue._empty_locked: the outcome of a receive that finds the queue empty. */
static int
empty_outcome(FastQueue *q)
{
    int64_t *ctl = q->ctl;
    if (ctl[ENDED]) {
        return O_ENDED;
    }
    if (ctl[OPEN + SEND] > 0 || reading(q)) {
        return O_EMPTY;
    }
    ctl[ENDED] = 1;
    return O_ENDED;
}

/* A copy of the small, well-formed message at ring position head, taken off the queue
 * (its slot freed); NULL if there is none such (an exception set if out of memory). */
static PyObject *
take_small(FastQueue *q, int64_t head)
{
    int64_t *ctl = q->ctl;
    int64_t slot = q->ring[head % q->capacity];
    int64_t n = ctl[NFREE];
    if (slot < 0 || slot >= q->capacity || n < 0 || n >= q->capacity) {
        return NULL;
    }
    int64_t base = slot * SLOT_FIELDS;
    int64_t start = q->slots[base + SLOT_START];
    int64_t length = q->slots[base + SLOT_LENGTH];
    if (q->slots[base + SLOT_STATE] != S_READY || start < 0 || start > length ||
        length > q->small) {
        return NULL;
    }
    /* Not tracked by the garbage collector: no Python code can run here. */
    PyObject *copy = PyByteArray_FromStringAndSize(q->payloads + slot * q->stride + start,
                                                   (Py_ssize_t)(length - start));
    if (copy != NULL) {
        ctl[HEAD] = head + 1;
        free_slot(q, slot);
    }
    return copy;
}

/* get() -> bytearray | outcome: SlotQueue._get_locked for a small, well-formed message
 * at the head (a copy of its bytes), or an empty queue (EMPTY or ENDED). */
static PyObject *
FastQueue_get(FastQueue *q, PyObject *Py_UNUSED(ignored))
{
    int64_t *ctl = q->ctl;
    int outcome = FALLBACK;
    PyObject *copy = NULL;
    int locked = lock(q);
    if (locked <= 0) {
        return locked < 0 ? NULL : PyLong_FromLong(FALLBACK);
    }
    int64_t head = ctl[HEAD];
    int64_t tail = ctl[TAIL];
    if (head == tail) {
        outcome = empty_outcome(q);
    }
    else if (head >= 0 && 0 < tail - head && tail - head <= q->capacity) {
        copy = take_small(q, head);
    }
    pthread_mutex_unlock(q->mutex);
    if (copy != NULL) {
        return copy;
    }
    if (PyErr_Occurred()) {
        return NULL; /* MemoryError, and nothing was taken */
    }
    return PyLong_FromLong(outcome);
}

/* get_many(limit) -> list[bytearray] | outcome: SlotQueue._get_many_locked for the
 * small, well-formed messages at the head, oldest first, up to limit (and BATCH_CHUNK);
 * or an empty queue (EMPTY or ENDED); FALLBACK if the head message is not one such.
 *
 * The list is made before the lock (a list is tracked by the garbage collector, whose
 * collections, and the finalizers they run, its allocation may set off), as long as the
 * messages buffered then, read without the lock: a hint, and no more are taken. A list
 * that cannot be made costs nothing taken; one made too long is cut to what was taken. */
static PyObject *
FastQueue_get_many(FastQueue *q, PyObject *arg)
{
    Py_ssize_t limit = PyLong_AsSsize_t(arg);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int64_t *ctl = q->ctl;
    int64_t hint = __atomic_load_n(&ctl[TAIL], __ATOMIC_RELAXED) -
                   __atomic_load_n(&ctl[HEAD], __ATOMIC_RELAXED);
    Py_ssize_t size = limit < BATCH_CHUNK ? limit : BATCH_CHUNK;
    if (hint < size) {
        size = hint < 0 ? 0 : (Py_ssize_t)hint;
    }
    PyObject *list = NULL;
    if (size > 0 && (list = PyList_New(size)) == NULL) {
        return NULL;
    }
    Py_ssize_t count = 0;
    int outcome = FALLBACK;
    int locked = lock(q);
    if (locked <= 0) {
        Py_XDECREF(list);
        return locked < 0 ? NULL : PyLong_FromLong(FALLBACK);
    }
    int64_t head = ctl[HEAD];
    int64_t tail = ctl[TAIL];
    if (head == tail) {
        outcome = empty_outcome(q);
    }
    else if (head >= 0 && 0 < tail - head && tail - head <= q->capacity) {
        for (; count < size && head < tail; head++, count++) {
            PyObject *copy = take_small(q, head);
            if (copy == NULL) {
                break;
            }
            PyList_SET_ITEM(list, count, copy);
        }
    }
    pthread_mutex_unlock(q->mutex);
    if (count == 0) {
        Py_XDECREF(list);
        return PyErr_Occurred() ? NULL : PyLong_FromLong(outcome);
    }
    PyErr_Clear(); /* a MemoryError after the first copy: those taken are received */
    Py_SET_SIZE(list, count); /* the slots past it are still NULL */
    return list;
}

/* A message's start or length attribute: 0, or -1 with an exception set. */
static int
int_attr(PyObject *message, PyObject *name, long long *out)
{
    PyObject *value = PyObject_GetAttr(message, name);
    if (value == NULL) {
        return -1;
    }
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* The leading messages of messages[first:] (at most BATCH_CHUNK) that put() would take:
 * small ones that come as one image. Gathered before the lock, as new references to
 * their images, for no Python code (an attribute lookup may run some) to run under it.
 * Returns how many, or -1 with an exception set (no reference kept). */
static Py_ssize_t
gather_images(FastQueue *q, PyObject *messages, Py_ssize_t first, PyObject **images,
              long long *starts, long long *lengths)
{
    Py_ssize_t n = 0;
    for (Py_ssize_t i = first; n < BATCH_CHUNK; i++) {
        /* Read the size on every step: a lookup may have changed the list. */
        if (i >= PySequence_Fast_GET_SIZE(messages)) {
            break;
        }
        PyObject *message = Py_NewRef(PySequence_Fast_GET_ITEM(messages, i));
        PyObject *image = PyObject_GetAttr(message, str_image);
        if (image == NULL) {
            Py_DECREF(message);
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                goto error;
            }
            PyErr_Clear(); /* not an image: a large message, for the Python path */
            break;
        }
        long long start, length;
        if (int_attr(message, str_start, &start) < 0 ||
            int_attr(message, str_length, &length) < 0) {
            Py_DECREF(image);
            Py_DECREF(message);
            goto error;
        }
        Py_DECREF(message);
        if (!PyBytes_CheckExact(image) || start < 0 ||
            length - start != PyBytes_GET_SIZE(image) || length > q->stride ||
            length > LOCKED_COPY_LIMIT) {
            Py_DECREF(image); /* the Python path raises what it raises */
            break;
        }
        images[n] = image;
        starts[n] = start;
        lengths[n] = length;
        n++;
    }
    return n;
error:
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(images[i]);
    }
    return -1;
}

/* put_many(messages, first) -> (outcome, sent): SlotQueue._put_many_locked for the
 * leading small images of messages[first:], as many as there are free slots (at most
 * BATCH_CHUNK); (FALLBACK, 0) if the first is not one, or anything is out of the
 * ordinary before the first is published. */
static PyObject *
FastQueue_put_many(FastQueue *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !(PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "put_many(messages: list | tuple, first: int)");
        return NULL;
    }
    Py_ssize_t first = PyLong_AsSsize_t(args[1]);
    if (first == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (first < 0) {
        first = PY_SSIZE_T_MAX; /* nothing to gather: FALLBACK */
    }
    /* The result is made first: once a message is published, nothing may fail. Its
     * numbers (an outcome, at most BATCH_CHUNK sent) are cached small ints. */
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        return NULL;
    }
    PyObject *images[BATCH_CHUNK];
    long long starts[BATCH_CHUNK], lengths[BATCH_CHUNK];
    Py_ssize_t count = gather_images(q, args[0], first, images, starts, lengths);
    if (count < 0) {
        Py_DECREF(result);
        return NULL;
    }
    int64_t *ctl = q->ctl;
    int outcome = FALLBACK;
    Py_ssize_t sent = 0;
    int locked = count > 0 ? lock(q) : 0;
    if (locked == 0) {
        goto done;
    }
    if (locked < 0) {
        goto error;
    }
    if (ctl[OPEN + RECV] <= 0) {
        outcome = O_BROKEN;
    }
    else if (ctl[OPEN + SEND] <= 0 || ctl[ENDED]) {
        outcome = O_CLOSED;
    }
    else if (ctl[NFREE] <= 0) {
        outcome = ctl[NFREE] == 0 ? O_FULL : FALLBACK;
    }
    else if (ctl[NFREE] <= q->capacity && ctl[TAIL] >= 0) {
        for (; sent < count; sent++) {
            int64_t n = ctl[NFREE] - 1;
            if (n < 0) {
                break;
            }
            int64_t slot = q->free_[n];
            if (slot < 0 || slot >= q->capacity) {
                break; /* corrupt: the Python path repairs (on the next call) */
            }
            int64_t base = slot * SLOT_FIELDS;
            int64_t tail = ctl[TAIL];
            memcpy(q->payloads + slot * q->stride + starts[sent], PyBytes_AS_STRING(images[sent]),
                   (size_t)PyBytes_GET_SIZE(images[sent]));
            ctl[NFREE] = n;
            q->slots[base + SLOT_START] = starts[sent];
            q->slots[base + SLOT_LENGTH] = lengths[sent];
            q->slots[base + SLOT_STATE] = S_READY;
            q->ring[tail % q->capacity] = slot;
            ctl[TAIL] = tail + 1;
            if (ctl[SLEEPERS + RECV]) {
                ring_one(q, RECV);
            }
        }
        outcome = sent > 0 ? O_DONE : FALLBACK;
    }
    pthread_mutex_unlock(q->mutex);
done:
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_DECREF(images[i]);
    }
    PyTuple_SET_ITEM(result, 0, PyLong_FromLong(outcome));
    PyTuple_SET_ITEM(result, 1, PyLong_FromSsize_t(sent));
    return result;
error:
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_DECREF(images[i]);
    }
    Py_DECREF(result);
    return NULL;
}

static PyMethodDef FastQueue_methods[] = {
    {"put", (PyCFunction)(void (*)(void))FastQueue_put, METH_FASTCALL,
     "put(image, start, length) -> outcome: publish a small message, or FALLBACK"},
    {"get", (PyCFunction)FastQueue_get, METH_NOARGS,
     "get() -> bytearray | outcome: take a small message, or an outcome, or FALLBACK"},
    {"put_many", (PyCFunction)(void (*)(void))FastQueue_put_many, METH_FASTCALL,
     "put_many(messages, first) -> (outcome, sent): publish leading small images"},
    {"get_many", (PyCFunction)FastQueue_get_many, METH_O,
     "get_many(limit) -> list[bytearray] | outcome: take small messages, or FALLBACK"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aioshm._speedups.FastQueue",
    .tp_basicsize = sizeof(FastQueue),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The uncontended hot path of one slot queue (see aioshm/_speedups.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastQueue_init,
    .tp_traverse = (traverseproc)FastQueue_traverse,
    .tp_clear = (inquiry)FastQueue_clear,
    .tp_dealloc = (destructor)FastQueue_dealloc,
    .tp_methods = FastQueue_methods,
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aioshm._speedups",
    .m_doc = "The uncontended hot path of aioshm's slot queue, in C (optional).",
    .m_size = -1,
};

#define ADD(dict, name, value)                                                   \
    do {                                                                         \
        PyObject *v_ = PyLong_FromLongLong(value);                               \
        if (v_ == NULL || PyDict_SetItemString(dict, name, v_) < 0) {            \
            Py_XDECREF(v_);                                                      \
            goto error;                                                          \
        }                                                                        \
        Py_DECREF(v_);                                                           \
    } while (0)

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module = NULL, *layout = NULL;
    if (PyType_Ready(&FastQueueType) < 0) {
        return NULL;
    }
    str_image = PyUnicode_InternFromString("image");
    str_start = PyUnicode_InternFromString("start");
    str_length = PyUnicode_InternFromString("length");
    if (str_image == NULL || str_start == NULL || str_length == NULL) {
        return NULL;
    }
    module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "FastQueue", (PyObject *)&FastQueueType) < 0) {
        goto error;
    }
    layout = PyDict_New();
    if (layout == NULL) {
        goto error;
    }
    ADD(layout, "HEAD", HEAD);
    ADD(layout, "TAIL", TAIL);
    ADD(layout, "NFREE", NFREE);
    ADD(layout, "OPEN", OPEN);
    ADD(layout, "SLEEPERS", SLEEPERS);
    ADD(layout, "ENDED", ENDED);
    ADD(layout, "SLOT_STATE", SLOT_STATE);
    ADD(layout, "SLOT_OWNER", SLOT_OWNER);
    ADD(layout, "SLOT_START", SLOT_START);
    ADD(layout, "SLOT_LENGTH", SLOT_LENGTH);
    ADD(layout, "SLOT_FIELDS", SLOT_FIELDS);
    ADD(layout, "FREE", S_FREE);
    ADD(layout, "READY", S_READY);
    ADD(layout, "READING", S_READING);
    ADD(layout, "SEND", SEND);
    ADD(layout, "RECV", RECV);
    ADD(layout, "_DONE", O_DONE);
    ADD(layout, "_FULL", O_FULL);
    ADD(layout, "_BROKEN", O_BROKEN);
    ADD(layout, "_EMPTY", O_EMPTY);
    ADD(layout, "_ENDED", O_ENDED);
    ADD(layout, "_CLOSED", O_CLOSED);
    ADD(layout, "LOCKED_COPY_LIMIT", LOCKED_COPY_LIMIT);
    ADD(layout, "sizeof(pthread_mutex_t)", (long long)sizeof(pthread_mutex_t));
    ADD(layout, "sizeof(sem_t)", (long long)sizeof(sem_t));
    if (PyModule_AddObjectRef(module, "LAYOUT", layout) < 0) {
        goto error;
    }
    Py_DECREF(layout);
    if (PyModule_AddIntConstant(module, "FALLBACK", FALLBACK) < 0) {
        goto error;
    }
    return module;
error:
    Py_XDECREF(layout);
    Py_XDECREF(module);
    return NULL;
}
