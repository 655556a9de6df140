"""The whole ingest (real worker processes, writer, Parquet) gives the same chunks on every tokenizer
path: the C WordPiece scan (default), kitoken segments (``HADES_GPU_TOKENIZER=kitoken``) and HF
`tokenizers` alone (``=hf``). Worker processes inherit the environment, so each run routes every
document of a mixed corpus (ASCII code and prose, accented and Cyrillic prose, Chinese text, a
special-token literal, control characters) through that path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hades_gpu.documents.fast_tokenizer import TOKENIZER_ENV

from corpus_helpers import copy_files, stdlib_sources

MIXED = {
    "accents.md": "# Café\n\nNaïve résumé at the ÉCOLE in İstanbul, e\u0301 combining. " * 80,
    "russian.txt": "Съешь же ещё этих мягких французских булок, да выпей чаю.\n\n" * 120,
    "chinese.txt": "東京都の天気は晴れです。中文没有空格。\n\n" * 150 + "some English at the end.\n",
    "literal.md": "Masked models read [MASK] and [SEP] as tokens; x[mask] in code is text.\n\n" * 60,
    "controls.txt": "tab\tand\x0bvertical\x0ctab, soh\x01, del\x7f and NEL\x85 in text.\n" * 100,
    "mostly_ascii.md": ("A plain paragraph of English prose with one naïve word.\n\n" * 40
                        + "Another with an em dash \u2014 and quotes \u201cthis\u201d.\n\n" * 20),
}


def _run(corpus: Path, out: Path, path: str, embedder) -> list[tuple]:
    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines.ingest import TextParallelPipeline
    from hades_gpu.store.reader import read_chunks

    old = os.environ.get(TOKENIZER_ENV)
    os.environ[TOKENIZER_ENV] = path
    try:
        cfg = load_pipeline_config("low_memory", ["isne.enabled=false", "monitoring.progress=off",
                                                  "chunking.chunk_tokens=64", "chunking.overlap_tokens=16"])
        cfg.profile.num_workers = 2
        result = TextParallelPipeline(cfg, embedder=embedder).process_batch([str(corpus)], output=str(out))
    finally:
        if old is None:
            os.environ.pop(TOKENIZER_ENV, None)
        else:
            os.environ[TOKENIZER_ENV] = old
    assert not result.errors, result.errors
    table = read_chunks(out, ["chunk_id", "path", "ordinal", "char_start", "char_end", "n_tokens", "text"])
    rows = sorted(zip(*(table.column(c).to_pylist() for c in table.column_names)))
    assert rows
    return rows


@pytest.mark.slow
def test_every_tokenizer_path_writes_the_same_chunks(tmp_path: Path, embedder) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in MIXED.items():
        (corpus / name).write_text(text, encoding="utf-8")
    copy_files(stdlib_sources(6), corpus / "code")
    runs = {path: _run(corpus, tmp_path / f"out-{path or 'default'}", path, embedder) for path in ("", "kitoken", "hf")}
    assert runs[""] == runs["hf"]
    assert runs["kitoken"] == runs["hf"]
    names = {Path(r[1]).name for r in runs[""]}
    assert set(MIXED) <= names
