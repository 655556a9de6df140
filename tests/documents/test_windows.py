"""Documents longer than `chunking.window_chars` are chunked one window at a time: memory is bounded
by the window, not by the file, and the chunk rules still hold for the whole document (exact text at
its offsets, ordinals 0..n-1, ids of each chunk's own text, every non-whitespace character covered)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hades_gpu.config import ChunkingConfig
from hades_gpu.documents.chunking import chunk_in_windows, chunk_text, process_document, window_bounds
from hades_gpu.documents.tokenizer import load_tokenizer
from hades_gpu.records import CODE, PROSE, DocumentRef

SMALL = dataclasses.replace(ChunkingConfig(), window_chars=4096)


def ref(rel: str, modality: str, language: str) -> DocumentRef:
    return DocumentRef(path=f"/c/{rel}", rel_path=rel, size=0, modality=modality, language=language)


def check_rules(text: str, chunks, budget: int) -> None:
    tok = load_tokenizer()
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert len({c.chunk_id for c in chunks}) == len(chunks)
    covered = np.zeros(len(text), dtype=bool)
    for c in chunks:
        assert text[c.char_start:c.char_end] == c.text
        assert 1 <= c.n_tokens <= budget
        assert c.token_ids.tolist() == tok.encode(c.text, add_special_tokens=False).ids
        covered[c.char_start:c.char_end] = True
    assert all(covered[i] or text[i].isspace() for i in range(len(text)))


@pytest.mark.parametrize("text", [
    "para one. " * 50 + "\n\n" + ("line of words\n" * 400) + "\n\n" + "x" * 9000 + " tail",
    "一二三四五六七八九十" * 1500,  # no whitespace at all: hard cuts
    "word " * 4000,  # one line
], ids=["paragraphs-lines-word", "cjk-no-spaces", "one-line"])
def test_window_bounds_partition_the_text_at_the_best_boundary(text):
    bounds = window_bounds(text, 4096)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(text)
    assert all(a < b and b - a <= 4096 for a, b in bounds)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    for _a, b in bounds[:-1]:  # a cut after whitespace wherever the window's last quarter has some
        window = text[b - 1024:b]
        if any(ch.isspace() for ch in window):
            assert text[b - 1].isspace()


def test_window_bounds_prefer_blank_lines_then_top_level_lines():
    text = "a\n" * 1000 + "\n" + "b\n" * 1500  # a blank line at 2001
    assert window_bounds(text, 2600)[0] == (0, 2001)
    code = ("def f():\n" + "    x = 1\n" * 50) * 20
    for _a, b in window_bounds(code, 3000)[:-1]:
        assert code[b:b + 3] == "def"  # cut before a top-level line, never inside a body


@pytest.mark.parametrize("modality,language,rel", [(PROSE, "markdown", "long.md"), (CODE, "python", "big.py"),
                                                   (PROSE, "text", "cjk.txt")])
def test_long_documents_follow_every_chunk_rule_across_windows(modality, language, rel):
    py = Path(textwrap.__file__).read_text(encoding="utf-8")
    texts = {"long.md": "# Title\n\n" + "\n\n".join(f"Paragraph {i}: " + "lorem ipsum dolor " * (5 + i % 40)
                                                  for i in range(120)),
             "big.py": py * 2, "cjk.txt": "一二三四五六七八九十。" * 2000}
    text = texts[rel]
    assert len(text) > 4 * SMALL.window_chars
    chunks, refs = chunk_in_windows(ref(rel, modality, language), text, "h", SMALL)
    check_rules(text, chunks, SMALL.chunk_tokens)
    if rel == "big.py":
        assert "re" in refs  # textwrap imports re: found by the line-based fallback
    # a document under the window is chunked as a whole, exactly as chunk_text does it
    short = text[:3000]
    a, _ = chunk_text(ref(rel, modality, language), short, "h", SMALL)
    b, _ = chunk_text(ref(rel, modality, language), short, "h", ChunkingConfig())
    assert [(c.char_start, c.char_end) for c in a] == [(c.char_start, c.char_end) for c in b]


_PEAK = """
import json, sys
from hades_gpu.config import ChunkingConfig, DocumentsConfig
from hades_gpu.documents.chunking import process_document
from hades_gpu.records import DocumentRef
path, window = sys.argv[1], int(sys.argv[2])
import os
ref = DocumentRef(path=path, rel_path="one_line.txt", size=os.path.getsize(path), modality="prose", language="text")
def hwm_kib():  # VmHWM: this process's own peak (ru_maxrss carries the forking parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
before = hwm_kib()
doc = process_document(ref, DocumentsConfig(), ChunkingConfig(window_chars=window))
print(json.dumps({"chunks": len(doc.chunks), "skip": doc.skip_reason, "grew_kib": hwm_kib() - before}))
"""


def test_memory_per_document_is_bounded_by_the_window(tmp_path):
    """A 2 MB single-line file (real processes, their VmHWM): chunked in 64 KiB windows it costs a
    fraction of what the same file costs chunked whole (which holds every token's offset at once)."""
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "chunk", "graph", "tokens", "embed"])
    line = " ".join(f"{w}{n}" for w, n in zip(rng.choice(words, 260_000), rng.integers(0, 999, 260_000)))
    path = tmp_path / "one_line.txt"
    path.write_text(line[:2_000_000])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")])}
    runs = {}
    for window in (65536, 10_000_000):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(window)], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[window] = json.loads(out.stdout.strip().splitlines()[-1])
    windowed, whole = runs[65536], runs[10_000_000]
    assert windowed["skip"] is None and whole["skip"] is None
    assert abs(windowed["chunks"] - whole["chunks"]) <= 0.02 * whole["chunks"]  # the same text, a few edges
    assert windowed["grew_kib"] < 0.5 * whole["grew_kib"], runs


