"""How a run ends when the process is told to: at interpreter exit, and on SIGTERM.

Interpreter exit (`active_run`, `exiting`): a run still going is stopped as Ctrl-C stops it, and
waited for. SIGTERM (`raise_terminated`, `sigterm_as_interrupt`): raised in the main thread as
`Terminated`, a KeyboardInterrupt, so the run cleans up as after Ctrl-C.

A run (ingest or ISNE training) started in a thread outlives its main thread in two ordinary
ways: the thread is a daemon, or Ctrl-C interrupted the main thread's `Thread.join(timeout)`,
after which CPython 3.11 marks the joined thread stopped (bpo-45274's clean-up releases the running
thread's lock) and finalizes the interpreter without waiting for it. The run's threads were then
cut off wherever they stood and the model runtime's native threads aborted the process (`terminate
called without an active exception`, exit 134), with the documents already embedded uncommitted.

`atexit` functions run before that teardown, while the other threads still run: if a run is active
then, this asks it to stop as on Ctrl-C (`exiting()`, polled by the pipeline's run loop and between
ISNE steps; finished documents are committed, workers stopped, the model closed) and waits up to
`WAIT_S` for it. A main thread that simply ends while a non-daemon thread ingests is unaffected:
Python joins that thread before any `atexit` function runs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator

log = logging.getLogger(__name__)

WAIT_S = 120.0  # at most this long for the runs to commit and close at exit
INGEST_KEPT = "the finished documents are committed"
ISNE_KEPT = "the training state of the last saved epoch is kept"  # an ISNE training's SIGTERM line said "documents"

_exiting = threading.Event()
_active = 0
_changed = threading.Condition()
_registered = False


def exiting() -> bool:
    """True once the interpreter exits with a run still going: the run should stop as on Ctrl-C."""
    return _exiting.is_set()


@contextlib.contextmanager
def active_run() -> Iterator[None]:
    """Counts the block as a run that interpreter exit must stop and wait for."""
    global _active, _registered
    with _changed:
        if not _registered:
            atexit.register(_stop_active_runs)
            _registered = True
        _active += 1
    try:
        yield
    finally:
        with _changed:
            _active -= 1
            _changed.notify_all()


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, systemd, Kubernetes), raised in the main thread so that the run cleans up
    as after Ctrl-C; without it the process died at once, its embedded documents uncommitted."""


_terminated = threading.Event()  # SIGTERM arrived: code between the handler and the run's caller (Ray's
# ray.get/wait) may turn `Terminated` into a plain KeyboardInterrupt, which then still reads as SIGTERM


def sigterm_arrived() -> bool:
    return _terminated.is_set()


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler: `Terminated` in the main thread; worker pools stop restarting workers."""
    from hades_gpu import child_process

    _terminated.set()
    child_process.stopping.set()
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt(kept: str = INGEST_KEPT) -> Iterator[None]:
    """For library use: within the block, SIGTERM stops the run as Ctrl-C does (finished documents
    committed, workers stopped), then the process ends by SIGTERM as it would have at once (exit
    143), with one log line saying what is `kept`. Only in the main thread and where SIGTERM has its
    default action: the command line, Ray, or the caller's own handler keep theirs."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except KeyboardInterrupt:
        if not _terminated.is_set():
            raise  # Ctrl-C: the caller's to handle
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log.warning("terminated by SIGTERM: %s; re-run to resume", kept)
        for handler in logging.getLogger().handlers + logging.getLogger("hades_gpu").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGTERM)  # the default action, now that the run has cleaned up
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C inside the block takes effect at its end (main thread only; elsewhere no signal arrives).

    For the imports and loads of native libraries: a KeyboardInterrupt raised in the middle of
    `import torch` leaves torch half-initialised in the process, and every later call failed
    ("partially initialized module 'torch'", "function 'conv1d' already has a docstring", or a
    segfault): one early Ctrl-C in a notebook broke the kernel for good."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:  # not the main thread, or a handler set outside Python (Triton's stub): not ours to swap
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held and callable(previous):
        previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt here


@contextlib.contextmanager
def stoppable_run(kept: str = INGEST_KEPT) -> Iterator[None]:
    """A library run (ingest or ISNE training): SIGTERM and interpreter exit stop it as Ctrl-C does,
    after its clean-up (`sigterm_as_interrupt`, `active_run`); `kept`: what a re-run resumes from."""
    with sigterm_as_interrupt(kept), active_run():
        yield


def _exit_at_once(signum: int, frame: object) -> None:
    """Ctrl-C again while the exit waits for the runs: stop waiting. Returning would let the
    interpreter tear down under the still running run (the abort this module is for), so the
    process ends here; parts are committed atomically, so what was committed stays and a re-run
    redoes the rest."""
    try:
        sys.stderr.write("interrupted again: exiting without waiting for the run(s) to commit (committed parts are "
                         "kept; re-run to resume)\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def _stop_active_runs() -> None:
    with _changed:
        if _active == 0:
            return
        _exiting.set()
        if threading.current_thread() is threading.main_thread():
            # before anything else: a second Ctrl-C even while the warning below is written (it raised
            # KeyboardInterrupt there, and the interpreter went on to abort under the run)
            signal.signal(signal.SIGINT, _exit_at_once)
        log.warning("the interpreter is exiting while %d run(s) are still going: stopping them as on Ctrl-C "
                    "(finished documents are committed; re-run to resume)", _active)
        if not _changed.wait_for(lambda: _active == 0, timeout=WAIT_S):
            log.warning("%d run(s) did not stop within %.0f s of interpreter exit", _active, WAIT_S)


__all__ = ["INGEST_KEPT", "ISNE_KEPT", "Terminated", "WAIT_S", "active_run", "exiting", "interrupts_held", "raise_terminated", "sigterm_arrived",
           "sigterm_as_interrupt", "stoppable_run"]
