"""Chunking real files: offsets, token limits, coverage, ids, structure, references."""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from hades_gpu.config import ChunkingConfig, DocumentsConfig
from hades_gpu.documents.chunking import chunk_document, chunk_text, process_document
from hades_gpu.documents.discovery import discover
from hades_gpu.documents.reading import read_document
from hades_gpu.documents.tokenizer import load_tokenizer
from hades_gpu.records import CODE, PROSE, DocumentRef, stable_id

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CC = ChunkingConfig()


def _ref(rel_path: str, modality: str, language: str, path: str = "/corpus/x") -> DocumentRef:
    return DocumentRef(path=path, rel_path=rel_path, size=0, modality=modality, language=language)


def check_chunks(text: str, chunks, cc: ChunkingConfig = CC, exact_ids: bool = True) -> None:
    """The contract of every chunk list (module docstring of hades_gpu.documents.chunking)."""
    tok = load_tokenizer()
    covered = np.zeros(len(text), dtype=bool)
    doc_ids = {c.doc_id for c in chunks}
    assert len(doc_ids) <= 1
    for k, c in enumerate(chunks):
        assert c.ordinal == k
        assert c.text == text[c.char_start : c.char_end]
        assert c.text.strip(), "whitespace-only chunk"
        assert c.text == c.text.rstrip()
        assert 1 <= c.n_tokens <= cc.chunk_tokens, c.n_tokens
        assert c.token_ids.dtype == np.int32
        if exact_ids:
            assert c.token_ids.tolist() == tok.encode(c.text, add_special_tokens=False).ids
        if k:
            assert c.char_start > chunks[k - 1].char_start  # document order
        covered[c.char_start : c.char_end] = True
    missed = [i for i in np.flatnonzero(~covered).tolist() if not text[i].isspace()]
    assert not missed, f"uncovered characters at {missed[:5]}"


