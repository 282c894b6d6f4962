/*
 * A measuring device, not part of poolguard: the statement timer's common
 * path compiled, to measure what a compiled timer would save (see
 * bench_ctimer_proto.py next to it). It does what the Python timer in
 * src/poolguard/_queries.py does when no time limit, culprit cap, breaker,
 * slow-query log or exporter is on: find the connection's hold, time the
 * statement, count it in its shape's histogram and rows, and update the hold.
 * Nothing else: with any of those on, the real timer must run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <time.h>

#define MAX_BOUNDS 256

static double bounds[MAX_BOUNDS];
static Py_ssize_t nbounds = 0;
/* Indices into a hold list (poolguard._hold), set by configure(). */
static Py_ssize_t i_statement, i_running_since, i_top_stat, i_top_time;

static PyObject *s_root_connection, *s_dbapi_connection, *s_connection_record, *s_hist,
    *s_counts, *s_sum, *s_max, *s_rowcount, *s_rows;

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *inner, *out, *stats, *new_stat;
} Timed;

/* The hold of the statement's connection (a new reference), or NULL. */
static PyObject *
find_hold(PyObject *out, PyObject *context)
{
    if (context == NULL || context == Py_None)
        return NULL;
    PyObject *root = PyObject_GetAttr(context, s_root_connection);
    if (root == NULL)
        goto none;
    PyObject *fairy = PyObject_GetAttr(root, s_dbapi_connection);
    Py_DECREF(root);
    if (fairy == NULL)
        goto none;
    PyObject *record = PyObject_GetAttr(fairy, s_connection_record);
    Py_DECREF(fairy);
    if (record == NULL)
        goto none;
    PyObject *hold = PyDict_GetItemWithError(out, record);
    Py_DECREF(record);
    if (hold == NULL || !PyList_CheckExact(hold) || PyList_GET_SIZE(hold) <= i_top_time)
        goto none;
    Py_INCREF(hold);
    return hold;
none:
    PyErr_Clear();
    return NULL;
}

static int
set_item(PyObject *list, Py_ssize_t i, PyObject *value)
{
    /* PyList_SetItem steals the reference, also on failure. */
    return value == NULL ? -1 : PyList_SetItem(list, i, value);
}

/* Count ``duration`` in ``stat.hist`` and the cursor's rows in ``stat.rows``. */
static int
record(PyObject *stat, PyObject *cursor, double duration)
{
    int ok = -1;
    PyObject *hist = NULL, *counts = NULL, *sum = NULL, *max = NULL, *rows = NULL;
    if ((hist = PyObject_GetAttr(stat, s_hist)) == NULL)
        goto done;
    if ((counts = PyObject_GetAttr(hist, s_counts)) == NULL)
        goto done;
    if (!PyList_CheckExact(counts)) {
        PyErr_SetString(PyExc_TypeError, "hist.counts is not a list");
        goto done;
    }
    Py_ssize_t lo = 0, hi = nbounds;
    while (lo < hi) { /* bisect_left */
        Py_ssize_t mid = (lo + hi) / 2;
        if (bounds[mid] < duration)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo >= PyList_GET_SIZE(counts)) {
        PyErr_SetString(PyExc_IndexError, "hist.counts is shorter than the bounds");
        goto done;
    }
    long long count = PyLong_AsLongLong(PyList_GET_ITEM(counts, lo));
    if (count == -1 && PyErr_Occurred())
        goto done;
    if (set_item(counts, lo, PyLong_FromLongLong(count + 1)) < 0)
        goto done;
    if ((sum = PyObject_GetAttr(hist, s_sum)) == NULL)
        goto done;
    double total = PyFloat_AsDouble(sum);
    if (total == -1.0 && PyErr_Occurred())
        goto done;
    Py_SETREF(sum, PyFloat_FromDouble(total + duration));
    if (sum == NULL || PyObject_SetAttr(hist, s_sum, sum) < 0)
        goto done;
    if ((max = PyObject_GetAttr(hist, s_max)) == NULL)
        goto done;
    if (duration > PyFloat_AsDouble(max)) {
        Py_SETREF(max, PyFloat_FromDouble(duration));
        if (max == NULL || PyObject_SetAttr(hist, s_max, max) < 0)
            goto done;
    }
    if ((rows = PyObject_GetAttr(cursor, s_rowcount)) == NULL) {
        PyErr_Clear(); /* a cursor without rowcount: nothing to count */
    }
    else {
        long long n = PyLong_AsLongLong(rows);
        if (n == -1 && PyErr_Occurred())
            PyErr_Clear();
        else if (n > 0) {
            PyObject *before = PyObject_GetAttr(stat, s_rows);
            if (before == NULL)
                goto done;
            PyObject *after = PyNumber_Add(before, rows);
            Py_DECREF(before);
            if (after == NULL)
                goto done;
            int set = PyObject_SetAttr(stat, s_rows, after);
            Py_DECREF(after);
            if (set < 0)
                goto done;
        }
    }
    ok = 0;
done:
    Py_XDECREF(hist);
    Py_XDECREF(counts);
    Py_XDECREF(sum);
    Py_XDECREF(max);
    Py_XDECREF(rows);
    return ok;
}

