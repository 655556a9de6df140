"""The C WordPiece scan (documents/_wordpiece.c, native_wordpiece.py) against HF `tokenizers`.

Ids *and* start offsets must be HF's on every document the scan takes; it must decline what it
cannot do exactly (special-token literals, mostly non-ASCII text) and be switched off, with its log
line, when it is not built, not applicable, or fails its self-check.
"""

from __future__ import annotations

import logging
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from hades_gpu.documents import fast_tokenizer, native_wordpiece, tokenized, tokenizer
from hades_gpu.documents.native_wordpiece import (
    NativeWordPiece,
    build_wordpiece,
    native_self_check,
    native_wordpiece_for,
)
from hades_gpu.documents.tokenized import SegmentedText, TokenizedText, tokenize_document
from hades_gpu.documents.tokenizer import load_tokenizer, tokenizer_spec
from requirements import skip_or_fail

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture()
def fresh_cache(monkeypatch) -> None:
    """An empty per-process cache of what is derived from a tokenizer (the scan is cached there)."""
    monkeypatch.setattr(tokenizer, "_DERIVED", {})


@pytest.fixture()
def native(monkeypatch) -> NativeWordPiece:
    monkeypatch.delenv(fast_tokenizer.TOKENIZER_ENV, raising=False)
    got = native_wordpiece_for(load_tokenizer())
    if got is None:
        skip_or_fail("the C WordPiece extension is not built (hades_gpu/documents/_wordpiece.c)")
    return got


def _hf(text: str) -> tuple[list[int], list[int]]:
    enc = load_tokenizer().encode(text, add_special_tokens=False)
    return enc.ids, [a for a, _ in enc.offsets]


def _assert_hf(native: NativeWordPiece, text: str) -> bool:
    """True when the scan took `text` (and then gave HF's ids and offsets), False when it declined."""
    got = native.encode_offsets(text)
    if got is None:
        return False
    ids, starts = _hf(text)
    assert got[0].dtype == np.int32 and got[1].dtype == np.int64
    assert got[0].tolist() == ids, text[:80]
    assert got[1].tolist() == starts, text[:80]
    return True