def _stdlib_files(n: int, max_bytes: int = 40_000) -> list[Path]:
    files = [p for p in sorted(STDLIB.glob("*.py")) if 2_000 < p.stat().st_size < max_bytes]
    step = max(1, len(files) // n)
    return files[::step][:n]


def _doc_files(n: int) -> list[Path]:
    """Some of /usr/share/doc (if present): Markdown/RST/text files first, then plain files."""
    root = Path("/usr/share/doc")
    if not root.is_dir():
        return []
    marked: list[Path] = []
    plain: list[Path] = []
    for p in sorted(root.glob("*/*")):
        if p.is_file() and not p.is_symlink() and 500 < p.stat().st_size < 30_000:
            if p.suffix.lower() in (".txt", ".md", ".rst", ".markdown"):
                marked.append(p)
            elif p.suffix == "":
                plain.append(p)
    picked = marked[:: max(1, len(marked) // (2 * n // 3 or 1))][: 2 * n // 3]
    return picked + plain[:: max(1, len(plain) // (n - len(picked) or 1))][: n - len(picked)]


def _read(path: Path, root: Path) -> tuple[DocumentRef, str, str]:
    refs, _ = discover(path, DocumentsConfig())
    assert refs, path
    ref = refs[0]
    ref = DocumentRef(ref.path, str(path.relative_to(root)), ref.size, ref.modality, ref.language)
    text, digest = read_document(ref, DocumentsConfig(decode_errors="replace"))
    return ref, text, digest


@pytest.fixture(scope="module")
def real_docs() -> list[tuple[DocumentRef, str, str]]:
    docs = [_read(p, STDLIB) for p in _stdlib_files(30)]
    docs += [_read(p, Path("/usr/share/doc")) for p in _doc_files(12)]
    docs.append(_read(STDLIB / "json" / "decoder.py", STDLIB))
    return docs


def test_contract_on_real_files(real_docs) -> None:
    assert len(real_docs) >= 31
    for ref, text, digest in real_docs:
        chunks = chunk_document(ref, text, digest, CC)
        assert chunks, ref.rel_path
        check_chunks(text, chunks)
        for c in chunks:
            assert c.path == ref.path and c.modality == ref.modality and c.doc_id == ref.doc_id
            assert c.chunk_id == stable_id(ref.doc_id, digest, str(c.ordinal))


def test_small_windows_on_real_files(real_docs) -> None:
    """Tiny chunks stress every split level (statements, lines, token cuts, overlap)."""
    cc = ChunkingConfig(chunk_tokens=24, overlap_tokens=6, min_chunk_tokens=4)
    for ref, text, digest in real_docs[::4]:
        check_chunks(text, chunk_document(ref, text, digest, cc), cc)


def test_sliced_ids_equal_reencoded(real_docs) -> None:
    tok = load_tokenizer()
    for ref, text, digest in real_docs[::3]:
        fast, _ = chunk_text(ref, text, digest, CC, tok)
        slow, _ = chunk_text(ref, text, digest, CC, tok, reencode=True)
        assert [(c.char_start, c.char_end) for c in fast] == [(c.char_start, c.char_end) for c in slow]
        assert all(np.array_equal(a.token_ids, b.token_ids) for a, b in zip(fast, slow))


def test_ids_stable_and_content_sensitive() -> None:
    text = "Alpha beta gamma. " * 200
    ref = _ref("notes/a.txt", PROSE, "text")
    a = chunk_document(ref, text, "hash1", CC)
    b = chunk_document(ref, text, "hash1", CC)
    assert len(a) > 1 and [c.chunk_id for c in a] == [c.chunk_id for c in b]
    c = chunk_document(ref, text, "hash2", CC)
    assert not {x.chunk_id for x in a} & {x.chunk_id for x in c}
    d = chunk_document(_ref("notes/b.txt", PROSE, "text"), text, "hash1", CC)
    assert not {x.chunk_id for x in a} & {x.chunk_id for x in d}
    assert len({x.chunk_id for x in a}) == len(a)


def _top_level_starts(text: str) -> list[tuple[int, int, bool]]:
    """(start offset incl. decorators/comments above, end offset, is def/class) per statement."""
    lines = text.splitlines(keepends=True)
    offs = np.cumsum([0] + [len(x) for x in lines]).tolist()
    out = []
    prev_end = 0
    for node in ast.parse(text).body:
        line = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while line - 1 > prev_end and lines[line - 2].lstrip().startswith("#"):
            line -= 1
        out.append((offs[line - 1], offs[node.end_lineno],
                    isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))))
        prev_end = node.end_lineno
    return out


def test_python_chunks_align_with_top_level_defs() -> None:
    path = STDLIB / "json" / "decoder.py"
    text = path.read_text()
    ref = _ref("json/decoder.py", CODE, "python", str(path))
    chunks = chunk_document(ref, text, "h", CC)
    check_chunks(text, chunks)
    tok = load_tokenizer()
    units = _top_level_starts(text)
    starts = {s for s, _, _ in units}
    for c in chunks:
        # a chunk begins at a top-level statement, or inside one too large for a single chunk
        inside = [(s, e) for s, e, _ in units if s < c.char_start < e]
        if c.char_start in starts or c.char_start == 0:
            continue
        assert inside, c.text[:60]
        s, e = inside[0]
        assert len(tok.encode(text[s:e], add_special_tokens=False).ids) > CC.chunk_tokens
    # every def/class that fits a chunk is inside exactly one chunk
    n_whole = 0
    for s, e, is_def in units:
        if not is_def or len(tok.encode(text[s:e], add_special_tokens=False).ids) > CC.chunk_tokens:
            continue
        body = text[s:e].rstrip()
        holders = [c for c in chunks if c.char_start <= s and s + len(body) <= c.char_end]
        assert len(holders) == 1, body[:60]
        n_whole += 1
    assert n_whole >= 1
    assert chunks[0].text.startswith('"""Implementation of JSONDecoder')


def test_function_kept_whole_when_it_fits() -> None:
    funcs = []
    for i in range(12):
        body = "\n".join(f"    value_{j} = compute(argument_{i}, {j}) + offset" for j in range(6))
        funcs.append(f"# helper number {i}\n@decorator\ndef function_{i}(argument_{i}):\n{body}\n    return value_0\n")
    text = "import os\n\n\n" + "\n\n".join(funcs)
    chunks = chunk_document(_ref("pkg/m.py", CODE, "python"), text, "h", CC)
    check_chunks(text, chunks)
    for i in range(12):
        start = text.index(f"# helper number {i}\n")
        end = text.index("    return value_0\n", start) + len("    return value_0")
        assert sum(c.char_start <= start and end <= c.char_end for c in chunks) == 1, i
    assert all(c.text.startswith(("import os", "# helper number")) for c in chunks)


def test_big_class_splits_at_methods() -> None:
    methods = "\n".join(
        f"    def method_{i}(self, x):\n        \"\"\"Method {i} doc.\"\"\"\n"
        + "".join(f"        x = x * {j} + self.bias_{i}_{j}\n" for j in range(6 + i // 2))
        + f"        return x\n\n    attr_{i} = {i}\n"
        for i in range(10)
    )
    text = f"class Big:\n    \"\"\"A big class.\"\"\"\n\n{methods}"
    chunks = chunk_document(_ref("big.py", CODE, "python"), text, "h", CC)
    check_chunks(text, chunks)
    assert len(chunks) > 3
    assert chunks[0].text.startswith("class Big:")
    for c in chunks[1:]:
        assert c.text.startswith("    def method_"), c.text[:40]  # indentation kept
    for i in range(10):  # every method fits a chunk: none is split, small attributes tag along
        start = text.index(f"    def method_{i}(")
        end = text.index(f"attr_{i} = {i}", start)
        assert sum(c.char_start <= start and end <= c.char_end for c in chunks) == 1, i


def test_syntax_error_falls_back_to_blocks() -> None:
    blocks = [f"def broken_{i}(:\n" + "".join(f"    line_{j} = {j}\n" for j in range(10)) for i in range(12)]
    text = "import os\nfrom .sibling import thing\n\n" + "\n\n".join(blocks)
    ref = _ref("pkg/sub/m.py", CODE, "python")
    chunks, refs = chunk_text(ref, text, "h", CC)
    check_chunks(text, chunks)
    assert len(chunks) > 1
    assert all(c.text.startswith(("import os", "def broken_")) for c in chunks)  # blank-line blocks
    assert refs == ["os", "pkg.sub.sibling.thing"]


def test_long_line_cut_in_token_space() -> None:
    words = " ".join(f"w{i}x" for i in range(1500))
    text = f"const data = [{words}];\nconsole.log(data);\n"
    chunks = chunk_document(_ref("a.js", CODE, "javascript"), text, "h", CC)
    check_chunks(text, chunks)
    assert len(chunks) >= 4
    for a, b in zip(chunks, chunks[1:]):
        assert text[b.char_start - 1].isspace()  # cut between words
        assert b.char_start >= a.char_end  # code never overlaps


def test_unbroken_word_longer_than_a_chunk() -> None:
    text = "start " + "ab" * 5000 + " end"
    for modality, lang in ((PROSE, "text"), (CODE, "c")):
        check_chunks(text, chunk_document(_ref("x", modality, lang), text, "h", CC))


def test_prose_overlap_only_inside_split_paragraphs() -> None:
    long_para = " ".join(f"Sentence number {i} talks about topic {i % 7} at length." for i in range(120))
    short = "A short paragraph that fits easily."
    text = f"{short}\n\n{long_para}\n\n{short}\n\n{short}\n"
    chunks = chunk_document(_ref("a.txt", PROSE, "text"), text, "h", CC)
    check_chunks(text, chunks)
    para_start = text.index(long_para)
    para_end = para_start + len(long_para)
    overlaps = 0
    tok = load_tokenizer()
    for a, b in zip(chunks, chunks[1:]):
        if b.char_start < a.char_end:
            overlaps += 1
            assert para_start < b.char_start < para_end  # only windows inside the long paragraph
            shared = text[b.char_start : a.char_end]
            assert len(tok.encode(shared, add_special_tokens=False).ids) <= CC.overlap_tokens
    assert overlaps >= 3
    # sentences are kept whole: every chunk inside the paragraph ends at a sentence end
    for c in chunks:
        if para_start < c.char_end < para_end:
            assert c.text.endswith("length."), c.text[-30:]
    assert chunks[-1].text.endswith(short)


def test_markdown_headings_start_chunks() -> None:
    sections = []
    for i in range(6):
        body = " ".join(f"Line {j} of section {i} explains a detail." for j in range(12))
        sections.append(f"## Section {i}\n\n{body}\n")
    text = "# Title\n\nIntro text.\n\n" + "\n".join(sections)
    chunks = chunk_document(_ref("README.md", PROSE, "markdown"), text, "h", CC)
    check_chunks(text, chunks)
    assert [c.text.split("\n")[0] for c in chunks[1:]] == [f"## Section {i}" for i in range(1, 6)]
    assert chunks[0].text.startswith("# Title") and "## Section 0" in chunks[0].text


def test_fenced_code_is_not_a_heading() -> None:
    text = "Intro.\n\n```python\n# not a heading\nx = 1\n```\n\nMore text.\n"
    chunks = chunk_document(_ref("a.md", PROSE, "markdown"), text, "h", CC)
    check_chunks(text, chunks)
    assert len(chunks) == 1


def test_trailing_fragment_merges() -> None:
    sentence = "This sentence has a handful of ordinary words. "
    text = sentence * 40 + "\n\nEnd."
    chunks = chunk_document(_ref("a.txt", PROSE, "text"), text, "h", CC)
    check_chunks(text, chunks)
    assert chunks[-1].text.endswith("End.") and chunks[-1].n_tokens >= CC.min_chunk_tokens


def test_crlf_and_unicode_offsets() -> None:
    text = "Première ligne 😀 avec\r\ndes accents\u200b et\u00a0espaces.\r\n\r\n中文句子。第二句！\r\n" * 60
    chunks = chunk_document(_ref("u.txt", PROSE, "text"), text, "h", ChunkingConfig(32, 8, 4))
    check_chunks(text, chunks, ChunkingConfig(32, 8, 4))


def test_process_document(tmp_path: Path) -> None:
    good = tmp_path / "pkg" / "mod.py"
    good.parent.mkdir()
    good.write_text("import json\nfrom . import util\n\n\ndef f():\n    return json.dumps(1)\n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02binary")
    invisible = tmp_path / "zw.txt"
    invisible.write_text("\u200b\u200c\u200d")
    refs, _ = discover(tmp_path, DocumentsConfig())
    out = {r.rel_path: process_document(r, DocumentsConfig(), CC) for r in refs}
    doc = out["pkg/mod.py"]
    assert doc.skip_reason is None and len(doc.chunks) == 1
    assert doc.references == ["json", "pkg.util"]
    assert doc.content_hash == read_document(refs[1], DocumentsConfig())[1]
    assert (out["blob.txt"].skip_reason, out["blob.txt"].chunks) == ("binary", [])
    assert out["zw.txt"].skip_reason == "empty"
    gone = DocumentRef(str(tmp_path / "gone.py"), "gone.py", 1, CODE, "python")
    assert process_document(gone, DocumentsConfig(), CC).skip_reason == "missing"


def test_python_references() -> None:
    text = (
        "import os, os.path as osp\n"
        "import a.b.c\n"
        "from x.y import z, w as ww\n"
        "from . import sibling\n"
        "from .. import parent_mod\n"
        "from .helpers import h1\n"
        "from ...top import t\n"
        "from ....too.far import q\n"
        "from m import *\n"
        "def f():\n"
        "    import inner.mod\n"
        "    try:\n"
        "        from zz import yy\n"
        "    except ImportError:\n"
        "        pass\n"
        "import os\n"
    )
    _, refs = chunk_text(_ref("pkg/sub/mod.py", CODE, "python"), text, "h", CC)
    assert refs == ["os", "os.path", "a.b.c", "x.y.z", "x.y.w", "pkg.sub.sibling", "pkg.parent_mod",
                    "pkg.sub.helpers.h1", "top.t", "....too.far.q", "m", "inner.mod", "zz.yy"]
    _, refs = chunk_text(_ref("pkg/__init__.py", CODE, "python"), "from .core import run\n", "h", CC)
    assert refs == ["pkg.core.run"]


def test_python_references_of_a_file_with_a_syntax_error_skip_its_docstrings() -> None:
    """The fallback for Python whose logical lines cannot be found read `from mypkg import logging`
    out of a docstring's example and linked that module."""
    quotes = "'" * 3
    text = ('"""Example:\n\n    from mypkg import logging\n"""\nimport real.one\n'
            f"def broken(:\n    pass\ns = {quotes}import fake{quotes}\nfrom x import y\n")
    _, refs = chunk_text(_ref("pkg/mod.py", CODE, "python"), text, "h", CC)
    assert refs == ["real.one", "x.y"]


def test_markdown_references() -> None:
    text = (
        "See [the guide](docs/guide.md#install) and [api](../api/index.md \"API\").\n"
        "Images too: ![diagram](img/arch.png). External: [site](https://example.com/x.md),\n"
        "[mail](mailto:a@b.c), [anchor](#local), <https://auto.link>, <docs/auto.md>, <br/>.\n"
        "[ref]: refs/target.md\n"
        "[file](file:///abs/path.md)\n\n"
        "```\n[not](in/code.md)\n```\n"
        "Inline `[nor](this.md)` either.\n"
    )
    _, refs = chunk_text(_ref("README.md", PROSE, "markdown"), text, "h", CC)
    assert refs == ["docs/guide.md", "../api/index.md", "img/arch.png", "docs/auto.md",
                    "refs/target.md", "file:///abs/path.md"]


def test_markdown_references_skip_html_comments_and_take_html_links() -> None:
    """`<!-- [old](../pkg/json.py) -->` linked that file; `<a href="../include/ring.h">` did not."""
    text = ("Intro <!-- [old](../pkg/json.py) and\n[gone](gone.md) -->.\n"
            "See <a class=\"x\" href=\"../include/ring.h\">the ring</a> and <A HREF='docs/b.md#top'>b</A>,\n"
            "not <a href=\"https://example.com\">a site</a>; then [kept](kept.md).\n"
            "Unclosed <!-- [lost](tail.md)\n")
    _, refs = chunk_text(_ref("README.md", PROSE, "markdown"), text, "h", CC)
    assert refs == ["../include/ring.h", "docs/b.md", "kept.md"]


def test_rst_references() -> None:
    text = (
        "Title\n=====\n\n"
        "Read `the guide <guide.rst#part>`_ and `site <https://example.com>`__.\n"
        "A `named <target_>`_ reference is not a document.\n\n"
        ".. include:: shared/header.rst\n"
        ".. literalinclude:: ../examples/demo.py\n\n"
        "See :doc:`install` and :doc:`the API <api/index>`.\n"
    )
    _, refs = chunk_text(_ref("index.rst", PROSE, "rst"), text, "h", CC)
    assert refs == ["guide.rst", "shared/header.rst", "../examples/demo.py", "install", "api/index"]
    assert re.match(r"Title\n=====", chunk_document(_ref("index.rst", PROSE, "rst"), text, "h", CC)[0].text)


# -- process_document: what a worker returns per file --------------------------------------------


def _file_ref(path: Path, modality: str, language: str, rel: str | None = None) -> DocumentRef:
    return DocumentRef(path=str(path), rel_path=rel or path.name, size=path.stat().st_size, modality=modality,
                       language=language)


def test_process_document_returns_exact_chunks_references_and_hash(tmp_path):
    import hashlib

    src = Path(sysconfig.get_paths()["stdlib"]) / "bisect.py"
    path = tmp_path / "bisect.py"
    path.write_bytes(src.read_bytes())
    ref = _file_ref(path, CODE, "python", rel="pkg/bisect.py")
    doc = process_document(ref, DocumentsConfig(), CC)
    assert doc.skip_reason is None and doc.skip_detail in (None, "") and doc.ref is ref
    digest = hashlib.blake2b(path.read_bytes(), digest_size=len(bytes.fromhex(doc.content_hash))).hexdigest()
    assert doc.content_hash == digest
    assert "_bisect" in doc.references  # `from _bisect import *`
    text = path.read_text()
    for k, c in enumerate(doc.chunks):
        assert (c.doc_id, c.ordinal, c.path, c.modality) == (ref.doc_id, k, str(path), CODE)
        assert c.chunk_id == stable_id(ref.doc_id, doc.content_hash, str(k))
        assert c.token_ids.dtype == np.int32 and c.text == text[c.char_start:c.char_end]
    starts = {text[c.char_start:].split("\n", 1)[0] for c in doc.chunks}
    assert any(s.startswith("def ") for s in starts)  # definitions begin chunks


def test_python_is_known_by_language_or_by_extension(tmp_path):
    """A python-language file without .py and a .pyi stub get the AST chunker; other code does not."""
    from hades_gpu.documents.chunking import _is_python

    assert _is_python(_ref("tool", CODE, "python")) and _is_python(_ref("stubs/x.pyi", CODE, "unknown"))
    assert _is_python(_ref("x.py", CODE, "unknown")) and not _is_python(_ref("x.js", CODE, "javascript"))
    assert not _is_python(_ref("x.pyc.txt", CODE, "text"))
    body = "import os\nfrom pkg import mod\n\n" + "".join(
        f"def f{i}(x):\n    return x * {i}\n\n\n" for i in range(60))
    for name, language in (("tool", "python"), ("tool.pyi", "unknown")):
        p = tmp_path / name
        p.write_text(body)
        doc = process_document(_file_ref(p, CODE, language), DocumentsConfig(), CC)
        assert doc.references == ["os", "pkg.mod"]  # from the AST; non-python code has none
        assert all(body[c.char_start:].startswith(("def ", "import ")) for c in doc.chunks)
    other = tmp_path / "tool.txt"
    other.write_text(body)
    assert process_document(_file_ref(other, CODE, "text"), DocumentsConfig(), CC).references == []


def test_process_document_skips_name_their_reason(tmp_path):
    blob = tmp_path / "blob.dat"
    blob.write_bytes(bytes(range(256)) * 4)
    doc = process_document(_file_ref(blob, PROSE, "text"), DocumentsConfig(), CC)
    assert (doc.skip_reason, doc.content_hash, doc.chunks) == ("binary", "", []) and doc.skip_detail
    invisible = tmp_path / "zero-width.txt"
    invisible.write_text("\u200b\u200d" * 50)  # format characters only: the tokenizer drops them all
    doc = process_document(_file_ref(invisible, PROSE, "text"), DocumentsConfig(), CC)
    assert doc.skip_reason == "empty" and doc.skip_detail.startswith("no tokens") and doc.content_hash
    ok = tmp_path / "ok.txt"
    ok.write_text("A short note.\n")
    bad_cfg = ChunkingConfig(chunk_tokens=0)
    doc = process_document(_file_ref(ok, PROSE, "text"), DocumentsConfig(), bad_cfg)
    assert doc.skip_reason == "chunk_error" and doc.content_hash
    assert doc.skip_detail == "ValueError: chunking.chunk_tokens must be >= 1 (got 0)"
    assert process_document(_file_ref(ok, PROSE, "text"), DocumentsConfig(), ChunkingConfig(chunk_tokens=1)).chunks


def test_prose_windows_overlap_code_windows_do_not_and_indentation_is_kept_only_in_code(tmp_path):
    para = " ".join(f"word{i}" for i in range(400))
    p = tmp_path / "notes.txt"
    p.write_text(para)
    cc = ChunkingConfig(chunk_tokens=64, overlap_tokens=20, min_chunk_tokens=4)
    prose = process_document(_file_ref(p, PROSE, "text"), DocumentsConfig(), cc).chunks
    assert len(prose) > 5
    assert all(b.char_start < a.char_end for a, b in zip(prose, prose[1:]))  # overlapping windows
    flat = process_document(_file_ref(p, PROSE, "text"), DocumentsConfig(),
                            ChunkingConfig(chunk_tokens=64, overlap_tokens=0, min_chunk_tokens=4)).chunks
    assert all(b.char_start >= a.char_end for a, b in zip(flat, flat[1:]))
    big = ChunkingConfig(chunk_tokens=10, overlap_tokens=4, min_chunk_tokens=1)  # overlap capped below budget/2
    capped = process_document(_file_ref(p, PROSE, "text"), DocumentsConfig(), big).chunks
    assert all(len(c.token_ids) <= 10 for c in capped) and len(capped) > len(prose)
    code = tmp_path / "m.py"
    code.write_text("class A:\n" + "".join(f"    def m{i}(self):\n        return {i}\n\n" for i in range(80)))
    cchunks = process_document(_file_ref(code, CODE, "python"), DocumentsConfig(), cc).chunks
    assert all(b.char_start >= a.char_end for a, b in zip(cchunks, cchunks[1:]))  # code never overlaps
    assert any(c.text.startswith("    def ") for c in cchunks)  # a method chunk keeps its indentation
    assert not any(c.text[:1].isspace() for c in prose + flat)


@pytest.mark.parametrize("hf_offsets", [False, True])
def test_window_edge_inside_a_token_takes_the_pieces_own_ids(hf_offsets: bool) -> None:
    """A form feed is a line break to Python but a deleted character to BERT: inside a word of over
    100 characters (one [UNK]) a window edge there lay inside that token, and the chunk stored a
    slice of the document's ids that its own text does not encode to (found by a fuzzing user)."""
    text = ("=1[SEP]the##\x1b[0mx\x0c\u0301\U0001F1FA\U0001F1F8012345678901234567890123456789the" + "a" * 115
            + "the\u2060\x00Σ. ===İthe1\ufe0f\u20e3\x0c---")
    cc = ChunkingConfig(chunk_tokens=16, overlap_tokens=32, min_chunk_tokens=8)
    chunks, _ = chunk_text(_ref("f.md", PROSE, "markdown"), text, "h", cc, load_tokenizer(), hf_offsets=hf_offsets)
    assert len(chunks) >= 2
    check_chunks(text, chunks, cc)


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
@pytest.mark.parametrize("rel, modality, language", [("main.go", CODE, "go"), ("notes.md", PROSE, "markdown")])
def test_a_file_with_windows_or_old_mac_line_ends_is_chunked_as_its_lf_twin(newline, rel, modality, language):
    """Every CRLF line end read as a blank line (the regex split \\r\\n into \\r and \\n), so each line
    of a CRLF Go or Markdown file was a block or paragraph of its own: chunks cut functions and
    paragraphs that fit whole (`func f22() int {` ended one chunk, its body began the next)."""
    if modality == CODE:
        text = 'package main\n\nimport "fmt"\n\n' + "\n".join(
            f'func f{i}() int {{\n\tfmt.Println("hello {i}")\n\treturn {i}\n}}\n' for i in range(80))
    else:
        text = "\n\n".join(f"Paragraph {i} opens here on alpha and beta.\nIts second line goes on about kappa.\n"
                           f"Then zeta ends it for good." for i in range(60)) + "\n"
    cc = ChunkingConfig()
    tok = load_tokenizer()
    lf, _ = chunk_text(_ref(rel, modality, language), text, "h", cc, tok)
    other, _ = chunk_text(_ref(rel, modality, language), text.replace("\n", newline), "h", cc, tok)
    assert [c.text.replace(newline, "\n") for c in other] == [c.text for c in lf]
    if modality == CODE:
        assert all(c.text.lstrip().startswith(("func f", "package", "import")) for c in other)


def test_a_cr_only_python_or_markdown_file_keeps_its_statements_imports_and_links():
    """Old Mac line ends (CR only): the statement and link finders look for line starts after "\n", so
    a CR-only Python file lost its imports (no reference edge) and its if/else structure (a chunk began
    with `else:`), and a Markdown reference link was not found."""
    import sysconfig
    from pathlib import Path

    source = (Path(sysconfig.get_paths()["stdlib"]) / "fnmatch.py").read_text()
    cc, tok = ChunkingConfig(), load_tokenizer()
    lf, lf_refs = chunk_text(_ref("fnmatch.py", CODE, "python"), source, "h", cc, tok)
    cr, cr_refs = chunk_text(_ref("fnmatch.py", CODE, "python"), source.replace("\n", "\r"), "h", cc, tok)
    assert cr_refs == lf_refs and "re" in cr_refs
    assert [c.text.replace("\r", "\n") for c in cr] == [c.text for c in lf]
    md = "Intro text here.\n\nSee [the guide][g].\n\n[g]: b.md\n"
    _, md_refs = chunk_text(_ref("a.md", PROSE, "markdown"), md.replace("\n", "\r"), "h", cc, tok)
    assert md_refs == ["b.md"]
