"""Token-space windowing shared by the prose and code chunkers.

A document is tokenized once (`tokenized.TokenizedText`; `SegmentedText` on the fast path): token
ids, the character offset where each token starts, and whether it continues a word (a ``##`` piece). Everything else works on character spans
and counts tokens by binary search over those offsets.

The modality chunkers describe a document's structure as *spans*: ``(start, end, section)``
character ranges that partition the text (paragraphs; top-level Python statements; blank-line
blocks), and a ``children(start, end)`` function that splits one span into finer ones (sentences,
lines; a class into its methods, a function into its statements). `Packer` turns them into
windows of at most ``budget`` tokens:

- spans are packed greedily, in order, into the open window while they fit;
- a span that does not fit closes the window and opens the next one when it fits there whole: a
  unit (sentence, line, statement, function) is never cut when it fits a chunk of its own;
- a span too large for any window is split into its children, recursively, and these continue
  the open window ("windows pack adjacent text"); a span without children (one long line) is cut
  in token space before a word (a token that is not a ``##`` piece, preferably after whitespace),
  inside a word only when a single word is longer than a window. With ``absorb_top=False`` (code) a
  top-level span that has to be split starts and ends windows of its own, so every top-level chunk
  begins at a top-level statement;
- a span flagged ``section`` (a Markdown heading) closes the open window unless that is still
  under ``min_tokens`` or holds only headings; a window that holds only a heading is not left
  alone when the span after it does not fit: that span splits into it;
- ``overlap`` (prose): a window that begins inside a top-level span (a paragraph that had to be
  split) repeats up to ``overlap`` tokens from before its start, within that paragraph, starting at
  a line start or after whitespace; such windows are packed to ``budget - overlap`` to leave room.
  Windows that begin at a paragraph do not overlap: they already begin at a natural boundary;
- a window under ``min_tokens`` (the last one of a document, a lone ``x = 1`` between two
  functions) merges into the window before it when the two fit together (headings excepted).

`finalize` trims whitespace off the windows, drops empty ones, and assigns each its token ids,
checking ``1 <= n <= budget`` (a window that re-tokenizes to more is split again).

Ids: for the BERT WordPiece tokenizer (normalizer and pre-tokenizer are per character / per word,
WordPiece per word) the ids of a text cut before a word are exactly the matching slice of the
whole document's ids, so a window whose two edges fall before words takes that slice; any other
window (an edge inside a word, or any other tokenizer) is re-encoded with its own text. Either way
a chunk's ids are exactly ``tokenizer.encode(chunk.text, add_special_tokens=False).ids``; the tests
check this equality on real files with ``reencode=True``.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import numpy as np

from hades_gpu.documents.tokenized import BERT_SPACE, SegmentedText, Tokenized, TokenizedText, tokenizer_info

Span = tuple[int, int, bool]  # (char_start, char_end, starts a section)
Window = tuple[int, int]  # (char_start, char_end)
Children = Callable[[int, int], Optional[list[Span]]]

_NON_SPACE = re.compile(r"\S")
_MAX_RESPLITS = 8

def line_starts(text: str) -> np.ndarray:
    """Offsets of the starts of lines 1, 2, ... (after ``\n``, ``\r\n`` or a lone ``\r``)."""
    if text.isascii():
        cp = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    else:
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    lf = cp == 10
    cr = cp == 13
    cr[:-1] &= ~lf[1:]  # the \r of a \r\n ends nothing: its \n does
    ends = np.flatnonzero(lf | cr) + 1
    return np.concatenate((np.zeros(1, dtype=np.int64), ends.astype(np.int64)))


class _Win:
    """A window being built: [s, e), n tokens, at most `cap`; `unit` is the start of the top-level
    span it began inside (-1 when it began at a top-level span: no overlap then)."""

    __slots__ = ("s", "e", "n", "cap", "unit", "heading")

    def __init__(self, s: int, cap: int, unit: int, heading: bool) -> None:
        self.s = self.e = s
        self.n = 0
        self.cap = cap
        self.unit = unit
        self.heading = heading  # holds nothing but a section heading so far


class Packer:
    """Streaming packer of structural spans into token windows (see the module docstring).

    Args:
        tt (TokenizedText | SegmentedText): the tokenized document.
        children (Callable[[int, int], list[Span] | None]): finer spans partitioning a span (at
            least two), or None when the span has no finer structure (then token cuts).
        min_tokens (int): a window under this joins the window before it when both fit (and
            a heading only closes the open window once that holds this many tokens).
        overlap (int, optional): tokens repeated at the start of a window that begins inside a
            top-level span (prose). (default: 0)
        absorb_top (bool, optional): whether an oversized top-level span may start in the window
            left open by the spans before it (prose), or always starts a window of its own and is
            followed by a new one (code: top-level chunks start at top-level statements).
            (default: False)
    """

    def __init__(self, tt: Tokenized, children: Children, min_tokens: int, overlap: int = 0,
                 absorb_top: bool = False) -> None:
        self.tt = tt
        self.children = children
        self.min_tokens = min_tokens
        self.overlap = overlap
        self.absorb_top = absorb_top
        self._budget = 0
        self._out: list[_Win] = []
        self._cur: Optional[_Win] = None

    # -- public -----------------------------------------------------------------------------
    def pack(self, spans: Sequence[Span], budget: int) -> list[Window]:
        """Windows (possibly overlapping, in document order) covering all of `spans`."""
        if self.overlap >= budget:
            raise ValueError(f"overlap must be < budget (got overlap={self.overlap}, budget={budget})")
        self._budget = budget
        self._out = []
        self._cur = None
        for s, e, section in spans:
            self._add(s, e, section, 0, True, s)
        self._flush()
        wins = self._out
        self._out = []
        out = [(w.s, w.e) for w in wins]
        if self.overlap:
            out = self._add_overlap(wins, out)
        return out

    # -- packing ----------------------------------------------------------------------------
    def _flush(self) -> None:
        cur, self._cur = self._cur, None
        if cur is None or cur.e <= cur.s:
            return
        if cur.n < self.min_tokens and not cur.heading and self._out:
            prev = self._out[-1]
            if prev.e == cur.s and prev.n + cur.n <= prev.cap:  # a small window joins the one before
                prev.e = cur.e
                prev.n += cur.n
                return
        self._out.append(cur)

    def _open(self, s: int, boundary: bool, unit: int, heading: bool = False) -> _Win:
        cap = self._budget if (boundary or not self.overlap) else self._budget - self.overlap
        self._cur = _Win(s, cap, -1 if boundary else unit, heading)
        return self._cur

    def _weak(self, cur: Optional[_Win], depth: int) -> bool:
        """A window holding only a heading: the span after it splits into it rather than leave it alone."""
        return cur is not None and cur.heading and (depth > 0 or self.absorb_top)

    def _add(self, s: int, e: int, section: bool, depth: int, boundary: bool, unit: int) -> None:
        n = self.tt.count(s, e)
        cur = self._cur
        if cur is not None and section and not cur.heading and cur.n >= self.min_tokens:
            self._flush()  # a heading opens a new chunk
            cur = None
        if cur is not None and cur.n + n <= cur.cap:
            cur.e = e
            cur.n += n
            if n:
                cur.heading = cur.heading and section
            return
        fresh_cap = self._budget if (boundary or not self.overlap) else self._budget - self.overlap
        if n <= fresh_cap:
            kids = self.children(s, e) if self._weak(cur, depth) else None
            if not kids:  # whole in a window of its own
                self._flush()
                cur = self._open(s, boundary, unit, heading=section)
                cur.e, cur.n = e, n
                return
        else:
            if depth == 0 and not self.absorb_top:
                self._flush()
            kids = self.children(s, e)
        if kids and len(kids) >= 2:
            for k, (cs, ce, csec) in enumerate(kids):
                self._add(cs, ce, csec, depth + 1, boundary and k == 0, unit)
        else:
            self._add_tokens(s, e, boundary, unit)
        if depth == 0 and not self.absorb_top:
            self._flush()

    def _add_tokens(self, s: int, e: int, boundary: bool, unit: int) -> None:
        """Fill windows with [s, e) (no finer structure), cutting before words."""
        tt = self.tt
        a, b = tt.index(s), tt.index(e)
        pos = s
        while True:
            cur = self._cur
            if cur is None:
                cur = self._open(pos, boundary and pos == s, unit)
            room = cur.cap - cur.n
            if b - a <= room:
                cur.e = e
                cur.n += b - a
                cur.heading = cur.heading and b == a
                return
            if cur.n > 0 and room < max(1, cur.cap // 4):
                self._flush()  # too little room left to be worth a cut: start afresh
                continue
            c = self._best_cut(a + max(1, room // 2), a + room, a + room)
            if c <= a:  # no cut possible in range (cannot happen for room >= 1; stay safe)
                c = a + max(1, room)
            cut = tt.start_of(c)
            cur.e = cut
            cur.n += c - a
            cur.heading = False
            self._flush()
            a, pos = c, cut

    def token_windows(self, s: int, e: int, budget: int) -> list[Window]:
        """Cut [s, e) into windows of at most `budget` tokens, balanced in size, before words."""
        tt = self.tt
        budget = max(1, budget)
        a, b = tt.index(s), tt.index(e)
        n = b - a
        if n <= budget:
            return [(s, e)]
        k = -(-n // budget)
        target = -(-n // k)
        wins: list[Window] = []
        cur = s
        while b - a > budget:
            c = self._best_cut(a + max(1, target // 2), a + budget, min(a + target, a + budget))
            pos = tt.start_of(c)
            wins.append((cur, pos))
            cur, a = pos, c
        wins.append((cur, e))
        return wins

    def _best_cut(self, lo: int, hi: int, ideal: int) -> int:
        """Token index in [lo, hi] to cut before: after whitespace > before a word > anywhere,
        nearest to `ideal` within each class (the later one on a tie)."""
        tt = self.tt
        first, last = max(lo, 1), min(hi, tt.n - 1)
        cs = np.arange(first, last + 1)
        if cs.size:
            st = tt.starts_of(first - 1, last + 1)  # starts of tokens first-1 .. last
            keep = st[1:] > st[:-1]  # a cut must fall between characters
            cs, st = cs[keep], st[1:][keep]
        if not cs.size:  # every token in range shares a start offset: cut at the limit
            return hi
        word = ~tt.cont[cs]
        text = tt.text
        space = np.fromiter((text[p - 1].isspace() for p in st.tolist()), dtype=bool, count=cs.size)
        cls = word.astype(np.int64) + (word & space)
        score = cls * (4 * (hi - lo + 2)) - 2 * np.abs(cs - ideal) + (cs > ideal)
        return int(cs[int(np.argmax(score))])

    def _add_overlap(self, wins: list[_Win], out: list[Window]) -> list[Window]:
        """Extend each window that begins inside a top-level span back by up to `overlap` tokens
        (never before that span, nor to the previous window's start), starting the repeat at a line
        start where that gives a useful overlap, else after whitespace, else before a word."""
        tt = self.tt
        overlap = self.overlap
        for k in range(1, len(wins)):
            w = wins[k]
            if w.unit < 0:
                continue
            first = tt.index(w.s)
            lo = max(first - overlap, tt.index(w.unit), tt.index(wins[k - 1].s) + 1)
            if first <= lo:
                continue
            # Candidates j in [lo, first): a word start (not a "##" piece) at a new character
            # (tt.word_start(j) and start_of(j) > start_of(j - 1), as arrays: one call per window
            # instead of four per token).
            st = tt.starts_of(lo - 1, first)  # starts of tokens lo-1 .. first-1
            valid = np.flatnonzero(~tt.cont[lo:first] & (st[1:] > st[:-1]))
            line = space = word = -1
            if valid.size:
                word = lo + int(valid[0])
                text = tt.text
                for v in valid.tolist():
                    p = int(st[v + 1])
                    if p > 0 and text[p - 1].isspace():
                        if space < 0:
                            space = lo + v
                        if _at_line_start(text, p):
                            line = lo + v
                            break
            if line >= 0 and first - line >= max(1, overlap // 4):
                pick = line
            else:
                pick = space if space >= 0 else word
            if pick >= 0:
                out[k] = (tt.start_of(pick), w.e)
        return out


def _at_line_start(text: str, pos: int) -> bool:
    lo = max(0, pos - 256)
    q = max(text.rfind("\n", lo, pos), text.rfind("\r", lo, pos))
    if q < 0:
        return lo == 0 and not text[:pos].strip()
    return not text[q + 1 : pos].strip()


def trim(text: str, s: int, e: int, keep_indent: bool) -> Window | None:
    """Strip whitespace from both ends of text[s:e] (keeping the first line's indentation when
    `keep_indent`); None when nothing but whitespace is left."""
    m = _NON_SPACE.search(text, s, e)
    if m is None:
        return None
    ns = m.start()
    if keep_indent:
        ls = max(text.rfind("\n", s, ns), text.rfind("\r", s, ns)) + 1
        if ls == 0:  # no line break in [s, ns): keep the indentation only if s starts a line
            ls = s if (s == 0 or text[s - 1] in "\r\n") else -1
        if ls >= 0 and not text[ls:ns].strip(" \t\f"):
            ns = ls
    ne = ns + len(text[ns:e].rstrip())
    return ns, ne


def finalize(
    tt: Tokenized,
    windows: Sequence[Window],
    budget: int,
    min_tokens: int,
    keep_indent: bool,
    packer: Packer,
) -> list[tuple[int, int, np.ndarray]]:
    """Trimmed windows with their ids, every one holding 1..budget tokens, in document order."""
    trimmed = [w for w in (trim(tt.text, s, e, keep_indent) for s, e in windows) if w is not None]
    done = _assign_ids(tt, trimmed, budget, keep_indent, packer, 0)
    # windows with no token at all (only characters the tokenizer drops, e.g. U+200B) join the next
    out: list[tuple[int, int, np.ndarray]] = []
    pending = -1
    for s, e, ids in done:
        if ids.shape[0] == 0:
            pending = s if pending < 0 else min(pending, s)
            continue
        if pending >= 0:
            s, pending = min(s, pending), -1
        out.append((s, e, ids))
    if pending >= 0 and out:
        ps, _pe, pids = out[-1]
        out[-1] = (ps, done[-1][1], pids)
    # a trailing fragment under min_tokens merges into the chunk before when it fits
    if len(out) >= 2 and out[-1][2].shape[0] < min_tokens:
        ps, s, e = out[-2][0], out[-1][0], out[-1][1]
        ids = _ids_for(tt, [(ps, e)])[0]
        if ids.shape[0] <= budget:
            out[-2:] = [(ps, e, ids)]
    return out


def _between_tokens(tt: Tokenized, pos: int, i: int) -> bool:
    """Whether character `pos` lies outside every token: at token `i`'s start (the first token at or
    after it), or separated from it by BERT whitespace only (which no token contains). A window edge
    at a character BERT deletes ("\\x0c", a line break to Python) inside a word lies inside that
    word's token (one "[UNK]" for a word over 100 characters): its ids are not a slice then."""
    p = tt.start_of(i)
    return p == pos or all(ch in BERT_SPACE for ch in tt.text[pos:p])


