/* BERT WordPiece ids and token start offsets in one pass over a document's ASCII words.
 *
 * Why hand-written: no released tokenizer returns both ids and offsets at this speed. HF
 * `tokenizers` tracks offsets through its normalizer at ~1 MB/s per thread; kitoken (Rust) is
 * 4-5x faster but gives ids only, and working offsets out afterwards cost the worker as much again
 * in Python. For ASCII words the whole BERT pipeline is simple enough to write down exactly:
 * BertNormalizer only lowercases (clean_text deletes control characters: such words are left to
 * HF), BertPreTokenizer splits at whitespace and isolates every ASCII punctuation character, and
 * WordPiece is a greedy longest match. The module is optional (built where a C compiler exists) and
 * checked against HF `tokenizers` at start-up (documents/fast_tokenizer.py), which is used instead
 * whenever it is missing or disagrees.
 *
 * Words holding anything else (non-ASCII, control characters) are not tokenized here: the scan
 * reports each such whitespace-separated run as a "hole" (char start, char end, token index it
 * goes before) for the caller to encode with HF and splice in. That is exact because BERT's
 * normalizer works per character and its pre-tokenizer splits at whitespace, so the ids of a text
 * are the ids of its whitespace-separated runs, concatenated.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t id; /* -1: empty slot */
    uint32_t offset; /* of the surface in the pool */
    uint16_t length;
    uint8_t continuation; /* 1: the "##" entry of this surface */
} Slot;

typedef struct {
    PyObject_HEAD
    char *pool;
    Slot *slots;
    uint64_t mask;
    Py_ssize_t max_surface; /* longest surface in the table: no longer match exists */
    Py_ssize_t max_chars; /* max_input_chars_per_word: a longer word is one [UNK] */
    int32_t unk_id;
    int lowercase;
    unsigned char *word; /* lowercased copy of the current word, max_chars + 1 bytes */
} WordPiece;

static inline uint64_t fnv_step(uint64_t h, unsigned char c) {
    return (h ^ c) * 1099511628211ULL;
}

static inline uint64_t fnv_seed(int continuation) {
    return 1469598103934665603ULL ^ (uint64_t)(continuation ? 0x9e3779b97f4a7c15ULL : 0);
}

static uint64_t fnv_hash(const unsigned char *s, Py_ssize_t n, int continuation) {
    uint64_t h = fnv_seed(continuation);
    for (Py_ssize_t j = 0; j < n; j++)
        h = fnv_step(h, s[j]);
    return h;
}

static int32_t lookup(const WordPiece *wp, const unsigned char *s, Py_ssize_t n, int continuation, uint64_t h) {
    uint64_t i = h & wp->mask;
    for (;;) {
        const Slot *slot = &wp->slots[i];
        if (slot->id < 0)
            return -1;
        if (slot->length == n && slot->continuation == continuation && memcmp(wp->pool + slot->offset, s, (size_t)n) == 0)
            return slot->id;
        i = (i + 1) & wp->mask;
    }
}

static void wordpiece_dealloc(WordPiece *self) {
    PyMem_Free(self->pool);
    PyMem_Free(self->slots);
    PyMem_Free(self->word);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* WordPiece(entries, unk_id, max_input_chars_per_word, lowercase)
 * entries: sequence of (surface: bytes, id: int, continuation: bool), ASCII surfaces only. */
static int wordpiece_init(WordPiece *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"entries", "unk_id", "max_input_chars_per_word", "lowercase", NULL};
    PyObject *entries;
    int unk_id, lowercase;
    Py_ssize_t max_chars;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oinp", kwlist, &entries, &unk_id, &max_chars, &lowercase))
        return -1;
    if (max_chars < 1 || max_chars > 100000) {
        PyErr_SetString(PyExc_ValueError, "max_input_chars_per_word out of range");
        return -1;
    }
    PyObject *seq = PySequence_Fast(entries, "entries must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    uint64_t size = 16;
    while (size < (uint64_t)count * 2 + 1)
        size <<= 1;
    size_t pool_bytes = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "each entry must be (bytes, int, bool)");
            return -1;
        }
        pool_bytes += (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
    }
    PyMem_Free(self->pool);
    PyMem_Free(self->slots);
    PyMem_Free(self->word);
    self->pool = PyMem_Malloc(pool_bytes + 1);
    self->slots = PyMem_Malloc(sizeof(Slot) * size);
    self->word = PyMem_Malloc((size_t)max_chars + 1);
    if (self->pool == NULL || self->slots == NULL || self->word == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (uint64_t i = 0; i < size; i++)
        self->slots[i].id = -1;
    self->mask = size - 1;
    self->max_surface = 0;
    size_t used = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        PyObject *surface = PyTuple_GET_ITEM(item, 0);
        long id = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
        int continuation = PyObject_IsTrue(PyTuple_GET_ITEM(item, 2));
        if ((id == -1 && PyErr_Occurred()) || continuation < 0) {
            Py_DECREF(seq);
            return -1;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(surface);
        if (n == 0 || n > 65535 || id < 0 || id > INT32_MAX)
            continue; /* never looked up */
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(surface);
        uint64_t h = fnv_hash(s, n, continuation);
        if (lookup(self, s, n, continuation, h) >= 0)
            continue; /* a surface given twice: the first id stays */
        memcpy(self->pool + used, s, (size_t)n);
        uint64_t i = h & self->mask;
        while (self->slots[i].id >= 0)
            i = (i + 1) & self->mask;
        self->slots[i].id = (int32_t)id;
        self->slots[i].offset = (uint32_t)used;
        self->slots[i].length = (uint16_t)n;
        self->slots[i].continuation = (uint8_t)(continuation ? 1 : 0);
        used += (size_t)n;
        if (n > self->max_surface)
            self->max_surface = n;
    }
    Py_DECREF(seq);
    self->unk_id = unk_id;
    self->max_chars = max_chars;
    self->lowercase = lowercase;
    return 0;
}

