"""`hades-serve`: run a Triton server on the model repository until SIGTERM or Ctrl-C (argparse).

The launcher is `embedding.triton_server.TritonServer`; this module is only its command line.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import subprocess
import sys
import threading
from typing import Optional

from hades_gpu.child_process import describe_exit
from hades_gpu.embedding.triton_server import (DEFAULT_MODELS, TRITONSERVER_ENV, StartCancelled, TritonServer,
                                               TritonServerError, _tail, default_model_repository)


class _OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (`hades-serve: error: ...`, exit 2), not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    """A TCP port for argparse: 0 (a free one) to 65535. The kernel took 70000 as 4464 while the
    address printed said 70000."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port must be 0-65535 (0: a free one), got {port}")
    return port


def _seconds(text: str) -> float:
    """A positive number of seconds for argparse (--ready-timeout -5 started a server, then gave up at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def serve_cli(argv: Optional[list[str]] = None) -> int:
    """`hades-serve`: run a Triton server on the model repository until SIGTERM or Ctrl-C.

    Exit 0 after a clean stop (SIGTERM, Ctrl-C); 2 with one line when the server cannot be found or
    started or the arguments are wrong; 1 with one line when a file cannot be written (`--log-file`)
    or the server exits on its own.
    """
    parser = _OneLineParser(
        prog="hades-serve", description="Serve triton_models/ with a real Triton Inference Server on 127.0.0.1.")
    parser.add_argument("--model-repository", default=str(default_model_repository()),
                        help="model repository folder (default: %(default)s)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated models to load (default: %(default)s)")
    parser.add_argument("--grpc-port", type=_port, default=0, help="0 = a free port (default)")
    parser.add_argument("--http-port", type=_port, default=0, help="0 = a free port (default)")
    parser.add_argument("--metrics-port", type=_port, default=0, help="0 = a free port (default)")
    parser.add_argument("--log-file", default=None, help="server log (default: a temporary file, printed)")
    parser.add_argument("--tritonserver", default=None,
                        help=f"tritonserver binary (default: ${TRITONSERVER_ENV}, PATH, then the pytriton wheel)")
    parser.add_argument("--ready-timeout", type=_seconds, default=180.0, help="seconds to wait for readiness")
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(argv)
    named = [(flag, port) for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port),
                                             ("--metrics-port", args.metrics_port)) if port]
    for i, (flag, port) in enumerate(named):
        other = next((f for f, p in named[i + 1:] if p == port), None)
        if other is not None:  # tritonserver's own refusal began with pieces of its usage text
            parser.error(f"{flag} and {other} are both {port}: each service needs its own port")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    # The handler only records the request; the main thread polls for it. Raising from the handler
    # (as before) relied on the signal interrupting the main thread's blocking waitpid, but the kernel
    # may deliver it to another thread (gRPC's, left from the readiness checks): the main thread then
    # slept in waitpid until tritonserver exited on its own (seen: 1 in 3 stops under load).
    stop_requested = threading.Event()

    def _on_signal(_signum: int, _frame: object) -> None:
        stop_requested.set()

    old_term = signal.signal(signal.SIGTERM, _on_signal)
    server: Optional[TritonServer] = None
    try:
        server = TritonServer(args.model_repository, models, args.grpc_port, args.http_port, args.metrics_port,
                              log_file=args.log_file, executable=args.tritonserver,
                              ready_timeout_s=args.ready_timeout, log_verbose=args.log_verbose)
        server.start(cancel=stop_requested)
        backends = server.backend_processes()  # before the ready lines: a stub killed by someone reading them is seen
        print(f"gRPC {server.grpc_url}", flush=True)
        print(f"HTTP {server.http_url}  metrics {server.metrics_url}  models {','.join(models)}  "
              f"pid {server.pid}  log {server.log_file}", flush=True)
        rc = _wait_for_exit_or_stop(server, stop_requested, backends)
        if isinstance(rc, str):  # a model's backend process died: the server would answer ready, serving nothing
            print(f"hades-serve: error: {rc}; stopping tritonserver (restart hades-serve)", file=sys.stderr, flush=True)
            return 1
        if rc is None:
            print("hades-serve: stopping tritonserver", file=sys.stderr, flush=True)
            return 0
        tail = _tail(server.log_file)
        print(f"hades-serve: tritonserver exited on its own ({describe_exit(rc)}; log {server.log_file})"
              + (f": {tail}" if tail else ""), file=sys.stderr)
        return 1  # a signal's negative code went to sys.exit as 247 (SIGKILL)
    except KeyboardInterrupt:  # Ctrl-C during the start; afterwards SIGINT is polled like SIGTERM
        if server is not None:
            print("hades-serve: stopping tritonserver", file=sys.stderr, flush=True)
        return 0
    except StartCancelled:  # SIGTERM while the models loaded: no address is printed for a server going away
        print("hades-serve: stopped before the server was ready", file=sys.stderr, flush=True)
        return 0
    except TritonServerError as err:
        print(f"hades-serve: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # --log-file in a folder that cannot be written, a full disk
        hint = " (a folder was expected; is the path an existing file?)" if err.errno in (
            errno.EEXIST, errno.ENOTDIR) and err.filename else ""
        print(f"hades-serve: error: {err.filename + ': ' if err.filename else ''}{err.strerror or err}{hint}",
              file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, old_term)


def _wait_for_exit_or_stop(server: TritonServer, stop_requested: threading.Event, backends: dict[int, str],
                           poll_s: float = 0.2) -> Optional[int | str]:
    """The server's exit code when it exits on its own; why, when a model's Python-backend process
    died (Triton does not start it again, and goes on answering ready: every request then fails
    with "Stub process ... is not healthy"); None once SIGTERM or Ctrl-C asked us to stop.

    Ctrl-C is handled here like SIGTERM (a flag, polled) for the same reason: no asynchronous
    KeyboardInterrupt that may never wake a blocked main thread.
    """
    import psutil

    old_int = signal.signal(signal.SIGINT, lambda _signum, _frame: stop_requested.set())
    try:
        while not stop_requested.is_set():
            try:
                return server.wait(poll_s)
            except subprocess.TimeoutExpired:
                pass
            for pid, model in backends.items():
                try:
                    gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    gone = True
                if gone and server.poll() is None and not stop_requested.is_set():
                    return f"the Python backend process of model {model} (pid {pid}) died: the server cannot serve it"
        return None
    finally:
        signal.signal(signal.SIGINT, old_int)
