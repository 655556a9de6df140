"""Start, watch and stop a real Triton Inference Server on the project's model repository.

Two places a `tritonserver` comes from:

* a system install (`tritonserver` on `PATH`, as in NVIDIA's container): used as is, with its own
  backends (ONNX Runtime, OpenVINO, TensorRT, Python);
* the `nvidia-pytriton` wheel (extra `serve`): a complete server 2.51 with the Python backend only.
  Running it outside pytriton takes a few things (measured in FACTS.md), all done here:

  - a backend directory `<dir>/python/` holding `libtriton_python.so`,
    `triton_python_backend_utils.py` and the stub built for the running Python, renamed
    `triton_python_backend_stub`;
  - `LD_LIBRARY_PATH` = this interpreter's LIBDIR first (else the stub loads the system libpython
    against our stdlib), then `site-packages/nvidia_pytriton.libs` (the server's own libraries);
  - this environment's `bin/` first on `PATH`: the stub takes its site-packages from the `python`
    found there, so the models import `hades_gpu` and its runtimes from this same environment;
  - numpy < 2 in that environment (with numpy 2 inputs arrive as zeros, silently): checked here.

Either way the server listens on 127.0.0.1 only, on free ports unless told otherwise, loads only the
models asked for (explicit model control), uses a shared-memory prefix unique to this server, runs
in its own process session, logs to a file, and is stopped by its PID (SIGTERM, then SIGKILL).

Nothing outlives its owner: on Linux the server gets SIGTERM from the kernel the moment the thread
that started it dies (`prctl(PR_SET_PDEATHSIG)`), however it dies (SIGKILL included); a clean
`stop()` removes the server's temporary folder (backend copies, default log) and shared memory, and
every `start()` sweeps the folders and shared memory left by owners that are gone (each folder
records its owner's PID and start time in `OWNER_FILE`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from hades_gpu.child_process import pdeathsig_preexec

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("minilm_python",)
TRITONSERVER_ENV = "HADES_TRITONSERVER"  # explicit path to a tritonserver binary
WORKDIR_PREFIX = "hades-triton-"  # tempdir/hades-triton-<owner pid>-<random>/
OWNER_FILE = "owner"  # in the folder: "<owner pid> <owner start time> <server pid>"
SHM_PREFIX = "hades"  # /dev/shm/hades<owner pid>_<random>_*: the Python backend's regions


def _process_start(pid: int) -> Optional[float]:
    """The start time of process `pid` (None when there is none): tells a live owner from a reused PID."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no such process, no access, no psutil
        if pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return -1.0
            return -1.0
        return None


def _alive(pid: int, started: float) -> bool:
    now = _process_start(pid)
    return now is not None and (now < 0 or started < 0 or abs(now - started) < 1.0)


def sweep_stale(tmp_root: Optional[str | Path] = None) -> list[Path]:
    """Remove the folders and shared memory of servers whose owner is gone (and whose server is too).

    Returns the folders removed. Folders without a readable `OWNER_FILE` younger than an hour are
    left alone (an owner may be writing it right now).
    """
    root = Path(tmp_root or tempfile.gettempdir())
    removed: list[Path] = []
    dead_owners: set[int] = set()
    for folder in root.glob(f"{WORKDIR_PREFIX}*"):
        if not folder.is_dir():
            continue
        try:
            fields = (folder / OWNER_FILE).read_text().split()
            owner, owner_start = int(fields[0]), float(fields[1])
            server = int(fields[2]) if len(fields) > 2 else 0
        except (OSError, ValueError, IndexError):
            try:
                if time.time() - folder.stat().st_mtime < 3600:
                    continue
            except OSError:
                continue
            owner, owner_start, server = 0, -1.0, 0
        if owner and _alive(owner, owner_start):
            continue
        if server and _process_start(server) is not None:
            continue  # still shutting down after its owner died: the next sweep takes it
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        if owner:
            dead_owners.add(owner)
    for pid in dead_owners:
        for path in glob.glob(f"/dev/shm/{SHM_PREFIX}{pid}_*"):
            with contextlib.suppress(OSError):
                os.unlink(path)
    if removed:
        log.info("removed %d stale tritonserver folder(s) of owners that are gone: %s", len(removed),
                 ", ".join(map(str, removed)))
    return removed


class TritonServerError(RuntimeError):
    """The server could not be found, started, or kept running; the message says why in one line."""


