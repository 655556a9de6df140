"""Throughput of one worker's per-document work (`process_document`) on one thread, HF-only vs fast.

Same files, same run: HF ``Tokenizer.encode`` alone (the baseline the ratios use), kitoken encode
alone, the C WordPiece scan alone (ids and offsets), ``process_document`` with HF offsets throughout,
and ``process_document`` on the fast path. Also reports how many documents took the kitoken segment
path and how many of its segments needed HF offsets. Prints a table, writes JSON.

    python scripts/bench_chunking.py --mb 10 --json bench_chunking.json [--profile 25]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread, as one worker process
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hades_gpu.config import ChunkingConfig, DocumentsConfig  # noqa: E402
from hades_gpu.documents import tokenized  # noqa: E402
from hades_gpu.documents.chunking import process_document  # noqa: E402
from hades_gpu.documents.discovery import discover  # noqa: E402
from hades_gpu.documents.fast_tokenizer import fast_tokenizer_for  # noqa: E402
from hades_gpu.documents.native_wordpiece import native_wordpiece_for  # noqa: E402
from hades_gpu.documents.reading import SkipDocument, read_document  # noqa: E402
from hades_gpu.documents.tokenizer import load_tokenizer  # noqa: E402


def corpus(mb: float) -> list:
    """DocumentRefs of real text and code on this machine, about `mb` MB, prose and code mixed."""
    roots = [Path("/usr/share/doc"), Path(sysconfig.get_paths()["stdlib"])]
    refs = []
    for root in roots:
        if root.is_dir():
            found, _ = discover(root, DocumentsConfig())
            refs.append([r for r in found if 200 < r.size < 2_000_000])
    picked, total, k = [], 0, 0
    while total < mb * 1e6 and any(k < len(r) for r in refs):
        for r in refs:
            if k < len(r):
                picked.append(r[k])
                total += r[k].size
        k += 1
    return picked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=10.0)
    ap.add_argument("--json", default="bench_chunking.json")
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions of the fast path")
    args = ap.parse_args()
    dcfg, ccfg = DocumentsConfig(decode_errors="replace"), ChunkingConfig()
    tok = load_tokenizer()
    fast = fast_tokenizer_for(tok)
    refs = corpus(args.mb)
    texts = []
    for r in refs:
        try:
            texts.append(read_document(r, dcfg)[0])
        except SkipDocument:
            pass
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    t_hf, n_tokens = timed(lambda: sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts))
    rows = {"hf_encode": t_hf}
    if fast is not None:
        rows["kitoken_encode"] = timed(lambda: sum(len(fast.encode(t)) for t in texts))[0]
    native = native_wordpiece_for(tok)
    if native is not None:  # ids *and* offsets; None for the documents it declines (then not counted)
        rows["native_scan_ids_offsets"] = timed(lambda: [native.encode_offsets(t) for t in texts])[0]
    rows["process_document_hf"] = timed(lambda: [process_document(r, dcfg, ccfg, tok, hf_offsets=True) for r in refs])[0]

    # the fast path, counting segments that needed HF offsets
    stats = {"segments": 0, "hf_segments": 0, "chars": 0, "hf_chars": 0}
    orig = tokenized.SegmentedText.__init__

    def counting_init(self, *a, **kw):
        orig(self, *a, **kw)
        seen.append(self)

    seen: list = []
    tokenized.SegmentedText.__init__ = counting_init
    t_fast, docs = timed(lambda: [process_document(r, dcfg, ccfg, tok) for r in refs])
    tokenized.SegmentedText.__init__ = orig
    rows["process_document_fast"] = t_fast
    seen_docs = list(seen)
    for st in seen:
        stats["segments"] += len(st._bounds)
        stats["hf_segments"] += st.hf_segments
        stats["chars"] += len(st.text)
        stats["hf_chars"] += st.hf_chars
    seen.clear()

    print(f"{len(texts)} files, {mb:.1f} MB, {n_tokens} tokens, one thread")
    print(f"{'stage':<26}{'seconds':>10}{'tokens/s':>14}{'x HF encode':>14}")
    result = {"files": len(texts), "mb": mb, "tokens": n_tokens, "rows": {}, "offsets": stats}
    for name, sec in rows.items():
        tps = n_tokens / sec
        ratio = t_hf / sec
        print(f"{name:<26}{sec:>10.2f}{tps:>14,.0f}{ratio:>14.2f}")
        result["rows"][name] = {"seconds": sec, "tokens_per_s": tps, "ratio_to_hf_encode": ratio}
    share = stats["hf_segments"] / max(1, stats["segments"])
    chars = stats["hf_chars"] / max(1, stats["chars"])
    print(f"documents on the kitoken segment path (the rest: the C scan or HF): {len(seen_docs)}; its segments "
          f"needing HF offsets: {stats['hf_segments']}/{stats['segments']} ({share:.1%}), {chars:.1%} of characters")
    Path(args.json).write_text(json.dumps(result, indent=2))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for r in refs:
            process_document(r, dcfg, ccfg, tok)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
