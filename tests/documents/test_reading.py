"""Reading and decoding real files: every skip reason, BOMs, error modes, the content hash."""

from __future__ import annotations

import codecs
import hashlib
import os
from pathlib import Path

import pytest

from hades_gpu.config import DocumentsConfig
from hades_gpu.documents.reading import SkipDocument, read_document
from hades_gpu.records import PROSE, DocumentRef


def _ref(path: Path) -> DocumentRef:
    size = path.stat().st_size if path.exists() and path.is_file() else 0
    return DocumentRef(path=str(path), rel_path=path.name, size=size, modality=PROSE, language="text")


def _file(tmp_path: Path, data: bytes, name: str = "f.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _skip(path: Path, cfg: DocumentsConfig | None = None) -> SkipDocument:
    with pytest.raises(SkipDocument) as info:
        read_document(_ref(path), cfg or DocumentsConfig())
    return info.value


def test_utf8_text_kept_exactly_and_hashed(tmp_path: Path) -> None:
    data = "héllo\r\nwörld\rend\n".encode()
    text, digest = read_document(_ref(_file(tmp_path, data)), DocumentsConfig())
    assert text == "héllo\r\nwörld\rend\n"  # line endings untouched
    assert digest == hashlib.blake2b(data, digest_size=32).hexdigest()


def test_boms(tmp_path: Path) -> None:
    data = codecs.BOM_UTF8 + "bom text".encode()
    text, digest = read_document(_ref(_file(tmp_path, data)), DocumentsConfig())
    assert text == "bom text"
    assert digest == hashlib.blake2b(data, digest_size=32).hexdigest()  # raw bytes, BOM included
    for codec in ("utf-16", "utf-16-be", "utf-32"):
        raw = "wide text ü\n".encode(codec)
        if codec == "utf-16-be":
            raw = codecs.BOM_UTF16_BE + raw
        text, _ = read_document(_ref(_file(tmp_path, raw, f"{codec}.txt")), DocumentsConfig())
        assert text == "wide text ü\n"


def test_bomless_utf16(tmp_path: Path) -> None:
    p = _file(tmp_path, "plain ascii in utf-16\n".encode("utf-16-le"))
    assert _skip(p, DocumentsConfig(decode_errors="strict")).reason == "binary"  # strict utf-8: NUL bytes
    text, _ = read_document(_ref(p), DocumentsConfig(decode_errors="fallback"))  # fallback: utf-16
    assert text == "plain ascii in utf-16\n"
    text, _ = read_document(_ref(p), DocumentsConfig())  # detect (default): its NUL pattern
    assert text == "plain ascii in utf-16\n"


def test_binary(tmp_path: Path) -> None:
    err = _skip(_file(tmp_path, b"abc\x00def" * 10))
    assert (err.reason, err.detail) == ("binary", "NUL byte at offset 3")
    err = _skip(_file(tmp_path, b"\x89PNG\r\n\x1a\n" + b"rest of it", "img.dat"))
    assert err.reason == "binary" and "PNG" in err.detail
    err = _skip(_file(tmp_path, bytes(range(1, 32)) * 20, "ctl"))
    assert err.reason == "binary" and "control bytes" in err.detail
    # a NUL after the first 8 KiB does not make a file binary
    text, _ = read_document(_ref(_file(tmp_path, b"a" * 9000 + b"\x00b", "late")), DocumentsConfig())
    assert text.endswith("\x00b")


def test_empty_and_whitespace(tmp_path: Path) -> None:
    err = _skip(_file(tmp_path, b""))
    assert (err.reason, err.detail) == ("empty", "0 bytes")
    err = _skip(_file(tmp_path, b" \n\t\r\n  \n", "ws.txt"))
    assert err.reason == "empty" and "whitespace" in err.detail
    assert _skip(_file(tmp_path, codecs.BOM_UTF8, "bom-only.txt")).reason == "empty"


def test_decode_modes(tmp_path: Path) -> None:
    p = _file(tmp_path, "caf\u00e9 au lait".encode("latin-1"))
    err = _skip(p, DocumentsConfig(decode_errors="strict"))
    assert err.reason == "decode_error"
    assert "0xe9 at offset 3" in err.detail and "utf-8" in err.detail
    text, _ = read_document(_ref(p), DocumentsConfig(decode_errors="replace"))
    assert text == "caf\ufffd au lait"
    text, _ = read_document(_ref(p), DocumentsConfig(decode_errors="fallback", fallback_encodings=["latin-1"]))
    assert text == "café au lait"
    # utf-16 would "decode" these NUL-free bytes into CJK garbage: it is not tried on them
    err = _skip(p, DocumentsConfig(decode_errors="fallback", fallback_encodings=["utf-16"]))
    assert err.reason == "decode_error"
    # the offset counts raw bytes, BOM included
    err = _skip(_file(tmp_path, codecs.BOM_UTF8 + b"ab\xffc", "bom-bad.txt"))  # a BOM is trusted: no detection
    assert "offset 5" in err.detail
    text, _ = read_document(_ref(p), DocumentsConfig(encoding="cp1252"))
    assert text == "café au lait"


def test_missing(tmp_path: Path) -> None:
    p = _file(tmp_path, b"here today")
    ref = _ref(p)
    p.unlink()  # vanished between discovery and reading
    with pytest.raises(SkipDocument) as info:
        read_document(ref, DocumentsConfig())
    assert info.value.reason == "missing"


def test_unreadable_special_files(tmp_path: Path) -> None:
    """Fails for root too: a folder where a file was, a FIFO (opened without blocking)."""
    d = tmp_path / "dir.txt"
    d.mkdir()
    err = _skip(d)
    assert (err.reason, err.detail) == ("unreadable", "not a regular file (directory)")
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    err = _skip(fifo)
    assert (err.reason, err.detail) == ("unreadable", "not a regular file (fifo)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_permission(tmp_path: Path) -> None:
    p = _file(tmp_path, b"secret")
    p.chmod(0)
    try:
        err = _skip(p)
    finally:
        p.chmod(0o644)
    assert err.reason == "unreadable" and "PermissionError" in err.detail


def test_too_large_checked_on_read(tmp_path: Path) -> None:
    p = _file(tmp_path, b"small")
    ref = _ref(p)
    p.write_bytes(b"x" * 100)  # grew after discovery
    with pytest.raises(SkipDocument) as info:
        read_document(ref, DocumentsConfig(max_file_bytes=50))
    assert info.value.reason == "too_large" and "100 bytes" in info.value.detail


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_file_longer_than_its_stat_size_is_read_whole_or_refused():
    """read_bytes asks for fstat's size first; a regular file whose content outgrows that size (here
    /proc/self/status: size 0, some hundred bytes of content) is still read to the end, and still
    refused above documents.max_file_bytes."""
    from hades_gpu.documents.reading import read_bytes

    data = read_bytes("/proc/self/status", 1 << 20)
    assert len(data) > 100 and data.count(b"\n") > 10 and data.startswith(b"Name:")
    with pytest.raises(SkipDocument) as err:
        read_bytes("/proc/self/status", 50)
    assert err.value.reason == "too_large"


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097])
def test_files_at_and_around_the_size_limit(tmp_path, size):
    from hades_gpu.documents.reading import read_bytes

    p = tmp_path / "f.txt"
    p.write_bytes(b"y" * size)
    assert read_bytes(str(p), max(size, 1)) == b"y" * size
    if size:
        with pytest.raises(SkipDocument):
            read_bytes(str(p), size - 1)


