"""Console entry points. Hydra apps over the same `conf/` that `load_pipeline_config` reads.

`hades-ingest corpus=<dir-or-file> output=<dir> [profile=...]` and `hades-ingest -m profile=a,b ...`
(one job per combination, each in its own folder under `output`).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from hades_gpu.config import (ConfigError, PipelineConfig, conf_dir, missing_config_message, name_profile,
                              register_configs, to_pipeline_config, unknown_key_message)
from hades_gpu.exit_guard import Terminated, raise_terminated, sigterm_arrived
from hades_gpu.records import printable, user_path

log = logging.getLogger("hades_gpu")


def _job_output_dir(cfg: PipelineConfig) -> Path:
    """The job's output folder: Hydra's run/sweep dir (which is `output` or `output/<job>` in `-m`)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        if not cfg.output:
            raise ConfigError("output=<dir> is required") from None
        return Path(cfg.output)


DEBUG_ENV = "HADES_DEBUG"  # HADES_DEBUG=1 (or the flag --debug): tracebacks for the one-line errors too

# Run-time failures a user can cause (a full disk, a path that is a file, a damaged output): one line,
# exit 1. Anything else is a bug and keeps its traceback.
_RUN_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
               errno.EEXIST, errno.EROFS, errno.ENAMETOOLONG, errno.EADDRINUSE, errno.ELOOP}
# (not ENOENT/EMFILE: in our own code those are bugs; EFBIG: a file-size limit, `ulimit -f`; ELOOP: a
# symbolic link where a file of the output must be)


class UsageError(Exception):
    """Bad command-line syntax (an unknown flag): one line, exit 2."""


def _take_debug_flag(argv: list[str]) -> bool:
    """Remove `--debug` from `argv` (Hydra would refuse it); True when it or `HADES_DEBUG=1` asks for tracebacks."""
    debug = False
    while "--debug" in argv[1:]:
        argv.remove("--debug")
        debug = True
    return debug or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _one_line(text: str) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line (their `full_key:` detail lines dropped)."""
    lines = [ln.strip() for ln in str(text).splitlines()]
    kept = [ln for ln in lines if ln and not re.match(r"(full_key|object_type|reference_type|parent_node)[:=]", ln)]
    out = ""
    for ln in kept:
        out = ln if not out else f"{out}{' ' if out[-1] in '.:;,' else '; '}{ln}"
    return out


def _config_message(err: BaseException) -> str:
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException):
        return missing_config_message(err)
    msg = unknown_key_message(_one_line(str(err)))
    if isinstance(err, OverrideParseException):
        msg += (" (a value holding characters other than letters, digits and /-_.:+@ needs quotes inside the "
                "shell's: key=\"'value'\")")
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        cause_msg = _one_line(str(cause))
        if cause_msg not in msg:
            msg = f"{msg}: {cause_msg}"
    key = next((getattr(e, "full_key", None) for e in _chain(err) if getattr(e, "full_key", None)), None)
    if key and key not in msg:  # OmegaConf's detail line, dropped by _one_line, named the key that failed
        where = ", the run folder made from output=" if key in ("hydra.run.dir", "hydra.sweep.dir") else ""
        msg = f"{msg} (in {key}{where})"
    return msg


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and what it was raised from or during (`__cause__`, `__context__`), outermost first."""
    seen: list[BaseException] = []
    cur: Optional[BaseException] = err
    while cur is not None and not any(cur is s for s in seen) and len(seen) < 20:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _disk_full(err: BaseException) -> Optional[str]:
    """The path (or "") when `err` comes from a full disk (ENOSPC, EDQUOT, SQLite's "disk is full"), else None."""
    import sqlite3

    for e in _chain(err):
        if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)):
            return str(e.filename or "")
        if isinstance(e, sqlite3.Error) and "disk is full" in str(e):
            return ""
    return None


def _os_message(err: OSError) -> str:
    what = err.strerror or str(err)
    where = f"{err.filename}: " if err.filename else ""
    if err.errno in (errno.EEXIST, errno.ENOTDIR) and err.filename:
        return f"{where}{what} (a folder was expected; is the path an existing file?)"
    return f"{where}{what}"


