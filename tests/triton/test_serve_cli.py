"""`hades-serve` (serve_cli): prints the gRPC address once ready, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hades_gpu.embedding.triton import embedder_for
from hades_gpu.embedding.triton_server import TritonServer, TritonServerError, free_port

from triton_helpers import UNAVAILABLE


def _serve_command() -> list[str]:
    exe = shutil.which("hades-serve", path=os.path.dirname(sys.executable))
    try:  # the console script, once the CLI wires it; else the function it calls
        from hades_gpu import cli

        if exe and hasattr(cli, "serve_main"):
            return [exe]
    except ImportError:
        pass
    return [sys.executable, "-c", "from hades_gpu.embedding.triton_server import serve_cli; raise SystemExit(serve_cli())"]


@pytest.mark.skipif(bool(UNAVAILABLE), reason=f"tritonserver cannot run here: {UNAVAILABLE}")
def test_hades_serve_prints_address_and_stops_on_sigterm(tmp_path):
    port = free_port()
    log_file = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [*_serve_command(), "--grpc-port", str(port), "--log-file", str(log_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # blocks until ready (or the process dies)
        assert line.strip() == f"gRPC 127.0.0.1:{port}", (line, proc.stderr.read() if proc.poll() else "")
        emb = embedder_for(f"127.0.0.1:{port}")
        emb.close()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Started GRPCInferenceService at 127.0.0.1" in log_file.read_text()
    with pytest.raises(Exception):  # the server is gone with it
        embedder_for(f"127.0.0.1:{port}")


@pytest.mark.skipif(bool(UNAVAILABLE), reason=f"tritonserver cannot run here: {UNAVAILABLE}")
def test_a_tritonserver_killed_under_hades_serve_is_one_line_exit_1(tmp_path):
    """SIGKILL of the server (the OOM killer, say): hades-serve exited 247 (-9 handed to sys.exit)
    with a line ending in an empty ": "; it is exit 1 now, saying how the server ended."""
    port = free_port()
    proc = subprocess.Popen([*_serve_command(), "--grpc-port", str(port), "--log-file", str(tmp_path / "serve.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == f"gRPC 127.0.0.1:{port}", proc.stderr.read() if proc.poll() else ""
        details = proc.stdout.readline()
        server_pid = int(details.split(" pid ")[1].split()[0])
        os.kill(server_pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        lines = [ln for ln in proc.stderr.read().splitlines() if ln.startswith("hades-serve:")]
        assert len(lines) == 1 and "exited on its own (killed by SIGKILL; log " in lines[0], lines
        assert not lines[0].rstrip().endswith(":")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.skipif(bool(UNAVAILABLE), reason=f"tritonserver cannot run here: {UNAVAILABLE}")
def test_a_dead_python_backend_process_stops_hades_serve_with_one_line(tmp_path):
    """SIGKILL of a model's backend stub (the OOM killer): Triton never starts it again and goes on
    answering ready, every request failing "Stub process ... is not healthy", while hades-serve said
    nothing. It now stops the server: one line naming the model, exit 1."""
    import psutil

    port = free_port()
    proc = subprocess.Popen([*_serve_command(), "--grpc-port", str(port), "--log-file", str(tmp_path / "serve.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == f"gRPC 127.0.0.1:{port}", proc.stderr.read() if proc.poll() else ""
        server_pid = int(proc.stdout.readline().split(" pid ")[1].split()[0])
        stubs = [c for c in psutil.Process(server_pid).children() if "triton_python_backend_stub" in c.name()
                 or any("minilm_python" in a for a in c.cmdline()[1:2])]
        assert stubs, [c.cmdline() for c in psutil.Process(server_pid).children()]
        os.kill(stubs[0].pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        lines = [ln for ln in proc.stderr.read().splitlines() if ln.startswith("hades-serve:")]
        assert len(lines) == 1 and "the Python backend process of model minilm_python" in lines[0], lines
        assert "restart hades-serve" in lines[0]
        assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_unknown_model_is_refused_before_start(tmp_path):
    with pytest.raises(TritonServerError, match="has no config.pbtxt"):
        TritonServer(models=["no_such_model"])


@pytest.mark.skipif(bool(UNAVAILABLE), reason=f"tritonserver cannot run here: {UNAVAILABLE}")
def test_failed_model_load_reports_log_tail(tmp_path):
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 4\n'
                                                   'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                                   'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    (repo / "broken" / "1" / "model.py").write_text("raise RuntimeError('model file is broken on purpose')\n")
    t0 = time.monotonic()
    with pytest.raises(TritonServerError) as info:
        TritonServer(repo, ["broken"], ready_timeout_s=60).start()
    assert "broken on purpose" in str(info.value) and time.monotonic() - t0 < 60


@pytest.mark.skipif(bool(UNAVAILABLE), reason=f"tritonserver cannot run here: {UNAVAILABLE}")
def test_sigterm_while_the_models_load_stops_at_once_and_prints_no_address(tmp_path):
    """The stop request was only looked at once the server was ready: a model loading for minutes
    kept hades-serve running, then it printed the address of a server it was about to stop."""
    from pathlib import Path

    from hades_gpu.embedding.triton_server import default_model_repository

    repo = tmp_path / "repo"
    (repo / "slow" / "1").mkdir(parents=True)
    config = (Path(default_model_repository()) / "minilm_python" / "config.pbtxt").read_text()
    (repo / "slow" / "config.pbtxt").write_text(config.replace('name: "minilm_python"', 'name: "slow"'))
    (repo / "slow" / "1" / "model.py").write_text(
        "import time\n\n\nclass TritonPythonModel:\n    def initialize(self, args):\n        time.sleep(300)\n\n"
        "    def execute(self, requests):\n        return []\n")
    log_file = tmp_path / "serve.log"
    proc = subprocess.Popen([*_serve_command(), "--grpc-port", str(free_port()), "--model-repository", str(repo),
                             "--models", "slow", "--log-file", str(log_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "slow" not in (log_file.read_text(errors="replace") if log_file.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no load"
            time.sleep(0.2)
        time.sleep(1.0)  # the model's initialize() is sleeping now
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 30 and proc.returncode == 0, (proc.returncode, err)
        assert "gRPC" not in out, out
        assert "stopped before the server was ready" in err, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("port", ["70000", "-5", "abc"])
def test_a_port_out_of_range_is_refused_in_one_line(port):
    """--grpc-port 70000 served on 4464 (the kernel keeps 16 bits) while the address printed said 70000."""
    proc = subprocess.run([*_serve_command(), "--grpc-port", port], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--grpc-port" in lines[0], proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(bool(UNAVAILABLE), reason=f"tritonserver cannot run here: {UNAVAILABLE}")
def test_a_port_in_use_and_a_ready_timeout_are_said_in_words(tmp_path):
    """A taken gRPC port printed ~650 characters of gRPC core's own report; a ready timeout of 0.5 s
    read "not ready after 0 s ...: " with nothing after the colon."""
    import socket

    from hades_gpu.embedding.triton_server import TritonServer, TritonServerError, default_model_repository

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(TritonServerError) as info:
            TritonServer(default_model_repository(), ["minilm_python"], grpc_port=port,
                         log_file=tmp_path / "taken.log").start()
    finally:
        taken.close()
    message = str(info.value)
    assert f"the gRPC port 127.0.0.1:{port} is already in use (another server?): choose another port" in message
    assert len(message) < 300, message
    with pytest.raises(TritonServerError, match=r"not ready within 0.5 s \(the ready timeout ran out; log "):
        TritonServer(default_model_repository(), ["minilm_python"], ready_timeout_s=0.5,
                     log_file=tmp_path / "slow.log").start()


def test_a_log_file_under_a_regular_file_says_a_folder_was_expected(tmp_path, capsys):
    """`--log-file afile/x.log` said "afile: File exists", true but not the cause; hades-ingest says
    what it means. Refused before any server starts."""
    from hades_gpu.embedding.serve_cli import serve_cli

    (tmp_path / "afile").write_text("")
    assert serve_cli(["--log-file", str(tmp_path / "afile" / "x.log")]) == 1
    assert capsys.readouterr().err.strip() == (f"hades-serve: error: {tmp_path / 'afile'}: File exists (a folder was "
                                               "expected; is the path an existing file?)")


@pytest.mark.parametrize("args, needle", [(["--ready-timeout", "-5"], "--ready-timeout: must be > 0 seconds"),
                                          (["--ready-timeout", "0"], "--ready-timeout: must be > 0 seconds"),
                                          (["--grpc-port", "18151", "--http-port", "18151"],
                                           "--grpc-port and --http-port are both 18151")])
def test_a_bad_ready_timeout_and_one_port_for_two_services_are_refused_in_one_line(args, needle):
    """`--ready-timeout -5` started a server and gave up at once; one port for gRPC and HTTP printed
    pieces of tritonserver's usage text."""
    proc = subprocess.run([*_serve_command(), *args], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(bool(UNAVAILABLE), reason=f"tritonserver cannot run here: {UNAVAILABLE}")
@pytest.mark.parametrize("service", ["http", "metrics"])
def test_a_taken_http_or_metrics_port_prints_no_ready_lines(tmp_path, service):
    """Only the gRPC endpoint was awaited: with the HTTP or metrics port taken, hades-serve printed its
    ready lines, then exited 1 when tritonserver gave up a moment later. Now: no ready line, exit 2,
    the port named."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        proc = subprocess.run([*_serve_command(), f"--{service}-port", str(port), "--log-file",
                               str(tmp_path / "s.log")], capture_output=True, text=True, timeout=240)
    finally:
        taken.close()
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    assert proc.stdout == "", proc.stdout
    kind = {"http": "HTTP", "metrics": "metrics"}[service]
    assert f"the {kind} port 127.0.0.1:{port} is already in use" in proc.stderr, proc.stderr[-2000:]
