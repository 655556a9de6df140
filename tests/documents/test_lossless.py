"""Nothing lost (issue 13): file names that are not UTF-8, legacy encodings, offsets into the decoded
text (`chunk_source`), binary files still skipped. Real files, real worker processes, no model."""

from __future__ import annotations

import codecs
import os
import random
import shutil
from pathlib import Path

import pytest

from hades_gpu.benchmarks.feed_bench import ZeroCostEmbedder
from hades_gpu.config import DocumentsConfig, load_pipeline_config
from hades_gpu.documents.discovery import discover
from hades_gpu.documents.reading import SkipDocument, read_text
from hades_gpu.pipelines import TextParallelPipeline
from hades_gpu.records import PROSE, DocumentRef, display_path, stable_id
from hades_gpu.store.manifest import Manifest
from hades_gpu.store.reader import SourceChangedError, chunk_source, read_chunks, read_documents, source_path

FAST = ["isne.enabled=false", "monitoring.progress=off"]
PROSE_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 12

# (file name, true text, raw bytes, recorded encoding)
SMART = "\u201cSmart quotes\u201d, \u2018single\u2019 ones \u2013 and a caf\u00e9 for \u20ac5.\r\n"
LEGACY = [
    ("latin1.txt", "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade. " * 30 + "\n", "latin-1", "cp1252"),
    ("cp1252.txt", SMART * 30, "cp1252", "cp1252"),
    # the detector ranked cp1257 first for this French line ("crčme", "ą la faēon"): stored mangled
    ("french_line.txt", "Café crème brûlée à la façon française. Déjà vu, señor, naïve.\n", "latin-1", "cp1252"),
    # ... iso8859-3 for this Polish one ("Wis³ı"), and nothing at all for a repeated pangram (skipped)
    ("polish.txt", "Warszawa jest stolicą Polski. Kraków leży nad Wisłą, a Gdańsk nad morzem. Żółw idzie powoli.\n",
     "cp1250", "cp1250"),
    ("pangram.txt", "Zażółć gęślą jaźń. Łódź jest pięknym miastem w Polsce.\n" * 2, "cp1250", "cp1250"),
    ("spanish.txt", "¿Qué tal? ¡Hola! Mañana vamos a la montaña, 10 m² de jardín. “Comillas” – guion…\n", "cp1252",
     "cp1252"),
    ("utf16.txt", "Wide text \u00fc \u4e2d\u6587 and more words.\r\n" * 30, "utf-16", "utf-16"),
    ("utf16be.txt", "Big endian \u00e9t\u00e9 text.\n" * 30, "utf-16-be+bom", "utf-16"),
    ("utf8bom.md", "# T\u00eftle\r\n\r\nB\u00f6dy with a BOM, caf\u00e9.\r\n" * 30, "utf-8-sig", "utf-8-sig"),
    ("utf8.md", "# Plain\r\n\r\nUTF-8 \u00e9\u00e8 \u2603 text\r\n" * 30, "utf-8", "utf-8"),
]


def _encode(text: str, how: str) -> bytes:
    if how == "utf-16-be+bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    return text.encode(how)


def _config(*overrides):
    return load_pipeline_config("balanced", [*FAST, *overrides])


def _ingest(corpus: Path, out: Path, *overrides):
    return TextParallelPipeline(_config(*overrides), embedder=ZeroCostEmbedder()).process_batch([corpus], output=out)


def _ref(path: Path) -> DocumentRef:
    return DocumentRef(path=str(path), rel_path=path.name, size=path.stat().st_size, modality=PROSE, language="text")


# -- file names that are not UTF-8 -----------------------------------------------------------------


def _bad_name_corpus(root: Path) -> bytes:
    """A folder with b"caf\\xe9.txt" (latin-1 name) under b"d\\xfcr/", and a normal file; returns the
    bad file's relative path as bytes."""
    os.makedirs(os.fsencode(root) + b"/d\xfcr")
    rel = b"d\xfcr/caf\xe9.txt"
    fd = os.open(os.fsencode(root) + b"/" + rel, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, PROSE_TEXT.encode())
    os.close(fd)
    (root / "ok.txt").write_text("A perfectly normal file with enough words to make a chunk of text.\n")
    return rel


