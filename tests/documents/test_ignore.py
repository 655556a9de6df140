"""Discovery honours .gitignore files and skips hidden names (documents.respect_gitignore,
documents.include_hidden), on real folders."""

from __future__ import annotations

from pathlib import Path

from hades_gpu.config import DocumentsConfig
from hades_gpu.documents.discovery import discover


def _write(root: Path, rel: str, data: str = "text\n") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data)
    return p


def _rels(root, cfg=None, **kw) -> list[str]:
    refs, skips = discover(root, cfg or DocumentsConfig(), **kw)
    assert not skips  # ignored and hidden files are never discovered: no report entries
    return [r.rel_path for r in refs]


def test_nested_gitignore_negation_and_directory_patterns(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _write(root, ".gitignore", "*.log\n!keep.log\nbuild/\n/top-only.txt\ndocs/generated\n")
    for rel in ["a.txt", "x.log", "keep.log", "top-only.txt", "sub/top-only.txt", "build/out.txt",
                "sub/build/out.txt", "build.txt", "docs/generated/g.txt", "docs/guide.md",
                "sub/y.log", "sub/keep.log", "sub/z.tmp", "sub/deep/z.tmp", "sub/deep/w.txt",
                "other/z.tmp", "other/build"]:
        _write(root, rel)
    # nested: applies to its own folder and below; overrides the parent (re-ignores keep.log,
    # re-includes *.log in sub/deep), patterns are relative to it
    _write(root, "sub/.gitignore", "*.tmp\nkeep.log\n/deep/w.txt\n")
    _write(root, "sub/deep/.gitignore", "!*.tmp\n")
    assert _rels(root) == [
        "a.txt", "build.txt", "docs/guide.md", "keep.log",
        "other/build",  # "build/" matches folders only: a file named build is kept
        "other/z.tmp",  # sub/.gitignore does not reach other/
        "sub/deep/z.tmp",  # re-included by the deeper file
        "sub/top-only.txt",  # "/top-only.txt" is anchored to the top
    ]
    every = _rels(root, DocumentsConfig(respect_gitignore=False, include_hidden=True))
    assert {".gitignore", "x.log", "build/out.txt", "sub/build/out.txt", "docs/generated/g.txt", "sub/deep/w.txt",
            "sub/.gitignore"} <= set(every)
    assert len(every) == 17 + 3


def test_ignored_folder_cannot_be_reincluded_and_git_info_exclude(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    _write(root, ".gitignore", "vendor/\n!vendor/keep.txt\n")
    _write(root, "vendor/keep.txt")
    _write(root, "a.txt")
    _write(root, "secret.txt")
    _write(root, ".git/info/exclude", "secret.txt\n")
    assert _rels(root) == ["a.txt"]  # as git: a file in an ignored folder stays ignored


def test_parent_gitignore_counts_inside_a_repository_only(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write(repo, ".gitignore", "*.log\n")
    (repo / ".git").mkdir()
    _write(repo, "docs/a.txt")
    _write(repo, "docs/b.log")
    assert _rels(repo / "docs") == ["a.txt"]  # the repository's top .gitignore applies to a sub-folder
    plain = tmp_path / "plain"
    _write(plain, ".gitignore", "*.log\n")
    _write(plain, "docs/a.txt")
    _write(plain, "docs/b.log")
    assert _rels(plain / "docs") == ["a.txt", "b.log"]  # not a repository: only ignore files inside it
    assert _rels(plain) == ["docs/a.txt"]  # ...which do count without a .git


def test_hidden_files_and_folders(tmp_path: Path) -> None:
    root = tmp_path / "c"
    for rel in ["a.txt", ".env", ".hidden/x.txt", "sub/.secret.md", "sub/b.md", ".github/workflows/ci.yml"]:
        _write(root, rel)
    assert _rels(root) == ["a.txt", "sub/b.md"]
    assert _rels(root, DocumentsConfig(include_hidden=True)) == [
        ".env", ".github/workflows/ci.yml", ".hidden/x.txt", "a.txt", "sub/.secret.md", "sub/b.md"]


def test_explicit_sources_are_taken_even_if_hidden_or_ignored(tmp_path: Path) -> None:
    root = tmp_path / "c"
    (root / ".git").mkdir(parents=True)  # a repository: its top .gitignore counts for sub-folders
    _write(root, ".gitignore", "*.log\nignored/\n")
    log = _write(root, "x.log")
    hidden = _write(root, ".env")
    _write(root, "ignored/in.txt")
    _write(root, "ignored/more.log")
    _write(root, ".hidden/h.txt")
    refs, _ = discover([log, hidden], DocumentsConfig())
    assert [r.rel_path for r in refs] == ["x.log", ".env"]
    # an explicitly named folder is walked even if ignored or hidden; the rules apply inside it
    assert _rels(root / "ignored") == ["in.txt", "more.log"]  # the folder asked for: all of it
    assert _rels(root / ".hidden") == ["h.txt"]
    _write(root, "sub/a.txt")
    _write(root, "sub/b.log")
    assert _rels(root / "sub") == ["a.txt"]  # not ignored itself: the top .gitignore applies inside it
    refs, _ = discover([log], DocumentsConfig(), root=root)
    assert [r.rel_path for r in refs] == ["x.log"]


def test_a_gitignore_that_starts_with_a_bom_keeps_its_first_rule(tmp_path: Path) -> None:
    """Windows editors save .gitignore with a UTF-8 BOM: its first pattern read as "\\ufeffbuild/" and
    matched nothing, so build/ was ingested while git ignores it."""
    (tmp_path / ".git" / "info").mkdir(parents=True)
    (tmp_path / ".gitignore").write_bytes(b"\xef\xbb\xbfbuild/\n*.log\n")
    (tmp_path / ".git" / "info" / "exclude").write_bytes(b"\xef\xbb\xbfsecret.txt\n")
    for rel in ("build/out.js", "src/m.c", "run.log", "secret.txt"):
        _write(tmp_path, rel)
    assert _rels(tmp_path) == ["src/m.c"]


def test_extra_exclude_adds_to_the_default_excludes_which_exclude_replaces(tmp_path: Path) -> None:
    """A user who set documents.exclude=[**/vendor/**] to skip one folder had node_modules/ and
    __pycache__/ ingested (the list replaces the defaults, silently): extra_exclude adds to them."""
    for rel in ("node_modules/lodash/index.js", "vendor/lib.c", "src/m.c", "__pycache__/x.txt"):
        _write(tmp_path, rel)
    assert _rels(tmp_path, DocumentsConfig(extra_exclude=["**/vendor/**"])) == ["src/m.c"]
    assert _rels(tmp_path, DocumentsConfig(exclude=["**/vendor/**"])) == ["__pycache__/x.txt", "node_modules/lodash/index.js",
                                                                         "src/m.c"]