def _loaded(*names: tuple[str, str]) -> tuple[type, ...]:
    """The classes `module.name` of the modules already imported."""
    found = []
    for module, name in names:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def classify_error(err: BaseException) -> Optional[tuple[int, str]]:
    """`(exit code, one-line cause)` for a failure the user can cause or fix; None for a bug (keep the traceback).

    2: the command line or the configuration (unknown key, wrong type, unknown group option, a
    missing model or extra); 1: the run failed (disk full, path is a file, damaged manifest or part,
    embedder server gone, nothing ingested).
    """
    import sqlite3

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, UsageError):
        return 2, str(err)
    full = _disk_full(err)
    if full is not None:
        return 1, f"{full + ': ' if full else ''}no space left on device (committed parts are kept: free space and re-run to resume)"
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return 2, _config_message(err)
    yaml_error = _loaded(("yaml", "YAMLError"))
    if yaml_error and isinstance(err, yaml_error):  # a config file of the user's that is no YAML (it names the file)
        return 2, f"a config file is not valid YAML: {_one_line(str(err))}"
    # Our error classes, looked up only where their module is loaded (an error of a module never
    # imported cannot have been raised; importing them here would cost torch's import on every typo).
    if isinstance(err, _loaded(("hades_gpu.config", "ConfigError"), ("hades_gpu.gpu.device", "DeviceError"),
                               ("hades_gpu.optional", "MissingDependencyError"),
                               # no output there: a usage error, as hades-search and hades-verify say (exit 2)
                               ("hades_gpu.isne.stage", "NotAnIngestOutputError"))):
        return 2, _one_line(str(err))
    if isinstance(err, _loaded(("hades_gpu.embedding.base", "EmbedderError"),  # server gone: re-run resumes
                               ("hades_gpu.pipelines.ingest", "NothingIngestedError"),
                               ("hades_gpu.pipelines.isne_training", "NothingTrainedError"),
                               ("hades_gpu.store.lock", "OutputLockedError"),  # another run holds the output
                               ("hades_gpu.store.manifest", "ManifestError"),
                               ("hades_gpu.store.claims", "ClaimsDamagedError"),
                               ("hades_gpu.orchestration.writer_process", "WriterProcessError"),  # re-run resumes
                               ("hades_gpu.orchestration.workers", "WorkerStartError"),  # workers cannot start
                               ("hades_gpu.store.reader", "DamagedOutputError"),
                               ("hades_gpu.store.shard_map", "ShardMapError"),  # output sharded another way
                               ("hades_gpu.cluster.driver", "ClusterRunError"),  # a shard failed every retry
                               ("hades_gpu.cluster.runtime", "ClusterConnectError"))):
        return 1, _one_line(str(err))
    if isinstance(err, sqlite3.DatabaseError):
        return 1, f"manifest database error: {_one_line(str(err))}"
    arrow = _loaded(("pyarrow.lib", "ArrowException"))
    if arrow and isinstance(err, arrow):
        return 1, f"damaged Parquet data: {_one_line(str(err))[:500]}"
    if isinstance(err, OSError) and err.errno in _RUN_ERRNOS:
        return 1, _os_message(err)
    cause = _os_cause(err)
    if isinstance(err, ValueError) and str(err).startswith("Config group override must be"):  # profile=null
        return 2, (f"{_one_line(str(err))}: a config group takes one of its option names (profile=balanced), "
                   f"not null")
    if isinstance(err, ValueError) and cause is not None:  # Hydra's "Unable to configure handler 'file'"
        return 1, f"{_os_message(cause)} (Hydra's job log in the output folder)"
    if isinstance(err, OSError) and _raised_in_hydra_run_job(err):  # e.g. output=/proc/x: ENOENT from its mkdir
        return 1, f"cannot create the output folder: {_os_message(err)}"
    return None


