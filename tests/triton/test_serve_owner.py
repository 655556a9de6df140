"""`hades-serve`'s tritonserver dies with it, however it dies; its temporary folders do not outlive it.

Real `hades-serve` processes in their own session, with `TMPDIR` pointing into the test's folder (so
the folders looked at are this test's only).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hades_gpu.embedding.triton_server import OWNER_FILE, SHM_PREFIX, WORKDIR_PREFIX, sweep_stale

from triton_helpers import UNAVAILABLE

REPO = Path(__file__).resolve().parents[2]
needs_server = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"tritonserver cannot run here: {UNAVAILABLE}")


def _start_serve(tmp: Path) -> tuple[subprocess.Popen, int, int]:
    """A `hades-serve` in its own session; returns it, its tritonserver's PID and gRPC port once ready."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-c", "from hades_gpu.cli import serve_main; serve_main()"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    grpc = proc.stdout.readline()
    details = proc.stdout.readline()
    if not grpc.startswith("gRPC "):
        proc.kill()
        pytest.fail(f"hades-serve did not start: {grpc!r} {proc.stderr.read()[-2000:]}")
    port = int(grpc.strip().rsplit(":", 1)[1])
    server_pid = int(details.split(" pid ")[1].split()[0])
    assert psutil.Process(server_pid).ppid() == proc.pid
    return proc, server_pid, port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_state(owner_pid: int, server_pid: int, tmp: Path) -> str:
    """Where a stop hangs: both processes' states and the server log's last lines."""
    def state(pid: int) -> str:
        try:
            p = psutil.Process(pid)
            return f"{p.status()} ({', '.join(c.name() for c in p.children(recursive=True)) or 'no children'})"
        except psutil.NoSuchProcess:
            return "gone"
    logs = sorted(tmp.glob(f"{WORKDIR_PREFIX}*/tritonserver.log"))
    tail = logs[0].read_text(errors="replace").splitlines()[-5:] if logs else []
    return f"hades-serve {state(owner_pid)}, tritonserver {state(server_pid)}, log tail {tail}"


def _workdirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob(f"{WORKDIR_PREFIX}*"))


@needs_server
@pytest.mark.parametrize("how", ["process group", "pid"])
def test_sigkill_of_hades_serve_takes_tritonserver_down(tmp_path, how):
    proc, server_pid, port = _start_serve(tmp_path)
    try:
        assert _port_open(port) and len(_workdirs(tmp_path)) == 1
        (owner_pid, _, recorded_server) = (_workdirs(tmp_path)[0] / OWNER_FILE).read_text().split()
        assert (int(owner_pid), int(recorded_server)) == (proc.pid, server_pid)
        if how == "process group":
            os.killpg(proc.pid, signal.SIGKILL)  # tritonserver runs in a session of its own: not in this group
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        try:
            psutil.Process(server_pid).wait(20)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            pytest.fail(f"tritonserver pid {server_pid} still runs {time.monotonic() - t0:.0f} s after its owner died")
        assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
        assert not _port_open(port)
    finally:
        if psutil.pid_exists(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The folder of the dead owner stays until the next start sweeps it (with its shared memory).
    (stale,) = _workdirs(tmp_path)
    shm = Path(f"/dev/shm/{SHM_PREFIX}{proc.pid}_test_{os.getpid()}")
    if Path("/dev/shm").is_dir():
        shm.write_bytes(b"x")
    assert sweep_stale(tmp_path) == [stale] and not stale.exists()
    assert not shm.exists()


@needs_server
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop_removes_the_temporary_folder(tmp_path, signum):
    proc, server_pid, port = _start_serve(tmp_path)
    try:
        assert len(_workdirs(tmp_path)) == 1
        os.kill(proc.pid, signum)
        try:  # communicate: its pipes are read while it stops, so a full pipe can never hold it up
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"hades-serve still runs 60 s after {signum.name}: {_stop_state(proc.pid, server_pid, tmp_path)}")
        assert proc.returncode == 0, err
        assert err.strip().splitlines()[-1] == "hades-serve: stopping tritonserver", err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not psutil.pid_exists(server_pid) and not _port_open(port)
    assert _workdirs(tmp_path) == []


def test_sweep_keeps_live_owners_and_removes_dead_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f"{WORKDIR_PREFIX}{os.getpid()}-live"
    gone = tmp_path / f"{WORKDIR_PREFIX}{dead.pid}-gone"
    fresh = tmp_path / f"{WORKDIR_PREFIX}unmarked"  # no owner file yet, just made: left alone
    for folder in (live, gone, fresh):
        (folder / "backends").mkdir(parents=True)
    (live / OWNER_FILE).write_text(f"{os.getpid()} {psutil.Process().create_time()} 0\n")
    (gone / OWNER_FILE).write_text(f"{dead.pid} {time.time() - 5} 0\n")
    assert sweep_stale(tmp_path) == [gone]
    assert live.exists() and fresh.exists() and not gone.exists()


def _serve_once(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    return subprocess.run([sys.executable, "-c", "from hades_gpu.cli import serve_main; serve_main()", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_bad_flag_is_one_line_exit_2(tmp_path):
    proc = _serve_once(tmp_path, "--bogus")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("hades-serve: error: "), proc.stderr


@needs_server
def test_unwritable_log_file_is_one_line_exit_1_and_leaves_no_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = _serve_once(tmp_path, "--log-file", str(blocker / "serve.log"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("hades-serve: error: "), proc.stderr
    assert str(blocker) in lines[0]
    assert _workdirs(tmp_path) == []
