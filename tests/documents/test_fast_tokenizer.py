"""The fast path (kitoken ids, HF offsets only where needed) against the HF-only path.

Every document must give exactly the same chunks (text, offsets, token ids) and references either
way; the self-check must reject a kitoken that disagrees and fall back to HF with its log line.
"""

from __future__ import annotations

import json
import logging
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from hades_gpu.config import ChunkingConfig, DocumentsConfig
from hades_gpu.documents import fast_tokenizer
from hades_gpu.documents.chunking import chunk_text
from hades_gpu.documents.discovery import discover
from hades_gpu.documents.fast_tokenizer import KitokenTokenizer, fast_tokenizer_for, self_check
from hades_gpu.documents.native_wordpiece import native_wordpiece_for
from hades_gpu.documents.reading import SkipDocument, read_document
from hades_gpu.documents.tokenized import SegmentedText, TokenizedText, tokenize_document
from hades_gpu.documents.tokenizer import load_tokenizer, model_dir
from hades_gpu.records import CODE, PROSE, DocumentRef
from requirements import skip_or_fail

import kitoken  # noqa: E402,F401 - a hard dependency (pyproject): the fast path is tested, never skipped

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _assert_same(ref: DocumentRef, text: str, cc: ChunkingConfig) -> None:
    tok = load_tokenizer()
    slow, slow_refs = chunk_text(ref, text, "h", cc, tok, hf_offsets=True)
    fast, fast_refs = chunk_text(ref, text, "h", cc, tok)
    assert fast_refs == slow_refs, ref.rel_path
    assert [(c.char_start, c.char_end) for c in fast] == [(c.char_start, c.char_end) for c in slow], ref.rel_path
    assert [c.token_ids.tolist() for c in fast] == [c.token_ids.tolist() for c in slow], ref.rel_path
    assert [c.text for c in fast] == [c.text for c in slow]
    for c in fast:  # and each chunk's ids are its own text's (packing.py's promise), on both paths
        assert c.token_ids.tolist() == tok.encode(c.text, add_special_tokens=False).ids, (ref.rel_path, c.char_start)