static PyObject *
timed_call(PyObject *self_, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Timed *self = (Timed *)self_;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || n < 3 || n > 4) {
        PyErr_SetString(PyExc_TypeError, "expected (cursor, statement, parameters[, context])");
        return NULL;
    }
    PyObject *cursor = args[0], *statement = args[1];
    PyObject *hold = find_hold(self->out, n > 3 ? args[3] : NULL);
    double start = now();
    if (hold != NULL) {
        Py_INCREF(statement);
        if (set_item(hold, i_statement, statement) < 0
            || set_item(hold, i_running_since, PyFloat_FromDouble(start)) < 0) {
            Py_DECREF(hold);
            return NULL;
        }
    }
    PyObject *result = PyObject_Vectorcall(self->inner, args, n, NULL);
    double duration = now() - start;
    if (result == NULL) {
        /* Not running any more (the shipped timer also records the error:
         * the prototype leaves that to it). */
        if (hold != NULL) {
            PyObject *error, *value, *tb;
            PyErr_Fetch(&error, &value, &tb);
            if (set_item(hold, i_running_since, PyFloat_FromDouble(0.0)) < 0)
                PyErr_Clear();
            PyErr_Restore(error, value, tb);
            Py_DECREF(hold);
        }
        return NULL;
    }
    PyObject *stat = PyDict_GetItemWithError(self->stats, statement);
    if (stat != NULL)
        Py_INCREF(stat);
    else if (!PyErr_Occurred())
        stat = PyObject_CallOneArg(self->new_stat, statement);
    if (stat == NULL || record(stat, cursor, duration) < 0)
        goto fail;
    if (hold != NULL) {
        if (set_item(hold, i_running_since, PyFloat_FromDouble(0.0)) < 0)
            goto fail;
        double top = PyFloat_AsDouble(PyList_GET_ITEM(hold, i_top_time));
        if (top == -1.0 && PyErr_Occurred())
            goto fail;
        if (duration > top) {
            Py_INCREF(stat);
            if (set_item(hold, i_top_time, PyFloat_FromDouble(duration)) < 0
                || set_item(hold, i_top_stat, stat) < 0)
                goto fail;
        }
        Py_DECREF(hold);
    }
    Py_DECREF(stat);
    return result;
fail:
    Py_XDECREF(hold);
    Py_XDECREF(stat);
    Py_DECREF(result);
    return NULL;
}

static int
timed_traverse(Timed *self, visitproc visit, void *arg)
{
    Py_VISIT(self->inner);
    Py_VISIT(self->out);
    Py_VISIT(self->stats);
    Py_VISIT(self->new_stat);
    return 0;
}

static int
timed_clear(Timed *self)
{
    Py_CLEAR(self->inner);
    Py_CLEAR(self->out);
    Py_CLEAR(self->stats);
    Py_CLEAR(self->new_stat);
    return 0;
}

static void
timed_dealloc(Timed *self)
{
    PyObject_GC_UnTrack(self);
    timed_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject TimedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ctimer_proto.Timed",
    .tp_basicsize = sizeof(Timed),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_vectorcall_offset = offsetof(Timed, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)timed_traverse,
    .tp_clear = (inquiry)timed_clear,
    .tp_dealloc = (destructor)timed_dealloc,
};

/* make(inner, out, stats, new_stat): a timed do_execute around ``inner``. */
static PyObject *
make(PyObject *module, PyObject *args)
{
    PyObject *inner, *out, *stats, *new_stat;
    if (nbounds == 0) {
        PyErr_SetString(PyExc_RuntimeError, "call configure() before make()");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO!O!O", &inner, &PyDict_Type, &out, &PyDict_Type, &stats,
                          &new_stat))
        return NULL;
    Timed *timed = PyObject_GC_New(Timed, &TimedType);
    if (timed == NULL)
        return NULL;
    Py_INCREF(inner);
    Py_INCREF(out);
    Py_INCREF(stats);
    Py_INCREF(new_stat);
    timed->inner = inner;
    timed->out = out;
    timed->stats = stats;
    timed->new_stat = new_stat;
    timed->vectorcall = timed_call;
    PyObject_GC_Track(timed);
    return (PyObject *)timed;
}

/* configure(bounds, statement, running_since, top_stat, top_time) */
static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "Onnnn", &seq, &i_statement, &i_running_since, &i_top_stat,
                          &i_top_time))
        return NULL;
    Py_ssize_t size = PySequence_Size(seq);
    if (size < 0)
        return NULL;
    if (size > MAX_BOUNDS) {
        PyErr_SetString(PyExc_ValueError, "too many bounds");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *item = PySequence_GetItem(seq, i);
        if (item == NULL)
            return NULL;
        bounds[i] = PyFloat_AsDouble(item);
        Py_DECREF(item);
        if (bounds[i] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    nbounds = size;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"make", make, METH_VARARGS, "make(inner, out, stats, new_stat)"},
    {"configure", configure, METH_VARARGS, "configure(bounds, statement, running_since, "
                                           "top_stat, top_time)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "ctimer_proto", NULL, -1, methods};

PyMODINIT_FUNC
PyInit_ctimer_proto(void)
{
    if (PyType_Ready(&TimedType) < 0)
        return NULL;
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        return NULL
    INTERN(s_root_connection, "root_connection");
    INTERN(s_dbapi_connection, "_dbapi_connection");
    INTERN(s_connection_record, "_connection_record");
    INTERN(s_hist, "hist");
    INTERN(s_counts, "counts");
    INTERN(s_sum, "sum");
    INTERN(s_max, "max");
    INTERN(s_rowcount, "rowcount");
    INTERN(s_rows, "rows");
    return PyModule_Create(&module_def);
}