def test_printable_escapes_control_characters_only() -> None:
    from hades_gpu.records import printable

    assert printable("caf\u00e9 \u2603 ok.md") == "caf\u00e9 \u2603 ok.md"
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("esc\x1b[31m\x7f\x85\u2028") == "esc\\x1b[31m\\x7f\\x85\\u2028"
    assert printable(display_path("caf\udce9")) == "caf\\xe9"  # undecodable bytes: display_path's escapes
    # ...and without display_path first: skip lines printed the raw byte (no terminal or grep reads it)
    assert printable("skipped /c/bin\udcff.txt: binary") == "skipped /c/bin\\xff.txt: binary"


def test_skips_are_recorded_as_text_for_json_tools() -> None:
    """metrics.json held lone surrogates ("fifo\\udcfe.txt"), which jq and others turn into U+FFFD."""
    import json

    from hades_gpu.orchestration.monitoring import RunMetrics

    m = RunMetrics()
    m.add_skip("/c/" + os.fsdecode(b"fifo\xfe.txt"), "unreadable", "not a regular file (fifo)")
    assert m.skipped[0]["path"] == "/c/fifo\\xfe.txt"
    json.dumps(m.skipped, ensure_ascii=False).encode("utf-8")  # a lone surrogate would raise here


def test_display_path_escapes_only_undecodable_bytes() -> None:
    assert display_path("caf\u00e9.txt") == "caf\u00e9.txt"
    assert display_path(os.fsdecode(b"caf\xe9.txt")) == "caf\\xe9.txt"
    assert display_path(os.fsdecode(b"caf\xe8.txt")) != display_path(os.fsdecode(b"caf\xe9.txt"))
    ref = DocumentRef(path="/c/" + os.fsdecode(b"caf\xe9.txt"), rel_path=os.fsdecode(b"caf\xe9.txt"), size=1,
                      modality=PROSE, language="text")
    assert ref.rel_path == "caf\\xe9.txt" and ref.rel_path_bytes == b"caf\xe9.txt"
    assert ref.path_bytes == b"/c/caf\xe9.txt" and ref.doc_id == stable_id("caf\\xe9.txt")