def _real_texts(limit: int) -> list[str]:
    files = [p for p in sorted(STDLIB.rglob("*.py")) if "test" not in p.parts and p.stat().st_size < 200_000]
    docs = [p for p in sorted(Path("/usr/share/doc").glob("*/*")) if p.is_file() and not p.is_symlink()
            and p.suffix.lower() in (".md", ".txt", ".rst") and p.stat().st_size < 200_000]
    picked = files[:: max(1, len(files) // limit)][:limit] + docs[:limit]
    return [p.read_bytes().decode("utf-8", "replace") for p in picked]


def test_ids_and_offsets_equal_hf_on_real_files(native: NativeWordPiece) -> None:
    texts = _real_texts(150)
    assert len(texts) > 100
    taken = sum(_assert_hf(native, t) for t in texts)
    holes = sum(1 for t in texts if not t.isascii())
    assert taken > 0.9 * len(texts), (taken, len(texts))
    assert holes > 0  # some files hold non-ASCII runs: the splice is exercised


def test_ids_and_offsets_equal_hf_on_seeded_random_text(native: NativeWordPiece) -> None:
    """Random mixes of vocabulary pieces, letters, digits, punctuation, whitespace of every kind,
    control and non-ASCII characters, words longer than max_input_chars_per_word."""
    rng = random.Random(12)
    vocab = [t for t in load_tokenizer().get_vocab() if t.isascii() and not t.startswith("[")]
    atoms = [" ", "  ", "\t", "\n", "\r\n", "\r", ".", "#", "##", "_", "-", "'", "(", ")", "[", "]", "x" * 101,
             "q" * 100, "\x00", "\x0b", "\x0c", "\x7f", "é", "東京", "😀", "\u00a0", "\u200b", "ﬁ", "ß", "[CLS",
             "SEP]", "Zz9", "0123456789", "ABCdef"]
    taken = 0
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(0, 60)):
            r = rng.random()
            if r < 0.5:
                word = rng.choice(vocab)
                parts.append(word.upper() if rng.random() < 0.2 else word)
            elif r < 0.8:
                parts.append(rng.choice(atoms))
            else:
                parts.append("".join(rng.choice("abcxyzQJK019_.-") for _ in range(rng.randint(1, 30))))
        taken += _assert_hf(native, "".join(p + (" " if rng.random() < 0.7 else "") for p in parts))
    assert taken > 250


def test_long_words_unknown_pieces_and_every_punctuation(native: NativeWordPiece) -> None:
    unk = load_tokenizer().token_to_id("[UNK]")
    for text in ("a" * 100, "a" * 101, "ab" * 51 + " end", "".join(chr(c) for c in range(0x21, 0x7F)),
                 "#### ##a a## x##y", "UPPER lower 3rd 0x1F", "", "   \n\t\r  ", "tail without newline"):
        assert _assert_hf(native, text), text
    ids, _ = native.encode_offsets("a" * 101 + " b")
    assert ids[0] == unk


def test_holes_are_spliced_at_their_token_index(native: NativeWordPiece) -> None:
    text = "start café middle \x00ctrl 東 end\u00a0nbsp x\x0by done" + " and some plain ascii words" * 4
    assert _assert_hf(native, text)


def test_declines_special_literals_and_mostly_non_ascii(native: NativeWordPiece) -> None:
    tok = load_tokenizer()
    for text in ("a [SEP] b", "x [MASK] y", "東京都の天気は晴れです。" * 20 + " ascii", "Съешь же ещё этих булок. " * 9):
        assert native.encode_offsets(text) is None, text
    # HF matches an added token that is not normalized exactly: Python's x[mask] is plain text
    assert _assert_hf(native, "y = x[mask] + z[cls] [Sep]")
    # a document the scan takes is a TokenizedText from its arrays
    tt = tokenize_document("plain ascii text, with punctuation.", tok)
    assert isinstance(tt, TokenizedText)
    assert tt.ids.tolist() == tok.encode("plain ascii text, with punctuation.", add_special_tokens=False).ids


def test_declined_documents_take_hf_until_kitoken_pays_off(native: NativeWordPiece, monkeypatch) -> None:
    """Declined documents: HF offsets until KITOKEN_AFTER_DECLINED_CHARS of them were seen, then
    kitoken segments; Chinese text always HF (kitoken is quadratic in Chinese characters)."""
    tok = load_tokenizer()
    russian = "Съешь же ещё этих мягких французских булок, да выпей чаю. " * 50
    chinese = "中文没有空格，東京都の天気は晴れです。" * 50
    monkeypatch.setattr(tokenized, "KITOKEN_AFTER_DECLINED_CHARS", 2 * len(russian))
    monkeypatch.setattr(tokenized, "_declined_chars", 0)
    kinds = [type(tokenize_document(russian, tok)) for _ in range(4)]
    assert kinds == [TokenizedText, TokenizedText, SegmentedText, SegmentedText]
    assert isinstance(tokenize_document(chinese, tok), TokenizedText)
    for text in (russian, chinese):
        assert tokenize_document(text, tok).ids.tolist() == tok.encode(text, add_special_tokens=False).ids


def test_encode_ids_of_other_texts(native: NativeWordPiece) -> None:
    texts = ["plain words", "a [SEP] b", "東京" * 10, ""]
    assert native.encode_ids(texts) == [
        e.ids for e in load_tokenizer().encode_batch(texts, add_special_tokens=False)]


def test_outputs_grow_for_texts_denser_than_two_characters_a_token(native: NativeWordPiece) -> None:
    """The outputs start at about one token per two characters and grow: punctuation is one token
    per character, on its own and after a long run of words."""
    for text in ("!" * 10_000, "word " * 5_000 + "." * 20_000, "a.b,c;d" * 3_000, "x"):
        assert _assert_hf(native, text)
    ids, starts = native.encode_offsets("!" * 10)
    assert not ids.flags.writeable and ids.shape == starts.shape == (10,)


def test_self_check_rejects_a_disagreeing_build(native: NativeWordPiece, fresh_cache, monkeypatch, caplog) -> None:
    """A scan built without lower-casing disagrees with the (lower-casing) HF tokenizer; the real
    path then logs why and declines."""
    hf = load_tokenizer()
    spec = dict(tokenizer_spec(hf))
    spec["normalizer"] = dict(spec["normalizer"], lowercase=False)
    cased = NativeWordPiece(hf, build_wordpiece(spec))
    assert "ids differ" in (native_self_check(cased, hf) or "")
    assert native_self_check(native, hf) is None

    monkeypatch.setattr(native_wordpiece, "build_wordpiece", lambda _spec: build_wordpiece(spec))
    with caplog.at_level(logging.WARNING, logger=native_wordpiece.__name__):
        assert native_wordpiece_for(hf) is None
    assert any("fails the self-check" in r.getMessage() for r in caplog.records)


def test_not_built_or_switched_off_means_none(fresh_cache, monkeypatch, caplog) -> None:
    """A missing extension cannot be caused otherwise where it is built: sys.modules[name] = None
    makes its import raise ImportError, as when it is absent."""
    hf = load_tokenizer()
    monkeypatch.setitem(sys.modules, "hades_gpu.documents._wordpiece", None)
    monkeypatch.setenv(fast_tokenizer.TOKENIZER_ENV, "native")
    assert fast_tokenizer.fast_tokenizer_for(hf) is not None  # kitoken stays on for the other documents
    with caplog.at_level(logging.INFO, logger=native_wordpiece.__name__):
        assert native_wordpiece_for(hf) is None
    assert any("not built" in r.getMessage() for r in caplog.records)
    for choice in ("kitoken", "hf"):
        monkeypatch.setenv(fast_tokenizer.TOKENIZER_ENV, choice)
        assert native_wordpiece_for(hf) is None


def test_not_a_bert_wordpiece_definition() -> None:
    spec = dict(tokenizer_spec(load_tokenizer()))
    assert build_wordpiece(dict(spec, pre_tokenizer={"type": "Whitespace"})) is None
    assert build_wordpiece(dict(spec, normalizer=None)) is None