def _real_files(limit: int) -> list[Path]:
    """Markdown/RST/text under /usr/share/doc and stdlib modules (Python and not), interleaved."""
    docs: list[Path] = []
    root = Path("/usr/share/doc")
    if root.is_dir():
        for p in sorted(root.glob("*/*")):
            if p.is_file() and not p.is_symlink() and 200 < p.stat().st_size < 200_000 and (
                    p.suffix.lower() in (".md", ".txt", ".rst") or p.name.upper().startswith("README")):
                docs.append(p)
    code = [p for p in sorted(STDLIB.rglob("*.py")) if 500 < p.stat().st_size < 300_000 and "test" not in p.parts]
    step = max(1, len(code) // limit)
    code = code[::step]
    out: list[Path] = []
    for k in range(max(len(docs), len(code))):
        out.extend(x[k] for x in (docs, code) if k < len(x))
    return out[:limit]


@pytest.fixture(params=["native", "kitoken"])
def fast_path(request, monkeypatch) -> str:
    """Each fast path in turn: the C WordPiece scan where it takes a document (kitoken otherwise),
    and kitoken + segments alone (``HADES_GPU_TOKENIZER=kitoken``)."""
    if request.param == "native":
        monkeypatch.delenv(fast_tokenizer.TOKENIZER_ENV, raising=False)
        if native_wordpiece_for(load_tokenizer()) is None:
            skip_or_fail("the C WordPiece extension is not built (hades_gpu/documents/_wordpiece.c)")
    else:
        monkeypatch.setenv(fast_tokenizer.TOKENIZER_ENV, "kitoken")
    return request.param


def test_fast_path_equals_hf_only_on_real_files(fast_path: str) -> None:
    """Same chunks, offsets, ids and references on a few hundred real files (~10 s at most a path)."""
    files = _real_files(400)
    assert len(files) > 50
    dcfg = DocumentsConfig(decode_errors="replace")
    t0 = time.perf_counter()
    done = 0
    for path in files:
        if time.perf_counter() - t0 > 10:
            break
        refs, _ = discover(path, DocumentsConfig())
        if not refs:
            continue
        try:
            text, _digest = read_document(refs[0], dcfg)
        except SkipDocument:
            continue
        for cc in (ChunkingConfig(), ChunkingConfig(chunk_tokens=48, overlap_tokens=12, min_chunk_tokens=4)):
            _assert_same(refs[0], text, cc)
        done += 1
    print(f"{done} files compared")
    assert done >= 50, done


ADVERSARIAL = {
    "huge_line": " ".join(f"word{i}, and (x{i}); " for i in range(6000)),
    "one_long_word": "start " + "abcdefghij" * 500 + " end.\n" + "tail " * 40,
    "cjk": "東京都の天気は晴れです。" * 400 + "\n\n" + "中文没有空格" * 300,
    "zero_width_only": "\u200b\u200d\ufeff" * 300,
    "zero_width_mixed": ("a\u200bb c\u200dd " * 400) + "\n" + "\u200b" * 50 + "word",
    "cr_only": "\r".join(f"line {i} has some text. Another sentence here!" for i in range(800)),
    "crlf": "\r\n".join(f"    def f{i}(x):\r\n        return x + {i}\r\n" for i in range(300)),
    "tabs": "\t".join(f"col{i}\tval {i}." for i in range(3000)),
    "trailing_ws": "".join(f"text {i} end   \t \n" for i in range(1500)) + "   \n\n  ",
    "emoji": "😀👍🏽 family 👨\u200d👩\u200d👧 " * 500 + "ok.",
    "controls": "ab\x0bcd ef\x0cgh \x00x\x85y " * 500,
    "accents": "Café naïve résumé ÉCOLE İstanbul e\u0301 " * 600,
    "special_literals": "[CLS] a [SEP] b [PAD] c[MASK]d [UNK]. " * 400,
    "unicode_spaces": "a\u3000b\u00a0c\u2028d\u2029e\u2003f " * 800,
    "punct_runs": "!!!???...;;;((()))---### " * 800,
    "ligatures": "ﬁne ﬂow ½ ² ™ ｆｕｌｌ " * 800,
    # every segment-marker character in the text: the join falls back to "[MASK]"
    "marker_chars": "a ^ b ~ c ` d | e \\ f @ g $ h [MASK] i^j~k`l|m\\n@o$p\n" * 300,
    "some_marker_chars": "x ^ y ~ z^w\n\n" * 500,
    # kitoken lowercases a word-final capital sigma to ς, HF to σ: such texts are HF's
    "greek_final_sigma": "ΟΔΥΣΣΕΥΣ ΚΑΙ ΣΙΣΥΦΟΣ ΣΤΗΝ ΑΘΗΝΑ. theΣ quick Σ\n" * 200,
    # a line break to Python that BERT deletes, inside a word of over 100 characters (one [UNK]):
    # a window edge there lies inside a token
    "deleted_break_in_long_word": ("=1 [0mx\x0c\u0301" + "0123456789" * 4 + "a" * 115 + "\x0c---. " + "word " * 20) * 40,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("modality,language,rel", [(PROSE, "markdown", "x.md"), (PROSE, "text", "x.txt"),
                                                   (CODE, "python", "x.py"), (CODE, "c", "x.c")])
def test_fast_path_equals_hf_only_on_adversarial_text(name: str, modality: str, language: str, rel: str,
                                                     fast_path: str) -> None:
    ref = DocumentRef(path="/c/" + rel, rel_path=rel, size=0, modality=modality, language=language)
    for cc in (ChunkingConfig(), ChunkingConfig(chunk_tokens=24, overlap_tokens=8, min_chunk_tokens=3)):
        _assert_same(ref, ADVERSARIAL[name], cc)


def test_index_and_offsets_match_hf_at_every_position(monkeypatch) -> None:
    """SegmentedText answers index/start_of/word_start as TokenizedText does, wherever it is asked."""
    monkeypatch.setenv(fast_tokenizer.TOKENIZER_ENV, "kitoken")
    tok = load_tokenizer()
    text = ("# Title\n\nSome prose, with punctuation; and Cyrillic Съешь. Emoji 😀 and\u200bzero-width.\r\n"
            "\tdef f(x):\n        return x  # ok\n" + "longword" * 30 + " tail\rend \x0bx\x85y  \n")
    slow = TokenizedText(text, tok)
    fast = tokenize_document(text, tok, cuts=[0, 9, 40])
    assert isinstance(fast, SegmentedText)
    assert fast.ids.tolist() == slow.ids.tolist()
    for pos in list(range(len(text) + 1))[::-1] + list(range(0, len(text) + 1, 7)):
        assert fast.index(pos) == slow.index(pos), pos
    for i in range(slow.n + 1):
        assert fast.start_of(i) == slow.start_of(i), i
        assert fast.word_start(i) == slow.word_start(i), i
    assert fast.starts_of(0, slow.n).tolist() == slow.starts.tolist()
    assert 0 < fast.hf_segments  # positions inside words did need HF offsets


def test_segment_marker_is_a_character_the_text_lacks(monkeypatch) -> None:
    """The join marker is the first marker character absent from the text, "[MASK]" when all occur;
    either way the document's ids are HF's."""
    monkeypatch.setenv(fast_tokenizer.TOKENIZER_ENV, "kitoken")
    from hades_gpu.documents import tokenized

    tok = load_tokenizer()
    plain = "alpha beta\ngamma delta\n" * 20
    with_caret = plain + "x ^ y\n"
    every = plain + " ".join(tokenized._MARKER_CHARS) + "\n"
    for text, want in ((plain, " ^ "), (with_caret, " ~ "), (every, tokenized._MARKER)):
        tt = tokenize_document(text, tok, cuts=range(0, len(text), 11))
        assert isinstance(tt, SegmentedText)
        assert tt._marker_for(text)[0] == want
        assert tt.ids.tolist() == tok.encode(text, add_special_tokens=False).ids


def test_special_literals_are_matched_only_where_present(tmp_path) -> None:
    """kitoken matches special-token literals only in texts that hold one (case-insensitively: a
    superset of HF's matches); a tokenizer whose added tokens are normalized always matches."""
    hf = load_tokenizer()
    fast = KitokenTokenizer(hf)
    assert not fast.specials_in("plain text [with] brackets [CLS ]")
    assert fast.specials_in("a [SEP] b") and fast.specials_in("x[mask]y") and fast.specials_in("[Pad]")
    for text in ("plain [brackets]", "a [SEP] b", "x[MASK]y [UNK]", "[cls] lower"):
        assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert fast.encode_batch(["plain", "a [SEP] b"]) == [
        e.ids for e in hf.encode_batch(["plain", "a [SEP] b"], add_special_tokens=False)]

    def normalized_specials(spec: dict) -> None:
        for tok in spec["added_tokens"]:
            tok["normalized"] = True

    assert KitokenTokenizer(_modified_tokenizer(tmp_path, normalized_specials)).specials_in("plain text")


def test_ascii_offsets_from_ids_equal_hf_or_decline() -> None:
    """Offsets worked out from ids (plain ASCII) are HF's exactly; where they cannot be (non-ASCII,
    control characters, [UNK], special literals) the answer is None and HF is asked."""
    from hades_gpu.documents.tokenized import ascii_surfaces

    tok = load_tokenizer()
    surfaces = ascii_surfaces(tok)
    lines = [ln for p in _real_files(60) for ln in p.read_text(errors="replace").splitlines()[:200] if ln.strip()]
    lines += ["MiXeD CaSe Words, punctuation!!! (x[0] -> y); tabs\tand  spaces  ", "don't stop-me #1 @x $y %z",
              "a" * 120 + " long word", "   leading and trailing   "]
    answered = 0
    for line in lines:
        enc = tok.encode(line, add_special_tokens=False)
        got = surfaces.starts(line, enc.ids)
        if got is not None:
            answered += 1
            assert got == [a for a, _ in enc.offsets], line
    assert answered > 0.8 * len(lines)
    for line in ("café au lait", "ctrl\x07char", "del\x7fchar", "x [SEP] y", "a" * 120, ""):
        assert surfaces.starts(line, tok.encode(line, add_special_tokens=False).ids) is None, line


@pytest.fixture()
def fresh_cache(monkeypatch):
    monkeypatch.setattr(fast_tokenizer, "_CACHE", {})
    monkeypatch.delenv(fast_tokenizer.TOKENIZER_ENV, raising=False)


def _modified_tokenizer(tmp_path: Path, edit) -> Tokenizer:
    spec = json.loads((model_dir() / "tokenizer.json").read_text())
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return Tokenizer.from_file(str(path))


def test_self_check_rejects_a_disagreeing_kitoken(tmp_path, fresh_cache, caplog, monkeypatch) -> None:
    """kitoken built with lowercase off disagrees with the real (lowercasing) HF tokenizer."""
    hf = load_tokenizer()
    cased = _modified_tokenizer(tmp_path, lambda s: s["normalizer"].update(lowercase=False))
    assert self_check(KitokenTokenizer(cased), hf) is not None
    assert self_check(KitokenTokenizer(hf), hf) is None

    # the real path: fast_tokenizer_for builds kitoken from the tokenizer it is given
    monkeypatch.setattr(fast_tokenizer, "KitokenTokenizer", lambda _hf: KitokenTokenizer(cased))
    with caplog.at_level(logging.WARNING, logger=fast_tokenizer.__name__):
        assert fast_tokenizer_for(hf) is None
    assert any("fails the self-check" in r.getMessage() for r in caplog.records)
    assert isinstance(tokenize_document("Hello World", hf), TokenizedText)


def test_self_check_catches_a_changed_vocab_entry(tmp_path) -> None:
    hf = load_tokenizer()

    def swap(spec: dict) -> None:
        vocab = spec["model"]["vocab"]
        vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]

    assert "differ" in (self_check(KitokenTokenizer(_modified_tokenizer(tmp_path, swap)), hf) or "")


def test_kitoken_not_importable_falls_back_to_hf(fresh_cache, caplog, monkeypatch) -> None:
    """A missing kitoken cannot be caused otherwise on a machine that has it installed:
    sys.modules['kitoken'] = None makes `import kitoken` raise ImportError, as when it is absent."""
    monkeypatch.setitem(sys.modules, "kitoken", None)
    with caplog.at_level(logging.INFO, logger=fast_tokenizer.__name__):
        assert fast_tokenizer_for(load_tokenizer()) is None
    assert any("kitoken is not importable" in r.getMessage() for r in caplog.records)
    assert isinstance(tokenize_document("Hello", load_tokenizer()), TokenizedText)


def test_env_switch_forces_hf(fresh_cache, monkeypatch) -> None:
    monkeypatch.setenv(fast_tokenizer.TOKENIZER_ENV, "hf")
    assert fast_tokenizer_for(load_tokenizer()) is None
    monkeypatch.setattr(fast_tokenizer, "_CACHE", {})
    monkeypatch.setenv(fast_tokenizer.TOKENIZER_ENV, "kitoken")
    assert isinstance(fast_tokenizer_for(load_tokenizer()), KitokenTokenizer)


def test_chinese_text_is_encoded_by_hf_not_kitoken() -> None:
    """kitoken 0.11 is quadratic in Chinese characters (16 k: 0.5 s vs HF 19 ms): such texts go to
    HF. kitoken's own encoder is replaced by one that fails if called (the routing is what is
    tested; the ids must still be HF's)."""
    hf = load_tokenizer()
    fast = KitokenTokenizer(hf)

    class Refuses:
        def encode(self, *_a):
            raise AssertionError("kitoken asked to encode Chinese text")

        encode_all = encode

    real = fast._kt
    fast._kt = Refuses()
    texts = ["中文没有空格 and English", "東京都の天気は晴れです。" * 30, "\U00020000 rare ideograph"]
    for text in texts:
        assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert fast.encode_batch(texts + ["plain"]) == [e.ids for e in hf.encode_batch(texts + ["plain"], add_special_tokens=False)]
    fast._kt = real
    assert fast.encode("Съешь ещё") == hf.encode("Съешь ещё", add_special_tokens=False).ids


def test_every_code_point_kitoken_reads_otherwise_goes_to_hf() -> None:
    """kitoken and HF ship Unicode tables of different versions: on ~820 k code points (characters
    added since, such as the Arabic marks U+0898-U+089F, noncharacters, unassigned ones) kitoken's ids
    differ. Every such code point, found by scanning all of them with the installed versions (~10 s),
    must send its text to HF; a new kitoken or tokenizers that differs elsewhere fails here, and
    `scripts/kitoken_differences.py` rewrites the table."""
    hf = load_tokenizer()
    differing = fast_tokenizer.differing_code_points(hf)
    assert 0x0898 in differing and 0x061D in differing  # what the scan exists for (kitoken 0.11.1)
    missed = sorted(c for c in differing if not fast_tokenizer.needs_hf(f"x{chr(c)}y"))
    assert not missed, f"{len(missed)} code points kitoken reads otherwise than HF are not routed to HF, e.g. " \
        f"{[hex(c) for c in missed[:10]]}: run scripts/kitoken_differences.py"


@pytest.mark.parametrize("text", [
    "بسم الله الرحمن الرحيم\u0898 قال\u061d تم",  # Arabic marks of Unicode 14
    "ok\ufffe fine \ufdd0 nonchars",
    "new emoji \U0001fae8 and a tag \U000e0001 here",
    "ⸯ punctuation \u2e5d of Unicode 14 and 😀 old emoji",
])
def test_text_with_such_code_points_gets_hf_ids_in_chunks(text: str, monkeypatch) -> None:
    """The whole kitoken path (``HADES_GPU_TOKENIZER=kitoken``): a chunk of such a text has HF's ids
    (a chunk of Arabic text with U+0898 stored 226 tokens where HF gives 218)."""
    monkeypatch.setenv(fast_tokenizer.TOKENIZER_ENV, "kitoken")
    hf = load_tokenizer()
    fast = KitokenTokenizer(hf)
    assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert fast.encode_batch([text, "plain"]) == [e.ids for e in hf.encode_batch([text, "plain"], add_special_tokens=False)]
    body = ("النص العربي من اليمين إلى اليسار مرحبا بالعالم\n" * 40) + text + "\n" + ("more text here\n" * 40)
    ref = DocumentRef(path="/x/a.txt", rel_path="a.txt", size=0, modality=PROSE, language="text")
    _assert_same(ref, body, ChunkingConfig())


def test_kitoken_definition_has_no_padding() -> None:
    """The packaged tokenizer.json pads to 128: the definition kitoken gets must not."""
    raw = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))  # padding and truncation still on
    assert len(raw.encode("Hello world", add_special_tokens=False).ids) == 128
    ids = KitokenTokenizer(raw).encode("Hello world")
    assert ids == load_tokenizer().encode("Hello world", add_special_tokens=False).ids and len(ids) == 2


