"""Helpers for the package's own child processes (writer process, tritonserver): tied to their parent.

A child that writes the output or holds a port must not outlive the process that started it: a
run killed with SIGKILL would otherwise leave a writer committing into an output the next run
already repairs, or a server holding its ports. On Linux the kernel does this for us
(`prctl(PR_SET_PDEATHSIG)`); elsewhere the children notice their parent's end on their pipe.
"""

from __future__ import annotations

import os
import signal
import threading
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Optional, Sequence

import hades_gpu

PACKAGE_ROOT = str(Path(hades_gpu.__file__).resolve().parent.parent)

_PR_SET_PDEATHSIG = 1


def child_env() -> dict[str, str]:
    """The environment of a `python -m hades_gpu...` child: this one, with the package's root first on
    PYTHONPATH (the child imports the same `hades_gpu`, whatever the working directory) and
    OpenBLAS on one thread (the children do no linear algebra; its pool of one thread per core,
    started when numpy is imported, cost a worker ~0.08 s of system CPU at start-up, 2 cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OPENBLAS_NUM_THREADS"] = "1"
    # `python -m` puts the working directory before PYTHONPATH: a folder holding another `hades_gpu`
    # (a checkout, a copy) was imported by every child instead (Python >= 3.11 honours this)
    env["PYTHONSAFEPATH"] = "1"
    return env


def _prctl() -> Optional[Callable[..., int]]:
    """libc's `prctl` (Linux only; None elsewhere or where it cannot be loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def pdeathsig_preexec(signum: int = signal.SIGTERM) -> Optional[Callable[[], None]]:
    """A `preexec_fn` asking the kernel to send `signum` to the child when the parent thread dies.

    Linux only (None elsewhere). The kernel tracks the *thread* that forked: call from a thread that
    lives as long as the child should. If the parent is already gone by the time the child runs
    this, the child exits at once. For a child that is not Python (tritonserver); a Python child
    calls `die_with_parent` itself.
    """
    prctl = _prctl()  # loaded here, in the parent: no dlopen after fork
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(125)

    return preexec


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Called first thing in a child: the kernel sends it `signum` when the thread that started it
    ends; if that parent is gone already (it died before this ran), exit now. From the child rather
    than a `preexec_fn`, which runs between fork and exec and is unsafe in a parent with threads.
    Linux only; elsewhere a no-op (the child notices the parent's end on its pipe)."""
    prctl = _prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:
        os._exit(0)


def start_module(module: str, args: Sequence[str], pass_fds: Sequence[int] = (),
                 env: Optional[dict[str, str]] = None) -> tuple[subprocess.Popen, Connection]:
    """`python -m <module> <child end of a socket pair> *args` (never `multiprocessing`'s spawn,
    which re-runs the user's main module), and this process's end of the pair as a `Connection`.
    `pass_fds`: further descriptors the child inherits; `env`: default `child_env()`."""
    parent_sock, child_sock = socket.socketpair()
    child_fd = child_sock.fileno()
    try:
        proc = subprocess.Popen([sys.executable, "-m", module, str(child_fd), *args], pass_fds=(child_fd, *pass_fds),
                                env=env if env is not None else child_env(), stdin=subprocess.DEVNULL, close_fds=True)
    finally:
        child_sock.close()
    return proc, Connection(parent_sock.detach())


# Set by the command line's SIGTERM handler: the run is stopping. A `kill -TERM -<group>` reaches the
# workers as well, and a pool thread that saw one die logged "died ...; restarting" under the one
# line of the interrupt (`orchestration.workers` says nothing then).
stopping = threading.Event()


def leave_interrupts_to_parent() -> None:
    """Called first thing in a child: Ctrl-C at a terminal signals the whole foreground group, and
    the parent alone decides what an interrupt means (it stops its workers, has its writer process
    drop the part being filled, and exits with one line). A child that took SIGINT itself printed a
    traceback each and could die inside a commit its parent was about to discard cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def describe_exit(returncode: Optional[int]) -> str:
    """A child's exit status in words: "exit code 1", "killed by SIGKILL", "still running"."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


__all__ = ["PACKAGE_ROOT", "child_env", "pdeathsig_preexec", "die_with_parent", "start_module", "leave_interrupts_to_parent", "describe_exit"]
