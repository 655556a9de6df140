"""Find the documents of a corpus: walk folders (sorted, deterministic), filter, classify.

A source is a folder or a file. Files found by walking a folder are filtered by the
``include``/``exclude`` globs of `DocumentsConfig`, matched against the path relative to that
folder (POSIX separators). A file named explicitly as a source is always taken (it was asked for by
name), and its ``rel_path`` is its file name, unless ``root`` is given (see `discover`).

Glob semantics: `fnmatch` (case-sensitive; ``*`` and ``?`` also match ``/``, ``[...]`` classes),
except that ``**/`` matches zero or more whole folders, so ``**/*.py`` also matches ``setup.py`` at
the top and ``**/.git/**`` matches ``.git/config``. A folder is not entered at all when an exclude
pattern matches its relative path or that path followed by ``/``.

Ignore files and hidden names, while walking a folder (rg/fd behaviour, both switchable):

- ``respect_gitignore`` (default true): a file or folder ignored by a ``.gitignore`` is never
  discovered (it is not a skipped document: it does not appear in the run report). Git's semantics
  (the `pathspec` library): each ``.gitignore`` applies to its own folder and below, with patterns
  relative to it; a deeper file overrides a shallower one, a later line an earlier one; ``!``
  re-includes; ``dir/`` matches folders only; an ignored folder is not entered, so nothing below it
  can be re-included. ``.git/info/exclude`` of a repository counts like a ``.gitignore`` at its top.
  The ``.gitignore`` files of the folders above a walked folder count up to the repository's top
  (the nearest folder holding ``.git``); outside a repository only those at or below the walked
  folder count (like ``rg --no-require-git``: no ``.git`` is needed for them). Global git excludes
  (``core.excludesFile``) are not read.
- ``include_hidden`` (default false): names starting with ``.`` are skipped, files and folders
  alike (a hidden folder is not entered), also without a report entry.

A source named explicitly (on the command line) is taken even when it is hidden or ignored: a file
is ingested, a folder is walked (the ignore files inside it apply; those above it too, unless they
ignore the folder itself, which was asked for by name).

Nothing here reads file contents: whether a file is text, empty or decodable is decided when it is
read (`hades_gpu.documents.reading`). Problems found while walking become `Skip` records, which the
run report lists; discovery itself never raises for a bad path.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import pathspec

from hades_gpu.config import ConfigError, DocumentsConfig
from hades_gpu.documents.document_list import DocumentList
from hades_gpu.records import CODE, PROSE, DocumentRef, display_path, path_within, printable, stat_tag
from hades_gpu.regular_file import NOT_A_REGULAR_FILE, file_kind

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# extension (lower case, with the dot) -> language
PROSE_EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".mdown": "markdown",
    ".rst": "rst",
    ".rest": "rst",
}

CODE_EXTENSIONS: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".pyx": "cython", ".pxd": "cython",
    ".js": "javascript", ".jsx": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".java": "java", ".kt": "kotlin", ".kts": "kotlin", ".scala": "scala", ".groovy": "groovy",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp",
    ".hxx": "cpp", ".cu": "cuda", ".cuh": "cuda", ".m": "objective-c", ".mm": "objective-cpp",
    ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".cs": "csharp", ".fs": "fsharp",
    ".swift": "swift", ".dart": "dart", ".zig": "zig", ".nim": "nim", ".v": "verilog", ".sv": "verilog",
    ".vhd": "vhdl", ".hs": "haskell", ".ml": "ocaml", ".mli": "ocaml", ".ex": "elixir", ".exs": "elixir",
    ".erl": "erlang", ".clj": "clojure", ".el": "elisp", ".lisp": "lisp", ".scm": "scheme",
    ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".fish": "shell", ".ps1": "powershell",
    ".bat": "batch", ".cmd": "batch", ".sql": "sql", ".lua": "lua", ".r": "r", ".jl": "julia",
    ".pl": "perl", ".pm": "perl", ".tcl": "tcl", ".f90": "fortran", ".f": "fortran", ".asm": "assembly",
    ".s": "assembly", ".proto": "protobuf", ".thrift": "thrift", ".graphql": "graphql",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json", ".jsonl": "json",
    ".ini": "ini", ".cfg": "ini", ".conf": "ini", ".xml": "xml", ".html": "html", ".htm": "html",
    ".css": "css", ".scss": "css", ".less": "css", ".vue": "vue", ".svelte": "svelte",
    ".cmake": "cmake", ".mk": "make", ".gradle": "groovy", ".tf": "terraform", ".nix": "nix",
    ".ipynb": "json", ".pbtxt": "protobuf",
}

# whole file names (no useful extension) that are code
CODE_FILENAMES: dict[str, str] = {
    "Makefile": "make", "GNUmakefile": "make", "makefile": "make", "Dockerfile": "dockerfile",
    "Containerfile": "dockerfile", "Jenkinsfile": "groovy", "CMakeLists.txt": "cmake",
    "Rakefile": "ruby", "Gemfile": "ruby", "BUILD": "starlark", "WORKSPACE": "starlark",
}

# names whose variants with a suffix are the same kind of code (a Gemfile.lock is no Ruby)
_VARIANT_STEMS = frozenset({"Makefile", "GNUmakefile", "makefile", "Dockerfile", "Containerfile", "Jenkinsfile"})

# the interpreter of a `#!` line -> the language of a script without an extension (bin/deploy, scripts/tool)
SHEBANG_LANGUAGES: dict[str, str] = {
    "python": "python", "sh": "shell", "bash": "shell", "zsh": "shell", "dash": "shell", "ksh": "shell",
    "fish": "shell", "node": "javascript", "nodejs": "javascript", "deno": "typescript", "bun": "javascript",
    "perl": "perl", "ruby": "ruby", "php": "php", "lua": "lua", "rscript": "r", "julia": "julia", "tclsh": "tcl",
    "pwsh": "powershell", "groovy": "groovy", "make": "make", "pypy": "python", "ipython": "python",
}
_SHEBANG_BYTES = 256


def shebang_language(path: str) -> Optional[str]:
    """The language of a file whose first line is `#!<interpreter>` (`/usr/bin/env python3`, `/bin/bash`,
    `/usr/bin/env -S node --flag`), or None. Read only for files without an extension: such scripts
    were prose "text" (no statement cuts, no import edges, prose overlap). An interpreter not in
    `SHEBANG_LANGUAGES` is still code, under its own name."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SHEBANG_BYTES)
    except OSError:
        return None  # reading says why, with its reason
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0]
    if len(line) >= _SHEBANG_BYTES - 2 or not line.strip().startswith(b"/"):  # `#! note`: no interpreter path
        return None
    words = line.decode("utf-8", "replace").split()
    if os.path.basename(words[0]) == "env":  # the interpreter: the first word after env's options and VAR=value
        rest, words = words[1:], []
        while rest:
            word = rest.pop(0)
            if word in ("-u", "--unset", "-C", "--chdir", "-P"):
                rest = rest[1:]  # an option with its value
            elif word.startswith("--split-string="):
                rest = word.partition("=")[2].split() + rest
            elif not word.startswith("-") and "=" not in word:
                words = [word, *rest]
                break
        if not words:
            return None
    interpreter = os.path.basename(words[0]).lower()
    if interpreter == "uv" and "--script" in words:  # `uv run --script`: PEP 723 inline-metadata Python
        return "python"
    interpreter = re.sub(r"[\d.]+$", "", interpreter) or interpreter  # python3.11 -> python
    if not re.fullmatch(r"[a-z][\w+-]*", interpreter):
        return None
    return SHEBANG_LANGUAGES.get(interpreter, interpreter)