def test_a_long_python_file_is_cut_at_statements_and_chunked_by_them():
    """Windows end at top-level statements of the whole file, each window is chunked by its
    statements (chunks begin where the one-piece chunker would let them), and the imports come
    from the whole file's logical lines (an `import` inside a docstring is none)."""
    from hades_gpu.documents.code_chunker import PythonStructure

    funcs = "".join(
        f'def function_{i}(value):\n    """Doc {i}.\n\nimport not_a_module\n"""\n'
        + "".join(f"    value = value * {j} + {i}\n" for j in range(8)) + "    return value\n\n\n"
        for i in range(150))
    text = "import os\nfrom .helpers import tool\n\n\n" + funcs + "import late_module\n"
    assert len(text) > 4 * SMALL.window_chars
    starts = {s for s, _e, _x in PythonStructure(text).units()}
    bounds = window_bounds(text, SMALL.window_chars, sorted(starts))
    assert all(b in starts for _a, b in bounds[:-1])
    chunks, refs = chunk_in_windows(ref("pkg/big.py", CODE, "python"), text, "h", SMALL)
    check_rules(text, chunks, SMALL.chunk_tokens)
    assert all(c.char_start in starts for c in chunks)  # every function fits a chunk: none is split
    assert refs == ["os", "pkg.helpers.tool", "late_module"]
    # unbalanced Python: windows by lines, imports by the line-based fallback
    broken = text.replace("def function_3(value):", "def function_3(value:")
    chunks, refs = chunk_in_windows(ref("pkg/big.py", CODE, "python"), broken, "h", SMALL)
    check_rules(broken, chunks, SMALL.chunk_tokens)
    assert "late_module" in refs and "os" in refs


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_long_texts_are_cut_at_blank_lines_whatever_their_line_ends(newline):
    """window_bounds looked for "\\n\\n" only: a CRLF or CR-only file over the window size never got a
    blank-line cut (it fell back to any line break)."""
    from hades_gpu.documents.chunking import window_bounds

    text = ("some words here" + newline) * 10 + newline
    text = text * 1000
    bounds = window_bounds(text, 5000)
    assert len(bounds) > 5
    assert all(text[:end].endswith(newline * 2) for _, end in bounds[:-1]), [repr(text[end - 6:end]) for _, end in bounds[:3]]
