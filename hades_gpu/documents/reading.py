"""Read one document's bytes and decode them, or say precisely why not.

`read_text` returns the decoded text exactly as decoded (a BOM removed, line endings untouched, so
chunk offsets index this string), a content hash of the raw bytes, and the encoding it was decoded
with (``raw.decode(encoding, "replace") == text``; stored in the documents table, so
`hades_gpu.store.reader.chunk_source` gives the same text back). A file that cannot become text
raises `SkipDocument(reason, detail)`:

- ``missing``: vanished since discovery;
- ``unreadable``: permission denied, a directory/FIFO/socket/device, any other OS error;
- ``too_large``: over ``documents.max_file_bytes`` (checked again here: files grow);
- ``empty``: 0 bytes, or only whitespace once decoded;
- ``binary``: a known magic number, NUL bytes in the first 8 KiB, or mostly control bytes there;
- ``decode_error``: not valid in ``documents.encoding``, per ``decode_errors``:
  ``detect`` (default) tries ``encoding`` (UTF-8); UTF-8 text with a few stray bytes (more
  well-formed multibyte characters than invalid sequences) is read as UTF-8 with those bytes as
  U+FFFD, with a warning; otherwise it asks charset-normalizer for the legacy encoding (cp1252 when
  it decodes the bytes as well as the detector's own pick; wide and EBCDIC code pages are never
  proposed) and skips only when nothing fits; ``strict`` names the byte and its
  offset; ``replace`` never fails, undecodable bytes become U+FFFD; ``fallback`` tries
  ``fallback_encodings`` in order, then skips.

Order: empty, then a BOM, then the binary checks, then ``encoding``, then detection. Byte-order
marks decide the codec: a UTF-8 BOM is stripped (recorded ``utf-8-sig``), a UTF-16/UTF-32 BOM selects
that codec (recorded ``utf-16``/``utf-32``; its NUL bytes are then not "binary"). Without a BOM, NUL
bytes mean binary, except for text that is plainly UTF-16 (ASCII-range characters with NULs at every
other byte) in ``detect`` mode or when a UTF-16 codec is the configured encoding or one of the
fallbacks in ``fallback`` mode. Conversely, a UTF-16 or UTF-32 codec is never tried on data without
NUL bytes: such data would "decode" into unrelated CJK characters rather than fail.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import logging
import os
import re
from typing import NamedTuple, Optional

from hades_gpu.config import DecodeErrors, DocumentsConfig
from hades_gpu.records import DocumentRef
from hades_gpu.regular_file import NotRegularFileError, open_regular

log = logging.getLogger(__name__)

SNIFF_BYTES = 8192
CONTENT_HASH_BYTES = 32  # blake2b digest size: 64 hex characters

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"%PDF-", "PDF document"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"PK\x05\x06", "ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"BZh", "bzip2 data"),
    (b"\xfd7zXZ\x00", "xz data"),
    (b"7z\xbc\xaf\x27\x1c", "7-zip archive"),
    (b"\x28\xb5\x2f\xfd", "zstd data"),
    (b"\x7fELF", "ELF binary"),
    (b"\xca\xfe\xba\xbe", "Java class / Mach-O fat binary"),
    (b"\xcf\xfa\xed\xfe", "Mach-O binary"),
    (b"\x00asm", "WebAssembly"),
    (b"SQLite format 3\x00", "SQLite database"),
    (b"PAR1", "Parquet file"),
    (b"ARROW1", "Arrow file"),
    (b"\x93NUMPY", "NumPy array"),
    (b"OggS", "Ogg media"),
    (b"fLaC", "FLAC audio"),
    (b"ID3", "MP3 audio"),
    (b"RIFF", "RIFF media"),
    (b"\x80\x04\x95", "Python pickle"),
    (b"\x80\x05\x95", "Python pickle"),
)

_BOMS: tuple[tuple[bytes, str], ...] = (  # UTF-32 first: its LE BOM starts with UTF-16 LE's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# bytes that do not occur in text (TAB LF VT FF CR ESC and BS are left out: they do)
_CONTROL = bytes(b for b in range(32) if b not in (8, 9, 10, 11, 12, 13, 27)) + b"\x7f"
_CONTROL_FRACTION = 0.10
_NON_SPACE = re.compile(r"\S")


class SkipDocument(Exception):
    """A document that cannot be ingested; `reason` is one of the module's reasons."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def content_hash(data: bytes) -> str:
    """blake2b (32-byte digest) hex of raw bytes."""
    return hashlib.blake2b(data, digest_size=CONTENT_HASH_BYTES).hexdigest()


