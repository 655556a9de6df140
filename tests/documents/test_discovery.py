"""Discovery on real folders: order, globs, classification and every skip reason it produces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hades_gpu.config import DocumentsConfig
from hades_gpu.documents.discovery import Skip, classify, discover, glob_to_regex, matches_any
from hades_gpu.records import CODE, PROSE


def _write(root: Path, rel: str, data: str | bytes = "x = 1\n") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data)
    return p


def _rels(refs) -> list[str]:
    return [r.rel_path for r in refs]


def _reasons(skips: list[Skip]) -> dict[str, str]:
    return {Path(s.path).name: s.reason for s in skips}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for rel in ["b.py", "a.md", "docs/guide.rst", "docs/sub/notes.txt", "docs/sub/z.js", "LICENSE",
                "Makefile", "pkg/__init__.py", "pkg/test_mod.py", "pkg/skip/inner.py",
                ".git/config", "pkg/__pycache__/m.cpython-311.pyc", "node_modules/x/index.js", "img.png"]:
        _write(root, rel)
    return root


def test_walk_is_sorted_and_classified(tree: Path) -> None:
    refs, skips = discover(tree, DocumentsConfig())
    assert _rels(refs) == ["LICENSE", "Makefile", "a.md", "b.py", "docs/guide.rst", "docs/sub/notes.txt",
                           "docs/sub/z.js", "pkg/__init__.py", "pkg/skip/inner.py", "pkg/test_mod.py"]
    by = {r.rel_path: r for r in refs}
    assert (by["b.py"].modality, by["b.py"].language) == (CODE, "python")
    assert (by["a.md"].modality, by["a.md"].language) == (PROSE, "markdown")
    assert (by["docs/guide.rst"].modality, by["docs/guide.rst"].language) == (PROSE, "rst")
    assert (by["docs/sub/z.js"].modality, by["docs/sub/z.js"].language) == (CODE, "javascript")
    assert (by["LICENSE"].modality, by["LICENSE"].language) == (PROSE, "text")  # decided when read
    assert (by["Makefile"].modality, by["Makefile"].language) == (CODE, "make")
    assert all(os.path.isabs(r.path) and Path(r.path).is_file() for r in refs)
    assert by["b.py"].size == len("x = 1\n")
    assert by["b.py"].doc_id == discover(tree, DocumentsConfig())[0][3].doc_id  # deterministic
    # default excludes prune .git, __pycache__, node_modules; a .png is skipped without reading
    assert _reasons(skips) == {"img.png": "binary"}


def test_include_exclude_globs(tree: Path) -> None:
    cfg = DocumentsConfig(include=["**/*.py", "*.md"], exclude=["**/skip/**", "**/test_*.py"])
    refs, _ = discover(tree, cfg)
    # `**/*.py` also matches a top-level file (zero folders); `*.md` crosses "/" (fnmatch)
    assert _rels(refs) == ["a.md", "b.py", "pkg/__init__.py"]
    refs, _ = discover(tree, DocumentsConfig(include=["docs/**"], exclude=[]))
    assert _rels(refs) == ["docs/guide.rst", "docs/sub/notes.txt", "docs/sub/z.js"]
    refs, _ = discover(tree, DocumentsConfig(include=["docs/sub/*.[jt][sx]*"], exclude=[]))
    assert _rels(refs) == ["docs/sub/notes.txt", "docs/sub/z.js"]


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("**/*.py", "a.py", True),
        ("**/*.py", "x/y/a.py", True),
        ("**/.git/**", ".git/config", True),
        ("**/.git/**", "a/.git/objects/x", True),
        ("**/.git/**", "a/.github/x", False),
        ("*.md", "docs/x.md", True),
        ("docs/*.md", "docs/x.md", True),
        ("docs/*.md", "src/docs/x.md", False),
        ("a?c", "abc", True),
        ("[!a]*", "abc", False),
        ("[!a]*", "bcd", True),
        ("src/**/test_*.py", "src/test_a.py", True),
        ("src/**/test_*.py", "src/x/y/test_a.py", True),
        ("x[", "x[", True),
    ],
)
def test_glob_semantics(pattern: str, path: str, hit: bool) -> None:
    assert bool(glob_to_regex(pattern).match(path)) is hit
    assert matches_any(path, [pattern]) is hit


def test_size_cap(tmp_path: Path) -> None:
    _write(tmp_path, "small.txt", "0123456789")
    _write(tmp_path, "big.txt", "0123456789!")
    refs, skips = discover(tmp_path, DocumentsConfig(max_file_bytes=10))
    assert _rels(refs) == ["small.txt"]
    assert [(Path(s.path).name, s.reason) for s in skips] == [("big.txt", "too_large")]
    assert "11 bytes" in skips[0].detail


def test_missing_source_and_file_sources(tmp_path: Path) -> None:
    f = _write(tmp_path, "sub/one.py")
    refs, skips = discover([tmp_path / "nope", str(f)], DocumentsConfig())
    assert [(s.reason, s.path) for s in skips] == [("missing", str(tmp_path / "nope"))]
    assert _rels(refs) == ["one.py"]  # a file source: its name
    refs, _ = discover([f], DocumentsConfig(), root=tmp_path)
    assert _rels(refs) == ["sub/one.py"]  # relative to an explicit root (shards of file lists)
    refs, _ = discover(tmp_path / "sub", DocumentsConfig(), root=tmp_path)
    assert _rels(refs) == ["sub/one.py"]


def test_explicit_file_bypasses_globs(tmp_path: Path) -> None:
    f = _write(tmp_path, "x.pyc.txt")
    refs, _ = discover(f, DocumentsConfig(include=["*.py"], exclude=["**/*.txt"]))
    assert _rels(refs) == ["x.pyc.txt"]


def test_duplicate_rel_paths_across_sources(tmp_path: Path) -> None:
    _write(tmp_path, "a/README.md", "# a\n")
    _write(tmp_path, "b/README.md", "# b\n")
    refs, skips = discover([tmp_path / "a", tmp_path / "b", tmp_path / "a"], DocumentsConfig())
    assert _rels(refs) == ["README.md"] and refs[0].path == str(tmp_path / "a" / "README.md")
    assert [s.reason for s in skips] == ["duplicate"]
    assert str(tmp_path / "a" / "README.md") in skips[0].detail


def test_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "c"
    target = _write(tmp_path, "outside/real.py")
    _write(root, "a.py")
    (root / "link.py").symlink_to(target)
    (root / "linkdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling.py").symlink_to(tmp_path / "gone.py")

    refs, skips = discover(root, DocumentsConfig())
    assert _rels(refs) == ["a.py"]
    assert {Path(s.path).name: s.reason for s in skips} == {
        "dangling.py": "symlink", "link.py": "symlink", "linkdir": "symlink", "loop": "symlink"}

    refs, skips = discover(root, DocumentsConfig(follow_symlinks=True))
    # linkdir/real.py is outside/real.py again, which link.py already took
    assert _rels(refs) == ["a.py", "link.py"]
    reasons = {Path(s.path).name: (s.reason, s.detail) for s in skips}
    assert reasons["real.py"] == ("duplicate", f"the same file as {root / 'link.py'}")
    assert reasons["dangling.py"][0] == "missing"
    assert reasons["loop"] == ("duplicate", f"a symlink loop: {root}, already walked")
    # a followed link to a file the corpus holds under its own name: once, not twice (both were
    # ingested: the same chunks stored and found twice)
    (root / "again.py").symlink_to(root / "a.py")
    refs, skips = discover(root, DocumentsConfig(follow_symlinks=True))
    assert _rels(refs) == ["a.py", "link.py"]
    assert {Path(s.path).name: s.reason for s in skips}["again.py"] == "duplicate"


def test_a_followed_link_never_takes_the_name_of_what_the_corpus_holds_under_its_own(tmp_path: Path) -> None:
    """"linkdir" -> "sub" sorts before "sub": the link was walked first, its name stored, and the real
    folder skipped as "unreadable: symlink loop"; an output ingested before with follow_symlinks=false
    then held the file under both names. Links are walked after the rest now."""
    root = tmp_path / "c"
    _write(root, "sub/deeper/real.md", "# real\n")
    (root / "linkdir").symlink_to(root / "sub", target_is_directory=True)
    (root / "alias.md").symlink_to(root / "sub" / "deeper" / "real.md")
    refs, skips = discover(root, DocumentsConfig(follow_symlinks=True))
    assert _rels(refs) == ["sub/deeper/real.md"]
    reasons = {Path(s.path).name: (s.reason, s.detail) for s in skips}
    assert reasons == {"alias.md": ("duplicate", f"the same file as {root / 'sub' / 'deeper' / 'real.md'}"),
                       "linkdir": ("duplicate", f"the same folder as {root / 'sub'}, already walked")}
    # a link to a folder outside the corpus is still walked, under the link's name
    _write(tmp_path, "outside/o.md", "# outside\n")
    (root / "elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)
    refs, _ = discover(root, DocumentsConfig(follow_symlinks=True))
    assert _rels(refs) == ["sub/deeper/real.md", "elsewhere/o.md"]


def test_hard_links_are_one_document_whatever_the_symlink_setting(tmp_path: Path) -> None:
    """Two names of one inode were both ingested (the same chunks twice) unless symlinks were followed."""
    root = tmp_path / "c"
    orig = _write(root, "orig.md", "# text\n")
    os.link(orig, root / "hardlink.md")
    for follow in (False, True):
        refs, skips = discover(root, DocumentsConfig(follow_symlinks=follow))
        assert _rels(refs) == ["hardlink.md"]
        assert [(Path(s.path).name, s.reason, s.detail) for s in skips] == [
            ("orig.md", "duplicate", f"the same file as {root / 'hardlink.md'}")]


def test_a_folder_and_its_subfolder_name_documents_the_same_in_any_order(tmp_path: Path) -> None:
    """["ov/sub", "ov"] named ov/sub/inner.md "inner.md" and skipped ov's walk into sub as an
    unreadable symlink loop; ["ov", "ov/sub"] named it "sub/inner.md"."""
    ov = tmp_path / "ov"
    _write(ov, "top.md", "# top\n")
    _write(ov, "sub/inner.md", "# inner\n")
    _write(ov, "sub/s2/deep.md", "# deep\n")  # a folder inside the inner source: it read as a symlink loop
    for order in ([ov / "sub", ov], [ov, ov / "sub"], [ov / "sub" / "inner.md", ov]):
        refs, skips = discover(order, DocumentsConfig())
        assert sorted(_rels(refs)) == ["sub/inner.md", "sub/s2/deep.md", "top.md"] and skips == [], (order, skips)


def test_special_files_and_unreadable_paths(tmp_path: Path) -> None:
    f = _write(tmp_path, "c/a.txt", "hello\n")
    os.mkfifo(tmp_path / "c" / "pipe.txt")
    refs, skips = discover(tmp_path / "c", DocumentsConfig())
    assert _rels(refs) == ["a.txt"]
    assert [(Path(s.path).name, s.reason, s.detail) for s in skips] == [
        ("pipe.txt", "unreadable", "not a regular file (fifo)")]
    # fails for root too: a path through a file
    _, skips = discover(str(f) + "/child.txt", DocumentsConfig())
    assert [s.reason for s in skips] == ["unreadable"] and "NotADirectoryError" in skips[0].detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root can list a chmod 000 folder")
def test_unreadable_folder(tmp_path: Path) -> None:
    _write(tmp_path, "ok/a.txt", "a")
    locked = tmp_path / "ok" / "locked"
    _write(locked, "b.txt", "b")
    locked.chmod(0)
    try:
        refs, skips = discover(tmp_path / "ok", DocumentsConfig())
    finally:
        locked.chmod(0o755)
    assert _rels(refs) == ["a.txt"]
    assert [(Path(s.path).name, s.reason) for s in skips] == [("locked", "unreadable")]


def test_extra_extensions() -> None:
    cfg = DocumentsConfig(extra_prose_extensions=[".adoc"], extra_code_extensions=["nb", ".py"])
    assert classify("x.adoc", cfg) == (PROSE, "text")
    assert classify("x.nb", cfg) == (CODE, "nb")
    assert classify("x.PY", cfg) == (CODE, "python")
    assert classify("x.weird", cfg) == (PROSE, "text")
    assert classify("x.png", cfg) is None


def test_skip_folders_are_never_walked_under_any_name(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    _write(root, "a.md", "text")
    out = root / "nested" / "out"  # the run's output inside its own corpus
    _write(out, "metrics.json", "{}")
    _write(out, "index/knn.json", "{}")
    (root / "alias").symlink_to(out, target_is_directory=True)
    cfg = DocumentsConfig(follow_symlinks=True)

    refs, skips = discover(root, cfg, skip_folders=[out])
    assert _rels(refs) == ["a.md"]
    assert sorted((Path(s.path).name, s.reason) for s in skips) == [("alias", "output_folder"), ("out", "output_folder")]
    # named as a source itself: still not walked; a folder that does not exist yet skips nothing
    refs, skips = discover([out, root / "a.md"], cfg, skip_folders=[str(out), tmp_path / "not-made-yet"])
    assert _rels(refs) == ["a.md"] and [s.reason for s in skips] == ["output_folder"]
    # without it the output's files are documents like any other
    assert any(rel.endswith("out/metrics.json") or rel == "alias/metrics.json" for rel in _rels(discover(root, cfg)[0]))


def test_output_folders_of_other_runs_are_recognised_by_their_listing(tmp_path: Path) -> None:
    from hades_gpu.store.layout import is_output_listing

    root = tmp_path / "corpus"
    _write(root, "a.md", "text")
    _write(root, "old-out/manifest-all.sqlite", b"SQLite format 3\x00")
    _write(root, "old-out/metrics.json", "{}")
    _write(root, "old-out/chunks/part-all-00000.parquet", b"PAR1")
    _write(root, "notes/manifest-2024.sqlite", b"x")  # a manifest without chunks/: an ordinary folder
    _write(root, "notes/todo.md", "text")
    refs, skips = discover(root, DocumentsConfig(), is_output_folder=is_output_listing)
    assert _rels(refs) == ["a.md", "notes/todo.md"]
    assert sorted((Path(s.path).name, s.reason) for s in skips) == [("manifest-2024.sqlite", "binary"), ("old-out", "output_folder")]
    refs, skips = discover(root / "old-out", DocumentsConfig(), is_output_folder=is_output_listing)
    assert refs == [] and [s.reason for s in skips] == ["output_folder"]  # named as the corpus: still skipped


def test_a_tree_deeper_than_the_recursion_limit_is_walked(tmp_path: Path) -> None:
    import subprocess
    import sys

    depth = sys.getrecursionlimit() + 200
    root = tmp_path / "corpus"
    folder = os.open(tmp_path, os.O_RDONLY)
    try:
        try:  # made one level at a time through descriptors (os.makedirs itself recurses per level)
            for name in ["corpus"] + ["d"] * depth:
                os.mkdir(name, dir_fd=folder)
                child = os.open(name, os.O_RDONLY, dir_fd=folder)
                os.close(folder)
                folder = child
            fd = os.open("deep.md", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=folder)
            os.write(fd, b"at the bottom")
            os.close(fd)
        finally:
            os.close(folder)
        _write(root, "top.md", "at the top")
        refs, skips = discover(root, DocumentsConfig())
        assert skips == [] and _rels(refs) == ["d/" * depth + "deep.md", "top.md"]
    finally:  # rm walks iteratively; shutil.rmtree (pytest's clean-up of tmp_path) recurses per level
        subprocess.run(["rm", "-rf", str(root)], check=True)


def test_sources_may_be_str_bytes_paths_or_any_iterable_of_them(tmp_path: Path) -> None:
    from hades_gpu.documents.discovery import source_list

    root = tmp_path / "corpus"
    _write(root, "a.md", "text")
    _write(root, "b.md", "text")
    assert source_list(os.fsencode(root)) == [str(root)]  # one bytes path, not its byte values
    assert source_list(root) == source_list(str(root)) == [str(root)]
    assert source_list(p for p in (root / "a.md", os.fsencode(root / "b.md"))) == [str(root / "a.md"), str(root / "b.md")]
    assert _rels(discover(os.fsencode(root), DocumentsConfig())[0]) == ["a.md", "b.md"]


def test_a_raw_byte_name_and_its_escaped_spelling_are_one_identity(tmp_path):
    """`caf\\xe9.txt` with the byte 0xE9 is stored as the text "caf\\\\xe9.txt"; a file whose name is
    spelt that way literally has the same identity (rel_path, doc id). Both were taken: two documents
    under one doc id damaged the output (hades-verify: rows mismatch) and each re-run swapped which
    one survived. The second is a `duplicate` now, whichever order the walk meets them in."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    raw = os.path.join(os.fsencode(corpus), b"caf\xe9.txt")
    with open(raw, "wb") as fh:
        fh.write(b"latin1 name file.\n")
    (corpus / "caf\\xe9.txt").write_text("literal backslash name file.\n")
    for _ in range(2):
        refs, skips = discover(corpus, DocumentsConfig())
        assert len(refs) == 1 and refs[0].rel_path == "caf\\xe9.txt"
        assert [s.reason for s in skips] == ["duplicate"] and "already taken by" in skips[0].detail
        # the two names print alike: said so (the line read as one file named twice)
        assert "another name, which reads the same once bytes that are not UTF-8 are written as \\xNN" \
            in skips[0].detail
    files = discover([raw.decode("utf-8", "surrogateescape"), str(corpus / "caf\\xe9.txt")], DocumentsConfig())
    assert len(files[0]) == 1 and [s.reason for s in files[1]] == ["duplicate"]