# Extensions that are binary formats for certain: skipped here (reason "binary") without reading.
BINARY_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .gif .bmp .ico .tif .tiff .webp .psd .pdf .zip .gz .tgz .bz2 .xz .zst .7z .rar "
    ".tar .jar .war .whl .egg .so .dylib .dll .exe .o .a .lib .obj .class .pyc .pyo .pyd .wasm .bin "
    ".dat .db .sqlite .sqlite3 .parquet .arrow .feather .npy .npz .pt .pth .ckpt .safetensors .onnx "
    ".pkl .pickle .h5 .hdf5 .mp3 .mp4 .wav .flac .ogg .avi .mov .mkv .webm .ttf .otf .woff .woff2 "
    ".eot .doc .docx .xls .xlsx .ppt .pptx .odt .ods".split()
)


@dataclass(frozen=True)
class Skip:
    """A path that will not be ingested, and why (a row of the run report's ``skipped`` list).

    reason: ``missing`` | ``unreadable`` | ``too_large`` | ``binary`` | ``symlink`` | ``duplicate``
    | ``output_folder`` here; reading adds ``empty`` | ``decode_error`` (see `hades_gpu.documents.reading`).
    """

    path: str
    reason: str
    detail: str = ""


SAME_FILE_AS = "the same file as "  # a duplicate skip's detail for a second name of one file (hard or followed link)


