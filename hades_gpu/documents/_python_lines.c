/* Logical lines of Python source in one pass over the text: the C twin of `python_lines.LogicalLines`.
 *
 * Why hand-written: the NumPy version needs some sixty array calls per file, and on a corpus of
 * ordinary modules their per-call cost, not the arithmetic, is most of a worker's time in the code
 * chunker (0.26 s of 0.45 per 7 MB of the standard library). This computes the same arrays with the
 * same rules, character by character; tests/documents/test_python_lines.py compares the two on the
 * whole standard library and on random texts, and the Python module falls back to NumPy where this
 * extension is not built.
 *
 * The rules (python_lines.py has them in full): string literals and comments are found as its regex
 * `_OPAQUE` finds them, left to right, the first alternative that matches at a position winning
 * (comment; triple-quoted; single-quoted, which cannot cross a line break unless escaped; a
 * backslash escapes any character, \r\n as one); a quote outside every literal, or brackets outside
 * literals that do not balance, is a SyntaxError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define READ(i) PyUnicode_READ(kind, data, (i))

static const char *const WORDS[] = {"if", "elif", "else", "try", "except", "finally", "import", "from"};
#define N_WORDS 8

/* End of the literal or comment that starts at p (quote or '#'), or -1 when none matches there. */
static Py_ssize_t opaque_end(int kind, const void *data, Py_ssize_t n, Py_ssize_t p) {
    Py_UCS4 c = READ(p);
    if (c == '#') {
        Py_ssize_t e = p + 1;
        while (e < n) {
            Py_UCS4 d = READ(e);
            if (d == '\r' || d == '\n')
                break;
            e++;
        }
        return e;
    }
    if (c != '\'' && c != '"')
        return -1;
    /* triple-quoted: content is any character but the quote and backslash, an escape (\\ then \r\n
       or any one character), or a quote not followed by two more; then the closing three quotes */
    if (p + 2 < n && READ(p + 1) == c && READ(p + 2) == c) {
        Py_ssize_t e = p + 3;
        while (e < n) {
            Py_UCS4 d = READ(e);
            if (d == '\\') {
                if (e + 1 >= n)
                    break; /* a backslash at the very end escapes nothing: no match */
                e += (READ(e + 1) == '\r' && e + 2 < n && READ(e + 2) == '\n') ? 3 : 2;
                continue;
            }
            if (d == c) {
                if (e + 2 < n && READ(e + 1) == c && READ(e + 2) == c)
                    return e + 3;
                e++;
                continue;
            }
            e++;
        }
        /* no closing quotes: the single-quoted alternative is tried next, as the regex does */
    }
    Py_ssize_t e = p + 1;
    while (e < n) {
        Py_UCS4 d = READ(e);
        if (d == '\\') {
            if (e + 1 >= n)
                return -1;
            e += (READ(e + 1) == '\r' && e + 2 < n && READ(e + 2) == '\n') ? 3 : 2;
            continue;
        }
        if (d == c)
            return e + 1;
        if (d == '\r' || d == '\n')
            return -1;
        e++;
    }
    return -1;
}

static inline int is_indent_space(Py_UCS4 c) { return c == ' ' || c == '\t' || c == '\f'; }

static int is_word_char(Py_UCS4 c) { /* \w of Python's re for str patterns */
    return c == '_' || Py_UNICODE_ISALNUM(c);
}

static PyObject *new_bytes(Py_ssize_t size, char **out) {
    PyObject *b = PyBytes_FromStringAndSize(NULL, size);
    if (b != NULL)
        *out = PyBytes_AS_STRING(b);
    return b;
}

/* scan(text, line_start) -> dict of bytes: per physical line k (line_start entries below len(text)):
 * boundary, comment_only (uint8), lift, next_boundary (int64); per logical line j: line, start,
 * first, indent (int64), word (int8), decorator, follows_decorator (uint8). Raises SyntaxError. */