@pytest.mark.parametrize("order", ["link first", "file first"])
def test_a_file_given_by_its_name_and_by_a_link_is_one_document_under_its_own_name(tmp_path: Path, order) -> None:
    """[link, file] stored the file under the link's name and dropped its own silently; [file, link]
    under its own: two runs in either order made two documents of one file."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "keyword.py").write_text("import keyword\n")
    (tmp_path / "sub" / "kwlink.py").symlink_to("../keyword.py")
    given = [tmp_path / "sub" / "kwlink.py", tmp_path / "keyword.py"]
    refs, skips = discover(given if order == "link first" else given[::-1], DocumentsConfig())
    assert [r.rel_path for r in refs] == ["keyword.py"]
    assert [(s.path, s.reason) for s in skips] == [(str(tmp_path / "sub" / "kwlink.py"), "duplicate")]
    again, none = discover([tmp_path / "keyword.py", f"{tmp_path}/./keyword.py"], DocumentsConfig())
    assert [r.rel_path for r in again] == ["keyword.py"] and none == []  # one path named twice: no skip


def test_a_folder_and_a_folder_inside_it_count_each_skip_once(tmp_path: Path) -> None:
    """["c", "c/sub"]: a symlink in sub was skipped, and counted, twice."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "sub" / "link.md").symlink_to("../a.md")
    refs, skips = discover([tmp_path, tmp_path / "sub"], DocumentsConfig())
    assert [r.rel_path for r in refs] == ["a.md"]
    assert [(s.path, s.reason) for s in skips] == [(str(tmp_path / "sub" / "link.md"), "symlink")]


