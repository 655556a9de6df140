"""Workers start from any Python entry point (issue 12, item 1), and an all-failed run says so.

The README's Python example, written as a user writes it, run as a real subprocess (`sys.executable`)
from: (a) a plain script without a main guard, (b) `python - < script`, (c) `python -c`, (d) a Jupyter
kernel, (e) a Hydra app, (f) a joblib/loky worker. Each must ingest every good file of the sample
corpus (chunks in the output for each, no `worker_crashed`), and the marker the example writes at
module top level must be written exactly once: a worker process that re-imports the user's main
module writes it again. A run in which every document fails must exit non-zero with one line
saying why (the CLI) or raise (a script).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corpus_helpers import REPO, SAMPLE_CORPUS
from entry_point_helpers import MARKER, parse_result, readme_example

pytestmark = pytest.mark.slow

TIMEOUT_S = 180
GOOD = {p.name for p in SAMPLE_CORPUS.rglob("*") if p.is_file() and p.suffix != ".png"}  # diagram.png: skipped by name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("entry") / "corpus"
    shutil.copytree(SAMPLE_CORPUS, dest)
    return dest


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> Path:
    """Only files that every worker rejects (NUL bytes: `binary`), under text names."""
    dest = tmp_path_factory.mktemp("entry-bad") / "corpus"
    dest.mkdir()
    for i in range(3):
        (dest / f"notes{i}.txt").write_bytes(b"\x00\x01\x02binary\x00" * 200 + bytes(range(256)))
    return dest


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests" / "support"),
                                         *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    return env


def _run(cmd: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True, env=_env(), timeout=TIMEOUT_S)


def _problems(out: Path, mark: Path, stdout: str, stderr: str, rc: int) -> list[str]:
    """Everything wrong with a run of the example (empty: it worked)."""
    from hades_gpu.store.reader import read_chunks

    problems = []
    if rc != 0:
        problems.append(f"exit status {rc}")
    reasons: set[str] = set()
    metrics = out / "metrics.json"
    if metrics.is_file():
        reasons = {s.get("reason") for s in json.loads(metrics.read_text()).get("skipped", [])}
    try:
        reasons |= set(parse_result(stdout)["reasons"])
    except AssertionError:
        problems.append("no RESULT line printed")
    if "worker_crashed" in reasons:
        problems.append("documents came back worker_crashed")
    try:
        names = {Path(p).name for p in read_chunks(out, ["path"]).column("path").to_pylist()}
    except (FileNotFoundError, OSError) as err:
        names = set()
        problems.append(f"no chunks in the output ({err})")
    if GOOD - names:
        problems.append(f"no chunks for {sorted(GOOD - names)}")
    marks = mark.read_text().splitlines() if mark.exists() else []
    if len(marks) != 1:
        problems.append(f"the main module's top level ran {len(marks)} times (pids {marks}): "
                        f"the workers re-imported it")
    if problems:
        problems.append(f"stderr tail: {stderr.strip()[-1500:]}")
    return problems


def _paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "out", tmp_path / "marks.txt"


# ------------------------------------------------------------------------------------------------
# (a)-(c): a script file, standard input, -c
# ------------------------------------------------------------------------------------------------
def test_a_plain_script_without_main_guard(corpus, tmp_path):
    out, mark = _paths(tmp_path)
    script = tmp_path / "ingest_docs.py"
    script.write_text(readme_example(corpus, out, mark))
    proc = _run([sys.executable, str(script)], tmp_path)
    assert not _problems(out, mark, proc.stdout, proc.stderr, proc.returncode), \
        _problems(out, mark, proc.stdout, proc.stderr, proc.returncode)
    assert proc.stdout.count(MARKER) == 1


def test_b_script_on_standard_input(corpus, tmp_path):
    out, mark = _paths(tmp_path)
    proc = _run([sys.executable, "-"], tmp_path, stdin=readme_example(corpus, out, mark))
    problems = _problems(out, mark, proc.stdout, proc.stderr, proc.returncode)
    assert not problems, problems


def test_b_script_on_standard_input_with_the_writer_in_its_own_process(corpus, tmp_path):
    """The writer process starts as `python -m`, as the workers do: the user's main module (here
    '<stdin>', which cannot be re-imported at all) runs once."""
    out, mark = _paths(tmp_path)
    proc = _run([sys.executable, "-"], tmp_path,
                stdin=readme_example(corpus, out, mark, extra=("profile.writer=process",)))
    problems = _problems(out, mark, proc.stdout, proc.stderr, proc.returncode)
    assert not problems, problems
    assert json.loads((out / "metrics.json").read_text())["writer"] == "process"


def test_c_python_dash_c(corpus, tmp_path):
    out, mark = _paths(tmp_path)
    proc = _run([sys.executable, "-c", readme_example(corpus, out, mark)], tmp_path)
    problems = _problems(out, mark, proc.stdout, proc.stderr, proc.returncode)
    assert not problems, problems


# ------------------------------------------------------------------------------------------------
# (d) a Jupyter kernel
# ------------------------------------------------------------------------------------------------
def test_d_jupyter_kernel(corpus, tmp_path):
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")
    jupyter_client = pytest.importorskip("jupyter_client",
                                         reason="jupyter_client is not installed (pip install -e '.[test]')")
    out, mark = _paths(tmp_path)
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(env=_env(), cwd=str(tmp_path))
    stdout, error = [], None
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(readme_example(corpus, out, mark))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            msg = kc.get_iopub_msg(timeout=max(1.0, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                stdout.append(content["text"])
            elif kind == "error":
                error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                break
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    problems = _problems(out, mark, "".join(stdout), error or "", 1 if error else 0)
    assert not problems, problems


# ------------------------------------------------------------------------------------------------
# (e) a Hydra app, (f) a joblib/loky worker
# ------------------------------------------------------------------------------------------------
HYDRA_APP = '''\
import os
with open({mark!r}, "a") as _m:
    _m.write(f"{{os.getpid()}}\\n")

import json
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="ingest_app")
def app(cfg: DictConfig) -> None:
    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines import TextParallelPipeline

    config = load_pipeline_config(profile=cfg.profile, overrides=["isne.enabled=false", "monitoring.progress=off"])
    result = TextParallelPipeline(config).process_batch([{corpus!r}], output={output!r})
    print("RESULT " + json.dumps({{"documents_ingested": result.documents_ingested,
                                  "chunks_written": result.chunks_written,
                                  "reasons": sorted({{s["reason"] for s in result.skipped}})}}), flush=True)


if __name__ == "__main__":
    app()
'''


def test_e_hydra_app(corpus, tmp_path):
    out, mark = _paths(tmp_path)
    app = tmp_path / "ingest_app.py"
    app.write_text(HYDRA_APP.format(mark=str(mark), corpus=str(corpus), output=str(out)))
    (tmp_path / "ingest_app.yaml").write_text("profile: low_memory\n")
    proc = _run([sys.executable, str(app), f"hydra.run.dir={tmp_path / 'hydra'}"], tmp_path)
    problems = _problems(out, mark, proc.stdout, proc.stderr, proc.returncode)
    assert not problems, problems


LOKY_DRIVER = '''\
import os
with open({mark!r}, "a") as _m:
    _m.write(f"{{os.getpid()}}\\n")
import json
from joblib import Parallel, delayed
from entry_point_helpers import run_readme_example

[result] = Parallel(n_jobs=1, backend="loky")([delayed(run_readme_example)({corpus!r}, {output!r})])
print("RESULT " + json.dumps(result), flush=True)
'''


def test_f_joblib_loky_worker(corpus, tmp_path):
    pytest.importorskip("joblib", reason="joblib is not installed")
    out, mark = _paths(tmp_path)
    code = LOKY_DRIVER.format(mark=str(mark), corpus=str(corpus), output=str(out))
    proc = _run([sys.executable, "-c", code], tmp_path)
    problems = _problems(out, mark, proc.stdout, proc.stderr, proc.returncode)
    assert not problems, problems


# ------------------------------------------------------------------------------------------------
# every document failed
# ------------------------------------------------------------------------------------------------
def _hades_ingest() -> list[str]:
    script = Path(sys.executable).with_name("hades-ingest")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hades_gpu.ingest"]


def test_cli_run_where_every_document_failed_exits_non_zero_with_one_line(bad_corpus, tmp_path):
    proc = _run([*_hades_ingest(), f"corpus={bad_corpus}", f"output={tmp_path / 'out'}", "profile=low_memory",
                 "isne.enabled=false", "monitoring.progress=off"], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hades-ingest: error:")]
    assert proc.returncode != 0, f"exit status 0 though every document failed; stdout: {proc.stdout.strip()[-800:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "document" in errors[0].lower(), errors[0]


def test_script_run_where_every_document_failed_raises(bad_corpus, tmp_path):
    out, mark = _paths(tmp_path)
    body = readme_example(bad_corpus, out, mark)
    script = tmp_path / "ingest_bad.py"  # guarded, so that only the all-failed behaviour is tested here
    script.write_text('if __name__ == "__main__":\n' + textwrap.indent(body, "    "))
    proc = _run([sys.executable, str(script)], tmp_path)
    assert proc.returncode != 0, f"exit status 0 though every document failed; stdout: {proc.stdout.strip()[-800:]}"
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "document" in last.lower(), proc.stderr[-2000:]


def test_a_run_without_a_torch_embedder_never_imports_torch(corpus, tmp_path):
    """The slab ring page-locks only where torch is already loaded (a CUDA embedder imported it): a
    CPU-only or Triton run must not pay torch's import (~2 s of CPU, ~0.5 GiB) on the way."""
    script = textwrap.dedent(f"""
        import sys
        from hades_gpu.config import load_pipeline_config
        from hades_gpu.pipelines import TextParallelPipeline
        from hades_gpu.benchmarks.feed_bench import ZeroCostEmbedder
        cfg = load_pipeline_config(profile="low_memory")
        cfg.isne.enabled = False
        res = TextParallelPipeline(cfg, embedder=ZeroCostEmbedder()).process_batch([{str(corpus)!r}], output={str(tmp_path / "out")!r})
        print("RESULT", res.chunks_written, "torch" in sys.modules)
    """)
    proc = _run([sys.executable, "-c", script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0].split()
    assert int(line[1]) > 0 and line[2] == "False"


def test_the_workers_process_function_imports_only_the_documents_layer(tmp_path):
    """What a worker unpickles (the pool's process function, as the ingest pipeline passes it, and its
    config dataclasses) must not drag the pipelines, store or orchestration stages (pyarrow), nor
    omegaconf/Hydra, into every worker's start-up."""
    import pickle

    from hades_gpu.pipelines import ingest

    from hades_gpu.config import load_pipeline_config

    cfg = load_pipeline_config(profile="balanced")
    payload = pickle.dumps((ingest.process_document_as, (cfg.documents, cfg.chunking)))
    script = textwrap.dedent(f"""
        import pickle, sys
        import hades_gpu.orchestration.worker_main
        fn, cfgs = pickle.loads({payload!r})
        heavy = sorted(m for m in sys.modules if m.startswith(("hades_gpu.pipelines", "hades_gpu.store",
                                                                "hades_gpu.orchestration.pipeline", "pyarrow", "torch",
                                                                "omegaconf", "hydra")))
        print("RESULT", fn.__module__, heavy)
    """)
    proc = _run([sys.executable, "-c", script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
    assert line == "RESULT hades_gpu.documents.chunking []", line


_CUT_IMPORT_SCRIPT = """
import importlib.abc, os, signal, sys
class CtrlCInTorchsImport(importlib.abc.MetaPathFinder):
    fired = False
    def find_spec(self, name, path, target=None):
        if name == "torch.nn" and not CtrlCInTorchsImport.fired:  # half-way through torch's own __init__
            CtrlCInTorchsImport.fired = True
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlCInTorchsImport())
from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines import TextParallelPipeline
p = TextParallelPipeline(load_pipeline_config(overrides=["isne.enabled=false"]))
try:
    p.process_batch([sys.argv[1]], output=sys.argv[2])
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", CtrlCInTorchsImport.fired)
result = p.process_batch([sys.argv[1]], output=sys.argv[2])
print("again", result.documents_ingested + result.documents_unchanged)
"""


def test_ctrl_c_during_the_first_runs_imports_leaves_the_next_call_working(corpus, tmp_path):
    """Ctrl-C in the first ~2 s of the first `process_batch` landed in torch's lazy import: torch
    stayed half-initialised and every later call in the process (a notebook's next cell) failed or
    segfaulted. The Ctrl-C now takes effect once the import is done: the call is interrupted, the
    next one works. The signal is sent from an import hook, so it lands inside torch's import."""
    proc = subprocess.run([sys.executable, "-c", _CUT_IMPORT_SCRIPT, str(corpus), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "interrupted True" and lines[-1] == f"again {len(GOOD)}", (proc.stdout, proc.stderr[-2000:])