static inline int is_bert_space(Py_UCS4 c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static inline int is_ascii_alnum(Py_UCS4 c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* Greedy longest-match WordPiece of one ASCII word text[a:b] (b - a <= max_chars), as HF: the
 * longest vocabulary surface at each position ("##" entries after the first piece); a word with a
 * position that matches nothing is one [UNK]. Returns the new token count. */
static Py_ssize_t encode_word(const WordPiece *wp, const void *data, int kind, Py_ssize_t a, Py_ssize_t b,
                              int32_t *ids, int64_t *starts, Py_ssize_t n) {
    Py_ssize_t len = b - a;
    unsigned char *w = wp->word;
    for (Py_ssize_t j = 0; j < len; j++) {
        unsigned char c = (unsigned char)PyUnicode_READ(kind, data, a + j);
        w[j] = (wp->lowercase && c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
    }
    Py_ssize_t first = n, start = 0;
    uint64_t hashes[64]; /* prefix hashes of the candidate piece; surfaces are short */
    while (start < len) {
        int continuation = start > 0;
        Py_ssize_t longest = len - start;
        if (longest > wp->max_surface)
            longest = wp->max_surface;
        Py_ssize_t found_len = 0;
        int32_t found = -1;
        if (longest <= 64) {
            uint64_t h = fnv_seed(continuation);
            for (Py_ssize_t k = 0; k < longest; k++) {
                h = fnv_step(h, w[start + k]);
                hashes[k] = h;
            }
            for (Py_ssize_t k = longest; k >= 1; k--) {
                found = lookup(wp, w + start, k, continuation, hashes[k - 1]);
                if (found >= 0) {
                    found_len = k;
                    break;
                }
            }
        } else {
            for (Py_ssize_t k = longest; k >= 1; k--) {
                found = lookup(wp, w + start, k, continuation, fnv_hash(w + start, k, continuation));
                if (found >= 0) {
                    found_len = k;
                    break;
                }
            }
        }
        if (found < 0) {
            ids[first] = wp->unk_id;
            starts[first] = a;
            return first + 1;
        }
        ids[n] = found;
        starts[n] = a + start;
        n++;
        start += found_len;
    }
    return n;
}

/* Room for at least `need` more tokens in the two outputs (bytes objects grown by doubling). */
static int reserve(PyObject **ids, PyObject **starts, Py_ssize_t *cap, Py_ssize_t need) {
    if (need <= *cap)
        return 0;
    Py_ssize_t grown = *cap * 2 > need ? *cap * 2 : need;
    if (_PyBytes_Resize(ids, grown * 4) < 0 || _PyBytes_Resize(starts, grown * 8) < 0)
        return -1;
    *cap = grown;
    return 0;
}

/* encode(text) -> (ids: bytes of int32, starts: bytes of int64, holes)
 * holes: list of (char_start, char_end, token_index) of the whitespace-separated runs left to the
 * caller, in text order; consecutive ones (only whitespace between them) are one hole. The outputs
 * start at about one token per two characters (text is ~0.3) and grow when a text needs more, so
 * memory is not reserved (and page-faulted) per character of the text.
 * Not thread-safe on one object: `word` is scratch space, and the GIL is held throughout. */
static PyObject *wordpiece_encode(WordPiece *self, PyObject *args) {
    PyObject *text;
    if (!PyArg_ParseTuple(args, "U", &text))
        return NULL;
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    Py_ssize_t cap = length / 2 + 16;
    PyObject *ids_obj = PyBytes_FromStringAndSize(NULL, cap * 4);
    PyObject *starts_obj = PyBytes_FromStringAndSize(NULL, cap * 8);
    PyObject *holes = PyList_New(0);
    if (ids_obj == NULL || starts_obj == NULL || holes == NULL)
        goto fail;
    const int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = 0, i = 0, last_hole_start = 0, last_hole_at = -1;
    while (i < length) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (is_bert_space(c)) {
            i++;
            continue;
        }
        /* the whitespace-separated run [i, end): ASCII printable throughout, or a hole */
        Py_ssize_t end = i;
        int plain = 1;
        while (end < length) {
            Py_UCS4 d = PyUnicode_READ(kind, data, end);
            if (is_bert_space(d))
                break;
            if (d < 0x20 || d >= 0x7f)
                plain = 0;
            end++;
        }
        if (!plain) {
            /* a hole right after another (only whitespace between: no token since) extends it, so
               that text with few ASCII words goes to HF in long runs, not word by word */
            Py_ssize_t start = i, last = PyList_GET_SIZE(holes) - 1;
            if (last >= 0 && last_hole_at == n) {
                start = last_hole_start;
                if (PyList_SetSlice(holes, last, last + 1, NULL) < 0)
                    goto fail;
            }
            PyObject *hole = Py_BuildValue("(nnn)", start, end, n);
            if (hole == NULL || PyList_Append(holes, hole) < 0) {
                Py_XDECREF(hole);
                goto fail;
            }
            Py_DECREF(hole);
            last_hole_start = start;
            last_hole_at = n;
            i = end;
            continue;
        }
        /* an ASCII run yields at most one token per character */
        if (reserve(&ids_obj, &starts_obj, &cap, n + (end - i)) < 0)
            goto fail;
        int32_t *ids = (int32_t *)PyBytes_AS_STRING(ids_obj);
        int64_t *starts = (int64_t *)PyBytes_AS_STRING(starts_obj);
        while (i < end) { /* words: runs of letters and digits; any other character is one word */
            Py_ssize_t b = i + 1;
            if (is_ascii_alnum(PyUnicode_READ(kind, data, i)))
                while (b < end && is_ascii_alnum(PyUnicode_READ(kind, data, b)))
                    b++;
            if (b - i > self->max_chars) {
                ids[n] = self->unk_id;
                starts[n] = i;
                n++;
            } else {
                n = encode_word(self, data, kind, i, b, ids, starts, n);
            }
            i = b;
        }
    }
    if (_PyBytes_Resize(&ids_obj, n * 4) < 0 || _PyBytes_Resize(&starts_obj, n * 8) < 0)
        goto fail;
    return Py_BuildValue("(NNN)", ids_obj, starts_obj, holes);
fail:
    Py_XDECREF(ids_obj);
    Py_XDECREF(starts_obj);
    Py_XDECREF(holes);
    return NULL;
}

static PyMethodDef wordpiece_methods[] = {
    {"encode", (PyCFunction)wordpiece_encode, METH_VARARGS,
     "encode(text) -> (ids: bytes of int32, starts: bytes of int64, holes): ids and start offsets of the "
     "ASCII words; holes = [(char_start, char_end, token_index)] of the runs left to the caller."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WordPieceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hades_gpu.documents._wordpiece.WordPiece",
    .tp_basicsize = sizeof(WordPiece),
    .tp_dealloc = (destructor)wordpiece_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BERT WordPiece over ASCII words: ids and token start offsets (see the module source).",
    .tp_methods = wordpiece_methods,
    .tp_init = (initproc)wordpiece_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef wordpiece_module = {
    PyModuleDef_HEAD_INIT, "_wordpiece", "BERT WordPiece ids and offsets for ASCII words.", -1, NULL,
};

PyMODINIT_FUNC PyInit__wordpiece(void) {
    if (PyType_Ready(&WordPieceType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&wordpiece_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&WordPieceType);
    if (PyModule_AddObject(m, "WordPiece", (PyObject *)&WordPieceType) < 0) {
        Py_DECREF(&WordPieceType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