def classify(name: str, cfg: DocumentsConfig) -> tuple[str, str] | None:
    """(modality, language) of a file name, or None for a known binary extension.

    Unknown extensions are prose with language ``"text"``: whether they really are text is decided
    when they are read (NUL bytes, magic numbers -> skipped as ``binary``).
    """
    if name in CODE_FILENAMES:
        return CODE, CODE_FILENAMES[name]
    ext = os.path.splitext(name)[1].lower()
    stem = name.split(".", 1)[0]
    if stem in _VARIANT_STEMS and ext not in CODE_EXTENSIONS and ext not in PROSE_EXTENSIONS \
            and ext not in BINARY_EXTENSIONS:  # Dockerfile.dev, Makefile.am, Containerfile.prod (not Gemfile.lock)
        return CODE, CODE_FILENAMES[stem]
    extra_code = set(dotted_extensions(cfg.extra_code_extensions))
    extra_prose = set(dotted_extensions(cfg.extra_prose_extensions))
    if ext in extra_code:
        return CODE, CODE_EXTENSIONS.get(ext, ext.lstrip(".") or "unknown")
    if ext in extra_prose:
        return PROSE, PROSE_EXTENSIONS.get(ext, "text")
    if ext in CODE_EXTENSIONS:
        return CODE, CODE_EXTENSIONS[ext]
    if ext in PROSE_EXTENSIONS:
        return PROSE, PROSE_EXTENSIONS[ext]
    if ext in BINARY_EXTENSIONS:
        return None
    return PROSE, "text"


def dotted_extensions(extensions: Sequence[str]) -> list[str]:
    """`documents.extra_*_extensions` as classify compares them: lower case, one leading dot, sorted, once."""
    cleaned = (e.strip().lower() for e in extensions)
    return sorted({e if e.startswith(".") else "." + e for e in cleaned})