def test_plain_ascii_skips_the_normalizer_with_the_same_ids(tmp_path) -> None:
    """ASCII without a control character BERT deletes and without a special literal takes the
    normalizer-free kitoken (after str.lower); everything else the full one; ids equal HF's both ways,
    on real files too."""
    hf = load_tokenizer()
    fast = KitokenTokenizer(hf)
    assert fast.plain("Plain ASCII\twith\r\ntabs and CRLF") and fast.plain("")
    assert not fast.plain("a\x0bb") and not fast.plain("x\x00y") and not fast.plain("del\x7f")
    assert not fast.plain("a [SEP] b") and not fast.plain("café")
    for text in ("MiXeD CaSe\tTabs\r\nCRLF", "a\x0bb c\x0cd", "x\x00y\x7fz", "UPPER [SEP] lower", "Ünïcode"):
        assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)
    batch = ["One Two", "THREE\tfour"]
    assert fast.encode_batch(batch) == [e.ids for e in hf.encode_batch(batch, add_special_tokens=False)]
    texts = [p.read_text(encoding="utf-8") for p in _real_files(60) if p.suffix == ".py"]
    texts = [t for t in texts if fast.plain(t)]
    assert len(texts) > 10
    assert [fast.encode(t) for t in texts] == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    # a cased tokenizer's plain path does not lowercase
    cased = _modified_tokenizer(tmp_path, lambda s: s["normalizer"].update(lowercase=False))
    cased.no_padding()
    cased.no_truncation()
    assert KitokenTokenizer(cased).encode("Hello world") == cased.encode("Hello world", add_special_tokens=False).ids
    assert KitokenTokenizer(cased).encode("Hello world") != hf.encode("Hello world", add_special_tokens=False).ids
    # another normalizer: no plain path
    no_bert = _modified_tokenizer(tmp_path, lambda s: s.update(normalizer={"type": "Lowercase"}))
    assert not KitokenTokenizer(no_bert).plain("hello")


_THREADS_SCRIPT = """
import threading
from hades_gpu.embedding.texts import text_token_ids
from hades_gpu.documents.tokenized import tokenize_document
from hades_gpu.documents.tokenizer import load_tokenizer
texts = ["thread text about herons", "Another one, with \\u00dcn\\u00efcode and a long wordpiece tokenisation"]
got = []
def job():
    got.append([r.tolist() for r in text_token_ids(texts)])
    got.append(list(tokenize_document(texts[1], load_tokenizer()).ids))
for _ in range(6):  # each thread ends before the next one starts
    t = threading.Thread(target=job); t.start(); t.join()
main = [[r.tolist() for r in text_token_ids(texts)], list(tokenize_document(texts[1], load_tokenizer()).ids)]
assert got == main * 6, (got[:2], main)
print("ok")
"""


def test_tokenizing_from_threads_that_end_one_after_another_does_not_crash():
    """`process_batch` from a second worker thread (a ThreadPoolExecutor, a web server) segfaulted:
    kitoken ties state to the thread that used it, and once that thread ended, the next thread's
    `encode` crashed (4 runs of 4 here). Threads now tokenize with HF (same ids); kitoken stays on
    the main thread and in the workers."""
    import subprocess

    from corpus_helpers import REPO

    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
