"""Resolve a document's raw references (docs/CONTRACTS.md `references`) to other documents.

Python documents list the dotted module names they import; every other document lists link targets
as written (Markdown/RST). Resolution rules, in order:

Python (`a.b.c`, rel_path ends in `.py`/`.pyi` or language is `python`):
  1. relative imports (`.x`, `..x.y`) resolve against the importing file's package directory and
     must match a rel_path exactly;
  2. the documents whose module path is `a/b/c` (`a/b/c.py`, `a/b/c.pyi` or `a/b/c/__init__.py`),
     exactly or as a path suffix (`src/a/b/c.py`). A suffix match is kept when the unmatched prefix
     (`src`) is an ancestor of the importing file's directory, or, failing that, when the name has
     at least two components, or names a package (`import click` finds `src/click/__init__.py`;
     a bare `import util` must not link to some `vendor/util.py`). A name whose first component is
     a standard-library module (`json`, `types`) never matches a suffix: Python 3 imports the
     standard library's;
  3. if nothing matched, the same with the last component dropped once (`from a.b import c`, where
     `c` is a function rather than a module);
  4. if nothing matched and the corpus folder is itself the package the name starts with (corpus
     `src/h11`, holding `__init__.py`; `import h11._util` from inside it), the rest of the name
     against the corpus root, exactly (as a relative import would).
  Several equally good candidates are all kept.

Links (Markdown/RST): URLs (`scheme:`), `//host` and in-page anchors are ignored; the fragment and
query are stripped and `%xx` decoded; the target is taken relative to the linking document's
directory (or to the corpus root when it starts with `/`); it matches a rel_path exactly, or with
one of `.md .rst .txt .markdown` appended, or as a folder through its `README`/`index` file.
"""

from __future__ import annotations

import posixpath
import re
import sys
from collections import defaultdict
from typing import Iterable, Sequence
from urllib.parse import unquote

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:")
_STDLIB_MODULES = frozenset(sys.stdlib_module_names)
_PY_SUFFIXES = (".py", ".pyi")
_LINK_EXTENSIONS = (".md", ".rst", ".txt", ".markdown")
_FOLDER_INDEX = ("README.md", "index.md", "index.rst", "README.rst", "readme.md")


def is_python(rel_path: str, language: str) -> bool:
    return language.lower() == "python" or rel_path.endswith(_PY_SUFFIXES)


def _module_parts(rel_path: str) -> tuple[str, ...] | None:
    for suf in _PY_SUFFIXES:
        if rel_path.endswith(suf):
            parts = tuple(rel_path[: -len(suf)].split("/"))
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            return parts if parts else None
    return None


