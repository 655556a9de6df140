"""The fastest exact tokenizer for ids: kitoken, self-checked against HF `tokenizers` at start-up.

kitoken (Rust) encodes MiniLM's WordPiece 4-5x faster than HF `tokenizers` with identical ids, but
returns ids only (no offsets). It is used only where it agrees with the HF tokenizer on a built-in
sample of awkward strings (`SELF_CHECK`); otherwise, or when it is not installed or fails to load,
`fast_tokenizer_for` returns None and callers keep HF (one log line says why).

Switch: ``HADES_GPU_TOKENIZER=hf`` forces HF everywhere; ``kitoken``: kitoken (when it passes the
check) for every document; empty or ``native``: the C WordPiece scan (`native_wordpiece`) for the
documents it takes, kitoken for the rest. Cached per process and HF tokenizer: worker processes
build their own.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import threading
from typing import Optional, Sequence

from tokenizers import Tokenizer

from hades_gpu.documents.kitoken_differences import DIFFERING_RANGES
from hades_gpu.documents.tokenizer import tokenizer_spec

log = logging.getLogger(__name__)

TOKENIZER_ENV = "HADES_GPU_TOKENIZER"

# Strings where a second implementation of BERT normalization / pre-tokenization / WordPiece is
# most likely to differ: Unicode categories, normalization, splitting rules, special-token literals.
SELF_CHECK: tuple[str, ...] = (
    "Hello world. The quick brown fox jumps over the lazy dog; it's 3.14159 -- really!",
    "def f(x: int = 0) -> dict[str, list[int]]:\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    "class Foo(Bar):\n\t\"\"\"Docstring.\"\"\"\r\n\tpass\r\n",
    "Café naïve résumé ÉCOLE Ångström façade São Paulo Zürich İstanbul ß ΑΒΓ δέλτα",
    "東京都の天気は晴れです。中文没有空格。한국어 텍스트 日本語テキスト",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷 ✓ ★",
    "zero\u200bwidth\u200cjoin\u200dmark\ufeffbom \u2060word joiner",
    "ligatures ﬁne ﬂow ﬀ ﬃ ½ ² ™ Ⅻ ｆｕｌｌｗｉｄｔｈ",
    "control\x00chars\x01\x07\x0b\x0c\x1f\x7f\x85 del",
    "ascii\x0bvertical\x0ctab\x1fand\x7fdel\x00null: deleted, not spaces",
    "line\r\nbreaks\rmixed\nand\u2028para\u2029sep\u00a0nbsp\u3000ideo\u2003em",
    "tabs\tand\t\tmore\t tabs   spaces",
    "x" * 99 + " " + "y" * 100 + " " + "z" * 101 + " " + "supercalifragilisticexpialidocious" * 4,
    "!!!???...,,,;;;::: ((([[[{{{}}}]]]))) --- ___ *** ### @@@ $$$ %%% ^^^ &&& ||| ~~~ ``` '''",
    "[CLS] special [SEP] tokens [PAD] in [MASK] text [UNK] and [cls] lowercase x[SEP]y",
    "combining e\u0301 a\u0308 n\u0303 \u0301alone Ω ohm Å angstrom",
    "\ufffd replacement char and \u00ad soft hyphen",
    "ΟΔΥΣΣΕΥΣ ΚΑΙ ΣΙΣΥΦΟΣ. theΣ quick ΣΑΣ",
    "",
    "   ",
    "a",
)


# The code points BERT's normalizer treats as Chinese characters (`handle_chinese_chars`). kitoken
# 0.11's encode time grows with the square of their number in a text (16 k of them: 0.5 s, HF 19 ms;
# 64 k: 3.2 s, HF 84 ms; measured 2026-12-06; kana, Hangul, Thai, emoji and Cyrillic are not
# affected), so texts holding any are encoded by HF instead.
CHINESE_RANGES: tuple[tuple[int, int], ...] = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2CEAF), (0x2F800, 0x2FA1F))


def _char_class(ranges: Sequence[tuple[int, int]]) -> str:
    """Inclusive code point ranges -> the inside of a regex character class."""
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


# Texts HF encodes instead of kitoken: the Chinese characters above (speed); the capital sigma Σ
# (correctness): kitoken lowercases a word-final Σ to the final form ς, as Rust's `str::to_lowercase`
# does, where HF's normalizer lowercases character by character to σ ("ΟΔΥΣΣΕΥΣ" ends in "##ς"
# against HF's "##σ"), so ids, token counts and vectors would differ from HF's for the same text; and
# every code point on which the two disagree (`kitoken_differences`: their Unicode tables are of
# different versions, so characters added since, noncharacters and unassigned code points are an
# [UNK] word for HF and dropped or split off by kitoken; "قال\u061d" was 4 tokens against HF's 1).
HF_ONLY_RANGES: tuple[tuple[int, int], ...] = tuple(sorted(CHINESE_RANGES + ((0x03A3, 0x03A3),) + DIFFERING_RANGES))
# Two lookups, because `re` tests a class holding characters above U+FFFF range by range (~0.8 s
# per MB of Arabic against ~7 ms for a class of BMP characters only, which it tests with a bitmap):
# the BMP ranges are one pattern, and the few distinct characters above U+FFFF a text holds (emoji,
# mostly) are looked up by bisection.
HF_ONLY_BMP_CHARS = re.compile(f"[{_char_class([(a, min(b, 0xFFFF)) for a, b in HF_ONLY_RANGES if a <= 0xFFFF])}]")
_ASTRAL_RANGES = [(max(a, 0x10000), b) for a, b in HF_ONLY_RANGES if b > 0xFFFF]
_ASTRAL_STARTS = [a for a, _ in _ASTRAL_RANGES]
_ASTRAL_CHAR = re.compile("[\U00010000-\U0010ffff]")


def _astral_hf_only(code_point: int) -> bool:
    i = bisect.bisect_right(_ASTRAL_STARTS, code_point) - 1
    return i >= 0 and code_point <= _ASTRAL_RANGES[i][1]


def needs_hf(text: str) -> bool:
    """Whether `text` holds a character kitoken must leave to HF (`HF_ONLY_RANGES`)."""
    if HF_ONLY_BMP_CHARS.search(text) is not None:
        return True
    if text.isascii() or _ASTRAL_CHAR.search(text) is None:
        return False
    return any(_astral_hf_only(ord(c)) for c in set(_ASTRAL_CHAR.findall(text)))


# ASCII control characters BERT's `clean_text` deletes (tab, line feed and carriage return it turns
# into spaces, which its pre-tokenizer splits on anyway)
DELETED_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class KitokenTokenizer:
    """Ids (no special tokens added) from kitoken, built from an HF tokenizer's own definition.

    Special-token literals written in a text ("[SEP]") are recognised as HF does, but only where a
    text holds one: kitoken's special-token matching costs ~20% of its encode time, and a text with
    no such literal encodes the same either way (`specials_in`).

    Plain ASCII skips kitoken's normalizer. For a `BertNormalizer` followed by `BertPreTokenizer`
    (MiniLM's), normalizing ASCII without deleted control characters is `str.lower` (or nothing,
    when the tokenizer is cased): no accents, no CJK, whitespace split alike. `str.lower` in C and a
    second kitoken without the normalizer encode such text ~40% faster than the full one, with the
    same ids (8.4 MB of the feed corpus checked; the self-check's ASCII samples take this path)."""

    def __init__(self, hf: Tokenizer) -> None:
        import kitoken  # raises ImportError when missing (or blocked)

        spec = dict(tokenizer_spec(hf))  # a shallow copy: the shared one is read-only
        # kitoken applies a definition's padding/truncation (MiniLM's file pads to 128 with zeros):
        # the definition it gets must have neither, never a strip of trailing zeros afterwards.
        spec["padding"] = None
        spec["truncation"] = None
        self._hf = hf  # texts that `needs_hf`
        self._kt = kitoken.Kitoken.from_tokenizers(json.dumps(spec).encode("utf-8"))
        self._specials = special_literals(spec)
        self._plain: Optional[object] = None
        self._lower = False
        normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
        if normalizer.get("type") == "BertNormalizer" and pre.get("type") == "BertPreTokenizer":
            self._plain = kitoken.Kitoken.from_tokenizers(json.dumps(dict(spec, normalizer=None)).encode("utf-8"))
            self._lower = bool(normalizer.get("lowercase", True))

    def specials_in(self, text: str) -> bool:
        """Whether `text` may hold a special-token literal (then it is encoded matching them)."""
        return self._specials is None or self._specials.search(text) is not None

    def plain(self, text: str) -> bool:
        """Whether `text` takes the path without the normalizer (ASCII, nothing it would delete, no
        special-token literal)."""
        return (self._plain is not None and text.isascii() and DELETED_CONTROLS.search(text) is None
                and not self.specials_in(text))

    def encode(self, text: str) -> list[int]:
        if self.plain(text):
            return self._plain.encode(text.lower() if self._lower else text, False)  # type: ignore[attr-defined]
        if needs_hf(text):
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._kt.encode(text, self.specials_in(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if texts and all(self.plain(t) for t in texts):
            return self._plain.encode_all([t.lower() for t in texts] if self._lower else texts, False)  # type: ignore[attr-defined]
        if any(needs_hf(t) for t in texts):
            return [self.encode(t) for t in texts]
        return self._kt.encode_all(texts, any(self.specials_in(t) for t in texts))


def special_literals(spec: dict, ignore_case: bool = True) -> Optional["re.Pattern[str]"]:
    """A pattern of the added tokens' contents, or None (always match) when one is matched after
    normalization: then another string may normalize into it, and a literal search could miss that.

    HF matches a token that is not `normalized` on the raw text, exactly (`single_word`, `lstrip`
    and `rstrip` only narrow or widen a match around the content), so the exact contents are a
    superset of its matches; `ignore_case` widens it further (kitoken's routing keeps that margin;
    the C scan, which needs `x[mask]` of Python code to stay its own, uses the exact one)."""
    added = spec.get("added_tokens") or []
    if any(tok.get("normalized") for tok in added):
        return None
    contents = sorted({tok["content"] for tok in added if tok.get("content")}, key=len, reverse=True)
    if not contents:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(map(re.escape, contents)), re.IGNORECASE if ignore_case else 0)


def differing_code_points(hf: Tokenizer, batch: int = 20_000) -> set[int]:
    """Every code point from U+0080 up (surrogates excluded) whose ids between two letters ("x?y")
    differ between kitoken (unrouted) and HF: what `kitoken_differences` must cover (~10 s)."""
    fast = KitokenTokenizer(hf)
    code_points = [c for c in range(0x80, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    differing: set[int] = set()
    for i in range(0, len(code_points), batch):
        part = code_points[i:i + batch]
        texts = [f"x{chr(c)}y" for c in part]
        want = hf.encode_batch(texts, add_special_tokens=False)
        got = fast._kt.encode_all(texts, False)
        differing.update(c for c, w, g in zip(part, want, got) if list(g) != w.ids)
    return differing


def self_check(fast: KitokenTokenizer, hf: Tokenizer, samples: Sequence[str] = SELF_CHECK) -> Optional[str]:
    """None when `fast` gives HF's ids on every sample (one by one and batched), else why not."""
    expected = [e.ids for e in hf.encode_batch(list(samples), add_special_tokens=False)]
    for text, want in zip(samples, expected):
        got = list(fast.encode(text))
        if got != want:
            return f"ids differ on {text[:40]!r}: {got[:8]} vs HF {want[:8]}"
    if [list(x) for x in fast.encode_batch(samples)] != expected:
        return "batched ids differ from HF"
    joined = "\n".join(samples)
    if list(fast.encode(joined)) != hf.encode(joined, add_special_tokens=False).ids:
        return "ids of the joined sample differ from HF"
    return None


_CACHE: dict[tuple[int, int], tuple[Tokenizer, Optional[KitokenTokenizer]]] = {}


def fast_tokenizer_for(hf: Tokenizer) -> Optional[KitokenTokenizer]:
    """kitoken for `hf` when it passes `self_check`, else None (HF it is); cached per process.

    None outside the main thread: kitoken 0.11 ties state to the thread that uses it, and once that
    thread has ended, the next `encode` from another thread segfaults (seen: `process_batch` from a
    second ThreadPoolExecutor or web-server thread, ~1 run in 2). The main thread never ends before
    the process; a worker process tokenizes in its main thread, so the hot path keeps kitoken.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    key = (id(hf), os.getpid())  # a forked child builds its own (kitoken may hold threads)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is hf:
        return hit[1]
    fast: Optional[KitokenTokenizer] = None
    choice = os.environ.get(TOKENIZER_ENV, "").strip().lower()
    if choice == "hf":
        log.info("tokenizer: HF tokenizers (%s=hf)", TOKENIZER_ENV)
    elif choice not in ("", "native", "kitoken"):
        log.warning("tokenizer: HF tokenizers (%s=%r is none of 'native', 'kitoken', 'hf')", TOKENIZER_ENV, choice)
    else:
        try:
            fast = KitokenTokenizer(hf)
        except ImportError as err:
            log.info("tokenizer: HF tokenizers (kitoken is not importable: %s)", err)
        except Exception as err:  # noqa: BLE001 - any load failure means: use HF
            log.warning("tokenizer: HF tokenizers (kitoken cannot load this tokenizer: %s: %s)",
                        type(err).__name__, err)
        if fast is not None:
            why = self_check(fast, hf)
            if why is not None:
                log.warning("tokenizer: HF tokenizers (kitoken fails the self-check: %s)", why)
                fast = None
    _CACHE[key] = (hf, fast)
    return fast


__all__ = ["CHINESE_RANGES", "HF_ONLY_RANGES", "KitokenTokenizer", "SELF_CHECK", "special_literals", "TOKENIZER_ENV", "differing_code_points", "fast_tokenizer_for", "needs_hf", "self_check"]
