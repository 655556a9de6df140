#!/usr/bin/env python
"""Manifest commit cost as a shard fills up: the SQLite manifest against the JSON one it replaced.

A commit names one part and records its documents. The JSON manifest (format 1, baseline) rewrote
the whole file at every commit, so its cost grew with the documents already in the shard; the SQLite
manifest writes only the committed rows. Both write durably (fsync), as the writer does. Measured in
the same run on the same disk:

    scripts/bench_manifest.py --documents 1000000 --per-part 1000

Prints a table and writes docs/bench_manifest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hades_gpu.store.atomic import atomic_write_bytes  # noqa: E402
from hades_gpu.store.manifest import DocumentEntry, Manifest  # noqa: E402


def entries(part: int, per_part: int) -> list[tuple[str, DocumentEntry]]:
    name = f"part-s0-{part:05d}"
    return [(f"corpus/dir{part % 997:03d}/file{part:07d}_{i:04d}.py",
             DocumentEntry(f"{part:08x}{i:08x}", f"{part * 7919 + i:016x}", 12, name, 4096 + i, 1_700_000_000_000_000_000 + i))
            for i in range(per_part)]


def sqlite_run(folder: Path, documents: int, per_part: int, sample_every: int) -> dict:
    m = Manifest.load(folder, "s0")
    commits = documents // per_part
    samples = []  # (documents already in, seconds for this commit)
    t_all = time.perf_counter()
    for part in range(1, commits + 1):
        rows = entries(part, per_part)
        t = time.perf_counter()
        m.commit_part(f"part-s0-{part:05d}", rows)
        dt = time.perf_counter() - t
        if part <= 5 or part % sample_every == 0 or part > commits - 5:
            samples.append(((part - 1) * per_part, dt))
    total = time.perf_counter() - t_all
    t = time.perf_counter()
    for part in range(1, commits + 1, max(1, commits // 1000)):
        assert m.lookup(f"corpus/dir{part % 997:03d}/file{part:07d}_0000.py") is not None
    lookup_s = (time.perf_counter() - t) / len(range(1, commits + 1, max(1, commits // 1000)))
    m.close()
    size = sum(p.stat().st_size for p in folder.glob("manifest-s0.sqlite*"))
    first = [dt for n, dt in samples[:5]]
    last = [dt for n, dt in samples[-5:]]
    return {"manifest": "sqlite", "documents": documents, "per_part": per_part, "commits": commits,
            "commit_ms_first5": round(1e3 * statistics.median(first), 3),
            "commit_ms_last5": round(1e3 * statistics.median(last), 3),
            "commit_ms_mean": round(1e3 * total / commits, 3), "lookup_us": round(1e6 * lookup_s, 1),
            "file_bytes": size, "bytes_per_document": round(size / documents, 1),
            "samples": [(n, round(1e3 * dt, 3)) for n, dt in samples]}


def json_commit_ms(folder: Path, already: int, per_part: int) -> tuple[float, int]:
    """One commit of the JSON manifest with `already` documents in it: the whole file is rewritten."""
    docs = {}
    parts = []
    for part in range(1, already // per_part + 1):
        parts.append(f"part-s0-{part:05d}")
        docs.update({rel: vars(e) for rel, e in entries(part, per_part)})
    part = already // per_part + 1
    parts.append(f"part-s0-{part:05d}")
    new = {rel: vars(e) for rel, e in entries(part, per_part)}
    path = folder / "manifest.json"
    t = time.perf_counter()
    docs.update(new)
    payload = {"version": 1, "shard": "s0", "parts": parts, "documents": docs}
    atomic_write_bytes(path, json.dumps(payload, separators=(",", ":")).encode())
    return 1e3 * (time.perf_counter() - t), path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--documents", type=int, default=1_000_000)
    ap.add_argument("--per-part", type=int, default=1000)
    ap.add_argument("--json-sizes", default="1000,10000,100000,1000000",
                    help="documents already in the JSON manifest at the measured commit (baseline)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench_manifest.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        (root / "sqlite").mkdir()
        sq = sqlite_run(root / "sqlite", args.documents, args.per_part, max(1, args.documents // args.per_part // 20))
        baseline = []
        for n in [int(x) for x in args.json_sizes.split(",") if x]:
            (root / f"json{n}").mkdir()
            ms, size = json_commit_ms(root / f"json{n}", n, args.per_part)
            baseline.append({"manifest": "json (baseline)", "documents_already": n, "commit_ms": round(ms, 1),
                             "file_bytes": size})
    rows = [("sqlite", f"{sq['documents']:,}", f"{sq['commit_ms_first5']:.2f}", f"{sq['commit_ms_last5']:.2f}",
             f"{sq['file_bytes'] / 2**20:.1f}")]
    rows += [("json (baseline)", f"{b['documents_already']:,}", "", f"{b['commit_ms']:.1f}", f"{b['file_bytes'] / 2**20:.1f}")
             for b in baseline]
    print(f"manifest commit of {args.per_part} documents ({platform.processor() or platform.machine()})")
    print(f"{'manifest':16} {'documents':>11} {'first ms':>9} {'at end ms':>10} {'MiB':>7}")
    for r in rows:
        print(f"{r[0]:16} {r[1]:>11} {r[2]:>9} {r[3]:>10} {r[4]:>7}")
    ratio = None
    same = [b for b in baseline if b["documents_already"] >= sq["documents"] - args.per_part]
    if same:
        ratio = round(same[0]["commit_ms"] / sq["commit_ms_last5"], 1)
        print(f"at {same[0]['documents_already']:,} documents a JSON commit costs {ratio}x a SQLite commit")
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
              "sqlite": sq, "json_baseline": baseline, "json_over_sqlite_at_end": ratio}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