static PyObject *scan(PyObject *module, PyObject *args) {
    PyObject *text, *starts_obj;
    if (!PyArg_ParseTuple(args, "UO", &text, &starts_obj))
        return NULL;
    Py_buffer sv;
    if (PyObject_GetBuffer(starts_obj, &sv, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (sv.itemsize != 8) {
        PyBuffer_Release(&sv);
        PyErr_SetString(PyExc_ValueError, "line_start must be an int64 array");
        return NULL;
    }
    const int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    const Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    const int64_t *all_starts = (const int64_t *)sv.buf;
    Py_ssize_t L = 0, total = sv.len / 8;
    while (L < total && all_starts[L] < n)
        L++; /* lines that start before the end */

    PyObject *result = NULL, *b_boundary = NULL, *b_comment = NULL, *b_lift = NULL, *b_next = NULL;
    PyObject *b_line = NULL, *b_start = NULL, *b_first = NULL, *b_indent = NULL, *b_word = NULL, *b_deco = NULL,
             *b_follows = NULL;
    unsigned char *inside = NULL, *string_goes_on = NULL, *open_bracket = NULL, *blank = NULL;
    int64_t *first = NULL;
    Py_UCS4 *head = NULL;

    inside = PyMem_Calloc((size_t)n + 1, 1);
    string_goes_on = PyMem_Calloc((size_t)L + 1, 1);
    open_bracket = PyMem_Calloc((size_t)L + 1, 1);
    blank = PyMem_Calloc((size_t)L + 1, 1);
    first = PyMem_Calloc((size_t)L + 1, sizeof(int64_t));
    head = PyMem_Calloc((size_t)L + 1, sizeof(Py_UCS4));
    if (!inside || !string_goes_on || !open_bracket || !blank || !first || !head) {
        PyErr_NoMemory();
        goto done;
    }

    /* literals and comments, bracket depth at each line break (the character before line k) */
    {
        Py_ssize_t p = 0, k = 1; /* k: next line whose break we have not passed */
        int64_t depth = 0;
        int bad_brackets = 0;
        while (p < n) {
            Py_UCS4 c = READ(p);
            if (c == '#' || c == '\'' || c == '"') {
                Py_ssize_t e = opaque_end(kind, data, n, p);
                if (e < 0) {
                    PyErr_SetString(PyExc_SyntaxError, "unterminated string literal");
                    goto done;
                }
                memset(inside + p, 1, (size_t)(e - p));
                while (k < L && all_starts[k] - 1 < e) {
                    if (all_starts[k] - 1 >= p)
                        string_goes_on[k] = 1;
                    open_bracket[k] = depth != 0;
                    k++;
                }
                p = e;
                continue;
            }
            if (c == '(' || c == '[' || c == '{')
                depth++;
            else if (c == ')' || c == ']' || c == '}') {
                if (--depth < 0)
                    bad_brackets = 1; /* reported at the end: a stray quote later is reported first */
            }
            while (k < L && all_starts[k] - 1 <= p) {
                open_bracket[k] = depth != 0;
                k++;
            }
            p++;
        }
        if (bad_brackets || depth != 0) {
            PyErr_SetString(PyExc_SyntaxError, "brackets do not balance");
            goto done;
        }
    }

    char *boundary, *comment_only, *lift_c, *next_c;
    if (!(b_boundary = new_bytes(L, &boundary)) || !(b_comment = new_bytes(L, &comment_only)) ||
        !(b_lift = new_bytes(L * 8, &lift_c)) || !(b_next = new_bytes(L * 8, &next_c)))
        goto done;
    int64_t *lift = (int64_t *)lift_c, *next_boundary = (int64_t *)next_c;

    for (Py_ssize_t k = 0; k < L; k++) {
        int cont = 0;
        if (k > 0) {
            Py_ssize_t prev = (Py_ssize_t)all_starts[k] - 1;
            Py_ssize_t before = prev - 1 - ((READ(prev) == '\n' && prev >= 1 && READ(prev - 1) == '\r') ? 1 : 0);
            int backslash = before >= 0 && READ(before) == '\\' && !inside[before];
            cont = string_goes_on[k] || open_bracket[k] || backslash;
        }
        boundary[k] = !cont;
        Py_ssize_t f = (Py_ssize_t)all_starts[k];
        while (f < n && is_indent_space(READ(f)))
            f++;
        first[k] = f;
        head[k] = f < n ? READ(f) : '\n';
        blank[k] = head[k] == '\n' || head[k] == '\r' || f >= n;
    }
    /* a line that is only a backslash holds no token: the statement starts on the line it continues into */
    for (Py_ssize_t k = 0; k < L; k++) {
        Py_ssize_t f = (Py_ssize_t)first[k];
        if (head[k] == '\\' && f < n) {
            Py_UCS4 after = f + 1 < n ? READ(f + 1) : 0;
            int bare = (f + 1 >= n) || after == '\n' || after == '\r';
            if (bare && boundary[k]) {
                blank[k] = 1;
                if (k + 1 < L)
                    boundary[k + 1] = 1;
            }
        }
    }
    Py_ssize_t J = 0;
    for (Py_ssize_t k = 0; k < L; k++) {
        comment_only[k] = boundary[k] && head[k] == '#';
        if (boundary[k] && !blank[k] && !comment_only[k])
            J++;
    }
    /* lift[k]: first of the comment-only lines running up to line k-1; next_boundary[k]: the first
       boundary line after k (L at the end) */
    {
        int64_t last_other = -1;
        for (Py_ssize_t k = 0; k < L; k++) {
            lift[k] = k == 0 ? 0 : last_other + 1;
            if (!comment_only[k])
                last_other = k;
        }
        int64_t later = L;
        for (Py_ssize_t k = L - 1; k >= 0; k--) {
            next_boundary[k] = later;
            if (boundary[k])
                later = k;
        }
    }

    char *line_c, *start_c, *first_c, *indent_c, *word_c, *deco_c, *follows_c;
    if (!(b_line = new_bytes(J * 8, &line_c)) || !(b_start = new_bytes(J * 8, &start_c)) ||
        !(b_first = new_bytes(J * 8, &first_c)) || !(b_indent = new_bytes(J * 8, &indent_c)) ||
        !(b_word = new_bytes(J, &word_c)) || !(b_deco = new_bytes(J, &deco_c)) || !(b_follows = new_bytes(J, &follows_c)))
        goto done;
    {
        int64_t *line = (int64_t *)line_c, *start = (int64_t *)start_c, *lfirst = (int64_t *)first_c,
                *indent = (int64_t *)indent_c;
        Py_ssize_t j = 0;
        for (Py_ssize_t k = 0; k < L; k++) {
            if (!(boundary[k] && !blank[k] && !comment_only[k]))
                continue;
            Py_ssize_t s = (Py_ssize_t)all_starts[k], f = (Py_ssize_t)first[k];
            line[j] = k;
            start[j] = s;
            lfirst[j] = f;
            int64_t col = 0; /* Python's column count: tab stops every 8 */
            for (Py_ssize_t i = s; i < f; i++)
                col = READ(i) == '\t' ? (col / 8 + 1) * 8 : col + 1;
            indent[j] = col;
            /* the first word, where the regex's ^ (start of text or after \n) could see it */
            word_c[j] = -1;
            if (s == 0 || READ(s - 1) == '\n') {
                for (int w = 0; w < N_WORDS; w++) {
                    Py_ssize_t len = (Py_ssize_t)strlen(WORDS[w]), i = 0;
                    if (f + len > n)
                        continue;
                    while (i < len && READ(f + i) == (Py_UCS4)(unsigned char)WORDS[w][i])
                        i++;
                    if (i == len && (f + len >= n || !is_word_char(READ(f + len)))) {
                        word_c[j] = (char)w;
                        break;
                    }
                }
            }
            deco_c[j] = head[k] == '@';
            follows_c[j] = j > 0 && deco_c[j - 1] && indent[j - 1] == indent[j];
            j++;
        }
    }
    result = Py_BuildValue("{sOsOsOsOsOsOsOsOsOsOsO}", "boundary", b_boundary, "comment_only", b_comment,
                           "lift", b_lift, "next_boundary", b_next, "line", b_line, "start", b_start, "first",
                           b_first, "indent", b_indent, "word", b_word, "decorator", b_deco, "follows_decorator",
                           b_follows);
done:
    Py_XDECREF(b_boundary);
    Py_XDECREF(b_comment);
    Py_XDECREF(b_lift);
    Py_XDECREF(b_next);
    Py_XDECREF(b_line);
    Py_XDECREF(b_start);
    Py_XDECREF(b_first);
    Py_XDECREF(b_indent);
    Py_XDECREF(b_word);
    Py_XDECREF(b_deco);
    Py_XDECREF(b_follows);
    PyMem_Free(inside);
    PyMem_Free(string_goes_on);
    PyMem_Free(open_bracket);
    PyMem_Free(blank);
    PyMem_Free(first);
    PyMem_Free(head);
    PyBuffer_Release(&sv);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(text, line_start) -> dict of bytes (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_python_lines", "Logical lines of Python source in one pass.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__python_lines(void) { return PyModule_Create(&module_def); }