class ReferenceResolver:
    """Index of a corpus' rel_paths that maps references to document indices.

    Args:
        rel_paths (Sequence[str]): corpus-relative POSIX paths, one per document (index = position).
    """

    def __init__(self, rel_paths: Sequence[str], package_roots: Iterable[str] = ()) -> None:
        self.rel_paths = [p.replace("\\", "/") for p in rel_paths]
        # names of corpus folders that are packages themselves (rule 4)
        self.package_roots = frozenset(package_roots)
        self.by_path: dict[str, int] = {p: i for i, p in enumerate(self.rel_paths)}
        # module path suffix (tuple of components) -> [(doc index, full module parts)]
        self.by_module_suffix: dict[tuple[str, ...], list[tuple[int, tuple[str, ...]]]] = defaultdict(list)
        for i, p in enumerate(self.rel_paths):
            parts = _module_parts(p)
            if parts is None:
                continue
            for start in range(len(parts)):
                self.by_module_suffix[parts[start:]].append((i, parts))

    # ---------------------------------------------------------------- python
    def resolve_module(self, name: str, importer: str) -> list[int]:
        name = name.strip()
        if not name:
            return []
        importer_dir = posixpath.dirname(importer)
        if name.startswith("."):
            dots = len(name) - len(name.lstrip("."))
            rest = [c for c in name[dots:].split(".") if c]
            base = importer_dir.split("/") if importer_dir else []
            up = dots - 1
            if up > len(base):
                return []
            base = base[: len(base) - up] if up else base
            for parts in (base + rest, base + rest[:-1]) if rest else (base,):
                hits = self._exact_module(parts)
                if hits:
                    return hits
            return []
        comps = [c for c in name.split(".") if c]
        for parts in (comps, comps[:-1]):
            if not parts:
                continue
            hits = self._module_candidates(tuple(parts), importer_dir)
            if hits:
                return hits
        if comps and comps[0] in self.package_roots:  # rule 4: `h11.x` inside the corpus folder h11/
            rest = comps[1:]
            for parts in (rest, rest[:-1]) if rest else ([],):
                hits = self._exact_module(parts)
                if hits:
                    return hits
        return []

    def _exact_module(self, parts: Iterable[str]) -> list[int]:
        stem = "/".join(parts)
        out = []
        for cand in (stem + ".py", stem + ".pyi", stem + "/__init__.py" if stem else "__init__.py"):
            if cand in self.by_path:
                out.append(self.by_path[cand])
        return sorted(set(out))

    def _module_candidates(self, key: tuple[str, ...], importer_dir: str) -> list[int]:
        entries = self.by_module_suffix.get(key, [])
        if not entries:
            return []
        exact = [i for i, parts in entries if len(parts) == len(key)]
        if exact:
            return sorted(set(exact))
        if key[0] in _STDLIB_MODULES:
            # `import json`, `from types import X`: Python 3 imports the standard library's module, not a
            # same-named file beside the importer (click's `from types import TracebackType` linked
            # every chunk of _compat.py to click/types.py)
            return []
        ancestors, others = [], []
        for i, parts in entries:
            prefix = "/".join(parts[: len(parts) - len(key)])
            if importer_dir == prefix or importer_dir.startswith(prefix + "/"):
                ancestors.append((len(prefix), i))
            else:
                others.append(i)
        if ancestors:
            longest = max(p for p, _ in ancestors)
            return sorted({i for p, i in ancestors if p == longest})
        if len(key) >= 2:
            return sorted(set(others))
        # a bare name: a package of that name (`import click` from tests/ in a src/ layout finds
        # src/click/__init__.py); a plain module elsewhere (some vendor/util.py) is not it
        return sorted({i for i in others if self.rel_paths[i].endswith("/__init__.py")})

    # ---------------------------------------------------------------- links
    def resolve_link(self, target: str, linker: str) -> list[int]:
        t = target.strip()
        if t.startswith("<") and t.endswith(">"):
            t = t[1:-1].strip()
        if not t:
            return []
        t = t.split()[0]  # Markdown `[x](path "title")`
        if t.startswith("#") or t.startswith("//") or _SCHEME.match(t):
            return []
        t = t.split("#", 1)[0].split("?", 1)[0]
        t = unquote(t)
        if not t:
            return []
        if t.startswith("/"):
            path = posixpath.normpath(t.lstrip("/"))
        else:
            path = posixpath.normpath(posixpath.join(posixpath.dirname(linker), t))
        if path.startswith("../") or path == "..":
            return []  # outside the corpus
        path = path.rstrip("/")
        candidates = [path] + [path + e for e in _LINK_EXTENSIONS] + [f"{path}/{f}" for f in _FOLDER_INDEX]
        if path == ".":
            candidates = list(_FOLDER_INDEX)
        for c in candidates:
            if c in self.by_path:
                return [self.by_path[c]]
        return []

    def resolve(self, ref: str, doc_index: int, language: str) -> list[int]:
        """Document indices that `ref` (written in document `doc_index`) points to, self excluded."""
        me = self.rel_paths[doc_index]
        hits = self.resolve_module(ref, me) if is_python(me, language) else self.resolve_link(ref, me)
        return [h for h in hits if h != doc_index]