def _raised_in_hydra_run_job(err: BaseException) -> bool:
    """Whether `err` comes from Hydra's own `run_job` (making the job's folder), not from our job:
    there every OSError is about the output path the user gave."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    inner = frames[-6:]  # the mkdir inside run_job, not an error our task raised through it
    return any(f.f_code.co_name == "run_job" and f.f_code.co_filename.endswith(os.path.join("hydra", "core", "utils.py"))
               for f in inner) and not any("hades_gpu" in f.f_code.co_filename for f in inner)


def _os_cause(err: BaseException) -> Optional[OSError]:
    """The OSError a user can fix (read-only output, no permission) behind `err` (its cause chain):
    `logging.config` wraps a job log that cannot be opened in a ValueError."""
    return next((e for e in _chain(err)[1:] if isinstance(e, OSError) and e.errno in _RUN_ERRNOS), None)


# keys whose values are paths: a value Hydra's override grammar cannot read unquoted (non-ASCII letters,
# "=", brackets) is quoted for the user, since unquoted it has no other meaning
PATH_KEYS = frozenset({"corpus", "output", "documents.root", "embedder.model_dir", "embedder.cache_dir"})


def _hydra_unescapes_to_a_path(parser: Any, arg: str, value: str) -> bool:
    """Whether Hydra's reading of a path value with backslash escapes names an existing path where
    the value taken literally does not (then the escapes were meant for Hydra, as under -m)."""
    from hydra.errors import HydraException

    try:
        parsed = parser.parse_overrides([arg])[0]
    except HydraException:
        return False
    unescaped = parsed.value()
    return (not parsed.is_sweep_override() and isinstance(unescaped, str) and unescaped != value
            and not os.path.lexists(os.path.expanduser(value)) and os.path.lexists(os.path.expanduser(unescaped)))


def is_sweep(args: list[str]) -> bool:
    """`-m`/`--multirun`, or `hydra.mode=MULTIRUN` in any of the forms Hydra takes (`+`/`++`, spaces,
    quotes): each check that asked only for `-m` let `hydra.mode='MULTIRUN'` through."""
    def multirun_mode(arg: str) -> bool:
        key, eq, value = arg.replace(" ", "").lstrip("+").partition("=")
        # OmegaConf takes the enum's name, its value (2) and its qualified name
        value = value.strip("'\"").lstrip("+").upper()  # hydra.mode=+2 is the int 2
        return bool(eq) and key == "hydra.mode" and value in ("MULTIRUN", "2", "RUNMODE.MULTIRUN")

    def multirun_flag(arg: str) -> bool:  # argparse takes any unambiguous prefix: --mu, --multi
        return arg == "-m" or (len(arg) >= 3 and "--multirun".startswith(arg))

    return any(multirun_flag(a) or multirun_mode(a) for a in args)


def quote_path_overrides(argv: list[str]) -> list[str]:
    """`corpus=café` (Hydra: "LexerNoViableAltException") becomes `corpus='café'`; a path value with
    spaces at its start or end, which Hydra strips (`"corpus=/data/  "` ingested `/data`), is a
    `UsageError` asking for quotes. Values with "," (a sweep), "${" (an interpolation), quotes or
    backslashes are left to Hydra, as is every other key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    # a sweep: -m, or hydra.mode=MULTIRUN (its commas are sweeps too, not parts of a path)
    sweep = is_sweep(argv)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") not in PATH_KEYS or value[:1] in ("'", '"'):
            out.append(arg)
            continue
        if value != value.strip():
            raise UsageError(f"{key}= starts or ends with spaces, which Hydra drops (another folder would be read): "
                             f"quote the value: \"{key}='{value}'\"")
        if "\\" in value and _hydra_unescapes_to_a_path(parser, arg, value):
            out.append(arg)  # `corpus=/data/my\ docs\,v2`, escaped as Hydra reads it (it does under -m)
            continue
        # a "," is a sweep only under -m: otherwise Hydra refused `corpus=/data/a,b` as "ambiguous"
        literal_comma = "," in value and not sweep
        if not literal_comma:
            try:
                parser.parse_overrides([arg])
                out.append(arg)
                continue
            except HydraException:
                pass
        if "${" not in value and ("," not in value or literal_comma):
            # quoted, with the quote and the backslashes before it escaped (a path may hold "'")
            escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
            escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
            quoted = f"{key}='{escaped}'"
            try:
                if parser.parse_overrides([quoted])[0].value() == value:  # only when it reads back exactly
                    out.append(quoted)
                    continue
            except HydraException:
                pass
        out.append(arg)  # Hydra says what is wrong (_config_message adds how to quote)
    return out


