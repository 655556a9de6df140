#!/usr/bin/env python
"""Put the exported MiniLM models into the Triton model repository.

Writes (copied from the export cache, `hades_gpu.embedding.export`):

    <repo>/minilm_onnx/1/model.onnx
    <repo>/minilm_openvino/1/model.xml, model.bin

Both graphs take ``input_ids`` / ``attention_mask`` int64 (B, L) and return ``embedding`` float32
(B, 384), mean-pooled and L2-normalised. Idempotent: a file whose bytes already match the cache is left
alone (its mtime too); ``--force`` re-exports into the cache and rewrites. Each file is written to a
temporary name beside it and renamed into place. The ``config.pbtxt`` files are not touched.

    python scripts/export_model.py [--repo triton_models] [--force] [--int8]
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hades_gpu.embedding import export  # noqa: E402

REPO_DEFAULT = Path(__file__).resolve().parent.parent / "triton_models"


def install(src: Path, dst: Path, force: bool) -> bool:
    """Copy `src` to `dst` atomically unless `dst` already holds the same bytes. True if written."""
    if not force and dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=REPO_DEFAULT, help=f"model repository (default: {REPO_DEFAULT})")
    ap.add_argument("--cache-dir", default="", help="export cache (default: ~/.cache/hades-gpu/models)")
    ap.add_argument("--force", action="store_true", help="re-export into the cache and rewrite the files")
    ap.add_argument("--int8", action="store_true",
                    help="also write minilm_openvino_int8/1/ (NNCF; needs hades-gpu[int8])")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", module="torch")

    onnx_path = export.export_onnx(args.cache_dir, force=args.force)
    xml_path = export.export_openvino(args.cache_dir, force=args.force)
    plan = [(onnx_path, args.repo / "minilm_onnx" / "1" / "model.onnx")]
    plan += [(xml_path.with_suffix(s), args.repo / "minilm_openvino" / "1" / f"model{s}") for s in (".bin", ".xml")]
    if args.int8:
        int8_xml = export.export_openvino_int8(args.cache_dir, force=args.force)
        plan += [(int8_xml.with_suffix(s), args.repo / "minilm_openvino_int8" / "1" / f"model{s}")
                 for s in (".bin", ".xml")]
    for src, dst in plan:  # .bin before .xml: a reader that sees the new .xml finds its weights
        written = install(src, dst, args.force)
        print(f"{'wrote' if written else 'up to date'}: {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
