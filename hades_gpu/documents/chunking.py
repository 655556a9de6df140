"""Chunk one document: structure per modality, windows in token space, stable ids.

This is what a worker process runs per file (`process_document`): read, tokenize once, cut, and
collect references. The rules (`hades_gpu.documents.packing`, `prose_chunker`, `code_chunker`):

- every chunk: ``text == document_text[char_start:char_end]``, ``1 <= n_tokens <= chunk_tokens``,
  no leading/trailing whitespace (code keeps the first line's indentation), never whitespace only;
  ordinals ``0..n-1`` in document order; ``chunk_id = stable_id(doc_id, content_hash, str(ordinal))``;
- together the chunks cover every non-whitespace character of the document;
- ``token_ids`` are exactly the tokenizer's ids for the chunk's text, without special tokens;
- prose packs paragraphs (a heading opens a new chunk), splitting a long paragraph by sentences
  with ``overlap_tokens`` of overlap between its windows; code packs top-level statements (Python)
  or blank-line blocks (other languages) without overlap, splitting a long one by its statements,
  lines, then tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from hades_gpu.config import ChunkingConfig, DocumentsConfig
from hades_gpu.documents.code_chunker import (
    CodeStructure,
    PythonStructure,
    python_references_fallback,
)
from hades_gpu.documents.packing import Children, Packer, Span, finalize, line_starts
from hades_gpu.documents.prose_chunker import ProseStructure, prose_references, prose_units
from hades_gpu.documents.reading import SkipDocument, read_text
from hades_gpu.documents.tokenized import SegmentMismatch, Tokenized, TokenizedText, tokenize_document
from hades_gpu.documents.tokenizer import load_tokenizer
from hades_gpu.records import CODE, PROSE, Chunk, ChunkedDocument, DocumentRef, stable_id

log = logging.getLogger(__name__)


_LONE_CR = re.compile(r"\r(?!\n)")


def line_shape(text: str) -> str:
    """`text` with every lone CR (old Mac line ends) as LF, the same length: what the structure finders
    read (statements, blocks, paragraphs, headings, imports and links look for line starts after
    "\n"), while chunk offsets and texts stay the document's own. A CR-only Python file lost its
    imports and its if/else structure; the tokens are the same (both are whitespace to the model)."""
    return _LONE_CR.sub("\n", text) if "\r" in text else text


def _is_python(ref: DocumentRef) -> bool:
    return ref.language == "python" or ref.rel_path.endswith((".py", ".pyi"))


def _python_structure(ref: DocumentRef, text: str) -> Optional[PythonStructure]:
    """The statement structure of a Python text, or None (logged) where its lines cannot be found."""
    try:
        return PythonStructure(text)
    except SyntaxError as err:
        log.debug("%s: no statement structure (%s); line-based chunking", ref.rel_path, err)
        return None


def _pack(tt: Tokenized, children: Children, units: list[Span], budget: int, chunking: ChunkingConfig,
          overlap: int, absorb_top: bool, keep_indent: bool) -> list[tuple[int, int, np.ndarray]]:
    packer = Packer(tt, children, chunking.min_chunk_tokens, overlap=overlap, absorb_top=absorb_top)
    windows = packer.pack(units, budget)
    return finalize(tt, windows, budget, chunking.min_chunk_tokens, keep_indent, packer)


def chunk_text(
    ref: DocumentRef,
    text: str,
    content_hash: str,
    chunking: ChunkingConfig,
    tokenizer: Optional[Tokenizer] = None,
    *,
    reencode: bool = False,
    hf_offsets: bool = False,
) -> tuple[list[Chunk], list[str]]:
    """Chunks of `text` and the document's references (see `chunk_document`, `process_document`).

    `hf_offsets` takes every token's offset from HF `tokenizers` (the path without a fast tokenizer:
    tests and the benchmark compare both); by default `tokenize_document` picks the fast path."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    budget = chunking.chunk_tokens
    if budget < 1:
        raise ValueError(f"chunking.chunk_tokens must be >= 1 (got {budget})")
    references: list[str] = []
    shape = line_shape(text)
    if ref.modality == CODE:
        structure: CodeStructure
        python = _python_structure(ref, shape) if _is_python(ref) else None
        if python is not None:
            structure, references = python, python.references(ref.rel_path)
        elif _is_python(ref):
            structure = CodeStructure(shape)
            references = python_references_fallback(shape, ref.rel_path)
        else:
            structure = CodeStructure(shape)
        children = structure.children
        units = structure.units()
        starts = structure.line_starts  # the structure's own: computed once per document
        overlap, absorb_top, keep_indent = 0, False, True
    else:
        prose = ProseStructure(shape)
        children = prose.children
        units = prose_units(shape, ref.language)
        references = prose_references(shape, ref.language)
        starts = line_starts(shape)
        overlap = min(chunking.overlap_tokens, max(0, budget // 2 - 1))
        absorb_top, keep_indent = True, False
    # the packer counts tokens at every top-level span and at the lines of the long ones: cut the
    # document at all of them up front (one batched encode instead of a re-encode per later cut)
    cuts = np.union1d(np.fromiter((s for s, _e, _sec in units), dtype=np.int64, count=len(units)),
                      starts).tolist()
    try:
        tt = TokenizedText(text, tok, reencode) if hf_offsets else tokenize_document(text, tok, reencode, cuts)
        pieces = _pack(tt, children, units, budget, chunking,
                       overlap, absorb_top, keep_indent)
    except SegmentMismatch as err:  # the fast ids disagree with HF somewhere: HF offsets throughout
        log.warning("%s: %s; tokenizing it with offsets instead", ref.rel_path, err)
        pieces = _pack(TokenizedText(text, tok, reencode), children, units, budget, chunking,
                       overlap, absorb_top, keep_indent)
    doc_id = ref.doc_id
    chunks = [
        Chunk(
            doc_id=doc_id,
            chunk_id=stable_id(doc_id, content_hash, str(k)),
            path=ref.path,
            modality=ref.modality,
            ordinal=k,
            char_start=s,
            char_end=e,
            text=text[s:e],
            token_ids=np.array(ids, dtype=np.int32),  # a copy: not a view pinning the whole document
        )
        for k, (s, e, ids) in enumerate(pieces)
    ]
    return chunks, references


def chunk_document(
    ref: DocumentRef,
    text: str,
    content_hash: str,
    chunking: ChunkingConfig,
    tokenizer: Optional[Tokenizer] = None,
) -> list[Chunk]:
    """The chunks of a decoded document (rules in the module docstring).

    Args:
        ref (DocumentRef): the document (modality and language pick the chunker).
        text (str): its decoded text; chunk offsets index this string.
        content_hash (str): hash of its raw bytes (part of every chunk id).
        chunking (ChunkingConfig): ``chunk_tokens``, ``overlap_tokens``, ``min_chunk_tokens``.
        tokenizer (tokenizers.Tokenizer, optional): default: the model's (`load_tokenizer`).
    """
    return chunk_text(ref, text, content_hash, chunking, tokenizer)[0]


def window_bounds(text: str, limit: int, preferred: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """Cut a long text into consecutive windows of at most `limit` characters, each ending at the best
    boundary: the last of the `preferred` cuts (sorted; a Python file's top-level statements) in its
    second half, else in its last quarter a blank line, else a line break before a line that starts
    at column 0 (a top-level statement in code), else any line break, else whitespace, else anywhere."""
    n = len(text)
    bounds: list[tuple[int, int]] = []
    start = 0
    cuts = np.asarray(preferred if preferred is not None else [], dtype=np.int64)
    while n - start > limit:
        lo, hi = start + (3 * limit) // 4, start + limit
        k = int(np.searchsorted(cuts, hi, "right")) - 1
        if k >= 0 and cuts[k] >= start + limit // 2:
            bounds.append((start, int(cuts[k])))
            start = int(cuts[k])
            continue
        # a blank line in any line-end convention (CRLF and CR-only files had none: "\n\n" only)
        cut = max((p + len(sep) if p >= 0 else -1) for sep in ("\n\n", "\r\n\r\n", "\r\r")
                  for p in (text.rfind(sep, lo, hi),))
        if cut < 0:
            cut = -1
            pos = text.rfind("\n", lo, hi - 1)
            while pos >= lo:  # a line break followed by a non-indented line
                if not text[pos + 1].isspace():
                    cut = pos + 1
                    break
                pos = text.rfind("\n", lo, pos)
            if cut < 0:
                pos = text.rfind("\n", lo, hi)
                cut = pos + 1 if pos >= 0 else -1
            if cut < 0:
                for pos in range(hi - 1, lo - 1, -1):
                    if text[pos].isspace():
                        cut = pos + 1
                        break
            if cut < 0:
                cut = hi
        bounds.append((start, cut))
        start = cut
    bounds.append((start, n))
    return bounds


def chunk_in_windows(
    ref: DocumentRef,
    text: str,
    content_hash: str,
    chunking: ChunkingConfig,
    tokenizer: Optional[Tokenizer] = None,
    *,
    hf_offsets: bool = False,
) -> tuple[list[Chunk], list[str]]:
    """`chunk_text` over a document longer than ``chunking.window_chars``, one window at a time, so
    that tokenizing and packing memory is bounded by the window, not by the file (a 16 MB single-line
    file would otherwise hold millions of token offsets). A chunk never spans two windows; offsets,
    ordinals and chunk ids are the document's. A Python file's logical lines (`python_lines`: arrays,
    a few bytes per character while they are found) put the window cuts at top-level statements,
    so each window is chunked by its statements, and give the file's imports; Python whose lines
    cannot be found is chunked line-wise, its imports found by the line-based fallback."""
    shape = line_shape(text)
    structure = _python_structure(ref, shape) if _is_python(ref) else None
    chunks: list[Chunk] = []
    references: list[str] = []
    doc_id = ref.doc_id
    window_ref = ref if not _is_python(ref) or structure is not None else DocumentRef(
        path=ref.path, rel_path=ref.rel_path + ".window", size=ref.size, modality=ref.modality, language="unknown",
        mtime_ns=ref.mtime_ns)
    preferred = [s for s, _e, _sec in structure.units()] if structure is not None else None
    for s, e in window_bounds(shape, chunking.window_chars, preferred):
        piece, refs = chunk_text(window_ref, text[s:e], content_hash, chunking, tokenizer, hf_offsets=hf_offsets)
        for c in piece:
            k = len(chunks)
            chunks.append(Chunk(doc_id=doc_id, chunk_id=stable_id(doc_id, content_hash, str(k)), path=ref.path,
                                modality=ref.modality, ordinal=k, char_start=c.char_start + s,
                                char_end=c.char_end + s, text=c.text, token_ids=c.token_ids))
        references.extend(refs)
    if structure is not None:
        references = structure.references(ref.rel_path)
    elif _is_python(ref):
        references = python_references_fallback(shape, ref.rel_path)
    return chunks, list(dict.fromkeys(references))


def process_document(
    ref: DocumentRef,
    documents_cfg: DocumentsConfig,
    chunking_cfg: ChunkingConfig,
    tokenizer: Optional[Tokenizer] = None,
    *,
    hf_offsets: bool = False,
) -> ChunkedDocument:
    """Read, chunk and tokenize one document; never raises for a bad file.

    A file that cannot be used comes back as ``ChunkedDocument(skip_reason=...)`` with the reasons
    of `hades_gpu.documents.reading`, ``empty`` (``no tokens``) when the tokenizer finds nothing in
    it, or ``chunk_error`` if chunking itself failed (a bug: logged with its traceback).
    """
    try:
        text, digest, encoding = read_text(ref, documents_cfg)
    except SkipDocument as skip:
        return ChunkedDocument(ref=ref, content_hash="", skip_reason=skip.reason, skip_detail=skip.detail)
    except Exception as err:  # noqa: BLE001 - one bad file must not stop a worker
        log.exception("reading %s failed", ref.path)
        return ChunkedDocument(ref=ref, content_hash="", skip_reason="unreadable",
                               skip_detail=f"{type(err).__name__}: {err}")
    try:
        chunk = chunk_in_windows if len(text) > chunking_cfg.window_chars else chunk_text
        chunks, references = chunk(ref, text, digest, chunking_cfg, tokenizer, hf_offsets=hf_offsets)
    except Exception as err:  # noqa: BLE001
        log.exception("chunking %s failed", ref.path)
        return ChunkedDocument(ref=ref, content_hash=digest, skip_reason="chunk_error",
                               skip_detail=f"{type(err).__name__}: {err}")
    if not chunks:
        return ChunkedDocument(ref=ref, content_hash=digest, skip_reason="empty",
                               skip_detail="no tokens (only characters the tokenizer drops)")
    return ChunkedDocument(ref=ref, content_hash=digest, chunks=chunks, references=references, encoding=encoding)


def process_document_as(ref: DocumentRef, documents_cfg: DocumentsConfig, chunking_cfg: ChunkingConfig,
                        force_code: bool = False) -> ChunkedDocument:
    """`process_document`, with every file taken as code when `force_code` (`CodeIngestPipeline`).

    The worker processes run this one: it lives here, not in `pipelines`, so that a worker unpickling
    it imports only the documents layer (importing the pipelines layer cost each worker ~90 ms more:
    pyarrow, the store, the orchestration stages)."""
    if force_code and ref.modality != CODE:
        ref = dataclasses.replace(ref, modality=CODE, language="unknown")
    return process_document(ref, documents_cfg, chunking_cfg)


# one short text per chunker: what a worker's first documents would otherwise build on the way
WARM_UP_TEXTS = (
    (PROSE, "markdown", "# Warm-up\n\nA paragraph of prose. It has two sentences.\n"),
    (CODE, "python", "import os\n\n\ndef f(x: int) -> int:\n    \"\"\"Doc.\"\"\"\n    return x + 1\n"),
)


def warm_up(chunking_cfg: ChunkingConfig) -> None:
    """Load the tokenizer and build what chunking needs on the first document (the fast tokenizer,
    self-checked against HF; the chunkers' tables) by chunking two short texts. A worker started
    while the main process still loads the model (`orchestration.workers.WorkerLaunch`) is then ready
    for its first document."""
    for modality, language, text in WARM_UP_TEXTS:
        ref = DocumentRef(path="<warm-up>", rel_path="<warm-up>", size=len(text), modality=modality, language=language)
        chunk_text(ref, text, "", chunking_cfg)


__all__ = ["chunk_document", "chunk_text", "chunk_in_windows", "window_bounds", "process_document",
           "process_document_as", "warm_up"]
