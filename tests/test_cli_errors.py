"""Every failure a user can cause is one line `hades-<prog>: error: <cause>` on stderr, exit 2 or 1.

Real subprocesses (`python -m hades_gpu.ingest ...`), tiny corpora. 2: the command line or the
configuration (Hydra's own compose errors included); 1: the run failed. `--debug` and
`HADES_DEBUG=1` add the traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ingest(*args: str, env: dict | None = None, timeout: float = 120,
            module: str = "hades_gpu.ingest") -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("HADES_DEBUG", "HYDRA_FULL_ERROR")}
    environ.update({"PYTHONPATH": str(REPO), **(env or {})})
    cmd = [sys.executable, "-m", module] if module == "hades_gpu.ingest" else \
        [sys.executable, "-c", f"from hades_gpu.cli import {module}; {module}()"]
    return subprocess.run([*cmd, *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line(proc: subprocess.CompletedProcess, code: int, *needles: str, prog: str = "hades-ingest") -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.py").write_text("def area(r):\n    \"\"\"Circle area.\"\"\"\n    return 3.14159 * r * r\n")
    (root / "b.md").write_text("# Shapes\n\nThe `area` function gives a circle's area.\n")
    return root


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, corpus) -> Path:
    """One real ingest output (the base of the damaged-output cases)."""
    out = tmp_path_factory.mktemp("ingested") / "out"
    proc = _ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((out / "chunks").glob("part-*.parquet")), list(out.rglob("*"))
    return out


@pytest.mark.parametrize("override, needles", [
    ("nosuchkey=1", ["nosuchkey"]),
    ("embedder.url=http://127.0.0.1:8001", ["embedder.url must be host:port", "drop the scheme"]),
    ("embedder.retry_backoff_s=-1", ["embedder.retry_backoff_s", ">= 0"]),
    ("isne.epoch=3", ["unknown key 'isne.epoch' (did you mean 'isne.epochs'?)"]),  # not Hydra's "+isne.epoch", refused too
    ("profile.num_workers=abc", ["profile.num_workers", "abc"]),
    ("profile=nope", ["profile/nope", "balanced"]),
    ("embedder=nope", ["embedder/nope", "local"]),
    ("profile=null", ["config group", "not null"]),  # a 44-line traceback
    ("profile=[", ["["]),
    ("--badflag", ["--badflag"]),
    ("graph.knn_k=${oc.env:HADES_NO_SUCH_VAR}", ["HADES_NO_SUCH_VAR", "graph.knn_k"]),
    ("output=${oc.env:HADES_NO_SUCH_VAR}/out", ["HADES_NO_SUCH_VAR", "output="]),
])
def test_configuration_errors_are_one_line_exit_2(tmp_path, corpus, override, needles):
    proc = _ingest(f"corpus={corpus}", f"output={tmp_path / 'out'}", override)
    _assert_one_line(proc, 2, *needles)


def test_hydra_flag_clashes_yaml_errors_and_multirun_mode_commas(tmp_path, corpus):
    """Each was a traceback (a user's YAML file with a syntax error; -m with --cfg), or a sweep read
    as one path (hydra.mode=MULTIRUN corpus=a,b)."""
    conf = tmp_path / "myconf" / "profile"
    conf.mkdir(parents=True)
    (conf / "badyaml.yaml").write_text("name: badyaml\nnum_workers: [1\n")
    _assert_one_line(_ingest("--config-dir", str(tmp_path / "myconf"), "profile=badyaml", f"corpus={corpus}",
                             f"output={tmp_path / 'x'}"), 2, "a config file is not valid YAML", "badyaml.yaml")
    _assert_one_line(_ingest("-m", "profile=balanced,low_memory", f"corpus={corpus}", f"output={tmp_path / 'cf'}",
                             "--cfg", "job"), 2, "--multirun and --cfg cannot be given together")
    second = tmp_path / "c2"
    second.mkdir()
    (second / "b.md").write_text("Another corpus.\n")
    proc = _ingest("hydra.mode=MULTIRUN", f"corpus={corpus},{second}", f"output={tmp_path / 'hm'}", "isne.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len([p for p in (tmp_path / "hm").iterdir() if p.is_dir()]) == 2
    # a swept value with "/" made nested job folders (the job's output two levels down)
    nested = _ingest("-m", "documents.include=[**/*.md],[**/*.py]", f"corpus={corpus}", f"output={tmp_path / 'gl'}",
                     "isne.enabled=false")
    assert nested.returncode == 0, nested.stderr[-2000:]
    jobs = sorted(p.name for p in (tmp_path / "gl").iterdir() if p.is_dir())
    assert jobs == ["0_documents.include=[**_*.md],isne.enabled=False", "1_documents.include=[**_*.py],isne.enabled=False"]
    assert all((tmp_path / "gl" / job / "metrics.json").is_file() for job in jobs)
    # a user's profile file without `name:` is recorded under the name chosen, not the schema's "balanced"
    (conf / "noname.yaml").write_text("num_workers: 1\nmax_batch_tokens: 1024\n")
    named = _ingest("--config-dir", str(tmp_path / "myconf"), "profile=noname", f"corpus={corpus}",
                    f"output={tmp_path / 'nn'}", "isne.enabled=false")
    assert named.returncode == 0, named.stderr[-2000:]
    recorded = json.loads((tmp_path / "nn" / "metrics.json").read_text())["config"]["profile"]
    assert (recorded["name"], recorded["max_batch_tokens"]) == ("noname", 1024)


def test_a_corpus_path_escaped_for_hydra_is_read_as_hydra_reads_it(tmp_path):
    """`corpus=/data/my\\ docs\\,v2` (Hydra's own escapes) was taken with its backslashes without -m,
    while under -m Hydra unescaped it: the same command line read two folders."""
    folder = tmp_path / "my docs,v2"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n\nsome text to ingest\n")
    escaped = str(folder).replace(" ", "\\ ").replace(",", "\\,")
    proc = _ingest(f"corpus={escaped}", f"output={tmp_path / 'out'}", "isne.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["corpus"] == str(folder)


def test_a_relative_corpus_is_read_from_where_the_command_ran_even_with_hydra_job_chdir(tmp_path, corpus):
    rel = os.path.relpath(corpus, REPO)  # _ingest runs in REPO
    proc = _ingest(f"corpus={rel}", f"output={tmp_path / 'out'}", "hydra.job.chdir=true", "isne.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["documents"]["done"] >= 1


def test_missing_corpus_is_one_line_exit_2(tmp_path):
    proc = _ingest(f"corpus={tmp_path / 'nowhere'}", f"output={tmp_path / 'out'}")
    _assert_one_line(proc, 2, "corpus must be an existing file or folder")
    # refused before Hydra runs the job: it left `.hydra/` and an empty job log in the output
    assert not (tmp_path / "out").exists()


def test_a_corpus_of_no_documents_is_one_line_exit_1_and_an_emptied_one_exit_0(tmp_path):
    """A fresh output of no documents (a documents.include glob that matched nothing, a wrong folder)
    exited 0, and `hades-ingest ... && hades-isne ...` went on: now the NothingIngestedError line,
    exit 1. An emptied corpus re-run over an output that holds documents is no failure: one warning
    line, exit 0."""
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / ".hidden" / "a.md").write_text("# hidden\n")
    proc = _ingest(f"corpus={empty}", f"output={tmp_path / 'out'}")
    _assert_one_line(proc, 1, "nothing ingested: no documents found in", str(empty), "case-sensitive")
    assert not (tmp_path / "out" / "edges.parquet").exists()  # no graph of nothing
    (empty / "b.md").write_text("# visible\n\nSome text.\n")
    proc = _ingest(f"corpus={empty}", f"output={tmp_path / 'out'}", "isne.enabled=false")
    assert proc.returncode == 0 and "no documents found" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    (empty / "b.md").unlink()
    proc = _ingest(f"corpus={empty}", f"output={tmp_path / 'out'}", "isne.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "no documents found" in ln]
    assert len(said) == 1 and str(empty) in said[0] and "nothing to ingest" in said[0], proc.stderr[-3000:]


def test_debug_shows_the_traceback(tmp_path):
    for args, env in (((f"corpus={tmp_path / 'nowhere'}", f"output={tmp_path / 'out'}", "--debug"), None),
                      ((f"corpus={tmp_path / 'nowhere'}", f"output={tmp_path / 'out'}"), {"HADES_DEBUG": "1"})):
        proc = _ingest(*args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback (most recent call last)" in proc.stderr and "ConfigError" in proc.stderr, proc.stderr
        assert proc.stderr.rstrip().splitlines()[-1].startswith("hades-ingest: error: corpus must be"), proc.stderr


def test_output_that_is_a_file_is_one_line_exit_1(tmp_path, corpus):
    out = tmp_path / "out"
    out.write_text("a regular file\n")
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={out}"), 1, str(out))


def test_a_writer_process_that_dies_is_one_line_exit_1_and_a_rerun_completes(tmp_path, corpus):
    """The writer process is SIGKILLed (by itself, at a commit point: store.writer's kill points)."""
    from hades_gpu.store.writer import KILL_ENV

    out = tmp_path / "out"
    args = (f"corpus={corpus}", f"output={out}", "isne.enabled=false", "profile.writer=process")
    _assert_one_line(_ingest(*args, env={KILL_ENV: "after_part_written"}), 1,
                     "writer process (PID", "killed by SIGKILL", "ingested again by the next run")
    again = _ingest(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    from hades_gpu.store.reader import read_documents

    assert sorted(read_documents(out, ["rel_path"]).column("rel_path").to_pylist()) == ["a.py", "b.md"]


def test_manifest_that_is_not_sqlite_is_one_line_exit_1(tmp_path, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest-s0.sqlite").write_text("not a database, just a text file that is long enough " * 4)
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false"), 1, "manifest")


def test_a_corrupt_part_file_is_named_in_one_line_and_its_documents_ingested_again(tmp_path, corpus, ingested):
    """Verification at start (store.verify) finds the damaged part before anything reads it: the run
    names it in one warning line, re-ingests its documents and exits 0 with the output whole again."""
    from hades_gpu.store.reader import read_chunks

    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    expected = len(read_chunks(ingested))
    part = sorted((out / "chunks").glob("part-*.parquet"))[0]
    part.write_bytes(b"this is not parquet")
    proc = _ingest(f"corpus={corpus}", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    named = [ln for ln in (proc.stderr + proc.stdout).splitlines() if part.stem in ln and "damaged" in ln]
    assert len(named) == 1, proc.stderr[-3000:]
    assert len(read_chunks(out)) == expected



def test_a_truncated_chunk_part_is_named_by_search_with_what_rewrites_it(tmp_path, ingested):
    """pyarrow's "Error creating dataset ... magic bytes not found" named no file and no remedy."""
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    part = sorted((out / "chunks").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    _assert_one_line(_ingest(str(out), "circle area", module="search_main"), 1, f"damaged output file: committed part {part} (",
                     "an ingest into the same output", prog="hades-search")


def test_a_damaged_documents_part_and_a_new_file_are_repaired_in_one_run(tmp_path, corpus, ingested):
    """A file new to the output made the start look its absolute path up in the documents parts,
    before the start check had repaired them: pyarrow's error, exit 1, on every later run."""
    from hades_gpu.store.reader import read_chunks

    out, grown = tmp_path / "out", tmp_path / "grown"
    shutil.copytree(ingested, out)
    shutil.copytree(corpus, grown)
    (grown / "c.md").write_text("# New\n\nA document the output does not hold yet.\n")
    part = sorted((out / "documents").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    proc = _ingest(f"corpus={grown}", f"output={out}", "isne.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(part.stem in ln and "damaged" in ln for ln in (proc.stderr + proc.stdout).splitlines()), proc.stderr
    paths = read_chunks(out, ["path"]).column("path").to_pylist()
    assert len(paths) == len(read_chunks(ingested)) + 1 and str(grown / "c.md") in paths


def _small_filesystem(where: Path) -> bool:
    where.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_disk_full_is_one_line_exit_1_and_a_rerun_with_space_completes(tmp_path, corpus, ingested):
    disk = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    if not _small_filesystem(disk):
        pytest.skip(reason="needs root and `mount -t tmpfs` to make a real 1 MiB filesystem")
    try:
        # Nearly full: Hydra's config files fit, the manifest or the first part does not.
        with open(disk / "fill", "wb") as f:
            f.write(b"\0" * (1024 - 24) * 1024)
        line = _assert_one_line(_ingest(f"corpus={corpus}", f"output={disk / 'out'}", "isne.enabled=false"), 1,
                                "no space left on device")
        assert "re-run" in line
        # the promise of that line: free space, run again, and the output is whole, nothing twice
        (disk / "fill").unlink()
        proc = _ingest(f"corpus={corpus}", f"output={disk / 'out'}", "isne.enabled=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
        from hades_gpu.store.reader import read_chunks

        def rows(out):
            t = read_chunks(out, ["path", "ordinal", "text"]).to_pydict()
            return sorted((p.rsplit("/", 1)[-1], o, x) for p, o, x in zip(t["path"], t["ordinal"], t["text"]))
        assert rows(disk / "out") == rows(ingested)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_isne_on_a_folder_that_is_no_ingest_output_is_one_line_exit_2(tmp_path):
    proc = _ingest(f"output={tmp_path}", module="isne_main")
    _assert_one_line(proc, 2, "is not an ingest output", prog="hades-isne")  # a usage error, as search and verify
    assert not (tmp_path / "chunks").exists()  # nothing ingested into it
    # nor Hydra's run files left in what is often the user's own documents folder
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "cli.log").exists(), sorted(os.listdir(tmp_path))


def test_isne_without_an_ingest_output_leaves_nothing_behind(tmp_path):
    """No output=: Hydra made `outputs/<date>_<time>/` in the working folder, then the refusal left it
    there; a regular file as output= was exit 1 "File exists" where a folder is exit 2."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HADES_DEBUG", "HYDRA_FULL_ERROR")}
    environ["PYTHONPATH"] = str(REPO)
    (tmp_path / "afile").write_text("hi")

    def isne(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from hades_gpu.cli import isne_main; isne_main()", *args],
                              cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)

    _assert_one_line(isne(), 2, "output=<ingest output> is required", prog="hades-isne")
    _assert_one_line(isne(f"output={tmp_path / 'afile'}"), 2, "is not an ingest output (a file, not a folder)",
                     prog="hades-isne")
    _assert_one_line(isne("output=nowhere"), 2, "is not an ingest output (it does not exist)", prog="hades-isne")
    # output= and another hydra.run.dir: the job folder was trained, output= ignored silently
    _assert_one_line(isne(f"output={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'b'}"), 2,
                     "both name the output folder", prog="hades-isne")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_a_comma_in_the_output_under_multirun_is_refused_not_swept(tmp_path, corpus):
    """The output folder was swept: jobs in two folders, one relative to the working folder."""
    proc = _ingest("-m", f"corpus={corpus}", "profile=balanced,low_memory", f"output={tmp_path / 'run a'},v2")
    _assert_one_line(proc, 2, "output= names one folder", "escape the comma")
    assert not (tmp_path / "run a").exists() and not (REPO / "v2").exists()
    proc = _ingest("-m", f"corpus={corpus}", "profile=balanced,low_memory", f"hydra.run.dir={tmp_path / 'r'}")
    _assert_one_line(proc, 2, "hydra.run.dir names one run's folder and is not used under -m")


def test_multirun_after_the_overrides_says_where_it_goes(tmp_path, corpus):
    """It said "unrecognized arguments ... (Hydra overrides are key=value)": they were key=value."""
    proc = _ingest(f"corpus={corpus}", f"output={tmp_path / 'out'}", "-m", "profile=balanced,low_memory")
    _assert_one_line(proc, 2, "-m goes before the overrides")
    assert not (tmp_path / "out").exists()


def test_sweep_failure_is_one_line_too(tmp_path):
    proc = _ingest("-m", f"corpus={tmp_path / 'nowhere'}", f"output={tmp_path / 'out'}", "profile=balanced,low_memory")
    _assert_one_line(proc, 2, "corpus must be an existing file or folder")


def test_a_bug_keeps_its_traceback(tmp_path):
    code = ("import sys; from hades_gpu import cli\n"
            "def task(cfg, out): raise KeyError('a bug, not a user error')\n"
            "cli._ingest_task = task\n"
            "cli._run_hydra_app(cli._ingest_task, 'hades-ingest')\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("HADES_DEBUG", "HYDRA_FULL_ERROR")}
    proc = subprocess.run([sys.executable, "-c", code, f"output={tmp_path / 'out'}"], cwd=REPO,
                          env={**environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'a bug, not a user error'" in proc.stderr
    assert "hades-ingest: error:" not in proc.stderr


def test_file_names_with_control_characters_are_printed_escaped_on_one_line(tmp_path, corpus):
    """A name holding a newline or an escape sequence: the skip report and the error line each stay
    one line, with the characters written as \\n or \\x1b (stored paths keep them exactly)."""
    odd = tmp_path / "odd"
    shutil.copytree(corpus, odd)
    (odd / "bin\nary.txt").write_bytes(b"\x00\x01binary")
    (odd / "esc\x1b[31mred.txt").write_bytes(b"\x00colour")
    out = tmp_path / "out"
    proc = _ingest(f"corpus={odd}", f"output={out}", "isne.enabled=false", "monitoring.progress=off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [ln for ln in proc.stdout.splitlines() if ln.startswith("  skipped ")]
    assert sorted(skipped) == sorted([f"  skipped {odd}/bin\\nary.txt: binary: NUL byte at offset 0",
                                      f"  skipped {odd}/esc\\x1b[31mred.txt: binary: NUL byte at offset 0"])
    assert "\x1b" not in proc.stdout + proc.stderr
    # Hydra's override grammar cannot read such a value unquoted: it is quoted for the user (cli.
    # quote_path_overrides), the folder made with its exact name, and printed escaped
    quoted = _ingest(f"corpus={odd}", f"output={tmp_path / 'a'}\x1b[31mred", "isne.enabled=false",
                     "monitoring.progress=off")
    assert quoted.returncode == 0, quoted.stderr[-3000:]
    assert (tmp_path / "a\x1b[31mred").is_dir() and "\x1b" not in quoted.stdout + quoted.stderr
    assert "a\\x1b[31mred" in quoted.stdout
    # every document skipped: the error line names the first one escaped too (it was two lines)
    only = tmp_path / "only"
    only.mkdir()
    (only / "em\npty.txt").write_bytes(b"")
    nothing = _ingest(f"corpus={only}", f"output={tmp_path / 'none'}", "isne.enabled=false", "monitoring.progress=off")
    _assert_one_line(nothing, 1, "nothing ingested", "em\\npty.txt: empty")


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_resume_with_other_chunking_is_one_line_exit_1_and_changes_nothing(tmp_path, corpus, ingested, writer):
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "chunks").iterdir())
    proc = _ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false", "chunking.chunk_tokens=100",
                   f"profile.writer={writer}")
    _assert_one_line(proc, 1, f"{out} holds chunks made with chunking.chunk_tokens=254 (this run: 100)",
                     "new output folder")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "chunks").iterdir()) == before
    again = _ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false", "embedder.precision=fp32")
    assert again.returncode == 0 and "2 unchanged" in again.stdout, again.stderr[-2000:]  # precision may change


def test_a_resume_with_other_extra_extensions_is_one_line_exit_1(tmp_path, corpus, ingested):
    """`documents.extra_code_extensions=[txt]` on an output of prose .txt documents exited 0: the
    unchanged ones stayed prose, a new or edited one became code: both kinds in one output."""
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "chunks").iterdir())
    proc = _ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false", "documents.extra_code_extensions=[TXT]")
    _assert_one_line(proc, 1, f"{out} holds chunks made with documents.extra_code_extensions=[] (this run: ['.txt'])",
                     "new output folder")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "chunks").iterdir()) == before
    proc = _ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false", "documents.extra_prose_extensions=[py]")
    _assert_one_line(proc, 1, "documents.extra_prose_extensions=[] (this run: ['.py'])")


def test_a_manifest_that_is_not_sqlite_is_one_line_exit_1_for_search_and_verify_too(tmp_path, corpus, ingested):
    """hades-search printed a 35-line traceback, hades-verify called it a usage error (exit 2)."""
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    (out / "manifest-s0.sqlite").write_text("not a database, just a text file that is long enough " * 4)
    _assert_one_line(_ingest(str(out), "circle area", module="search_main"), 1, "manifest", "is damaged",
                     "move it aside", prog="hades-search")
    verify = subprocess.run([sys.executable, "-m", "hades_gpu.store.verify", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    _assert_one_line(verify, 1, "manifest", "is damaged", "move it aside", prog="hades-verify")
    # a folder where the manifest was: SQLite said "disk I/O error" / "unable to open database file"
    (out / "manifest-s0.sqlite").unlink()
    (out / "manifest-s0.sqlite").mkdir()
    needles = ("manifest-s0.sqlite is a folder, not a SQLite file", "remove it")
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false"), 1, *needles)
    verify = subprocess.run([sys.executable, "-m", "hades_gpu.store.verify", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    _assert_one_line(verify, 1, *needles, prog="hades-verify")


def test_a_folder_in_place_of_metrics_json_is_named_in_one_line(tmp_path, corpus, ingested):
    """The rename over it said "Is a directory" about a hidden temporary file, on every run."""
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    (out / "metrics.json").unlink()
    (out / "metrics.json").mkdir()
    proc = _ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false")
    line = _assert_one_line(proc, 1, f"{out / 'metrics.json'}: a folder stands where this file belongs", "remove it")
    assert ".tmp" not in line


def test_an_output_that_cannot_be_written_is_named_in_one_line_at_the_start(tmp_path, corpus, ingested):
    """SQLite's "unable to open database file" (no path) or pyarrow's text about a hidden temporary
    came mid-run. An immutable folder (chattr +i) stops root too; skipped where chattr cannot set it."""
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    grown = tmp_path / "grown"
    shutil.copytree(corpus, grown)
    (grown / "c.md").write_text("# More\n\nSomething new to write.\n")
    for folder in (out / "chunks", out):
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
        try:
            proc = _ingest(f"corpus={grown}", f"output={out}", "isne.enabled=false")
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        _assert_one_line(proc, 1, f"{folder}: cannot write in this output folder", "make it writable")
    assert _ingest(f"corpus={grown}", f"output={out}", "isne.enabled=false").returncode == 0  # writable again


def test_without_an_output_the_run_goes_to_the_documented_default_folder(tmp_path, corpus):
    """`output` unset (or empty) is Hydra's outputs/<date>_<time> in the working directory, as
    conf/config.yaml says; `-m` sweeps go to multirun/<date>_<time>. Both failed with "Incompatible
    value 'None' for field of type 'str'"."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HADES_DEBUG", "HYDRA_FULL_ERROR")}
    environ["PYTHONPATH"] = str(REPO)
    for args, parent in ([[], "outputs"], [["output="], "outputs"], [["-m", "chunking.overlap_tokens=16,32"], "multirun"]):
        cwd = tmp_path / uuid.uuid4().hex[:8]
        cwd.mkdir()
        proc = subprocess.run([sys.executable, "-m", "hades_gpu.ingest", *args, f"corpus={corpus}", "isne.enabled=false",
                               "monitoring.progress=off"], cwd=cwd, env=environ, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
        runs = list((cwd / parent).iterdir())
        assert len(runs) == 1, (args, runs)
        manifests = list(runs[0].rglob("manifest-*.sqlite"))
        assert len(manifests) == (2 if "-m" in args else 1), (args, manifests)


def test_an_output_that_is_the_corpus_folder_is_refused_before_anything_is_written(tmp_path):
    """Its manifest at the corpus root made every later run of that corpus take it for an ingest
    output and skip it whole; now one line, exit 2, and the corpus ingests elsewhere afterwards."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# Title\n\nSome prose to ingest.\n")
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={corpus}/", "isne.enabled=false"), 2,
                     "is the corpus folder", str(corpus))
    assert not list(corpus.glob("manifest-*")) and not list(corpus.glob(".lock-*")) and not (corpus / "chunks").exists()
    assert sorted(p.name for p in corpus.iterdir()) == ["a.md"]  # not even Hydra's .hydra/ and job log
    proc = _ingest(f"corpus={corpus}", f"output={tmp_path / 'out'}", "isne.enabled=false")
    assert proc.returncode == 0 and "1 document(s) ingested" in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_output_and_a_hydra_job_folder_that_disagree_are_refused_before_anything_is_written(tmp_path):
    """`output=o hydra.run.dir=rd` wrote everything to rd, ignored o silently, and recorded o in
    metrics.json; `hydra.run.dir=<corpus>` wrote `.hydra/` and a log into the corpus before the refusal."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# Title\n\nSome prose to ingest.\n")
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        _assert_one_line(_ingest(f"corpus={corpus}", f"output={tmp_path / 'o'}", f"{key}={tmp_path / 'rd'}",
                                 "isne.enabled=false"), 2, "both name the output folder", key)
    assert not (tmp_path / "o").exists() and not (tmp_path / "rd").exists()
    _assert_one_line(_ingest(f"corpus={corpus}", f"hydra.run.dir={corpus}", "isne.enabled=false"), 2,
                     "is the corpus folder")
    assert sorted(p.name for p in corpus.iterdir()) == ["a.md"]
    proc = _ingest(f"corpus={corpus}", f"hydra.run.dir={tmp_path / 'rd'}", "isne.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "rd" / "metrics.json").read_text())
    assert metrics["config"]["output"] == str(tmp_path / "rd")  # the folder really written


def test_hades_isne_while_an_ingest_writes_the_output_is_refused_in_one_line(tmp_path, ingested):
    """A graph built while a run still commits chunks misses them (it saved an empty graph and
    vectors, exit 0). Another process holding a shard's lock (a real flock, as a running
    hades-ingest holds it) makes hades-isne refuse, naming the holder; once it is gone the stage runs."""
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom hades_gpu.store.lock import OutputLock\n"
                               "OutputLock(sys.argv[1], 's0').acquire()\nprint('held', flush=True)\ntime.sleep(120)\n",
                               str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _assert_one_line(_ingest(f"output={out}", "isne.epochs=1", module="isne_main"), 1, "shard s0",
                                f"PID {holder.pid}", prog="hades-isne")
        assert "in use" in line
        assert not (out / "edges.parquet").exists()
    finally:
        holder.kill()
        holder.wait()
    proc = _ingest(f"output={out}", "isne.epochs=1", module="isne_main")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "edges.parquet").exists()


def test_hades_isne_that_trains_no_batch_exits_1_and_keeps_the_model(tmp_path, ingested):
    """A time budget shorter than one batch saved the untrained start over the model, exit 0."""
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    assert _ingest(f"output={out}", "isne.epochs=1", module="isne_main").returncode == 0
    model = (out / "isne" / "model.safetensors").read_bytes()
    proc = _ingest(f"output={out}", "isne.time_budget_s=1e-9", module="isne_main")
    _assert_one_line(proc, 1, "nothing trained", "the earlier model and its vectors are kept", prog="hades-isne")
    assert "ISNE untrained" in proc.stdout and (out / "isne" / "model.safetensors").read_bytes() == model


def test_a_job_log_that_cannot_be_opened_is_one_line_exit_1(tmp_path, corpus, ingested):
    """Hydra opens its job log in the output folder before the job runs; a read-only output (or a
    log name taken by a folder, as here) was a 58-line traceback ending in "Unable to configure
    handler 'file'"."""
    logs = [p.name for p in ingested.glob("*.log")]
    assert logs, list(ingested.iterdir())
    out = tmp_path / "out"
    for name in logs:
        (out / name).mkdir(parents=True)
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false"), 1, "Is a directory",
                     logs[0], "job log")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a folder nobody can create in)")
def test_an_output_folder_hydra_cannot_create_is_one_line_exit_1(corpus):
    """Hydra makes the job folder (the output) before the job runs; a path where no folder can be
    made (under /proc: ENOENT even for root) was Hydra's 41-line traceback."""
    _assert_one_line(_ingest(f"corpus={corpus}", "output=/proc/hades-no-such-folder/out", "isne.enabled=false"), 1,
                     "cannot create the output folder", "/proc/hades-no-such-folder")


@pytest.mark.parametrize("args", [["--help"], ["-m", "--help"]])
def test_a_reader_that_leaves_early_ends_the_command_quietly(args):
    """`hades-ingest --help | head -1`, `hades-search ... | head`: when the reader has gone, the
    command printed a BrokenPipeError traceback; now it ends quietly (exit 1, nothing on stderr but
    Python's own silence)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HADES_DEBUG", "HYDRA_FULL_ERROR")}
    environ["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "hades_gpu.ingest", *args], cwd=REPO, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_path_values_hydra_cannot_read_unquoted_are_quoted_for_the_user(tmp_path):
    """`corpus=café` was "LexerNoViableAltException" (exit 2, nothing said about quotes), as was an "="
    in a folder name; a path ending in spaces was silently read as its parent folder."""
    corpus = tmp_path / "café=1"
    corpus.mkdir()
    (corpus / "a.md").write_text("# Café\n\nSome text about coffee.\n")
    out = tmp_path / "out" / "é"
    proc = _ingest(f"corpus={corpus}", f"output={out}", "isne.enabled=false", "monitoring.progress=off",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from hades_gpu.store.reader import read_documents

    assert read_documents(out, ["rel_path"]).column("rel_path").to_pylist() == ["a.md"]

    spaces = tmp_path / "  "
    spaces.mkdir()
    _assert_one_line(_ingest(f"corpus={spaces}", f"output={tmp_path / 'o2'}"), 2,
                     "corpus= starts or ends with spaces", f"\"corpus='{spaces}'\"")
    assert not (tmp_path / "o2").exists()
    # a "," outside -m and a "'" are a path's too (Hydra said "ambiguous value" / a lexer error)
    odd = tmp_path / "notes, it's"
    odd.mkdir()
    (odd / "b.md").write_text("# Notes\n\nSome text about tea.\n")
    proc = _ingest(f"corpus={odd}", f"output={tmp_path / 'o4'}", "isne.enabled=false", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_documents(tmp_path / "o4", ["rel_path"]).column("rel_path").to_pylist() == ["b.md"]
    # a sweep's comma stays Hydra's to read; its error says how to quote
    _assert_one_line(_ingest("-m", "corpus=café,[x", f"output={tmp_path / 'o3'}"), 2, "needs quotes",
                     "key=\"'value'\"")


def test_sigterm_during_the_run_is_one_line_exit_143(tmp_path):
    """Covered end to end with a real run in tests/pipelines/test_ingest.py; here the unit: the
    handler is only installed where nobody else handles SIGTERM."""
    import signal

    from hades_gpu import cli

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cli._catch_sigterm()
        assert signal.getsignal(signal.SIGTERM) is cli.raise_terminated
        with pytest.raises(cli.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # delivered at the next bytecode boundary
                pass
        mine = lambda *a: None  # noqa: E731 - someone else's handler
        signal.signal(signal.SIGTERM, mine)
        cli._catch_sigterm()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_busy_prometheus_port_and_a_wrong_embedder_dim_are_one_line(tmp_path, corpus):
    """A taken `monitoring.prometheus_port` was a 75-line traceback (a parallel sweep with one fixed
    port lost every job but one); `embedder.dim=128` with the local model was a traceback too."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        _assert_one_line(_ingest(f"corpus={corpus}", f"output={tmp_path / 'o1'}", "isne.enabled=false",
                                 "monitoring.prometheus=true", f"monitoring.prometheus_port={port}"), 1,
                         f"127.0.0.1:{port}", "prometheus_port=0")
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={tmp_path / 'o2'}", "isne.enabled=false",
                             "embedder.dim=128"), 2, "embedder.dim must be 384")


def test_a_bad_value_in_one_sweep_job_is_one_line_and_the_other_jobs_run(tmp_path, corpus):
    """`-m profile.num_workers=1,-1,2`: the second job's ConfigError ended the sweep, and the valid
    third job never ran. Each failed job is now its line naming the job; the rest run; exit 2."""
    proc = _ingest("-m", f"corpus={corpus}", f"output={tmp_path / 'sweep'}", "profile.num_workers=1,-1,2",
                   "isne.enabled=false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hades-ingest: error: ")]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert "job 1 (" in lines[0] and "profile.num_workers=-1)" in lines[0], lines[0]
    assert "profile.num_workers must be >= 1" in lines[0]
    assert lines[1] == "hades-ingest: error: 1 job(s) of the sweep failed"
    done = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/manifest-*.sqlite"))
    assert [d[0] for d in done] == ["0", "2"] and all("profile.num_workers=" in d for d in done), done


def test_failed_jobs_of_a_joblib_sweep_count_in_the_exit_code(tmp_path, corpus):
    """Under `hydra/launcher=joblib_2` the jobs run in loky worker processes: every job failed, each
    printed its line, and the sweep exited 0 (a CI sweep passed with nothing ingested). The workers
    now leave their codes for the sweeping process: exit 2 and the summary line."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    proc = _ingest("-m", "hydra/launcher=joblib_2", f"corpus={corpus}", f"output={tmp_path / 'sweep'}",
                   "profile.num_workers=-1,-2", "isne.enabled=false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hades-ingest: error: ")]
    assert sorted(ln.partition(" (")[0] for ln in lines[:2]) == ["hades-ingest: error: job 0",
                                                                 "hades-ingest: error: job 1"], lines
    assert lines[2:] == ["hades-ingest: error: 2 job(s) of the sweep failed"], proc.stderr[-3000:]


def test_a_configuration_error_leaves_no_output_folder_behind(tmp_path, corpus):
    """`output=o profile.num_workers=-1`: one line, exit 2, and yet `o/` was made, holding Hydra's
    `.hydra/` and an empty `cli.log`. A folder that existed before is left as it was."""
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={tmp_path / 'o'}", "profile.num_workers=-1"), 2,
                     "profile.num_workers")
    assert not (tmp_path / "o").exists()
    (tmp_path / "kept").mkdir()
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={tmp_path / 'kept'}", "profile.num_workers=-1"), 2)
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())  # as it was: empty


@pytest.mark.parametrize(("code", "text"), [(errno.EFBIG, "File too large"),
                                            (errno.ELOOP, "Too many levels of symbolic links")])
def test_a_file_size_limit_and_a_link_loop_are_one_line(code, text):
    """`ulimit -f` hit mid-run (EFBIG from the slab memfd or a Parquet write) printed Hydra's
    traceback; so did a symbolic link loop in a path the user gave."""
    from hades_gpu.cli import classify_error

    assert classify_error(OSError(code, text, "/out/chunks/part-s0-00001.parquet")) == (
        1, f"/out/chunks/part-s0-00001.parquet: {text}")


def test_a_sweep_over_corpora_names_each_in_its_job_folder_and_never_ingests_its_own_files(tmp_path):
    """`-m corpus=a,b output=a/sweep`: Hydra's multirun.yaml in the sweep's folder (inside corpus a)
    was ingested as a document, and the job folders left the corpus out of their names, so a later
    `corpus=b,a` sweep resumed job 0 of the other corpus and held both."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "one.md").write_text("# One\n\nThe first corpus holds this note about circles.\n")
    (b / "two.md").write_text("# Two\n\nThe second corpus holds this note about squares.\n")
    sweep = a / "sweep"
    proc = _ingest("-m", f"corpus={a},{b}", f"output={sweep}", "isne.enabled=false", "monitoring.progress=off",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "multirun.yaml").is_file()
    from hades_gpu.store.reader import read_documents

    jobs = sorted(p for p in sweep.iterdir() if (p / "chunks").is_dir())
    assert len(jobs) == 2, list(sweep.iterdir())
    held = {job.name: sorted(Path(p).name for p in read_documents(job).column("path").to_pylist()) for job in jobs}
    assert sorted(held.values()) == [["one.md"], ["two.md"]], held  # not multirun.yaml
    for job, names in held.items():
        assert ("_a," in job or job.endswith("_a")) == (names == ["one.md"]), job  # the corpus is in the name


def test_hades_isne_refuses_a_sweep_before_making_folders(tmp_path, ingested):
    """`hades-isne -m isne.epochs=1,2 output=<ingest output>`: every job said the output was no ingest
    output (each trained `output/<job>`) and left those folders inside the dataset."""
    before = sorted(p.name for p in ingested.iterdir())
    _assert_one_line(_ingest("-m", "isne.epochs=1,2", f"output={ingested}", module="isne_main"), 2,
                     "-m", "hades-bench", prog="hades-isne")
    assert sorted(p.name for p in ingested.iterdir()) == before


def test_a_config_folder_that_holds_no_config_is_one_line(tmp_path, corpus):
    """HADES_GPU_CONF_DIR naming a folder without config.yaml: a 14-line traceback, exit 1."""
    for module, prog in (("hades_gpu.ingest", "hades-ingest"), ("bench_main", "hades-bench")):
        proc = _ingest(f"corpus={corpus}", f"output={tmp_path / 'o'}", module=module,
                       env={"HADES_GPU_CONF_DIR": str(tmp_path / "nowhere")})
        _assert_one_line(proc, 2, "no Hydra config found", prog=prog)


def test_a_sweep_with_many_overrides_gets_folder_names_the_filesystem_takes(tmp_path, corpus):
    """A dozen overrides made a job folder name over 255 bytes: "File name too long" and no job ran.
    The name is now cut and ends in a hash of the whole (two jobs, two folders)."""
    from hades_gpu.config import FOLDER_NAME_BYTES, folder_name

    long_keys = [f"profile.queue_max_bytes={2**24}", "profile.queue_max_items=128", "profile.high_watermark=0.8",
                 "profile.low_watermark=0.5", "profile.max_batch_size=16", "profile.lookahead_batches=16",
                 "profile.inflight_docs_per_worker=16", "profile.writer_rows_per_part=5000", "embedder.precision=fp32",
                 "chunking.overlap_tokens=32", "isne.enabled=false", "monitoring.progress=off"]
    proc = _ingest("-m", f"corpus={corpus}", f"output={tmp_path / 'sweep'}", "profile.num_workers=-1,-2", *long_keys)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hades-ingest: error: ")]
    assert len(lines) == 3 and all("profile.num_workers must be >= 1" in ln for ln in lines[:2]), proc.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(folders) == 2 and all(len(f.encode()) <= 255 for f in folders), folders
    assert folder_name("x" * 300) != folder_name("x" * 299 + "y") and len(folder_name("é" * 300).encode()) <= FOLDER_NAME_BYTES


def test_a_bench_configuration_error_is_said_once_and_leaves_no_folder(tmp_path, corpus):
    """`hades-bench bench.job=foo`: the reason was printed twice (a log line, then the error line) and
    the output folder was made, holding a result.json of the refused run."""
    proc = _ingest("bench.warmup_batches=-1", f"corpus={corpus}", f"output={tmp_path / 'o'}", module="bench_main")
    _assert_one_line(proc, 2, "bench.warmup_batches", prog="hades-bench")
    assert not (tmp_path / "o").exists()


def test_an_empty_output_is_refused_before_anything_is_written(tmp_path, corpus, ingested):
    """`hades-isne output=` run inside an ingest output left `outputs/<time>/` there and named that
    folder."""
    before = sorted(p.name for p in ingested.iterdir())
    proc = subprocess.run([sys.executable, "-c", "from hades_gpu.cli import isne_main; isne_main()", "output=",
                           "isne.epochs=1"], cwd=ingested, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    _assert_one_line(proc, 2, "output= is empty", prog="hades-isne")
    assert sorted(p.name for p in ingested.iterdir()) == before
    # hades-ingest's empty output= is Hydra's outputs/<date>_<time>/, as documented (the test below)


def test_hydra_mode_multirun_in_any_form_is_a_sweep_for_every_check(tmp_path, ingested):
    """`hydra.mode=MULTIRUN` (and `hydra.mode='MULTIRUN'`) got around the checks that asked for -m:
    a swept corpus went unnamed in the job folders (corpus=b,a resumed the other corpus's job) and
    hades-isne swept, leaving job folders inside the output."""
    from hades_gpu.cli import EXCLUDE_KEYS, is_sweep, name_swept_corpus

    for form in ("-m", "--multirun", "hydra.mode=MULTIRUN", "hydra.mode='MULTIRUN'", "++hydra.mode=MULTIRUN",
                 'hydra.mode="MULTIRUN"', "hydra.mode=2", "hydra.mode=+2", "hydra.mode=RunMode.MULTIRUN", "--multi",
                 "--mu"):
        assert is_sweep([form, "corpus=a,b"]), form
        assert name_swept_corpus([form, "corpus=a,b"])[-1] == f"{EXCLUDE_KEYS}=[output]", form
    assert not is_sweep(["hydra.mode=RUN", "corpus=a"]) and name_swept_corpus(["corpus=a"]) == ["corpus=a"]
    before = sorted(p.name for p in ingested.iterdir())
    _assert_one_line(_ingest(f"output={ingested}", "isne.epochs=2,3", "hydra.mode='MULTIRUN'", module="isne_main"), 2,
                     "-m", prog="hades-isne")
    assert sorted(p.name for p in ingested.iterdir()) == before


def test_an_empty_hydra_run_dir_is_refused_and_a_bench_run_dir_is_checked_before_hydra_writes(tmp_path, corpus,
                                                                                               ingested):
    """`hydra.run.dir=` put the output's files into the working folder itself (exit 0); `hades-bench
    hydra.run.dir=<ingest output>` was refused only after Hydra had rewritten the output's .hydra/."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "hades_gpu.ingest", f"corpus={corpus}", "hydra.run.dir="], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    _assert_one_line(proc, 2, "hydra.run.dir= is empty")
    assert list(tmp_path.iterdir()) == []
    overrides = (ingested / ".hydra" / "overrides.yaml").read_text()
    _assert_one_line(_ingest(f"corpus={corpus}", f"hydra.run.dir={ingested}", module="bench_main"), 2,
                     "is an ingest output", prog="hades-bench")
    assert (ingested / ".hydra" / "overrides.yaml").read_text() == overrides


def test_an_output_inside_an_emptied_corpus_is_no_failed_document(tmp_path):
    """The run's own output folder inside the corpus counted as a skipped document: an emptied corpus
    re-run exited 1 with "all 1 document(s) failed or were skipped (1 output_folder)", and a glob that
    matched nothing blamed the output folder instead of saying no document was found."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.md").write_text("# A\n\nSome prose about circles.\n")
    assert _ingest(f"corpus={corpus}", f"output={corpus / 'out'}", "isne.enabled=false").returncode == 0
    (corpus / "a.md").unlink()
    proc = _ingest(f"corpus={corpus}", f"output={corpus / 'out'}", "isne.enabled=false")
    assert proc.returncode == 0 and "no documents found" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    (corpus / "MAIN.PY").write_text("print('hi')\n")
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={corpus / 'fresh'}", "documents.include=[**/*.py]"), 1,
                     "no documents found in")


def test_a_graph_or_isne_device_that_is_not_there_is_refused_before_anything_is_embedded(tmp_path, corpus):
    """`gpu.device=cpu graph.device=cuda:3` on a box without it: the whole corpus was embedded and
    committed, then the graph stage failed (hours on a large corpus)."""
    _assert_one_line(_ingest(f"corpus={corpus}", f"output={tmp_path / 'o'}", "gpu.device=cpu", "graph.device=cuda:3"),
                     2, "graph.device=cuda:3")  # the setting named, not only the device
    assert not list((tmp_path / "o").glob("chunks/part-*.parquet"))


def test_hades_isne_help_prints_the_help(tmp_path):
    """`hades-isne --help` exited 2 with "output=<ingest output> is required"."""
    proc = _ingest("--help", module="isne_main")
    assert proc.returncode == 0 and "isne" in proc.stdout, proc.stderr[-2000:]
