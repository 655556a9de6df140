"""The one corpus builder of every benchmark: real text and code found on this machine.

Python's standard library sources (code) and `/usr/share/doc` (prose), chosen deterministically
from a seed, so two benchmarks asked for the same corpus get the same files.
"""

from __future__ import annotations

import random
import shutil
import sysconfig
from pathlib import Path
from typing import Iterator

PROSE_SUFFIXES = {".md", ".txt", ".rst"}


def stdlib_files(max_bytes: int = 200_000) -> list[Path]:
    """The standard library's .py files, tests left out, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "test" not in p.parts and 0 < p.stat().st_size < max_bytes)


def prose_files(root: Path = Path("/usr/share/doc")) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                  and p.suffix.lower() in PROSE_SUFFIXES and 500 < p.stat().st_size < 300_000)


def pick_files(megabytes: float, code_share: float = 0.6, seed: int = 0) -> Iterator[tuple[str, Path]]:
    """(kind, path) of about `megabytes` of files, `code_share` of the bytes code and the rest prose."""
    budget = int(megabytes * 1e6)
    rng = random.Random(seed)
    code, prose = stdlib_files(), prose_files() if code_share < 1 else []
    rng.shuffle(code)
    rng.shuffle(prose)
    taken = 0
    for kind, files, target in (("prose", prose, budget * (1 - code_share)), ("code", code, None)):
        size = 0
        for path in files:
            limit = target if target is not None else budget - taken
            if size >= limit:
                break
            yield kind, path
            size += path.stat().st_size
        taken += size


def build_corpus(dest: Path, megabytes: float, code_share: float = 0.6, seed: int = 0) -> dict[str, int]:
    """Copy about `megabytes` of real files into a fresh `dest/{code,prose}`; returns bytes per kind."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    sizes = {"code": 0, "prose": 0}
    for i, (kind, path) in enumerate(pick_files(megabytes, code_share, seed)):
        target = dest / kind / f"{i:05d}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        sizes[kind] += path.stat().st_size
    return sizes


def small_files(max_bytes: int) -> list[Path]:
    """Real files of at most `max_bytes` bytes (code and prose, sorted): the standard library, the
    interpreter's installed packages, `/usr/share/doc`. What a repository mostly holds: package
    `__init__.py` files, small modules, READMEs, notes."""
    roots = [Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib")] + [Path("/usr/share/doc")]
    suffixes = PROSE_SUFFIXES | {".py"}
    found: set[Path] = set()
    for root in roots:
        if root.is_dir():
            found.update(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                         and not p.is_symlink() and 0 < p.stat().st_size <= max_bytes)
    return sorted(found)


def build_small_files_corpus(dest: Path, megabytes: float, max_bytes: int = 4096, seed: int = 0) -> dict[str, int]:
    """About `megabytes` of `small_files(max_bytes)`, chosen by `seed`, copied into a fresh `dest`
    (one folder per thousand files); returns bytes per kind. Per-document costs dominate here, where
    `build_corpus`'s files (13 KB on average) hide them."""
    files = small_files(max_bytes)
    random.Random(seed).shuffle(files)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    sizes = {"code": 0, "prose": 0}
    budget = int(megabytes * 1e6)
    for i, path in enumerate(files):
        if sum(sizes.values()) >= budget:
            break
        kind = "code" if path.suffix == ".py" else "prose"
        target = dest / f"{i // 1000:03d}" / f"{i:06d}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        sizes[kind] += path.stat().st_size
    return sizes


def scale_corpus(base: Path, dest: Path, copies: int) -> None:
    """`copies` copies of `base` side by side under a fresh `dest` (a corpus `copies` times larger)."""
    if dest.exists():
        shutil.rmtree(dest)
    for i in range(copies):
        shutil.copytree(base, dest / f"copy{i}")


# Left out of the package corpus: tests, GUI/demo trees and bundled wheels (no code of their own)
_NOT_PACKAGES = {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "lib2to3",
                 "distutils", "site-packages", "__pycache__", "__phello__"}


def build_package_corpus(dest: Path, megabytes: float) -> dict[str, int]:
    """The standard library's packages with their folder layout (so imports between modules resolve
    to edges), about `megabytes` in all, the same share per package: a code corpus whose documents
    carry a label, their package (the first folder of the path). Returns bytes per package."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()
                      and p.name not in _NOT_PACKAGES)
    per_package = megabytes * 1e6 / max(len(packages), 1)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    sizes: dict[str, int] = {}
    for pkg in packages:
        files = sorted(f for f in pkg.rglob("*.py") if not (set(f.relative_to(root).parts[:-1]) & _NOT_PACKAGES))
        taken = 0
        for f in files:
            if taken >= per_package:
                break
            size = f.stat().st_size
            if not 0 < size < 200_000:
                continue
            target = dest / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            taken += size
        if taken:
            sizes[pkg.name] = taken
    return sizes
