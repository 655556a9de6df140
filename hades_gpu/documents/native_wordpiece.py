"""Ids and token start offsets of a whole document in one C pass (`_wordpiece.c`), checked against HF.

Why: the worker's per-document cost was the fast tokenizer's ids (kitoken, ids only) plus working
offsets out afterwards segment by segment in Python; the C scan gives both for the ASCII words of a
document at ~90 MB/s (kitoken ~5-8 MB/s, HF with offsets ~1 MB/s). Whitespace-separated runs that
hold anything else (non-ASCII, control characters) come back as holes and are encoded here by HF
`tokenizers`, with offsets, and spliced in: exact because BERT normalizes per character and splits
at whitespace (see the C source). A document that holds a special-token literal ("[SEP]"), or whose
holes are a large share of it, is left to the caller's other paths (`encode_offsets` returns None).

Used only for `BertNormalizer` + `BertPreTokenizer` + `WordPiece` definitions, and only when the
built extension gives HF's ids *and* offsets on the self-check samples; otherwise
`native_wordpiece_for` returns None (one log line says why). ``HADES_GPU_TOKENIZER=kitoken`` or
``=hf`` switches it off (`fast_tokenizer.TOKENIZER_ENV`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from hades_gpu.documents.fast_tokenizer import SELF_CHECK, TOKENIZER_ENV, special_literals
from hades_gpu.documents.tokenizer import derived_from, tokenizer_spec

log = logging.getLogger(__name__)

# holes (runs HF encodes) above this share of a document's characters: the document is mostly
# non-ASCII (CJK, accented prose), where HF's offset-tracking encode of every run would be slower
# than the kitoken path the caller has
MAX_HOLE_SHARE = 0.25

# ASCII strings where a WordPiece written again is most likely to slip: words longer than
# max_input_chars_per_word, words with a piece no vocabulary entry matches ([UNK]), digits and
# letters mixed, every punctuation character, runs of "#" (the continuation prefix), upper case
NATIVE_SELF_CHECK: tuple[str, ...] = (
    "".join(chr(c) for c in range(0x21, 0x7F)),
    "#### ##a a## ###b #\n## hash#tag C# F## x##y",
    "UPPER lower MiXeD CamelCaseIdentifier snake_case_name kebab-case SCREAMING_SNAKE 3rd 21st 0x1F 1e-10",
    "a" * 100 + " " + "b" * 101 + " " + "ab" * 50 + "c " + "z" * 3000,
    "qqqqqqqxzvjk xzqv qzxj q1z2x3 zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz unaffable antidisestablishmentarianism",
    "mixed ascii café runs\tand \x00controls\x7f in\x0bruns end\u00a0nbsp tail",
    "x[mask]y [cls] [Sep] [pad]ding [unK] [MASK ] [ CLS]: lower-case literals are plain text to HF",
    "  leading and trailing spaces \r\n\r\n\t ",
)


class NativeWordPiece:
    """The C scan for one HF BERT WordPiece tokenizer (module docstring).

    Args:
        hf (tokenizers.Tokenizer): the tokenizer it must agree with (truncation/padding off).
        wordpiece (object): a built ``_wordpiece.WordPiece`` (from `build_wordpiece`).
    """

    def __init__(self, hf: Tokenizer, wordpiece: object) -> None:
        self.hf = hf
        self._wp = wordpiece
        self._specials = special_literals(tokenizer_spec(hf), ignore_case=False)

    def encode_offsets(self, text: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(ids int32, start offsets int64; read-only) of `text` without special tokens, or None where
        this path does not take the document (a special-token literal, or mostly holes)."""
        if self._specials is None or self._specials.search(text) is not None:
            return None
        id_bytes, start_bytes, holes = self._wp.encode(text)  # type: ignore[attr-defined]
        ids = np.frombuffer(id_bytes, dtype=np.int32)  # read-only views of exactly n tokens
        starts = np.frombuffer(start_bytes, dtype=np.int64)
        if not holes:
            return ids, starts
        if sum(e - s for s, e, _at in holes) > MAX_HOLE_SHARE * len(text):
            return None
        return _splice(ids, starts, holes, self.hf.encode_batch(
            [text[s:e] for s, e, _at in holes], add_special_tokens=False))

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of other texts (re-encoded windows): this path where it takes them, else HF."""
        out: list[list[int]] = []
        for text in texts:
            got = self.encode_offsets(text)
            out.append(got[0].tolist() if got is not None else self.hf.encode(text, add_special_tokens=False).ids)
        return out


def _splice(ids: np.ndarray, starts: np.ndarray, holes: list[tuple[int, int, int]],
            encodings: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """The scan's tokens with each hole's HF tokens inserted before its token index."""
    id_parts: list[np.ndarray] = []
    start_parts: list[np.ndarray] = []
    prev = 0
    for (s, _e, at), enc in zip(holes, encodings):
        id_parts += [ids[prev:at], np.asarray(enc.ids, dtype=np.int32)]
        hole_starts = np.fromiter((a for a, _b in enc.offsets), dtype=np.int64, count=len(enc.offsets))
        start_parts += [starts[prev:at], hole_starts + s]
        prev = at
    id_parts.append(ids[prev:])
    start_parts.append(starts[prev:])
    return np.concatenate(id_parts), np.concatenate(start_parts)


def build_wordpiece(spec: dict) -> Optional[object]:
    """A ``_wordpiece.WordPiece`` for a tokenizer definition, or None when it is not BERT WordPiece
    (raises ImportError when the extension is not built)."""
    from hades_gpu.documents._wordpiece import WordPiece

    model = spec.get("model") or {}
    normalizer = spec.get("normalizer") or {}
    pre = spec.get("pre_tokenizer") or {}
    if (model.get("type") != "WordPiece" or normalizer.get("type") != "BertNormalizer"
            or pre.get("type") != "BertPreTokenizer"):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    unk = vocab.get(model.get("unk_token") or "[UNK]")
    if unk is None:
        return None
    prefix = model.get("continuing_subword_prefix") or "##"
    entries: list[tuple[bytes, int, bool]] = []
    for token, i in vocab.items():
        if not token.isascii():
            continue  # never matches an ASCII word
        entries.append((token.encode("ascii"), i, False))
        if token.startswith(prefix) and len(token) > len(prefix):
            entries.append((token[len(prefix):].encode("ascii"), i, True))
    return WordPiece(entries, unk, int(model.get("max_input_chars_per_word") or 100),
                     bool(normalizer.get("lowercase", True)))


def native_self_check(native: NativeWordPiece, hf: Tokenizer,
                      samples: Sequence[str] = SELF_CHECK + NATIVE_SELF_CHECK) -> Optional[str]:
    """None when `native` gives HF's ids and start offsets on every sample it takes (and on all of
    them joined), else why not."""
    encoded = {text: native.encode_offsets(text) for text in samples}
    taken = [text for text, got in encoded.items() if got is not None]
    joined = "\n".join(taken)
    encoded[joined] = native.encode_offsets(joined)
    for text in [*taken, joined]:
        got = encoded[text]
        if got is None:  # only the joined text can get here (never seen): nothing to compare
            continue
        enc = hf.encode(text, add_special_tokens=False)
        if got[0].tolist() != enc.ids:
            return f"ids differ on {text[:40]!r}: {got[0][:8].tolist()} vs HF {enc.ids[:8]}"
        if got[1].tolist() != [a for a, _b in enc.offsets]:
            return f"offsets differ on {text[:40]!r}"
    return None


def native_wordpiece_for(hf: Tokenizer) -> Optional[NativeWordPiece]:
    """The C scan for `hf` when it is built, applies and passes `native_self_check`; else None.
    Cached per process, tokenizer and `TOKENIZER_ENV` value (worker processes build their own)."""
    choice = os.environ.get(TOKENIZER_ENV, "").strip().lower()
    return derived_from(f"native_wordpiece:{os.getpid()}:{choice}", (hf,), lambda: _make(hf, choice))


def _make(hf: Tokenizer, choice: str) -> Optional[NativeWordPiece]:
    if choice in ("hf", "kitoken"):
        log.info("tokenizer: no C WordPiece (%s=%s)", TOKENIZER_ENV, choice)
        return None
    try:
        wordpiece = build_wordpiece(tokenizer_spec(hf))
    except ImportError as err:
        log.info("tokenizer: no C WordPiece (the extension is not built: %s)", err)
        return None
    if wordpiece is None:
        log.info("tokenizer: no C WordPiece (not a BERT WordPiece definition)")
        return None
    native = NativeWordPiece(hf, wordpiece)
    why = native_self_check(native, hf)
    if why is not None:
        log.warning("tokenizer: no C WordPiece (it fails the self-check: %s)", why)
        return None
    return native


__all__ = ["MAX_HOLE_SHARE", "NATIVE_SELF_CHECK", "NativeWordPiece", "build_wordpiece", "native_self_check",
           "native_wordpiece_for"]
