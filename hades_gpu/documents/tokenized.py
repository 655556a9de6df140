"""A document tokenized once: ids, and where each token starts (`TokenizedText`, `SegmentedText`).

`TokenizedText` holds ids and every token's start offset: from the C WordPiece scan for the BERT
WordPiece tokenizer (`native_wordpiece`, the default where it is built and takes the document), or
from one HF `tokenizers` call (any tokenizer). `SegmentedText` is the kitoken path for BERT
WordPiece (documents the C scan declines, or no C scan): ids come from kitoken (`fast_tokenizer`,
ids only), and offsets are only worked out where the packer asks. `tokenize_document` chooses.

Why that is exact: BertNormalizer works per character and BertPreTokenizer splits on whitespace
(and punctuation), so the ids of a text cut at whitespace, piece by piece and concatenated, are the
ids of the whole text. `SegmentedText` keeps the document as segments cut at such points, each with
its token range. ``index(pos)`` at a segment boundary is the segment's first token; a new position
that is a valid cut (after or before whitespace) splits its segment, counting the tokens of the
shorter side with the fast tokenizer (no count at all when that side is only whitespace: such
characters never start a token). A position inside a word (a cut in a long line, an overlap start)
narrows its segment to the word run around it and takes that run's offsets from HF `tokenizers`,
cached. Every piece the fast tokenizer encodes again is checked against the document's ids; a
mismatch raises `SegmentMismatch` and the caller redoes the document with `TokenizedText`.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import Callable, Optional, Sequence, Union

import numpy as np
from tokenizers import Tokenizer

from hades_gpu.documents.fast_tokenizer import DELETED_CONTROLS, KitokenTokenizer, fast_tokenizer_for, needs_hf
from hades_gpu.documents.native_wordpiece import native_wordpiece_for
from hades_gpu.documents.tokenizer import derived_from, tokenizer_spec

_NON_SPACE = re.compile(r"\S")
# SegmentedText._encode_segments joins a document's segments with a marker for one encode: an ASCII
# punctuation character the document does not hold (its own token wherever it stands; kitoken is ~4x
# slower on non-ASCII text, so no CJK character), else "[MASK]" (an added token: the encode must then
# match special tokens, ~20% slower)
_MARKER_CHARS = "^~`|\\@$"
_MARKER = " [MASK] "
# characters BERT treats as separators (\t \n \r and Unicode White_Space that is not a control
# character: those, like \v \f \x85, are deleted by clean_text and join their neighbours instead)
BERT_SPACE = frozenset("\t\n\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                       "\u2028\u2029\u202f\u205f\u3000")


def tokenizer_info(tokenizer: Tokenizer) -> tuple[np.ndarray, bool]:
    """(is-continuation table indexed by id, whether slices of a document's ids are exact)."""
    return derived_from("info", (tokenizer,), lambda: _make_info(tokenizer))


def _make_info(tokenizer: Tokenizer) -> tuple[np.ndarray, bool]:
    spec = tokenizer_spec(tokenizer)
    model = spec.get("model") or {}
    # the parsed definition's vocabulary and added tokens are `get_vocab(with_added_tokens=True)`,
    # without building that dict again (~11 ms of a worker's start-up)
    vocab = dict(model.get("vocab") or {}) if isinstance(model.get("vocab"), dict) \
        else tokenizer.get_vocab(with_added_tokens=True)
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens") or [] if "content" in t and "id" in t})
    table = np.zeros(max(vocab.values(), default=0) + 1, dtype=bool)
    prefix = model.get("continuing_subword_prefix") or "##"
    for tok, i in vocab.items():
        if tok.startswith(prefix) and len(tok) > len(prefix):
            table[i] = True
    norm = (spec.get("normalizer") or {}).get("type")
    pre = (spec.get("pre_tokenizer") or {}).get("type")
    slice_exact = model.get("type") == "WordPiece" and pre == "BertPreTokenizer" and norm in (None, "BertNormalizer")
    return table, slice_exact


class AsciiSurfaces:
    """Each id's surface for working out token offsets of plain ASCII text from ids alone.

    For BERT WordPiece on ASCII text without control characters, normalization only lowercases (same
    length) and every token is its vocabulary string (less the ``##`` of a continuation) in order,
    whitespace between words. So where the concatenated surfaces equal the text with its whitespace
    removed, token k starts at the non-whitespace character sum(len(surface) of tokens < k). Ids
    without a usable surface ([UNK], added tokens, non-ASCII pieces) have none (""): such a segment
    takes HF's offsets. Why not always HF: its offset tracking costs ~0.6 us per character, which was
    ~8% of a worker's time (prose overlaps ask for the offsets of many short segments)."""

    _DROP_SPACE = str.maketrans("", "", " \t\n\r")

    def __init__(self, tokenizer: Tokenizer) -> None:
        spec = tokenizer_spec(tokenizer)
        norm = spec.get("normalizer") or {}
        self.lowercase = bool(norm.get("lowercase", True)) if norm else False
        prefix = (spec.get("model") or {}).get("continuing_subword_prefix") or "##"
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        added = {t["id"] for t in spec.get("added_tokens") or []}
        unk = (spec.get("model") or {}).get("unk_token")
        self.surface: list[str] = [""] * (max(vocab.values(), default=0) + 1)  # "": not usable
        for tok, i in vocab.items():
            if i in added or tok == unk:
                continue
            surface = tok[len(prefix):] if tok.startswith(prefix) and len(tok) > len(prefix) else tok
            if surface and surface.isascii() and surface.isprintable() and not any(c.isspace() for c in surface):
                self.surface[i] = surface

    def starts(self, piece: str, ids: list[int]) -> Optional[list[int]]:
        """Start offsets (in `piece`) of `ids`, the ids of `piece`; None where this cannot tell.

        Plain Python on purpose: segments are short (median ~100 characters), where numpy's
        per-call cost was twice this loop's."""
        if not ids or not piece.isascii() or DELETED_CONTROLS.search(piece) is not None:
            return None  # control characters: clean_text deletes them
        try:
            surfaces = [self.surface[i] for i in ids]
        except IndexError:
            return None
        solid = piece.translate(self._DROP_SPACE)
        if self.lowercase:
            solid = solid.lower()
        if "" in surfaces or "".join(surfaces) != solid:
            return None
        out: list[int] = []
        pos = 0
        space = " \t\n\r"
        for surface in surfaces:
            while piece[pos] in space:
                pos += 1
            out.append(pos)
            pos += len(surface)
        return out


def ascii_surfaces(tokenizer: Tokenizer) -> AsciiSurfaces:
    return derived_from("ascii_surfaces", (tokenizer,), lambda: AsciiSurfaces(tokenizer))


def _markers(tokenizer: Tokenizer, fast: KitokenTokenizer) -> list[tuple[str, int]]:
    """The usable segment markers, best first: each (" c ", id) whose character is one token of its
    own (HF and the fast tokenizer agree), then " [MASK] " if it is; once per tokenizer pair."""
    def build() -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for marker in [f" {c} " for c in _MARKER_CHARS] + [_MARKER]:
            mid = tokenizer.token_to_id(marker.strip())
            if mid is not None and fast.encode(marker) == [mid] \
                    and tokenizer.encode(marker, add_special_tokens=False).ids == [mid]:
                out.append((marker, mid))
        return out

    return derived_from("segment_markers", (tokenizer, fast), build)


def _cont_of(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    if not ids.shape[0]:
        return np.zeros(0, dtype=bool)
    return table[np.minimum(ids, len(table) - 1)]


class SegmentMismatch(RuntimeError):
    """The fast tokenizer's ids of a piece disagree with the document's: redo it with HF offsets."""


class TokenizedText:
    """A document encoded once: ids and per-token start offsets, from one HF `tokenizers` call or
    given (`encoded`: the C WordPiece scan, `native_wordpiece`, which checked itself against HF).

    Args:
        text (str): the decoded document.
        tokenizer (tokenizers.Tokenizer): the model's tokenizer (truncation/padding off).
        reencode (bool, optional): re-encode every window's text instead of slicing ids where
            that is exact (for tests; same result, slower). (default: False)
        encoded (tuple[np.ndarray, np.ndarray], optional): (ids int32, starts int64) of `text`
            already known; then `tokenizer` is not run on the text. (default: None)
        encode_ids (Callable, optional): ids of other texts (default: the HF tokenizer's).
    """

    def __init__(self, text: str, tokenizer: Tokenizer, reencode: bool = False, *,
                 encoded: Optional[tuple[np.ndarray, np.ndarray]] = None,
                 encode_ids: Optional[Callable[[Sequence[str]], list[list[int]]]] = None) -> None:
        self.text = text
        self.tokenizer = tokenizer
        self._encode_ids = encode_ids
        if encoded is not None:
            self.ids, starts = encoded
            starts_list = starts.tolist()
        else:
            enc = tokenizer.encode(text, add_special_tokens=False)
            self.ids = np.array(enc.ids, dtype=np.int32)  # (n,)
            starts_list = [a for a, _ in enc.offsets]  # 5x faster than np.asarray of the (n, 2) pairs
            starts = np.array(starts_list, dtype=np.int64)  # (n,)
        self.n = int(self.ids.shape[0])
        if self.n > 1 and bool((starts[1:] < starts[:-1]).any()):
            # never seen with BERT; keep binary search valid for any tokenizer
            starts = np.maximum.accumulate(starts)
            starts_list = starts.tolist()
        self.starts = starts
        self._starts_list = starts_list  # bisect on a list: ~20x cheaper per call than np.searchsorted
        table, slice_exact = tokenizer_info(tokenizer)
        self.cont = _cont_of(self.ids, table)  # (n,) True for "##" pieces
        self.slice_exact = slice_exact and not reencode

    # -- counting ---------------------------------------------------------------------------
    def index(self, pos: int) -> int:
        """Index of the first token starting at or after character `pos`."""
        return bisect_left(self._starts_list, pos)

    def count(self, start: int, end: int) -> int:
        return self.index(end) - self.index(start)

    def start_of(self, i: int) -> int:
        return int(self.starts[i]) if i < self.n else len(self.text)

    def starts_of(self, lo: int, hi: int) -> np.ndarray:
        """Start offsets of tokens lo..hi-1 (0 <= lo <= hi <= n)."""
        return self.starts[lo:hi]

    # -- cut quality ------------------------------------------------------------------------
    def word_start(self, i: int) -> bool:
        """A cut before token `i` does not split a word (ends of the text count as word starts)."""
        if i <= 0 or i >= self.n:
            return True
        return (not self.cont[i]) and self.starts[i] > self.starts[i - 1]

    def space_before(self, i: int) -> bool:
        p = self.start_of(i)
        return p > 0 and self.text[p - 1].isspace()

    # -- ids of other texts -----------------------------------------------------------------
    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if self._encode_ids is not None:
            return self._encode_ids(texts)
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class SegmentedText:
    """The same interface as `TokenizedText` for BERT WordPiece, from fast ids (module docstring).

    Args:
        text (str): the decoded document.
        tokenizer (tokenizers.Tokenizer): the HF tokenizer (offsets where needed).
        fast (KitokenTokenizer): ids, self-checked against `tokenizer`.
        cuts (Sequence[int], optional): positions to cut the document at up front (the chunker's
            top-level spans: it counts tokens at all of them); invalid ones are ignored.
    """

    slice_exact = True

    def __init__(self, text: str, tokenizer: Tokenizer, fast: KitokenTokenizer, cuts: Sequence[int] = ()) -> None:
        self.text = text
        self.tokenizer = tokenizer
        self.fast = fast
        n_chars = len(text)
        bounds = [0]
        space = BERT_SPACE
        for c in cuts:  # = `_valid_cut` inline: this loop sees every top-level span of the document
            if bounds[-1] < c < n_chars and (text[c - 1] in space or text[c] in space):
                bounds.append(c)
        self._bounds = bounds  # segment k is text[bounds[k]:bounds[k+1]] (last: to the end)
        ids, self._cum = self._encode_segments(bounds)  # _cum[k]: segment k's first token
        # segment start -> its first token: the chunker counts tokens mostly at the cuts it gave, and
        # a dict hit there is ~5x cheaper than the bisect + tuple of the general path
        self._first_token = dict(zip(bounds, self._cum))
        self.ids = ids.astype(np.int32)  # (n,)
        self._ids_cache: Optional[list[int]] = None
        self.n = int(ids.shape[0])
        self._offsets: dict[int, list[int]] = {}  # segment start -> absolute starts of its tokens
        table, _ = tokenizer_info(tokenizer)
        self.cont = _cont_of(self.ids, table)
        self.hf_segments = 0  # segments whose offsets came from HF (for the benchmark's report)
        self.hf_chars = 0

    @property
    def _ids_list(self) -> list[int]:
        """The ids as a list, for comparing re-encoded pieces (made on the first such check only)."""
        if self._ids_cache is None:
            self._ids_cache = self.ids.tolist()
        return self._ids_cache

    # -- segments ---------------------------------------------------------------------------
    def _encode_segments(self, bounds: list[int]) -> tuple[np.ndarray, list[int]]:
        """(document ids, first token of each segment).

        One encode of the segments joined by a marker (a character the text lacks that is a token of
        its own, or "[MASK]", an added token; between spaces either way, so the pieces around it keep
        their ids) is ~2x faster than a batch of many short strings. The marker's id splits the
        result; when the text itself holds that token (its count is off), a plain batch of the
        pieces is used instead."""
        text, fast = self.text, self.fast
        if len(bounds) == 1:
            return np.array(fast.encode(text), dtype=np.int64), [0]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:] + [len(text)])]
        found = self._marker_for(text)
        if found is not None:
            marker, marker_id = found
            joined = np.array(fast.encode(marker.join(pieces)), dtype=np.int64)
            at = np.flatnonzero(joined == marker_id)
            if at.shape[0] == len(pieces) - 1:
                cum = np.concatenate(([0], at - np.arange(at.shape[0]))).tolist()
                return np.delete(joined, at), cum
        cum = [0]
        ids: list[int] = []
        for p in fast.encode_batch(pieces):
            ids.extend(p)
            cum.append(len(ids))
        return np.array(ids, dtype=np.int64), cum[:-1]

    def _marker_for(self, text: str) -> Optional[tuple[str, int]]:
        """(" c ", id) for the first marker character absent from `text`, else (" [MASK] ", id) when
        that is one token; None when no marker works (a batch of the pieces then)."""
        for marker, marker_id in _markers(self.tokenizer, self.fast):
            if marker == _MARKER or marker.strip() not in text:
                return marker, marker_id
        return None

    def _valid_cut(self, pos: int) -> bool:
        t = self.text
        return pos <= 0 or pos >= len(t) or t[pos - 1] in BERT_SPACE or t[pos] in BERT_SPACE

    def _seg(self, k: int) -> tuple[int, int, int, int]:
        """(char start, char end, first token, end token) of segment k."""
        b, c = self._bounds, self._cum
        last = k + 1 >= len(b)
        return b[k], (len(self.text) if last else b[k + 1]), c[k], (self.n if last else c[k + 1])

    def _split(self, k: int, pos: int) -> int:
        """Cut segment k at `pos` (a valid cut strictly inside it); the token index at `pos`."""
        s0, e0, c0, c1 = self._seg(k)
        text = self.text
        if _NON_SPACE.search(text, s0, pos) is None:
            left = 0
        elif _NON_SPACE.search(text, pos, e0) is None:
            left = c1 - c0
        elif pos - s0 <= e0 - pos:
            got = self.fast.encode(text[s0:pos])
            left = len(got)
            if got != self._ids_list[c0 : c0 + left]:
                raise SegmentMismatch(f"ids of [{s0}, {pos}) differ from the document's")
        else:
            got = self.fast.encode(text[pos:e0])
            left = (c1 - c0) - len(got)
            if left < 0 or got != self._ids_list[c0 + left : c1]:
                raise SegmentMismatch(f"ids of [{pos}, {e0}) differ from the document's")
        self._bounds.insert(k + 1, pos)
        self._cum.insert(k + 1, c0 + left)
        self._first_token[pos] = c0 + left
        return c0 + left

    def _offsets_of(self, k: int) -> list[int]:
        """Absolute start offsets of segment k's tokens (cached): from the ids for plain ASCII
        (`AsciiSurfaces`), else from HF."""
        s0, e0, c0, c1 = self._seg(k)
        hit = self._offsets.get(s0)
        if hit is not None and len(hit) == c1 - c0:
            return hit
        piece = self.text[s0:e0]
        local = ascii_surfaces(self.tokenizer).starts(piece, self._ids_list[c0:c1])
        if local is not None:
            starts = [s0 + a for a in local]
            self._offsets[s0] = starts
            return starts
        enc = self.tokenizer.encode(piece, add_special_tokens=False)
        if enc.ids != self._ids_list[c0:c1]:
            raise SegmentMismatch(f"HF ids of [{s0}, {e0}) differ from the document's")
        starts = [s0 + a for a, _ in enc.offsets]
        for j in range(1, len(starts)):  # monotone for binary search (as TokenizedText)
            if starts[j] < starts[j - 1]:
                starts[j] = starts[j - 1]
        self._offsets[s0] = starts
        self.hf_segments += 1
        self.hf_chars += e0 - s0
        return starts

    def _narrow(self, k: int, pos: int) -> int:
        """Cut segment k at the whitespace around `pos` (the word run holding it); its new index."""
        s0, e0, _, _ = self._seg(k)
        text = self.text
        left = max(text.rfind(" ", s0, pos), text.rfind("\t", s0, pos), text.rfind("\n", s0, pos),
                   text.rfind("\r", s0, pos)) + 1
        if left > s0:
            self._split(k, left)
            k += 1
            s0 = left
        found = [q for q in (text.find(c, pos, e0) for c in " \t\n\r") if q >= 0]
        if found and min(found) > s0:
            self._split(k, min(found))
        return k

    # -- counting ---------------------------------------------------------------------------
    def index(self, pos: int) -> int:
        """Index of the first token starting at or after character `pos`."""
        hit = self._first_token.get(pos)
        if hit is not None:
            return hit
        if pos <= 0:
            return 0
        if pos >= len(self.text):
            return self.n
        k = bisect_right(self._bounds, pos) - 1
        s0, e0, c0, c1 = self._seg(k)
        if pos == s0 or c0 == c1:
            return c0
        offs = self._offsets.get(s0)
        if offs is not None and len(offs) == c1 - c0:
            return c0 + bisect_left(offs, pos)
        if self._valid_cut(pos):
            return self._split(k, pos)
        k = self._narrow(k, pos)
        s0, _, c0, _ = self._seg(k)
        return c0 + bisect_left(self._offsets_of(k), pos)

    def count(self, start: int, end: int) -> int:
        return self.index(end) - self.index(start)

    def _seg_of_token(self, i: int) -> int:
        return bisect_right(self._cum, i) - 1  # the last segment starting at or before token i

    def start_of(self, i: int) -> int:
        if i >= self.n:
            return len(self.text)
        k = self._seg_of_token(i)
        s0, e0, c0, _ = self._seg(k)
        if i == c0:
            m = _NON_SPACE.search(self.text, s0, e0)
            if m is not None and "!" <= self.text[m.start()] <= "~":
                return m.start()  # printable ASCII after whitespace only: the first token starts there
        return self._offsets_of(k)[i - c0]

    def starts_of(self, lo: int, hi: int) -> np.ndarray:
        """Start offsets of tokens lo..hi-1 (0 <= lo <= hi <= n)."""
        out: list[int] = []
        i = lo
        while i < hi:
            k = self._seg_of_token(i)
            _, _, c0, c1 = self._seg(k)
            offs = self._offsets_of(k)
            j = min(hi, c1)
            out.extend(offs[i - c0 : j - c0])
            i = j
        return np.array(out, dtype=np.int64)

    # -- cut quality ------------------------------------------------------------------------
    def word_start(self, i: int) -> bool:
        """A cut before token `i` does not split a word (ends of the text count as word starts)."""
        if i <= 0 or i >= self.n:
            return True
        if self.cont[i]:
            return False
        k = self._seg_of_token(i)
        _, _, c0, _ = self._seg(k)
        if i == c0:  # the token before lies in an earlier segment: it starts strictly before
            return True
        offs = self._offsets_of(k)
        return offs[i - c0] > offs[i - c0 - 1]

    def space_before(self, i: int) -> bool:
        p = self.start_of(i)
        return p > 0 and self.text[p - 1].isspace()

    # -- ids of other texts -----------------------------------------------------------------
    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.fast.encode_batch(texts)