def _check_hydra_args(argv: list[str]) -> None:
    """Hydra's own flags parsed first, so that a bad one is a `UsageError` and not argparse's usage block."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def _error(message: str) -> None:
        flags = [a for a in argv[1:] if a.startswith("-")]
        late = next((f for f in flags if f in ("-m", "--multirun") and
                     any("=" in a and not a.startswith("-") for a in argv[1:argv.index(f)])), None)
        if late is not None:  # `key=value -m key=a,b`: argparse said "unrecognized arguments"
            raise UsageError(f"{late} goes before the overrides (hades-ingest -m key=a,b ...), not after them")
        raise UsageError(f"{message} (see --help; Hydra overrides are key=value)")

    parser.error = _error  # type: ignore[method-assign]
    args = parser.parse_args(argv[1:])
    modes = [flag for flag, on in (("--run", args.run), ("--multirun", args.multirun), ("--cfg", args.cfg),
                                   ("--info", args.info), ("--shell-completion", args.shell_completion)) if on]
    if len(modes) > 1:  # Hydra raised a ValueError for it, after argument parsing: a traceback
        _error(f"{' and '.join(modes)} cannot be given together: one of --run, --multirun, --cfg, --info, "
               f"--shell-completion")


class _Reported(BaseException):
    """Carries a classified failure out of a Hydra job untouched (Hydra's run_job catches `Exception`
    only, and would print its own "Error executing job with overrides" line first)."""

    def __init__(self, err: BaseException) -> None:
        super().__init__(str(err))
        self.err = err

    def __reduce__(self):  # crosses process boundaries intact (hydra/launcher=joblib runs jobs in workers)
        return (_Reported, (self.err,))


def guarded(task: Callable[..., None]) -> Callable[..., None]:
    """Wrap a Hydra job body: a failure `classify_error` knows leaves the job as `_Reported`.

    In `-m` runs such a failure is one line naming the job and the sweep goes on; the command then
    exits with the worst job's code (`run_hydra_main`), also under `hydra/launcher=joblib`, whose jobs
    run in other processes (`_record_sweep_failure`).
    """

    @functools.wraps(task)
    def body(*args: object, **kwargs: object) -> None:
        try:
            task(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the CLI boundary
            found = classify_error(err)
            if found is None:
                raise
            job = _multirun_job()
            if job is None:
                raise _Reported(err) from err
            # one job of a -m sweep: its line, then the next job (a bad value in one combination
            # stopped the whole sweep, and the valid jobs after it never ran); the exit code says so
            code, message = found
            print(printable(f"{sys.argv[0]}: error: job {job}: {message} (the sweep goes on)"), file=sys.stderr,
                  flush=True)
            _record_sweep_failure(code)

    return body


_sweep_failures: list[int] = []  # exit codes of the failed jobs of this process's -m sweep
# a folder the sweeping process made: jobs that run in other processes (hydra/launcher=joblib) leave
# their exit codes there as files, since a job's return value never reaches `run_hydra_main`
_SWEEP_FAILURES_ENV = "HADES_SWEEP_FAILURES"


def _record_sweep_failure(code: int) -> None:
    """Count a failed job of this `-m` sweep, in this process or, from a launcher's worker, in the
    folder its sweeping process named."""
    folder = os.environ.get(_SWEEP_FAILURES_ENV, "")
    owner, _, path = folder.partition(":")
    if not path or owner == str(os.getpid()):
        _sweep_failures.append(code)
        return
    import tempfile

    with tempfile.NamedTemporaryFile("w", dir=path, prefix="job-", suffix=".code", delete=False) as out:
        out.write(str(int(code)))


def _begin_sweep_failures(sweep: bool) -> Optional[str]:
    """Before a `-m` sweep: the folder its jobs in other processes report failures to (None otherwise;
    a variable inherited from an outer sweep is dropped)."""
    os.environ.pop(_SWEEP_FAILURES_ENV, None)
    if not sweep:
        return None
    import tempfile

    folder = tempfile.mkdtemp(prefix="hades-sweep-")
    os.environ[_SWEEP_FAILURES_ENV] = f"{os.getpid()}:{folder}"
    return folder


def _end_sweep_failures(folder: Optional[str]) -> list[int]:
    """The exit codes of the sweep's failed jobs: this process's and those its workers left in `folder`."""
    codes = list(_sweep_failures)
    if folder is None:
        return codes
    os.environ.pop(_SWEEP_FAILURES_ENV, None)
    for entry in sorted(Path(folder).glob("job-*.code")):
        try:
            codes.append(int(entry.read_text() or 1))
        except (OSError, ValueError):
            codes.append(1)  # a job failed; its code was not written whole
    shutil.rmtree(folder, ignore_errors=True)
    return codes

def _multirun_job() -> Optional[str]:
    """`<num> (<overrides>)` of the running job of a `-m` sweep, or None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return f"{hc.job.num} ({hc.job.override_dirname or 'no overrides'})"
    except Exception:  # noqa: BLE001 - not under Hydra
        return None


def _catch_sigterm() -> None:
    """SIGTERM raises `Terminated` in the main thread, unless someone else already handles it."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_terminated)


def _exit_interrupted(code: int = 130) -> None:
    """Exit 130 (143 for SIGTERM) after an interrupt, skipping the C++ static destructors of extension modules.

    The run's own clean-up has happened (its `finally` blocks: workers stopped, the part being filled
    dropped, metrics written), and Python's exit functions still run here. What is skipped is the
    native teardown, where after an interrupt the model runtime's threads sometimes abort the
    process (`terminate called without an active exception`, exit 134 instead of 130: 1 in ~3
    interrupted runs here, with OpenVINO and torch loaded)."""
    import atexit

    # the user asked to stop: another Ctrl-C now would only print a traceback from an exit function
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report_interrupt(prog: str, err: KeyboardInterrupt, debug: bool = False) -> None:
    """One line for Ctrl-C (exit 130) or SIGTERM (exit 143), then exit."""
    if debug:
        traceback.print_exception(err)
    sigterm = isinstance(err, Terminated) or sigterm_arrived()
    what = "terminated by SIGTERM" if sigterm else "interrupted"
    if prog == "hades-bench":  # a bench job measures a whole run: nothing of it resumes
        advice = "the jobs that finished keep their result.json; a re-run runs every job again"
    else:
        kept = "the training state is kept" if prog == "hades-isne" else "committed parts are kept"
        advice = f"{kept}: re-run to resume"
    print(f"{prog}: error: {what} ({advice})", file=sys.stderr)
    _exit_interrupted(143 if sigterm else 130)


def _literal_values(args: list[str], keys: tuple[str, ...]) -> dict[str, str]:
    """The plain string values of `keys` among the overrides (no sweep, no interpolation): what can be
    checked before Hydra starts the job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    found: dict[str, str] = {}
    parser = OverridesParser.create()
    for arg in args:
        key = arg.partition("=")[0].lstrip("+~")
        if key not in keys or arg.startswith("-"):
            continue
        try:
            value = parser.parse_overrides([arg])[0].value()
        except HydraException:
            continue  # Hydra reports it
        if isinstance(value, str) and "${" not in value:
            found[key] = value
    return found