def _ids_for(tt: Tokenized, wins: Sequence[Window]) -> list[np.ndarray]:
    result: list[Optional[np.ndarray]] = [None] * len(wins)
    todo: list[int] = []
    for k, (s, e) in enumerate(wins):
        a, b = tt.index(s), tt.index(e)
        if tt.slice_exact and tt.word_start(a) and tt.word_start(b) and _between_tokens(tt, s, a) \
                and _between_tokens(tt, e, b):
            result[k] = tt.ids[a:b]
        else:
            todo.append(k)
    if todo:
        # the fast tokenizer's ids where the document has one (it passed the self-check against HF)
        encs = tt.encode_ids([tt.text[wins[k][0] : wins[k][1]] for k in todo])
        for k, ids in zip(todo, encs):
            result[k] = np.asarray(ids, dtype=np.int32)
    return result  # type: ignore[return-value]


def _assign_ids(
    tt: Tokenized,
    wins: Sequence[Window],
    budget: int,
    keep_indent: bool,
    packer: Packer,
    depth: int,
) -> list[tuple[int, int, np.ndarray]]:
    out: list[tuple[int, int, np.ndarray]] = []
    for (s, e), ids in zip(wins, _ids_for(tt, wins)):
        n = int(ids.shape[0])
        if n <= budget:
            out.append((s, e, ids))
            continue
        # re-tokenized longer than the document's slice said (a cut inside a word): split again
        if depth >= _MAX_RESPLITS:
            raise RuntimeError(f"chunk [{s}, {e}) still has {n} tokens > {budget} after {depth} re-splits")
        global_n = max(1, tt.count(s, e))
        smaller = max(1, (budget * global_n) // n - 1)
        subs = [w for w in (trim(tt.text, a, b, keep_indent) for a, b in packer.token_windows(s, e, smaller))
                if w is not None]
        out.extend(_assign_ids(tt, subs, budget, keep_indent, packer, depth + 1))
    return out


__all__ = ["Span", "Window", "TokenizedText", "SegmentedText", "Packer", "finalize", "trim", "tokenizer_info", "line_starts"]