def test_a_file_replaced_by_a_symlink_after_discovery_is_not_read_through_it(tmp_path: Path) -> None:
    """With follow_symlinks=false (default), a file swapped for a link between discovery and the read
    was read through the link: a link to /etc/passwd put its lines in the output. It is now skipped
    as `symlink`; a source named explicitly as a link is still read (discovery followed it), and
    with follow_symlinks=true links are read as before."""
    from hades_gpu.documents.discovery import discover
    from hades_gpu.documents.reading import read_text

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the file discovery saw\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("text that must not reach the output\n")
    refs, _ = discover(corpus, DocumentsConfig())
    (corpus / "a.txt").unlink()
    (corpus / "a.txt").symlink_to(secret)
    err = _skip(Path(refs[0].path))  # _skip builds a fresh ref: no discovery stat to match either
    assert err.reason == "symlink"
    with pytest.raises(SkipDocument) as info:
        read_text(refs[0], DocumentsConfig())
    assert info.value.reason == "symlink" and "became one after discovery" in info.value.detail
    assert read_text(refs[0], DocumentsConfig(follow_symlinks=True)).text == secret.read_text()

    link = tmp_path / "named.txt"
    link.symlink_to(secret)
    named, skips = discover([link], DocumentsConfig())
    assert not skips and read_text(named[0], DocumentsConfig()).text == secret.read_text()