def _refuse_misplaced_output(args: list[str]) -> None:
    """`-m ... output=/data/run a,v2`: a comma in the output path made Hydra sweep the output folder,
    jobs landing in two folders (one relative to the working folder) and the sweep's own files in a
    third. The output is the sweep's folder, one path: refused, with how to write the comma. And
    `hydra.run.dir=` under -m, which Hydra ignores silently."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    multirun = is_sweep(args)
    for arg in args:
        key = arg.partition("=")[0].lstrip("+~")
        if key not in ("output", "hydra.sweep.dir", "hydra.run.dir") or arg.startswith("-"):
            continue
        if multirun and key == "hydra.run.dir":  # Hydra ignores it under -m: the jobs went to ./multirun/<time>/
            raise ConfigError("hydra.run.dir names one run's folder and is not used under -m: give the sweep's "
                              "folder as output= (or hydra.sweep.dir=)")
        try:
            swept = parser.parse_overrides([arg])[0].is_sweep_override()
        except HydraException:
            continue  # Hydra reports it
        if swept:
            raise ConfigError(f"{key}= names one folder, the sweep's: {arg!r} would sweep it (a comma is a sweep "
                              f"under -m); escape the comma (\\,) or quote the path ({key}='\"a,b\"')")


EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"


def name_swept_corpus(args: list[str]) -> list[str]:
    """`-m corpus=a,b`: the job folders name the corpus (`conf/config.yaml` leaves it out of them, a
    path being long): otherwise job 0 of `corpus=a,b` and of a later `corpus=b,a` was one folder,
    which then held both corpora, silently. Left alone when the user sets the exclude keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if not is_sweep(args) or any(a.lstrip("+~").startswith(EXCLUDE_KEYS) for a in args):
        return args
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or arg.partition("=")[0].lstrip("+~") != "corpus":
            continue
        try:
            swept = parser.parse_overrides([arg])[0].is_sweep_override()
        except HydraException:
            return args  # Hydra reports it
        if swept:
            return [*args, f"{EXCLUDE_KEYS}=[output]"]
    return args


def _check_corpus(corpus: Optional[str]) -> None:
    """`corpus=` given and existing (before Hydra runs the job and again inside it, where an
    interpolated value is known)."""
    if not corpus:
        raise ConfigError("corpus=<dir-or-file> is required")
    if not user_path(corpus).exists():
        raise ConfigError(f"corpus must be an existing file or folder (got {corpus!r})")


def _refuse_empty_folders(values: dict[str, str], keys: tuple[str, ...] = ("hydra.run.dir", "hydra.sweep.dir"),
                          remedy: str = "") -> None:
    """`hydra.run.dir=` / `hydra.sweep.dir=` given empty: the output's files went into the working
    folder itself. (An empty `output=` is Hydra's outputs/<date>_<time>/, as conf/config.yaml says,
    except for `hades-isne`, which passes its keys and what to give instead.)"""
    for key in keys:
        if key in values and not values[key].strip():
            raise ConfigError(f"{key}= is empty: " + (remedy.format(key=key) or
                              f"name the output folder (or leave {key}= out for "
                              f"{'multirun' if key == 'hydra.sweep.dir' else 'outputs'}/<date>_<time>/)"))


def check_ingest_paths(args: list[str]) -> None:
    """`corpus=` that does not exist, or `output=` equal to the corpus, refused before Hydra runs the
    job: Hydra makes the job's folder (`.hydra/`, `<job>.log`) in the output first, so the refusal left
    those behind, in the corpus itself for output == corpus."""
    from hades_gpu.pipelines.ingest import refuse_output_in_sources

    values = _literal_values(args, ("corpus", "output", "hydra.run.dir", "hydra.sweep.dir"))
    corpus, output = values.get("corpus"), values.get("output")
    _refuse_empty_folders(values)
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        job_dir = values.get(key)
        if job_dir is None:
            continue
        if output is not None and user_path(job_dir) != user_path(output):
            # the job's folder is the output: output= was silently ignored and the data went to job_dir
            raise ConfigError(f"output={output} and {key}={job_dir} both name the output folder: give one "
                              f"(output= sets {key})")
        output = job_dir
    if corpus:
        _check_corpus(corpus)
    if corpus and output:
        refuse_output_in_sources(user_path(output), [os.path.expanduser(corpus)])