Tokenized = Union[TokenizedText, SegmentedText]


# kitoken's build and self-check cost a worker ~0.2 s; where the C scan runs, only the documents it
# declines (special-token literals, mostly non-ASCII text) would use kitoken, and HF's offset encode
# of them costs ~0.7 s per million characters more than kitoken's segments: HF takes them until a
# process has seen this many such characters
KITOKEN_AFTER_DECLINED_CHARS = 300_000
_declined_chars = 0  # per process: characters of documents the C scan declined


def tokenize_document(text: str, tokenizer: Tokenizer, reencode: bool = False,
                      cuts: Sequence[int] = ()) -> Tokenized:
    """For a BERT WordPiece tokenizer (and not `reencode`): `TokenizedText` from the C scan where it
    takes the document (`native_wordpiece`); else `SegmentedText` from kitoken ids when kitoken passed
    its self-check, the text holds no Chinese character (kitoken is quadratic in them) nor a capital
    sigma (kitoken lowercases a final one otherwise than HF) nor a code point kitoken reads otherwise than HF (`needs_hf`) and, where the C scan runs, declined documents have made kitoken's build worth it
    (`KITOKEN_AFTER_DECLINED_CHARS`); otherwise `TokenizedText` from HF."""
    global _declined_chars
    if not reencode and tokenizer_info(tokenizer)[1]:
        native = native_wordpiece_for(tokenizer)
        if native is not None:
            encoded = native.encode_offsets(text)
            if encoded is not None:
                return TokenizedText(text, tokenizer, encoded=encoded, encode_ids=native.encode_ids)
            _declined_chars += len(text)
        if (not needs_hf(text)
                and (native is None or _declined_chars > KITOKEN_AFTER_DECLINED_CHARS)):
            fast = fast_tokenizer_for(tokenizer)
            if fast is not None:
                return SegmentedText(text, tokenizer, fast, cuts)
    return TokenizedText(text, tokenizer, reencode=reencode)


__all__ = ["BERT_SPACE", "SegmentMismatch", "SegmentedText", "Tokenized", "TokenizedText", "tokenize_document", "tokenizer_info"]