def _codec_name(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError as err:
        raise SkipDocument("decode_error", f"unknown encoding {encoding!r}") from err


def _is_wide(codec: str) -> bool:
    return codec.startswith(("utf-16", "utf-32"))


def _open_unless_new_link(path: str, follow_symlinks: bool, discovered: Optional[tuple[int, int]]) -> tuple[int, os.stat_result]:
    """`open_regular`, except that with ``follow_symlinks=False`` a path that is a symbolic link is
    opened only when it leads to the file discovery saw (``discovered``: its size and mtime_ns; a
    source named explicitly is followed even as a link). Why: a file replaced by a link after
    discovery was read through it, so a link to /etc/passwd put that file's text in the output."""
    if follow_symlinks:
        return open_regular(path)
    try:
        return open_regular(path, follow_symlinks=False)
    except OSError as err:
        if err.errno != errno.ELOOP or not os.path.islink(path):
            raise
    try:
        target = os.stat(path)
    except OSError:
        target = None
    if discovered is None or target is None or (target.st_size, target.st_mtime_ns) != discovered:
        raise SkipDocument("symlink", "symbolic link not followed (documents.follow_symlinks=false): "
                           "the file became one after discovery")
    return open_regular(path)


def read_bytes(path: str, max_bytes: int, follow_symlinks: bool = True,
               discovered: Optional[tuple[int, int]] = None) -> bytes:
    """The file's bytes, refusing anything but a regular file of at most `max_bytes` (and, with
    ``follow_symlinks=False``, a file that became a symbolic link since discovery, which saw it
    with size and mtime_ns ``discovered``)."""
    try:
        fd, st = _open_unless_new_link(path, follow_symlinks, discovered)  # a FIFO does not wait for a writer
    except NotRegularFileError as err:
        raise SkipDocument("unreadable", str(err)) from err
    except (FileNotFoundError, NotADirectoryError) as err:
        raise SkipDocument("missing", f"{type(err).__name__}: {err.strerror}") from err
    except OSError as err:  # PermissionError, ELOOP, ...
        raise SkipDocument("unreadable", f"{type(err).__name__}: {err.strerror or err}") from err
    try:
        if st.st_size > max_bytes:
            raise SkipDocument("too_large", f"{st.st_size} bytes > documents.max_file_bytes ({max_bytes})")
        with open(fd, "rb", closefd=False) as fh:
            # read(n) allocates n bytes up front: ask for the size fstat gave (+1 to see growth), then
            # the rest only if the file grew meanwhile (read(max_bytes + 1) cost 7x more per file)
            want = min(st.st_size, max_bytes) + 1
            data = fh.read(want)
            if len(data) == want and want <= max_bytes:
                data += fh.read(max_bytes + 1 - want)
    except OSError as err:  # EIO, EISDIR, ...
        raise SkipDocument("unreadable", f"{type(err).__name__}: {err.strerror or err}") from err
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise SkipDocument("too_large", f"more than {max_bytes} bytes (documents.max_file_bytes); the file grew")
    return data


def _bom_codec(data: bytes) -> tuple[str, int] | None:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return codec, len(bom)
    return None


def _looks_utf16(head: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' for BOM-less UTF-16 of mostly ASCII-range text, else None."""
    n = len(head) // 2 * 2
    if n < 4:
        return None
    even, odd = head[0:n:2], head[1:n:2]
    half = n // 2
    if odd.count(0) >= 0.7 * half and even.count(0) <= 0.05 * half:
        return "utf-16-le"
    if even.count(0) >= 0.7 * half and odd.count(0) <= 0.05 * half:
        return "utf-16-be"
    return None


def _sniff_binary(head: bytes) -> str | None:
    """Why `head` (the first bytes, no UTF-16/32 BOM) is binary, or None."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"{what} (magic number)"
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"NUL byte at offset {nul}"
    if head:
        n_control = len(head) - len(head.translate(None, _CONTROL))
        if n_control > _CONTROL_FRACTION * len(head):
            return f"{n_control} control bytes in the first {len(head)}"
    return None


def _decode_strict(data: bytes, codec: str, skipped: int) -> str:
    try:
        return data.decode(codec, "strict")
    except UnicodeDecodeError as err:
        bad = err.object[err.start : err.start + 1]
        raise SkipDocument(
            "decode_error",
            f"not valid {codec}: byte 0x{bad.hex() or '??'} at offset {err.start + skipped} ({err.reason})",
        ) from err


# Codecs a BOM selects, and the name recorded for them: `raw.decode(recorded)` strips the BOM itself.
_BOM_RECORDED = {"utf-8": "utf-8-sig", "utf-16-le": "utf-16", "utf-16-be": "utf-16",
                 "utf-32-le": "utf-32", "utf-32-be": "utf-32"}
# Never proposed by detection: wide codecs "decode" NUL-free text into unrelated CJK characters (UTF-16
# is found from a BOM or its NUL pattern instead), and EBCDIC code pages turn bytes >= 0x80 into letters.
_NOT_DETECTED = ["utf_16", "utf_16_be", "utf_16_le", "utf_32", "utf_32_be", "utf_32_le", "utf_7",
                 "cp037", "cp273", "cp424", "cp500", "cp875", "cp1026", "cp1140"]
_PREFERRED = "cp1252"  # the usual legacy encoding; chosen when it decodes as well as the detector's pick
_CHAOS_SLACK = 0.05
_COHERENCE_SLACK = 0.5


# Single-byte code pages of Latin scripts: where the detector's pick among them loses to cp1252 when
# cp1252 reads the bytes cleanly (`_clean_latin`). Cyrillic, Greek, Hebrew, Arabic, Thai and CJK picks
# are left alone.
_LATIN_CODE_PAGES = {codecs.lookup(c).name for c in (
    "cp1250", "cp1254", "cp1257", "latin_1", "iso8859_2", "iso8859_3", "iso8859_4", "iso8859_9", "iso8859_10",
    "iso8859_13", "iso8859_14", "iso8859_15", "iso8859_16", "mac_roman", "mac_latin2", "mac_iceland",
    "mac_turkish", "cp437", "cp850", "cp852", "cp858")}
# Non-letters that Western prose uses (typographic quotes and dashes, currency, symbols)
_WESTERN_MARKS = set("€‚„…†‡‰‹›‘’“”•–—˜™«»°±·×÷§¶©®ªºµ¢£¥¤¦¨¬¯´¸\xa0\xad")
# ...and those it uses only after a non-letter (¿Qué, ¡Hola, m²: also what Polish ż, ł, ą become
# inside words when cp1250 text is read as cp1252)
_AFTER_NON_LETTER = set("¿¡¹²³¼½¾")

_HIGH_BYTE = re.compile(rb"[\x80-\xff]+")
_ACCENTED_LETTER_BYTES = frozenset(range(0xC0, 0x100)) - {0xD7, 0xF7}  # À..ÿ in cp1252, × and ÷ left out
_OPENING_MARKS = frozenset({0xA1, 0xBF})  # ¡ ¿: Spanish opens a sentence with them
_BIG5 = {codecs.lookup(c).name for c in ("big5", "big5hkscs", "cp950")}
_GBK = {codecs.lookup(c).name for c in ("gb2312", "gbk", "gb18030", "hz")}
_EUC_KR = {codecs.lookup(c).name for c in ("euc_kr", "cp949")}
# lead bytes of each codec's frequent characters that are also accented letters in cp1252: Big5's level-1
# hanzi (0xA4-0xC6; with an ASCII trail byte, '權' = C5 76 reads 'Åv'), GB2312's level-1 hanzi and
# KS X 1001's hangul (two high bytes each)
_FREQUENT_LEADS = {**{c: frozenset(range(0xC0, 0xC7)) for c in _BIG5}, **{c: frozenset(range(0xC0, 0xD8)) for c in _GBK},
                   **{c: frozenset(range(0xC0, 0xC9)) for c in _EUC_KR}}


def _is_letter_byte(byte: int) -> bool:
    return chr(byte).isalpha() if byte < 0x80 else byte in _ACCENTED_LETTER_BYTES


def _lone_accented_letters(data: bytes, picked: str) -> bool:
    """Every run of bytes >= 0x80 is one or two accented letters (À..ÿ in cp1252; ¡ ¿ before a word)
    between ASCII bytes, and none is more likely one of `picked`'s frequent characters. A Western
    text has a byte or two per accented letter run, which a multi-byte codec reads with the next byte as
    one character (b'b\xf6se' as Big5 'b飉e', 'Über' as Big5, 'Bär' as Johab, 'Ação' as Big5), and a
    short Spanish line with ¡ or ¿ went to Johab or cp1006. A frequent character of `picked` (Big5's
    '權' = C5 76, 'Åv' in cp1252) stays the codec's unless it sits inside a Latin word: a letter right
    before it, or, after its trail byte, a letter going on ('Året' = C5 'r' 'e'). Longer runs are
    East Asian text."""
    leads = _FREQUENT_LEADS.get(picked, frozenset())
    runs = 0
    for m in _HIGH_BYTE.finditer(data):
        i, j = m.start(), m.end()
        run = data[i:j]
        if len(run) > 2:
            return False
        after = data[j] if j < len(data) else None
        if len(run) == 1 and run[0] in _OPENING_MARKS:
            if after is None or not _is_letter_byte(after):
                return False
            runs += 1
            continue
        if any(b not in _ACCENTED_LETTER_BYTES for b in run):
            return False
        if run[0] in leads:
            before_letter = i > 0 and _is_letter_byte(data[i - 1])
            # the byte after the character the codec would make (lead + trail) goes on as a letter
            beyond = data[i + 2] if i + 2 < len(data) else None
            word_goes_on = (beyond is not None and _is_letter_byte(beyond)) if len(run) == 1 else \
                (after is not None and _is_letter_byte(after))  # 'Ääni': two letters, then more
            if not (before_letter or word_goes_on):
                return False
        runs += 1
    return runs > 0


def _clean_latin(data: bytes, codec: str) -> str | None:
    """`data` decoded by `codec` when every non-ASCII character is a letter or a mark prose uses
    (see `_AFTER_NON_LETTER`), else None. Why: a text whose bytes all read as letters in cp1252 is
    Western prose read right far more often than not (the detector's chaos score can rank a Baltic
    page first for French)."""
    try:
        text = data.decode(codec, "strict")
    except UnicodeDecodeError:
        return None
    for match in re.finditer(r"[^\x00-\x7f]", text):
        ch = match.group()
        if ch.isalpha() or ch in _WESTERN_MARKS:
            continue
        before = text[match.start() - 1] if match.start() else " "
        if ch in _AFTER_NON_LETTER and not before.isalpha():
            continue
        return None
    return text


class Decoded(NamedTuple):
    """A document's text, the blake2b of its raw bytes, and the codec: ``raw.decode(encoding,
    "replace") == text`` (the name a BOM selects, e.g. ``utf-8-sig``/``utf-16``, strips the BOM)."""

    text: str
    content_hash: str
    encoding: str


_REPLACEMENT_UTF8 = "\ufffd".encode("utf-8")


def _mostly_utf8(data: bytes) -> tuple[str, int, int] | None:
    """(text, invalid sequences, offset of the first) of UTF-8 text with a few stray bytes, else None.

    Why: a UTF-8 file with one Latin-1 byte pasted in fails strict UTF-8, and every legacy code
    page then "decodes" it, turning each of its UTF-8 characters into two or three (é -> Ã©):
    the whole file mangled to save one byte. Taken when the file holds more well-formed multibyte
    characters than invalid sequences; a legacy file has next to none (its accented letters are
    lone high bytes), so it still goes to detection."""
    text = data.decode("utf-8", "replace")
    invalid = text.count("\ufffd") - data.count(_REPLACEMENT_UTF8)
    non_ascii = len(text) - len(text.encode("ascii", "ignore"))
    well_formed = non_ascii - invalid
    if invalid <= 0 or well_formed <= invalid:
        return None
    try:
        data.decode("utf-8", "strict")
        first = -1
    except UnicodeDecodeError as err:
        first = err.start
    return text, invalid, first


def _detect(data: bytes) -> tuple[str, str] | None:
    """(text, codec) that charset-normalizer finds for `data` (no BOM, not UTF-8, not binary), or None."""
    from charset_normalizer import from_bytes  # imported on first use: most corpora never need it

    matches = list(from_bytes(data, cp_exclusion=_NOT_DETECTED))
    if not matches:
        # the detector found nothing (it gave up on a repeated cp1250 line): a Latin code page whose
        # text is clean Western or Central European prose is taken before a decode_error
        for codec in (_PREFERRED, "cp1250"):
            text = _clean_latin(data, codec)
            if text is not None:
                return text, codec
        return None
    best = matches[0]
    picked = codecs.lookup(best.encoding).name
    # a short Western line read by a multi-byte codec, or by a non-Latin code page (cp1006 took '¡Hola!')
    if picked not in _LATIN_CODE_PAGES and _lone_accented_letters(data, picked):
        text = _clean_latin(data, _PREFERRED)
        if text is not None:
            return text, _PREFERRED
    if picked in _LATIN_CODE_PAGES:
        # A Latin code page: the first that reads every byte as a letter or a mark prose uses, of
        # cp1252 (the common case; the detector ranked cp1257 first for French: "crčme", "ą la
        # faēon"), its own pick, and cp1250 (it read Polish as iso8859-3: "Wis³ı"); none: its pick.
        for codec in dict.fromkeys((_PREFERRED, picked, "cp1250")):
            text = _clean_latin(data, codec)
            if text is not None:
                return text, codec
    for m in matches:  # the same text from cp1252 (or close to as good): cp1252, the common case
        if (_PREFERRED in m.could_be_from_charset and m.chaos <= best.chaos + _CHAOS_SLACK
                and m.coherence >= best.coherence - _COHERENCE_SLACK):
            best_codec = _PREFERRED
            break
    else:
        best_codec = best.encoding
    codec = codecs.lookup(best_codec).name
    try:
        return data.decode(codec, "strict"), codec
    except UnicodeDecodeError:  # the detector's sample decoded, the whole file does not
        try:
            return data.decode(best.encoding, "strict"), codecs.lookup(best.encoding).name
        except UnicodeDecodeError:
            return None


def decode_text(data: bytes, cfg: DocumentsConfig, source: Optional[str] = None) -> tuple[str, str]:
    """Decode raw bytes per `cfg` (see the module docstring): ``(text, encoding)``, where
    ``data.decode(encoding, "replace") == text``; raises `SkipDocument`. `source` names the file in
    the warning about replaced bytes."""
    if not data:
        raise SkipDocument("empty", "0 bytes")
    head = data[:SNIFF_BYTES]
    mode = cfg.decode_errors
    primary = _codec_name(cfg.encoding)
    fallbacks = [_codec_name(e) for e in cfg.fallback_encodings] if mode == DecodeErrors.FALLBACK else []
    wide_ok = [primary, *fallbacks] + (["utf-16-le"] if mode == DecodeErrors.DETECT else [])

    bom = _bom_codec(data)
    has_nul = b"\x00" in head
    skipped = 0
    if bom is not None:
        codecs_to_try = [bom[0]]
        skipped = bom[1]
        data = data[skipped:]  # the BOM is not text
    else:
        why = _sniff_binary(head)
        if why is not None:
            wide = _looks_utf16(head) if has_nul else None
            if wide is None or not any(c.startswith("utf-16") for c in wide_ok):
                raise SkipDocument("binary", why)
            codecs_to_try = [wide]
        else:
            codecs_to_try = [primary, *fallbacks]
            if not has_nul:  # see the module docstring: wide codecs "succeed" on narrow text
                narrow = [c for c in codecs_to_try if not _is_wide(c)]
                codecs_to_try = narrow or codecs_to_try[:1]

    def recorded(codec: str) -> str:
        return _BOM_RECORDED.get(codec, codec) if bom is not None else codec

    if mode == DecodeErrors.REPLACE:
        return data.decode(codecs_to_try[0], "replace"), recorded(codecs_to_try[0])
    first_err: SkipDocument | None = None
    for codec in dict.fromkeys(codecs_to_try):
        try:
            return _decode_strict(data, codec, skipped), recorded(codec)
        except SkipDocument as err:
            first_err = first_err or err
    assert first_err is not None
    if mode == DecodeErrors.DETECT and bom is None and not has_nul:
        if primary == "utf-8":
            mostly = _mostly_utf8(data)
            if mostly is not None:
                text, invalid, first = mostly
                log.warning("%s: %d byte sequence(s) not valid UTF-8 (the first at offset %d) read as U+FFFD; "
                            "the rest of the file is UTF-8", source or "a document", invalid, first)
                return text, "utf-8"
        found = _detect(data)
        if found is not None:
            return found
        raise SkipDocument("decode_error", f"{first_err.detail}; no other encoding detected")
    tried = ", ".join(dict.fromkeys(codecs_to_try))
    detail = first_err.detail if len(codecs_to_try) == 1 else f"{first_err.detail}; also tried: {tried}"
    raise SkipDocument("decode_error", detail)


def decode_bytes(data: bytes, cfg: DocumentsConfig) -> str:
    """The text of `decode_text` (without the encoding)."""
    return decode_text(data, cfg)[0]


def read_text(ref: DocumentRef, cfg: DocumentsConfig) -> Decoded:
    """`Decoded` text, content hash and encoding of a document, or `SkipDocument` with the reason it
    cannot be used. `content_hash` is the blake2b hex of the raw bytes (BOM included); `text` is
    exactly what the codec produced (a BOM removed, line endings untouched), and chunk offsets
    (``char_start``/``char_end``) index it."""
    data = read_bytes(ref.path, cfg.max_file_bytes, follow_symlinks=cfg.follow_symlinks,
                      discovered=(ref.size, ref.mtime_ns))
    text, encoding = decode_text(data, cfg, ref.rel_path)
    if _NON_SPACE.search(text) is None:
        raise SkipDocument("empty", f"whitespace only ({len(data)} bytes)")
    return Decoded(text, content_hash(data), encoding)


def read_document(ref: DocumentRef, cfg: DocumentsConfig) -> tuple[str, str]:
    """``(text, content_hash)`` of `read_text`."""
    decoded = read_text(ref, cfg)
    return decoded.text, decoded.content_hash


__all__ = ["Decoded", "SkipDocument", "read_document", "read_text", "read_bytes", "decode_bytes", "decode_text",
           "content_hash"]