class StartCancelled(Exception):
    """`start(cancel=...)`'s event was set before the server was ready (it has been stopped)."""


def default_model_repository() -> Path:
    """The repository's `triton_models/` folder (beside the `hades_gpu` package)."""
    return Path(__file__).resolve().parents[2] / "triton_models"


@dataclass
class ServerInstall:
    """Where a `tritonserver` binary lives and what it needs to run.

    Args:
        executable (Path): the `tritonserver` binary.
        bundled (bool): True for the pytriton wheel's copy (backend dir and libraries built here).
        python_backend (Optional[Path]): the wheel's `backends/python` folder (bundled only).
        stub (Optional[Path]): the wheel's Python backend stub for this interpreter (bundled only).
        lib_dirs (list[Path]): prepended to `LD_LIBRARY_PATH`.
    """

    executable: Path
    bundled: bool
    python_backend: Optional[Path] = None
    stub: Optional[Path] = None
    lib_dirs: list[Path] = field(default_factory=list)


def _python_libdir() -> Optional[Path]:
    libdir = sysconfig.get_config_var("LIBDIR")
    return Path(libdir) if libdir and Path(libdir).is_dir() else None


def _check_numpy() -> None:
    try:
        import numpy
    except ImportError as err:
        raise TritonServerError("the Triton Python backend needs numpy < 2 in this environment (numpy is not installed)") from err
    major = int(numpy.__version__.split(".")[0])
    if major >= 2:
        raise TritonServerError(
            f"the bundled Triton Python backend needs numpy < 2 in this environment (got numpy {numpy.__version__}); "
            "install with -c constraints.txt or use a separate environment for the server"
        )


def find_server(executable: Optional[str] = None) -> ServerInstall:
    """Locate a runnable `tritonserver`.

    Order: `executable` (or `$HADES_TRITONSERVER`), a system `tritonserver` on `PATH` (NVIDIA's
    container), then the `nvidia-pytriton` wheel's bundled binary. Raises `TritonServerError` saying
    what was looked for when none can run here.
    """
    explicit = executable or os.environ.get(TRITONSERVER_ENV)
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TritonServerError(f"tritonserver must be an executable file (got {explicit!r})")
        return _install_for(path)
    on_path = shutil.which("tritonserver")
    if on_path:
        return _install_for(Path(on_path))
    return _bundled_install()


def _install_for(path: Path) -> ServerInstall:
    """A given binary: treat it as the wheel's copy when it sits inside the pytriton package."""
    if path.resolve().parent.parent.name == "tritonserver" and path.resolve().parents[2].name == "pytriton":
        return _bundled_install()
    return ServerInstall(executable=path, bundled=False)