def test_non_utf8_file_name_end_to_end(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    rel = _bad_name_corpus(corpus)
    result = _ingest(corpus, out)
    assert result.documents_ingested == 2 and not result.skipped

    docs = {r["rel_path_bytes"]: r for r in read_documents(out).to_pylist()}
    row = docs[rel]
    assert row["rel_path"] == "d\\xfcr/caf\\xe9.txt"  # valid text, undecodable bytes escaped
    assert row["path_bytes"] == os.fsencode(corpus) + b"/" + rel  # the exact path, byte for byte
    assert os.fsencode(source_path(row)) == row["path_bytes"]
    assert os.fsencode(source_path(row, relative=True)) == rel
    assert Path(source_path(row)).read_bytes() == PROSE_TEXT.encode()
    assert docs[b"ok.txt"]["path_bytes"] == os.fsencode(corpus / "ok.txt")
    chunks = read_chunks(out).to_pylist()
    mine = [c for c in chunks if c["doc_id"] == row["doc_id"]]
    assert mine and all(c["path"] == row["path"] for c in mine)
    text = chunk_source(out, rel)  # by raw relative path; also by doc id and by the path as str
    assert text == chunk_source(out, row["doc_id"]) == chunk_source(out, source_path(row)) == PROSE_TEXT
    assert all(text[c["char_start"]:c["char_end"]] == c["text"] for c in mine)

    # stable: the same doc id from a fresh discovery, and a re-run finds it unchanged
    refs, _ = discover(corpus, DocumentsConfig())
    assert {r.rel_path_bytes: r.doc_id for r in refs}[rel] == row["doc_id"]
    again = _ingest(corpus, out)
    assert again.documents_ingested == 0 and again.documents_unchanged == 2
    with Manifest.load(out, _config().shard) as manifest:
        assert manifest.lookup("d\\xfcr/caf\\xe9.txt").doc_id == row["doc_id"]
    # a new output gets the same ids
    _ingest(corpus, tmp_path / "out2")
    assert {r["rel_path_bytes"]: r["doc_id"] for r in read_documents(tmp_path / "out2").to_pylist()}[rel] == row["doc_id"]


# -- legacy encodings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "how", "recorded"), LEGACY, ids=[x[0] for x in LEGACY])
def test_read_text_decodes_and_records_the_encoding(tmp_path: Path, name, text, how, recorded) -> None:
    p = tmp_path / name
    p.write_bytes(_encode(text, how))
    got = read_text(_ref(p), DocumentsConfig())
    assert got.text == text
    assert got.encoding == recorded
    assert p.read_bytes().decode(got.encoding, "replace") == text  # what chunk_source relies on


@pytest.mark.parametrize(("raw", "text", "recorded"), [
    # one accented letter in a short line: the detector read b"\xf6s" as one Big5 character ("b飉e")
    (b'print("b\xf6se")\n', 'print("böse")\n', "cp1252"),
    (b"x = 'r\xe9sum\xe9'\n", "x = 'résumé'\n", "cp1252"),
    # ... while short East Asian texts stay theirs (kana with ASCII trail bytes, high pairs)
    ("ソフト".encode("shift_jis"), "ソフト", "cp932"),
    ("東京都の天気は晴れです。".encode("shift_jis"), "東京都の天気は晴れです。", "cp932"),
    ("中文沒有空格。".encode("big5"), "中文沒有空格。", "big5"),
    ("한국어 텍스트".encode("euc_kr"), "한국어 텍스트", "cp949"),
    # one Big5 character whose trail byte is ASCII reads as one accented letter too ("權" as "Åv"):
    # after a quote or a space, it stays Chinese
    ('name = "權"\n'.encode("big5"), 'name = "權"\n', "big5"),
    ("# 觀 護 權\n".encode("big5"), "# 觀 護 權\n", "big5"),
    # accented letters that start a word: read as Big5 or Johab by the rule that wanted a letter before
    ("Über alles.\n".encode("cp1252"), "Über alles.\n", "cp1252"),
    ("Ça marche.\n".encode("cp1252"), "Ça marche.\n", "cp1252"),
    ("Der Bär sagt: Übung.\n".encode("cp1252"), "Der Bär sagt: Übung.\n", "cp1252"),
    ("Öl ist teuer.\n".encode("cp1252"), "Öl ist teuer.\n", "cp1252"),
    # a word that starts with one of Big5's frequent lead bytes and goes on, two letters side by side,
    # Spanish opening marks (Big5, Johab and cp1006 took these)
    ("Äußere Form\n".encode("cp1252"), "Äußere Form\n", "cp1252"),
    ("Året är slut.\n".encode("cp1252"), "Året är slut.\n", "cp1252"),
    ("Ação\n".encode("cp1252"), "Ação\n", "cp1252"),
    ("¿Por qué?\n".encode("cp1252"), "¿Por qué?\n", "cp1252"),
    ("¡Hola!\n".encode("cp1252"), "¡Hola!\n", "cp1252"),
], ids=["latin1-in-code", "latin1-twice", "katakana", "japanese", "big5", "korean", "big5-one-char", "big5-words",
        "uber", "ca", "bar-ubung", "ol", "aussere", "aret", "acao", "por-que", "hola"])
def test_short_files_lone_accents_are_latin_and_east_asian_text_is_not(tmp_path: Path, raw, text, recorded) -> None:
    p = tmp_path / "short.py"
    p.write_bytes(raw)
    got = read_text(_ref(p), DocumentsConfig())
    assert (got.text, got.encoding) == (text, recorded)


def test_utf8_with_a_few_stray_bytes_stays_utf8(tmp_path: Path, caplog) -> None:
    """A UTF-8 file with one Latin-1 byte pasted in is read as UTF-8 with that byte as U+FFFD and a
    warning naming the file and offset; read as cp1252 every UTF-8 character would have been mangled
    (é -> Ã©). A legacy file with an accidental well-formed pair stays with detection."""
    body = "Über naïve café — ☃ and “quotes”. " * 20
    p = tmp_path / "mixed.txt"
    data = body.encode() + b"Caf\xe9 pasted from Latin-1.\n" + body.encode()
    p.write_bytes(data)
    with caplog.at_level("WARNING", logger="hades_gpu.documents.reading"):
        got = read_text(_ref(p), DocumentsConfig())
    assert got.encoding == "utf-8"
    assert got.text == body + "Caf\ufffd pasted from Latin-1.\n" + body
    assert data.decode(got.encoding, "replace") == got.text  # what chunk_source relies on
    assert [r.getMessage() for r in caplog.records] == [
        f"mixed.txt: 1 byte sequence(s) not valid UTF-8 (the first at offset {len(body.encode()) + 3}) read as "
        "U+FFFD; the rest of the file is UTF-8"]
    # a genuine U+FFFD in the file is a well-formed character, not a replaced byte
    p.write_bytes("caf\ufffd ok \u00e9".encode() + b" \xff")
    assert read_text(_ref(p), DocumentsConfig()).text == "caf\ufffd ok \u00e9 \ufffd"
    # a Latin-1 file whose bytes happen to hold one well-formed UTF-8 pair ("Ã©") is still Latin
    legacy = ("Café crème brûlée, naïve façade. " * 10 + "Ã© ").encode("cp1252")
    p.write_bytes(legacy)
    got = read_text(_ref(p), DocumentsConfig())
    assert got.encoding == "cp1252" and got.text == legacy.decode("cp1252")
    # strict mode is unchanged: the stray byte skips the file
    p.write_bytes(data)
    with pytest.raises(SkipDocument, match="not valid utf-8"):
        read_text(_ref(p), DocumentsConfig(decode_errors="strict"))


def test_strict_still_skips_legacy_files(tmp_path: Path) -> None:
    for name, text, how, _ in LEGACY[:2]:
        p = tmp_path / name
        p.write_bytes(_encode(text, how))
        with pytest.raises(SkipDocument) as info:
            read_text(_ref(p), DocumentsConfig(decode_errors="strict"))
        assert info.value.reason == "decode_error"
    p = tmp_path / "latin1.txt"
    assert read_text(_ref(p), DocumentsConfig(decode_errors="replace")).encoding == "utf-8"


def test_binary_files_are_still_binary(tmp_path: Path) -> None:
    files = {
        "img.txt": b"\x89PNG\r\n\x1a\n" + bytes(random.Random(1).randrange(256) for _ in range(3000)),
        "noise.txt": bytes(random.Random(2).randrange(256) for _ in range(5000)),
        "true.txt": Path(shutil.which("true") or "/bin/true").read_bytes(),
        "ctl.txt": bytes(range(1, 32)) * 50,
    }
    for mode in ("detect", "strict", "fallback"):
        for name, data in files.items():
            p = tmp_path / name
            p.write_bytes(data)
            with pytest.raises(SkipDocument) as info:
                read_text(_ref(p), DocumentsConfig(decode_errors=mode))
            assert info.value.reason == "binary", (mode, name, info.value)


def test_legacy_files_end_to_end_and_chunk_source(tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for name, text, how, _ in LEGACY:
        (corpus / name).write_bytes(_encode(text, how))
    (corpus / "img.png.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    result = _ingest(corpus, out)
    assert {Path(s["path"]).name: s["reason"] for s in result.skipped} == {"img.png.txt": "binary"}

    docs = {r["rel_path"]: r for r in read_documents(out).to_pylist()}
    assert {name: docs[name]["encoding"] for name, *_ in LEGACY} == {name: rec for name, _, _, rec in LEGACY}
    by_doc: dict[str, list] = {}
    for c in read_chunks(out, ["doc_id", "char_start", "char_end", "text"]).to_pylist():
        by_doc.setdefault(c["doc_id"], []).append(c)
    for name, text, _, _ in LEGACY:
        row = docs[name]
        source = chunk_source(out, name)
        assert source == text, name  # the true text: BOM stripped, \r\n kept
        assert by_doc[row["doc_id"]], name
        for c in by_doc[row["doc_id"]]:
            assert source[c["char_start"]:c["char_end"]] == c["text"], name

    (corpus / "latin1.txt").write_bytes(b"changed")
    with pytest.raises(SourceChangedError):
        chunk_source(out, "latin1.txt")
    with pytest.raises(KeyError):
        chunk_source(out, "no-such-file.txt")

    strict = _ingest(corpus, tmp_path / "strict", "documents.decode_errors=strict")
    reasons = {Path(s["path"]).name: s["reason"] for s in strict.skipped}
    assert reasons == {"cp1252.txt": "decode_error", "img.png.txt": "binary", "french_line.txt": "decode_error",
                       "polish.txt": "decode_error", "pangram.txt": "decode_error", "spanish.txt": "decode_error"}