def run_hydra_main(app: Callable[[], None], prog: str, precheck: Optional[Callable[[list[str]], None]] = None) -> None:
    """Run a `@hydra.main` app as `prog`: every failure a user can cause is one line on stderr.

    `prog: error: <cause>` and exit 2 for the command line and the configuration (Hydra's compose
    errors included), exit 1 for a failed run (see `classify_error`); `--debug` or `HADES_DEBUG=1`
    prints the traceback first. Anything unexpected is a bug: Python's traceback, exit 1.
    """
    debug = _take_debug_flag(sys.argv)
    sys.argv[0] = prog
    # Hydra re-raises instead of printing its own several-line report: we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    before: Optional[tuple[Path, Optional[set[str]]]] = None  # the output= folder and what it held, if it existed
    failures_folder: Optional[str] = None
    try:
        _catch_sigterm()
        _check_hydra_args(sys.argv)
        sys.argv[1:] = quote_path_overrides(sys.argv[1:])
        _refuse_misplaced_output(sys.argv[1:])
        sys.argv[1:] = name_swept_corpus(sys.argv[1:])
        before = _output_before(sys.argv[1:])
        if precheck is not None:
            precheck(sys.argv[1:])
        failures_folder = _begin_sweep_failures(is_sweep(sys.argv[1:]))
        app()
        failed = _end_sweep_failures(failures_folder)
        failures_folder = None
        if failed:  # jobs of a -m sweep that failed (each said why in its line)
            print(printable(f"{prog}: error: {len(failed)} job(s) of the sweep failed"), file=sys.stderr, flush=True)
            sys.exit(max(failed))
    except KeyboardInterrupt as err:
        _end_sweep_failures(failures_folder)  # _report_interrupt leaves with os._exit: no finally runs
        _report_interrupt(prog, err, debug)
    except (_Reported, Exception) as caught:  # noqa: BLE001 - the CLI boundary
        err = caught.err if isinstance(caught, _Reported) else caught
        found = classify_error(err)
        if found is None:
            raise
        code, message = found
        if debug:
            traceback.print_exception(err)
        if code == 2 and before is not None:
            _remove_hydra_leftovers(*before)
        sys.stderr.flush()
        print(printable(f"{prog}: error: {message}"), file=sys.stderr, flush=True)
        sys.exit(code)
    finally:
        if failures_folder is not None:
            shutil.rmtree(failures_folder, ignore_errors=True)


def _output_before(args: list[str]) -> Optional[tuple[Path, Optional[set[str]]]]:
    """The literal `output=` folder and the names in it before Hydra makes its run files there (None:
    it does not exist yet, Hydra makes it for the job); None when no folder is named or it is no folder."""
    output = _literal_values(args, ("output",)).get("output")
    if not output:
        return None
    folder = user_path(output)
    if not folder.exists():
        return folder, None
    try:
        return (folder, set(os.listdir(folder))) if folder.is_dir() else None
    except OSError:
        return None


def _is_hydra_leftover(entry: Path) -> bool:
    return entry.name == ".hydra" or (entry.suffix == ".log" and entry.is_file() and entry.stat().st_size == 0)


def _remove_hydra_leftovers(folder: Path, names_before: Optional[set[str]]) -> None:
    """A refused command (exit 2: nothing ran) left Hydra's `.hydra/` and an empty job log in the
    output= folder. One Hydra made for the command is removed whole when that is all it holds; in one
    that existed and is no ingest output (often the user's own documents, `hades-isne output=~/docs`)
    what the command added is removed, so it is left as it was; an output keeps its files."""
    from hades_gpu.store.manifest import has_manifest

    try:
        entries = list(folder.iterdir())
        if names_before is None:
            if all(_is_hydra_leftover(e) for e in entries):
                shutil.rmtree(folder)
        elif not has_manifest(folder):
            for e in entries:
                if e.name not in names_before and _is_hydra_leftover(e):
                    shutil.rmtree(e) if e.is_dir() else e.unlink()
    except OSError:
        pass