def _bundled_install() -> ServerInstall:
    import importlib.util

    if not sys.platform.startswith("linux"):
        raise TritonServerError(f"the bundled tritonserver runs on Linux only (got platform {sys.platform})")
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "no tritonserver on PATH and package 'nvidia-pytriton' is not installed: "
            "pip install 'hades-gpu[serve]' (or run inside NVIDIA's Triton container)"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    root = pkg / "tritonserver"
    exe = root / "bin" / "tritonserver"
    backend = root / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    libs = pkg.parent / "nvidia_pytriton.libs"
    for what, p in (("server binary", exe), ("Python backend", backend / "libtriton_python.so"),
                    (f"Python backend stub for Python {version}", stub)):
        if not p.exists():
            raise TritonServerError(f"nvidia-pytriton install lacks its {what}: expected {p}")
    _check_numpy()
    lib_dirs = [d for d in (_python_libdir(), libs) if d is not None and d.is_dir()]
    return ServerInstall(executable=exe, bundled=True, python_backend=backend, stub=stub, lib_dirs=lib_dirs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Optional[Path], lines: int = 3) -> str:
    """The log's error lines (Triton's `E...` lines and its final `error:`), else its last lines; one line."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in text if (line[:1] == "E" and line[1:5].isdigit()) or line.startswith("error:")]
    picked = [line for line in (errors or text) if line.strip() and not _harmless(line)][-lines:]
    # Triton logs a traceback inside one line as literal "\n": keep the first line of each.
    return " | ".join(line.split("\\n")[0].strip()[:400] for line in picked)


_PORT_IN_USE = re.compile(r"Socket '([^']*)' already in use")
_SERVICE = re.compile(r"failed to start (\w+) service")


def _start_failure(path: Optional[Path]) -> str:
    """Why tritonserver exited before it was ready, in words: a port already in use is named as such
    (it was ~650 characters of gRPC core's own report); otherwise the log's error lines (`_tail`)."""
    tail = _tail(path)
    port = _PORT_IN_USE.search(tail)
    if port:
        service = _SERVICE.search(tail)
        kind = {"GRPC": "gRPC", "HTTP": "HTTP", "Metrics": "metrics"}.get(service.group(1), service.group(1)) \
            if service else "a"
        return f"the {kind} port {port.group(1)} is already in use (another server?): choose another port"
    return tail


def _harmless(line: str) -> bool:
    # Noise every CPU-only start prints (FACTS.md): not the reason anything failed.
    return any(s in line for s in ("CUDA driver version is insufficient", "Failed to initialize NVML",
                                   "DCGM", "CudaDriverHelper", "Unable to allocate pinned system memory",
                                   "unable to get number of CUDA devices"))


class TritonServer:
    """A `tritonserver` process serving `models` from `model_repository` on 127.0.0.1.

    Usable as a context manager (`with TritonServer(...) as server: server.grpc_url`). `start()`
    returns once the server and every requested model are ready, or raises `TritonServerError` with
    the log's last lines; `stop()` sends SIGTERM to the server's PID and SIGKILL after `stop_timeout_s`.

    Args:
        model_repository (str | Path, optional): repository folder (default: the repo's `triton_models/`).
        models (Sequence[str], optional): models to load (default: `("minilm_python",)`).
        grpc_port, http_port, metrics_port (int, optional): 0 picks a free port (default: 0).
        log_file (str | Path, optional): server log (default: a file in a fresh temporary folder).
        executable (str, optional): a `tritonserver` binary (default: see `find_server`).
        ready_timeout_s (float, optional): how long to wait for readiness (default: 180).
        stop_timeout_s (float, optional): SIGTERM grace period before SIGKILL (default: 30).
        log_verbose (int, optional): Triton's `--log-verbose` level (default: 0).
        extra_args (Sequence[str], optional): more `tritonserver` flags.
    """

    def __init__(
        self,
        model_repository: str | Path | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        log_file: str | Path | None = None,
        executable: Optional[str] = None,
        ready_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository or default_model_repository()).resolve()
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository must be a folder (got {self.model_repository})")
        self.models = list(models)
        if not self.models:
            raise TritonServerError("models must name at least one model (got none)")
        for m in self.models:
            if not (self.model_repository / m / "config.pbtxt").is_file():
                raise TritonServerError(f"model {m!r} has no config.pbtxt in {self.model_repository}")
        self._ports_wanted = (grpc_port, http_port, metrics_port)
        self.grpc_port = self.http_port = self.metrics_port = 0
        self._log_file_arg = Path(log_file) if log_file else None
        self.log_file: Optional[Path] = None
        self.executable = executable
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.shm_prefix = ""
        self._proc: Optional[subprocess.Popen] = None
        self._cancel: Optional[threading.Event] = None
        self._workdir: Optional[Path] = None
        self._log_handle = None
        self._log_offset = 0
        self.dies_with_parent = False
        self._failed = False  # the server failed (start-up or on its own): keep its log for the user

    # ----------------------------------------------------------------------------- addresses
    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def backend_processes(self) -> dict[int, str]:
        """pid -> model of the server's Python-backend stub processes (one per model instance)."""
        import psutil

        if self._proc is None:
            return {}
        found: dict[int, str] = {}
        try:
            children = psutil.Process(self._proc.pid).children()
        except psutil.Error:
            return found
        for child in children:
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].endswith("triton_python_backend_stub") and len(cmd) > 1:
                found[child.pid] = Path(cmd[1]).parent.parent.name  # <repository>/<model>/<version>/model.py
        return found

    def poll(self) -> Optional[int]:
        """The server's exit code, or None while it runs."""
        return self._proc.poll() if self._proc else None

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the server to exit on its own (then its log is kept: see `stop`)."""
        assert self._proc is not None, "server not started"
        rc = self._proc.wait(timeout)
        self._failed = True
        return rc

    # ----------------------------------------------------------------------------- lifecycle
    def command(self, install: ServerInstall, backend_dir: Optional[Path]) -> list[str]:
        """The `tritonserver` command line (explicit model control: only `models` load)."""
        cmd = [
            str(install.executable),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            "--strict-readiness=true",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
            "--exit-timeout-secs=20",
        ]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        return cmd + self.extra_args

    def environment(self, install: ServerInstall) -> dict[str, str]:
        """The server's environment: library path and PATH as the bundled server needs them."""
        env = dict(os.environ)
        env_bin = Path(sys.executable).parent  # the venv's bin/ (not resolved: keep the venv)
        env["PATH"] = os.pathsep.join([str(env_bin), env.get("PATH", "")])
        if install.lib_dirs:
            old = env.get("LD_LIBRARY_PATH", "")
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, install.lib_dirs), *([old] if old else [])])
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("ORT_DISABLE_TELEMETRY", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def _backend_dir(self, install: ServerInstall) -> Optional[Path]:
        if not install.bundled:
            return None
        assert self._workdir is not None and install.python_backend and install.stub
        target = self._workdir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        # Copies, not links: the backend finds the stub next to its own (unresolved) path. ~3 MB.
        shutil.copy2(install.python_backend / "libtriton_python.so", target / "libtriton_python.so")
        shutil.copy2(install.python_backend / "triton_python_backend_utils.py", target / "triton_python_backend_utils.py")
        shutil.copy2(install.stub, target / "triton_python_backend_stub")
        return target.parent

    def start(self, cancel: Optional[threading.Event] = None) -> "TritonServer":
        """Start tritonserver and wait until it and its models are ready. `cancel` set meanwhile (a
        SIGTERM to hades-serve) stops it and raises `StartCancelled`: a model whose load takes
        minutes kept a stopped hades-serve waiting, then printed the address of a dying server."""
        self._cancel = cancel
        if self._proc is not None:
            raise TritonServerError(f"server already started (pid {self._proc.pid})")
        install = find_server(self.executable)
        with contextlib.suppress(Exception):  # housekeeping only: never a reason not to start
            sweep_stale()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
        self._write_owner()
        # Free ports are picked before the server binds them: another process may take one in between.
        # Then the server exits at start-up and, when the ports were ours to pick, we try new ones.
        attempts = 3 if not any(self._ports_wanted) else 1
        try:
            self.log_file = (self._log_file_arg or self._workdir / "tritonserver.log").resolve()
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(1, attempts + 1):
                try:
                    self._launch(install)
                    return self
                except TritonServerError as err:
                    if attempt == attempts or "already in use" not in str(err).lower():
                        raise
                    log.warning("tritonserver could not bind its ports (%s): retrying on new ones", err)
            raise AssertionError("unreachable")
        except BaseException as err:
            self._failed = isinstance(err, TritonServerError)  # its message points at the log: keep it
            self._halt()
            self._remove_workdir()
            raise

    def _write_owner(self, server_pid: int = 0) -> None:
        assert self._workdir is not None
        me = os.getpid()
        started = _process_start(me) or -1.0
        with contextlib.suppress(OSError):
            (self._workdir / OWNER_FILE).write_text(f"{me} {started} {server_pid}\n")

    def _launch(self, install: ServerInstall) -> None:
        assert self.log_file is not None and self._workdir is not None
        backend_dir = self._backend_dir(install)  # (re)built per launch: stop() removes it
        g, h, m = self._ports_wanted
        self.grpc_port, self.http_port, self.metrics_port = g or free_port(), h or free_port(), m or free_port()
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        cmd = self.command(install, backend_dir)
        self._log_handle = open(self.log_file, "ab")
        self._log_offset = self._log_handle.tell()
        self._log_handle.write(("$ " + " ".join(cmd) + "\n").encode())
        self._log_handle.flush()
        log.info("starting tritonserver (%s) on %s, log %s", install.executable, self.grpc_url, self.log_file)
        # Dies with us: SIGTERM from the kernel when the thread starting it ends, however it ends. From
        # another thread that would be that thread's end (a pool worker's, say): there we rely on stop().
        preexec = pdeathsig_preexec() if threading.current_thread() is threading.main_thread() else None
        self.dies_with_parent = preexec is not None
        self._proc = subprocess.Popen(
            cmd, env=self.environment(install), cwd=str(self._workdir), stdin=subprocess.DEVNULL,
            stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec,
        )
        self._write_owner(self._proc.pid)
        try:
            self._wait_ready()
        except BaseException:
            self._halt()  # start() retries in the same folder, or removes it
            raise
        log.info("tritonserver pid %d ready: gRPC %s, models %s", self._proc.pid, self.grpc_url, ",".join(self.models))

    def _log_text(self) -> str:
        """What this launch wrote to the log so far ("" when it cannot be read)."""
        assert self.log_file is not None
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _settled(self, wait_s: float = 0.5) -> bool:
        """Still running `wait_s` after it said ready, with no service failed: a taken metrics port is
        logged as started and fails ~5 ms later."""
        assert self._proc is not None
        try:
            self._proc.wait(wait_s)
            return False
        except subprocess.TimeoutExpired:
            return "failed to start" not in self._log_text()

    def _started_services(self) -> bool:
        """True once *this* server's log says each of its endpoints is up (not another process on the
        port): gRPC, and HTTP and metrics unless the extra flags turn them off. The gRPC one alone
        let hades-serve print its ready lines while the HTTP or metrics port was taken, and the
        server exited a moment later (a script waiting for the lines ingested against a dying server)."""
        text = self._log_text()
        wanted = [f"Started GRPCInferenceService at 127.0.0.1:{self.grpc_port}"]
        if "--allow-http=false" not in self.extra_args:
            wanted.append(f"Started HTTPService at 127.0.0.1:{self.http_port}")
        if "--allow-metrics=false" not in self.extra_args:
            wanted.append(f"Started Metrics Service at 127.0.0.1:{self.metrics_port}")
        return all(line in text for line in wanted)

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while True:
                if self._cancel is not None and self._cancel.is_set():
                    raise StartCancelled("stopped before the server was ready")
                rc = self._proc.poll()
                if rc is not None:
                    raise TritonServerError(f"tritonserver exited with code {rc} before it was ready (log "
                                            f"{self.log_file}): {_start_failure(self.log_file)}")
                try:
                    if self._started_services() and client.is_server_ready(client_timeout=2.0) and all(
                        client.is_model_ready(m, client_timeout=2.0) for m in self.models
                    ) and self._settled():
                        return
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    tail = _tail(self.log_file)
                    raise TritonServerError(
                        f"tritonserver not ready within {self.ready_timeout_s:g} s (the ready timeout ran out; "
                        f"log {self.log_file})" + (f": {tail}" if tail else "; it logged no error yet"))
                time.sleep(0.2)
        finally:
            client.close()

    def stop(self, timeout_s: Optional[float] = None) -> Optional[int]:
        """SIGTERM the server's PID, SIGKILL its process group after `timeout_s`; returns its exit code.

        Then its shared memory and temporary folder go (the folder's default log stays after a failure).
        """
        rc = self._halt(timeout_s)
        self._remove_workdir()
        return rc

    def _halt(self, timeout_s: Optional[float] = None) -> Optional[int]:
        """Stop the process (and its stubs), remove its shared memory, close the log; keep the folder."""
        proc, self._proc = self._proc, None
        rc = None
        if proc is not None:
            timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver pid %d ignored SIGTERM for %.0f s: SIGKILL", proc.pid, timeout_s)
            # The server ran in its own session (pgid == its pid): stubs it left behind go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            self._cleanup_shm()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return rc

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            # The folder holds the backend copies, the owner file and, unless a log file was given, the
            # log: after a failure that log is kept (the error points at it; the next start's sweep
            # removes it once we are gone), else the whole folder goes.
            if self._failed and self._log_file_arg is None:
                shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            else:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def kill(self) -> None:
        """SIGKILL the server at once (tests: a server dying mid-run). Keeps the object reusable."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self.stop(timeout_s=5)

    def _cleanup_shm(self) -> None:
        # A clean SIGTERM removes these; after SIGKILL they would stay in /dev/shm.
        if self.shm_prefix:
            for path in glob.glob(f"/dev/shm/{self.shm_prefix}*"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def metrics(self, timeout_s: float = 5.0) -> str:
        """Triton's Prometheus metrics text."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as resp:  # noqa: S310 - loopback
            return resp.read().decode()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten server must not outlive its owner
        if getattr(self, "_proc", None) is not None:
            with contextlib.suppress(Exception):
                self.stop(timeout_s=5)