@lru_cache(maxsize=256)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob: fnmatch semantics, plus ``**/`` = zero or more folders (and a trailing
    ``/**`` = anything below the folder)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append(".*")
            i += 1
        elif c == "?":
            out.append(".")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append("\\[")
                i += 1
            else:
                body = pattern[i + 1 : j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("(?s:" + "".join(out) + r")\Z")


def matches_any(rel_path: str, patterns: Iterable[str]) -> bool:
    return any(glob_to_regex(p).match(rel_path) for p in patterns)


def _folder_excluded(rel_dir: str, cfg: DocumentsConfig) -> bool:
    excluded = cfg.excluded()
    return matches_any(rel_dir, excluded) or matches_any(rel_dir + "/", excluded)


def source_list(sources: Union[PathLike, bytes, Iterable[Union[PathLike, bytes]]]) -> list[str]:
    """One source or several (str, bytes, `os.PathLike`; any iterable of them) as a list of str
    paths: a single `bytes` path was iterated as its byte values, a single `Path` is one source.

    Raises:
        TypeError: `sources` is neither a path nor an iterable of paths (None, a number).
        ConfigError: an empty path: `Path("")` is the working directory, so a stray "" ingested
            whatever folder the caller ran in; "." says that on purpose.
    """
    if isinstance(sources, (str, bytes, os.PathLike)):
        sources = [sources]
    try:
        items = list(sources)
    except TypeError:
        raise TypeError(f"paths must be a path or an iterable of paths (got {type(sources).__name__})") from None
    paths = []
    for s in items:
        if not isinstance(s, (str, bytes, os.PathLike)):
            raise TypeError(f"paths must be str, bytes or os.PathLike (got {type(s).__name__}: {s!r})")
        path = os.fsdecode(s)
        if path == "":  # (a name of spaces is a name: such files exist)
            raise ConfigError(f"an empty path is not a source (got {path!r}; Path('') is the working "
                              "directory: pass '.' to ingest it)")
        paths.append(os.path.expanduser(path))  # "~/docs" as a shell reads it (records.user_path)
    return paths


GITIGNORE = ".gitignore"


def _load_ignore(path: str) -> Optional[pathspec.GitIgnoreSpec]:
    """The patterns of one ignore file, or None when it is absent, unreadable or empty."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # a BOM (Windows editors write one) made the first pattern "\ufeffbuild/", which matches nothing;
    # git skips it
    lines = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape").splitlines()
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    return spec if len(spec.patterns) else None


def _folder_specs(folder: str) -> list[pathspec.GitIgnoreSpec]:
    """The ignore files that start applying at `folder`: its .git/info/exclude (below .gitignore,
    which overrides it), then its .gitignore."""
    specs = []
    if os.path.isdir(os.path.join(folder, ".git")):
        exclude = _load_ignore(os.path.join(folder, ".git", "info", "exclude"))
        if exclude is not None:
            specs.append(exclude)
    spec = _load_ignore(os.path.join(folder, GITIGNORE))
    if spec is not None:
        specs.append(spec)
    return specs


# (folder, spec): folder is the absolute folder the spec's patterns are relative to
_Ignores = tuple[tuple[str, pathspec.GitIgnoreSpec], ...]


def _ancestor_ignores(folder: str) -> _Ignores:
    """Ignore files of the folders above `folder` up to its repository's top (none outside a repository)."""
    chain: list[str] = []
    parent = os.path.dirname(folder)
    while True:
        chain.append(parent)
        if os.path.exists(os.path.join(parent, ".git")):
            break
        up = os.path.dirname(parent)
        if up == parent:
            return ()  # not inside a repository
        parent = up
    out: list[tuple[str, pathspec.GitIgnoreSpec]] = []
    for d in reversed(chain):  # shallowest first
        out.extend((d, spec) for spec in _folder_specs(d))
    return tuple(out)


def _ignored(ignores: _Ignores, abs_path: str, is_dir: bool) -> bool:
    """Whether git would ignore `abs_path`: the last matching pattern of the deepest file that has one."""
    for base, spec in reversed(ignores):
        rel = os.path.relpath(abs_path, base).replace(os.sep, "/")
        result = spec.check_file(rel + "/" if is_dir else rel)
        if result.include is not None:
            return bool(result.include)
    return False


class _Walker:
    """State of one `discover` call: results, skips, and what was seen (for duplicates/loops)."""

    def __init__(self, cfg: DocumentsConfig, root: Optional[str], skip_folders: Sequence[str] = (),
                 is_output_folder: Optional[Callable[[list[str]], bool]] = None) -> None:
        self.cfg = cfg
        self.root = os.path.abspath(root) if root is not None else None
        self.skip_folders = _folder_ids(skip_folders)
        self.is_output_folder = is_output_folder
        self.refs = DocumentList()  # columns: ~60 bytes a document (document_list.py)
        self.skips: list[Skip] = []
        self.seen_paths: set[str] = set()
        self.seen_rel: dict[str, str] = {}
        self.seen_dirs: dict[tuple[int, int], str] = {}  # (device, inode) -> the name it was walked under
        # A file under a second name (a followed symlink, a hard link) would be stored twice:
        # (device, inode) -> the first name. Kept for every file only when symlinks are followed; else
        # only for files with more than one hard link (a dict entry per document would undo the main
        # process's per-document savings, and st_nlink names the few that can repeat).
        self.seen_files: dict[tuple[int, int], str] = {}
        # Followed symlinks are walked after everything reached without one (`walk_deferred`): a
        # link sorted before its target ("linkdir" < "sub") took the files' names, and the real
        # folder was then skipped as already visited.
        self.deferred: deque[tuple[str, str, str, _Ignores, bool]] = deque()

    def _unreadable(self, path: str, err: OSError) -> None:
        self.skips.append(Skip(path, "unreadable", f"{type(err).__name__}: {err.strerror or err}"))

    def _skip_output(self, folder: str, detail: str = "the run's own output folder: its files are not documents") -> None:
        self.skips.append(Skip(folder, "output_folder", detail))

    def rel_for(self, abs_path: str, default: str) -> str:
        if self.root is not None:
            rel = os.path.relpath(abs_path, self.root)
            if rel == ".":
                return ""
            if not rel.startswith(".." + os.sep) and rel != "..":
                return rel.replace(os.sep, "/")
        return default

    def add_file(self, abs_path: str, rel_path: str, st: os.stat_result) -> None:
        if abs_path in self.seen_paths:
            return  # the same file named twice (a folder and a file inside it): once is enough
        self.seen_paths.add(abs_path)
        # the identity is the escaped text form (`display_path`): a name with the byte 0xE9 and one
        # spelled "caf\\xe9.txt" are the same document id, so the second is the duplicate
        identity = display_path(rel_path)
        if identity in self.seen_rel:
            taken = self.seen_rel[identity]
            # two names that print alike (a byte 0xE9 and the text "\xe9"): said, or the line named one file twice
            alike = (" (another name, which reads the same once bytes that are not UTF-8 are written as \\xNN)"
                     if printable(taken) == printable(abs_path) and taken != abs_path else "")
            self.skips.append(Skip(abs_path, "duplicate",
                                   f"rel_path {identity!r} already taken by {printable(taken)}{alike}"))
            return
        if not stat.S_ISREG(st.st_mode):
            self.skips.append(Skip(abs_path, "unreadable", f"{NOT_A_REGULAR_FILE} ({file_kind(st.st_mode)})"))
            return
        name = os.path.basename(abs_path)
        kind = classify(name, self.cfg)
        if kind == (PROSE, "text") and not os.path.splitext(name)[1]:
            language = shebang_language(abs_path)  # a script without an extension: code, by its #! line
            if language is not None:
                kind = (CODE, language)
        if kind is None:
            self.skips.append(Skip(abs_path, "binary", f"binary file extension {os.path.splitext(abs_path)[1]!r}"))
            return
        if st.st_size > self.cfg.max_file_bytes:
            self.skips.append(Skip(abs_path, "too_large",
                                   f"{st.st_size} bytes > documents.max_file_bytes ({self.cfg.max_file_bytes})"))
            return
        if self.cfg.follow_symlinks or st.st_nlink > 1:
            first = self.seen_files.setdefault((st.st_dev, st.st_ino), abs_path)
            if first != abs_path:  # a link to a file already taken: its chunks would be stored twice
                self.skips.append(Skip(abs_path, "duplicate", f"{SAME_FILE_AS}{printable(first)}"))
                return
        self.seen_rel[identity] = abs_path
        self.refs.append(DocumentRef(path=abs_path, rel_path=rel_path, size=int(st.st_size),
                                     modality=kind[0], language=kind[1], mtime_ns=int(st.st_mtime_ns),
                                     stat_tag=stat_tag(st)))

    def source(self, src: str) -> None:
        abs_path = os.path.abspath(src)
        try:
            st = os.stat(abs_path)  # an explicitly named source is followed even if it is a link
        except FileNotFoundError:
            self.skips.append(Skip(abs_path, "missing", "no such file or folder"))
            return
        except OSError as err:  # e.g. NotADirectoryError, PermissionError on a parent, ELOOP
            self._unreadable(abs_path, err)
            return
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in self.skip_folders:
                self._skip_output(abs_path)
                return
            self.seen_dirs.setdefault((st.st_dev, st.st_ino), abs_path)
            base = self.rel_for(abs_path, "")
            ignores = _ancestor_ignores(abs_path) if self.cfg.respect_gitignore else ()
            if ignores and _ignored(ignores, abs_path, True):
                ignores = ()  # asked for by name although its repository ignores it: walk all of it
            self.walk(abs_path, "", base, ignores)
        else:
            self.add_file(abs_path, self.rel_for(abs_path, os.path.basename(abs_path)), st)

    def walk(self, folder: str, rel_dir: str, base: str, ignores: _Ignores = ()) -> None:
        """Depth-first, entries sorted by name; `rel_dir` is relative to the source folder (for
        globs), `base` the prefix that turns it into the document's rel_path (when `root` is given),
        `ignores` the ignore files that apply above `folder`.

        An explicit stack of open folders, not recursion: a tree deeper than Python's recursion
        limit (~1,000 nested folders) crashed discovery with a RecursionError."""
        stack: list[tuple[Iterator[os.DirEntry], str, _Ignores]] = []
        frame = self._open(folder, rel_dir, ignores)
        if frame is not None:
            stack.append(frame)
        while stack:
            entries, rel_dir, ignores = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            sub = self._visit(entry, rel_dir, base, ignores)
            if sub is not None:
                frame = self._open(entry.path, sub, ignores)
                if frame is not None:
                    stack.append(frame)

    def _open(self, folder: str, rel_dir: str, ignores: _Ignores) -> Optional[tuple[Iterator[os.DirEntry], str, _Ignores]]:
        """A folder's sorted entries with the ignore files that apply inside it; None (and a skip
        when it is one) when it cannot be listed or is an output folder."""
        if self.cfg.respect_gitignore:
            ignores = ignores + tuple((folder, spec) for spec in _folder_specs(folder))
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            self.skips.append(Skip(folder, "missing", "folder vanished while walking"))
            return None
        except OSError as err:
            self.skips.append(Skip(folder, "unreadable",
                                   f"cannot list folder ({type(err).__name__}: {err.strerror or err})"))
            return None
        if self.is_output_folder is not None and self.is_output_folder([e.name for e in entries]):
            self._skip_output(folder, "an ingest output folder (another run's): its files are not documents")
            return None
        return iter(entries), rel_dir, ignores

    def _visit(self, entry: os.DirEntry, rel_dir: str, base: str, ignores: _Ignores) -> Optional[str]:
        """Take, skip or pass over one entry of a folder; a folder to walk next comes back as its
        relative path."""
        cfg = self.cfg
        if not cfg.include_hidden and entry.name.startswith("."):
            return None  # hidden: never discovered (documents.include_hidden)
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir(follow_symlinks=cfg.follow_symlinks)
        except OSError as err:
            self._unreadable(entry.path, err)
            return None
        if ignores and _ignored(ignores, entry.path, is_dir):
            return None  # ignored by a .gitignore: never discovered (documents.respect_gitignore)
        if is_dir:
            if _folder_excluded(rel, cfg):
                return None
            if is_link:  # followed, after the folders reached without a link
                self.deferred.append((entry.path, rel, base, ignores, True))
                return None
            return rel if self._enter(entry.path) else None
        if not matches_any(rel, cfg.include) or matches_any(rel, cfg.excluded()):
            return None
        if is_link and not cfg.follow_symlinks:
            self.skips.append(Skip(entry.path, "symlink",
                                   "symbolic link not followed (documents.follow_symlinks=false)"))
            return None
        if is_link:
            self.deferred.append((entry.path, rel, base, ignores, False))
            return None
        self._take(entry.path, rel, base, is_link)
        return None

    def _enter(self, path: str) -> bool:
        """Whether to walk the folder at `path` (not an output, not walked before under another name)."""
        try:
            st = os.stat(path)
        except OSError as err:
            self._unreadable(path, err)
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.skip_folders:
            self._skip_output(path)
            return False
        first = self.seen_dirs.get(key)
        if first is not None and os.path.abspath(first) == os.path.abspath(path):
            return False  # the same folder by the same path: a source inside another given one, no loop
        if first is not None:
            inside = os.path.commonpath([os.path.abspath(first), os.path.abspath(path)]) == os.path.abspath(first)
            self.skips.append(Skip(path, "duplicate", (f"a symlink loop: {printable(first)}, already walked"
                                                       if inside else f"the same folder as {printable(first)}, "
                                                       "already walked")))
            return False
        self.seen_dirs[key] = path
        return True

    def _take(self, abs_path: str, rel: str, base: str, is_link: bool) -> None:
        try:
            st = os.stat(abs_path) if is_link else os.lstat(abs_path)
        except FileNotFoundError:
            self.skips.append(Skip(abs_path, "missing",
                                   "broken symbolic link" if is_link else "vanished while walking"))
            return
        except OSError as err:
            self._unreadable(abs_path, err)
            return
        self.add_file(abs_path, f"{base}/{rel}" if base else rel, st)

    def walk_deferred(self) -> None:
        """The followed symlinks, in the order met (links inside them after them): a name reached
        without a link has already taken its file or folder, so a link to it is the duplicate."""
        while self.deferred:
            path, rel, base, ignores, is_dir = self.deferred.popleft()
            if not is_dir:
                self._take(path, rel, base, True)
            elif self._enter(path):
                self.walk(path, rel, base, ignores)


def _folder_ids(folders: Sequence[PathLike]) -> set[tuple[int, int]]:
    """(device, inode) of each existing folder: the same folder under any name or link matches."""
    ids = set()
    for folder in folders:
        try:
            st = os.stat(folder)
        except OSError:
            continue  # not made yet: nothing in it to skip
        if stat.S_ISDIR(st.st_mode):
            ids.add((st.st_dev, st.st_ino))
    return ids


def _outer_first(sources: list[str]) -> list[tuple[str, str]]:
    """`sources` with each one inside another given folder moved after it (else in the order given): a
    document's name must not depend on the order of the list. ["ov/sub", "ov"] named ov/sub/a.md
    "a.md" and skipped ov's walk into sub as a symlink loop; ["ov", "ov/sub"] named it "sub/a.md".
    Each comes with its real path."""
    real = [os.path.realpath(s) for s in sources]
    if len(sources) < 2:
        return list(zip(sources, real))
    given = set(real)

    def depth(i: int) -> int:  # how many given sources hold it: its ancestors' paths, looked up (a list of
        n, path = 0, real[i]   # 10^5 files was O(n^2) compared pairwise)
        while True:
            parent = os.path.dirname(path)
            if parent == path:
                return n
            n += parent in given
            path = parent

    return [(sources[i], real[i]) for i in sorted(range(len(sources)), key=depth)]


def _under_its_outer_source(src: str, real: str, walked: list[tuple[str, str]]) -> str:
    """`src` as a path under an outer source folder already walked when it lies there only through a
    link (["L1/sub", "real"] with L1 -> real): walked under its link's path, its files were new paths
    and new names, a second document each. Under the outer folder's path they are the same files."""
    given = os.path.abspath(src)
    for outer_real, outer_given in walked:
        if path_within(real, outer_real) and not path_within(given, outer_given):
            return outer_given.rstrip(os.sep) + real[len(outer_real.rstrip(os.sep)):]
    return src


def discover(
    sources: Union[PathLike, Sequence[PathLike]],
    cfg: DocumentsConfig,
    *,
    root: Optional[PathLike] = None,
    skip_folders: Sequence[PathLike] = (),
    is_output_folder: Optional[Callable[[list[str]], bool]] = None,
) -> tuple[DocumentList, list[Skip]]:
    """Documents under `sources` (folders and/or files) and the paths skipped on the way.

    Args:
        sources (str | Path | Sequence[str | Path]): folders to walk and/or files to take.
        cfg (DocumentsConfig): include/exclude globs, size cap, symlink policy, extra extensions.
        root (str | Path, optional): when given, every ``rel_path`` is taken relative to this folder
            (for shards that hand over explicit file lists: ids then match a whole-folder run).
            Paths outside it fall back to the rules below. (default: None)
        skip_folders (Sequence[str | Path]): folders never walked, even when named as a source: the
            run's output folder, whose metrics and index files would otherwise be ingested by the
            next run over a corpus that holds it. Each is one ``output_folder`` skip. (default: none)
        is_output_folder (callable, optional): given a folder's entry names, whether it is an output
            of this tool (`hades_gpu.store.layout.is_output_listing`; discovery sits below the store and
            does not know its file names): such a folder is not walked either, one ``output_folder``
            skip. (default: every folder is walked)

    Returns:
        ``(refs, skips)``: refs in a deterministic order (sources in the order given, folders
        walked depth-first with names sorted). ``rel_path`` is relative to the folder walked, or the
        file name for a file source. A second file with an already used ``rel_path`` (two source
        folders both holding ``README.md``) is skipped as ``duplicate`` (doc ids derive from it).
    """
    walker = _Walker(cfg, os.fspath(root) if root is not None else None, [os.fspath(f) for f in skip_folders],
                     is_output_folder)
    ordered = _outer_first(source_list(sources))
    # The same folder or file named twice is walked once (it read as a symlink loop), under its own
    # name where one of the names is it rather than a link to it: [link, file] stored the file under
    # the link's name, [file, link] under its own, so the order of the list made a second document.
    chosen: dict[str, int] = {}
    for i, (src, where) in enumerate(ordered):
        j = chosen.get(where)
        if j is None or (os.path.abspath(src) == where and os.path.abspath(ordered[j][0]) != where):
            chosen[where] = i
    walked: list[tuple[str, str]] = []  # (real path, path as given) of the folders walked so far
    for i, (src, where) in enumerate(ordered):
        j = chosen[where]
        if i == j:
            src = _under_its_outer_source(src, where, walked)
            walker.source(src)
            if os.path.isdir(where):
                walked.append((where, os.path.abspath(src)))
        elif os.path.abspath(src) != os.path.abspath(ordered[j][0]):  # another name for it: said, not silent
            walker.skips.append(Skip(os.path.abspath(src), "duplicate",
                                     f"the same file or folder as {printable(os.path.abspath(ordered[j][0]))}"))
    walker.walk_deferred()
    # a folder and a folder inside it both given: the inner one's skips were met twice (and counted twice)
    unique: dict[tuple[str, str], Skip] = {}
    for skip in walker.skips:
        unique.setdefault((skip.path, skip.reason), skip)
    skips = list(unique.values())
    if skips:
        log.debug("discovery skipped %d path(s)", len(skips))
    return walker.refs, skips


__all__ = ["Skip", "discover", "source_list", "classify", "glob_to_regex", "matches_any", "PROSE_EXTENSIONS", "CODE_EXTENSIONS"]