@pytest.mark.parametrize("given", [["L1/sub", "real"], ["real/sub", "L1"], ["L1/sub/y.md", "real"]])
def test_a_source_inside_another_only_through_a_link_is_not_a_second_copy(tmp_path: Path, given) -> None:
    """["L1/sub", "real"] with L1 -> real: the inner source was walked under the link's path, so
    real/sub/y.md was stored twice, as "sub/y.md" and "y.md" (and its skips counted twice)."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "x.md").write_text("x")
    (tmp_path / "real" / "sub" / "y.md").write_text("y")
    (tmp_path / "real" / "sub" / "sl.md").symlink_to("../x.md")
    (tmp_path / "L1").symlink_to("real")
    refs, skips = discover([tmp_path / g for g in given], DocumentsConfig())
    assert sorted(r.rel_path for r in refs) == ["sub/y.md", "x.md"]
    assert [s.reason for s in skips] == ["symlink"]


def test_scripts_without_an_extension_are_code_by_their_shebang_and_dockerfile_variants_are_code(tmp_path):
    """bin/deploy (#!/bin/bash) and scripts/tool (#!/usr/bin/env python3) were prose "text": no
    statement cuts, no import edges, prose overlap; so were Dockerfile.dev and Makefile.am."""
    from hades_gpu.documents.discovery import shebang_language

    files = {"scripts/tool": "#!/usr/bin/env python3\nimport os\nprint(os.getcwd())\n",
             "bin/deploy": "#!/bin/bash\nset -e\necho deploy\n",
             "bin/serve": "#!/usr/bin/env -S node --no-warnings\nconsole.log(1)\n",
             "bin/odd": "#!/opt/tools/frob\nfrob it\n",
             "README": "Plain words, no shebang.\n",
             "Dockerfile.dev": "FROM python:3.12\n", "Makefile.am": "all:\n\techo hi\n", "notes.txt": "#!not a script\n",
             "Gemfile.lock": "GEM\n  specs:\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    refs, _ = discover(tmp_path, DocumentsConfig())
    got = {r.rel_path: (r.modality, r.language) for r in refs}
    assert got == {"scripts/tool": (CODE, "python"), "bin/deploy": (CODE, "shell"), "bin/serve": (CODE, "javascript"),
                   "bin/odd": (CODE, "frob"), "README": (PROSE, "text"), "Dockerfile.dev": (CODE, "dockerfile"),
                   "Makefile.am": (CODE, "make"), "notes.txt": (PROSE, "text"), "Gemfile.lock": (PROSE, "text")}
    assert shebang_language(str(tmp_path / "missing")) is None
    # env's options, their values and VAR=value assignments are no interpreter (PYTHONPATH=/opt/app/lib read as "lib")
    for line, want in (("#!/usr/bin/env -S PYTHONPATH=/opt/app/lib python3", "python"),
                       ("#!/usr/bin/env -S uv run --script", "python"), ("#!/usr/bin/env -u FOO python3", "python"),
                       ("#!/usr/bin/env --chdir /tmp python3", "python"), ("#!/usr/bin/env -i PATH=/x bash", "shell"),
                       ("#!/usr/bin/env --split-string=python3 -u", "python"), ("#!/usr/bin/pypy3", "python"),
                       ("#!/", None), ("#! important: read this", None), ("#!" + "x" * 300, None)):
        (tmp_path / "s").write_text(line + "\nbody\n")
        assert shebang_language(str(tmp_path / "s")) == want, line