def _run_hydra_app(task: Callable[[PipelineConfig, Path], None], prog: str,
                   precheck: Optional[Callable[[list[str]], None]] = None) -> None:
    """Run `task` as a Hydra app over `conf/`; failures become one line on stderr (`run_hydra_main`)."""
    try:
        import hydra

        register_configs()
    except KeyboardInterrupt as err:  # Ctrl-C while Hydra imports (the first ~0.5 s): no traceback
        _report_interrupt(prog, err)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    try:
        config_path = str(conf_dir())
    except ConfigError as err:  # HADES_GPU_CONF_DIR naming no config: one line, as any configuration error
        print(printable(f"{prog}: error: {err}"), file=sys.stderr, flush=True)
        sys.exit(2)

    @hydra.main(config_path=config_path, config_name="config", version_base="1.3")
    @guarded
    def app(dcfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        cfg = name_profile(to_pipeline_config(dcfg), HydraConfig.get().runtime.choices.get("profile"))
        out = _job_output_dir(cfg)
        cfg.output = str(out)  # what metrics.json records: the job's folder (in -m, output/<job>)
        task(cfg, out)

    run_hydra_main(app, prog, precheck)


def _sweep_folder() -> list[Path]:
    """[the folder of the running `-m` sweep], or []: it is not a document of a corpus that holds it
    (Hydra's multirun.yaml there was ingested by every job whose output lay inside the corpus)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or not hc.sweep.dir:
        return []
    return [Path(hc.runtime.cwd) / os.path.expanduser(str(hc.sweep.dir))]


def _ingest_task(cfg: PipelineConfig, out: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from hades_gpu.pipelines.ingest import TextParallelPipeline

    if cfg.corpus and not os.path.isabs(os.path.expanduser(cfg.corpus)):
        # relative to where the command ran: with hydra.job.chdir=true the job runs in its own folder,
        # and a corpus=docs that exists was refused as missing
        cfg.corpus = os.path.join(HydraConfig.get().runtime.cwd, cfg.corpus)
    _check_corpus(cfg.corpus)
    if cfg.cluster.mode != "none":
        from hades_gpu.cluster import ClusterIngest  # the [cluster] extra: imported only when asked for

        result = ClusterIngest(cfg, skip_folders=_sweep_folder()).run([cfg.corpus], out)
        c = result.metrics.get("cluster", {})
        print(printable(f"{out}: cluster ({c.get('mode')}): {c.get('shards')} shard(s), "
                        f"{c.get('shards_done_earlier', 0)} done earlier, {c.get('retries', 0)} retried; "
                        f"{result.metrics.get('wall_s', 0.0):.1f} s"))
    else:
        result = TextParallelPipeline(cfg, skip_folders=_sweep_folder()).process_batch([cfg.corpus], output=out)
    print(printable(f"{out}: {result.documents_ingested} document(s) ingested, {result.chunks_written} chunk(s), "
                    f"{result.documents_unchanged} unchanged, {result.documents_skipped} skipped"
                    f"{f', {result.documents_removed} removed' if result.documents_removed else ''}; "
                    f"{result.metrics.get('chunks_per_s', 0.0):.1f} chunks/s"))
    for skip in result.skipped[:20]:
        print(printable(f"  skipped {skip['path']}: {skip['reason']}{': ' + skip['detail'] if skip['detail'] else ''}"))
    if len(result.skipped) > 20:
        print(printable(f"  ... {len(result.skipped) - 20} more in {out / 'metrics.json'}"))


def _reader_may_leave(main: Callable[..., None]) -> Callable[..., None]:
    """A console entry point whose output may go to a reader that stops early (`hades-search ... |
    head -3`, `hades-ingest --help | head`): a closed pipe ends it quietly, exit 1, instead of a
    BrokenPipeError traceback (Python's documented recipe: stdout pointed at /dev/null so the exit's
    own flush does not fail again)."""

    @functools.wraps(main)
    def entry(*args: object, **kwargs: object) -> None:
        try:
            try:
                main(*args, **kwargs)
            finally:
                sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)

    return entry


@_reader_may_leave
def ingest_main() -> None:
    """`hades-ingest`: the main job."""
    _run_hydra_app(_ingest_task, "hades-ingest", check_ingest_paths)


def _refuse_unless_ingest_output(dataset: Path) -> None:
    from hades_gpu.isne.stage import NotAnIngestOutputError
    from hades_gpu.store.layout import no_manifest_detail
    from hades_gpu.store.reader import is_ingest_output

    if not is_ingest_output(dataset):  # else the pipeline would ingest the folder (Hydra's .hydra/ files) into itself
        raise NotAnIngestOutputError(f"{dataset} is not an ingest output {no_manifest_detail(dataset)}: give output= a "
                                     f"folder hades-ingest wrote (`hades-ingest corpus=<documents> output=<folder>` first)")


def check_isne_paths(args: list[str]) -> None:
    """`hades-isne` needs output= naming an ingest output, checked before Hydra runs the job: without
    output= Hydra made a fresh `outputs/<date>_<time>/` folder (never an ingest output) and left it
    behind with the refusal; a regular file there failed Hydra's mkdir with exit 1 and "File exists"."""
    if is_sweep(args):
        # each job trained a folder of its own (output/<job>, no ingest output) and left it in the dataset
        raise ConfigError("hades-isne trains the one output given, and -m would make a folder per job inside it: run "
                          "hades-isne once per setting, or compare settings with `hades-bench -m bench=isne "
                          "corpus=<documents> isne.<key>=a,b`")
    if any(a in ("--help", "-h", "--hydra-help", "--version", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
           or a.startswith(("--info=", "--cfg=")) for a in args):
        return  # Hydra answers these without running the job (--help exited 2 with "output= is required")
    if any(a.startswith(("--config-name", "-cn", "--config-dir", "-cd")) for a in args):
        return  # a config of the user's own may set output=
    values = _literal_values(args, ("output", "hydra.run.dir"))
    if "output" in values and "hydra.run.dir" in values and user_path(values["output"]) != user_path(values["hydra.run.dir"]):
        # Hydra's job folder is the one trained: output= was ignored, silently
        raise ConfigError(f"output={values['output']} and hydra.run.dir={values['hydra.run.dir']} both name the output "
                          f"folder: give one (output= sets hydra.run.dir)")
    dataset = values.get("output", values.get("hydra.run.dir"))
    # Hydra made outputs/<time>/ here, inside an output run from
    _refuse_empty_folders(values, ("output", "hydra.run.dir"), "give the ingest output folder ({key}=<folder hades-ingest wrote>)")
    if dataset is None:
        if any(a.partition("=")[0].lstrip("+~") in ("output", "hydra.run.dir") for a in args):
            return  # interpolated: the job checks it
        raise ConfigError("output=<ingest output> is required: the folder hades-ingest wrote")
    _refuse_unless_ingest_output(user_path(dataset))


def _isne_task(cfg: PipelineConfig, out: Path) -> None:
    from hades_gpu.pipelines.isne_training import ISNETrainingPipeline

    dataset = Path(cfg.output or out)
    _refuse_unless_ingest_output(dataset)
    result = ISNETrainingPipeline(cfg).train(corpus_path=dataset)
    print(printable(result.summary()))
    if result.metrics.get("mode") == "untrained":
        from hades_gpu.pipelines.isne_training import NothingTrainedError

        raise NothingTrainedError(
            f"nothing trained: the time budget of {result.metrics.get('time_budget_s') or 0.0:.3g} s ended training "
            f"before its first batch ({'the earlier model and its vectors are kept' if result.metrics.get('kept_model') else 'no model'}); "
            f"raise isne.time_budget_s, or set isne.time_budget_vs_embedding=0 for no budget")


@_reader_may_leave
def isne_main() -> None:
    """`hades-isne output=<ingest output>`: build the chunk graph and train ISNE on it."""
    _run_hydra_app(_isne_task, "hades-isne", check_isne_paths)


@_reader_may_leave
def serve_main(argv: Optional[list[str]] = None) -> None:
    """`hades-serve`: start a real tritonserver on `triton_models/` (argparse, not Hydra)."""
    from hades_gpu.embedding.serve_cli import serve_cli

    sys.exit(serve_cli(argv))


@_reader_may_leave
def search_main(argv: Optional[list[str]] = None) -> None:
    """`hades-search <output> "query" [-k 10] [--embedder local|triton] [--expand graph|isne] [--json]`."""
    from hades_gpu.retrieval.search_cli import search_cli

    sys.exit(search_cli(argv))


def check_bench_paths(args: list[str]) -> None:
    """`hades-bench`'s output= checked before Hydra writes its run files there (`jobs.check_job_folder`;
    under -m, the sweep's folder: an ingest output, or inside the corpus)."""
    from hades_gpu.benchmarks.jobs import check_bench_folder, check_job_folder

    values = _literal_values(args, ("corpus", "output", "hydra.run.dir", "hydra.sweep.dir"))
    _refuse_empty_folders(values)
    sweep = is_sweep(args)
    folder = values.get("output", values.get("hydra.sweep.dir" if sweep else "hydra.run.dir"))
    if folder is None or "corpus" not in values:
        return  # the job checks its own folder
    output, corpus = user_path(folder), str(user_path(values["corpus"]))
    (check_bench_folder if sweep else check_job_folder)(output, corpus)  # a sweep's jobs check their own folders


@_reader_may_leave
def bench_main() -> None:
    """`hades-bench [-m] corpus=<dir> [bench=ingest|embed_only|triton|isne] [profile=...] ...`: one
    benchmark job per combination, each writing `result.json` into its Hydra output folder."""
    from hades_gpu.benchmarks.jobs import run_bench_app

    try:
        run_bench_app("hades-bench", guard=guarded, run=functools.partial(run_hydra_main, precheck=check_bench_paths))
    except ConfigError as err:  # raised before the app runs: HADES_GPU_CONF_DIR naming no config
        print(printable(f"hades-bench: error: {err}"), file=sys.stderr, flush=True)
        sys.exit(2)


@_reader_may_leave
def report_main(argv: Optional[list[str]] = None) -> None:
    """`hades-report <multirun-dir>`: the sweep's results as `report.md` and PNG plots."""
    from hades_gpu.benchmarks.report import report_cli

    sys.exit(report_cli(argv))
