"""Helpers for the package's own child processes (writer process, tritonserver): tied to their parent.

A child that writes the output or holds a port must not outlive the process that started it: a
run killed with SIGKILL would otherwise leave a writer committing into an output the next run
already repairs, or a server holding its ports. On Linux the kernel does this for us
(`prctl(PR_SET_PDEATHSIG)`); elsewhere the children notice their parent's end on their pipe.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

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
    return env


def pdeathsig_preexec(signum: int = signal.SIGTERM) -> Optional[Callable[[], None]]:
    """A `preexec_fn` asking the kernel to send `signum` to the child when the parent thread dies.

    Linux only (None elsewhere). The kernel tracks the *thread* that forked: call from a thread that
    lives as long as the child should. If the parent is already gone by the time the child runs
    this, the child exits at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here, in the parent: no dlopen after fork
        prctl = libc.prctl
    except (OSError, AttributeError):
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
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    if prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:
        os._exit(0)


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


__all__ = ["PACKAGE_ROOT", "child_env", "pdeathsig_preexec", "die_with_parent", "leave_interrupts_to_parent", "describe_exit"]
