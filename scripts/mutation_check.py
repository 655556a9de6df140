#!/usr/bin/env python
"""Mutation testing of the core modules with mutmut 3, each module group against its fast tests.

Why: a suite can pass while a feature is broken (an assertion any value satisfies, a check of a
prefix only). mutmut makes one-line changes to the code (a ``+=`` to ``=``, a ``<`` to ``<=``, an
argument to ``None``) and runs the tests that cover each changed function; a mutant the tests do not
notice "survives". Run it here, not in CI (55 minutes on 2 cores for every group by default,
DEFAULT_MINUTES; complete runs of the big groups take longer, --timeout-min):

    scripts/mutation_check.sh                 # every group
    scripts/mutation_check.sh store graph     # some groups

Each group runs in its own scratch copy of the working tree (``$HADES_MUTATION_DIR``, default
/tmp/hades-mutation/<group>), so the checkout is never touched; results go to
``docs/mutation/results.json`` and ``docs/mutation/report.md`` (killed / survived / no tests / timeout per
module and group, and every survivor with its diff).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# group -> (files mutmut may change, the fast tests that exercise them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "store": (["hades_gpu/store/*"], ["tests/store"]),
    # the real-ingest scrape test is end to end (a compiled model, worker processes): not a fast test
    "orchestration": (["hades_gpu/orchestration/*"], ["tests/orchestration", "--deselect",
                                                      "tests/orchestration/test_prometheus.py::test_scrape_during_a_real_ingest"]),
    "chunking": (["hades_gpu/documents/chunking*"], ["tests/documents/test_chunking.py"]),
    "isne": (["hades_gpu/isne/*"], ["tests/isne/test_model.py", "tests/isne/test_sampling.py",
                                    "tests/isne/test_trainer.py", "tests/isne/test_evaluation.py"]),
    "graph": (["hades_gpu/graph/*"], ["tests/graph", "--deselect", "tests/graph/test_build.py::test_knn_blocked_equals_brute_force[1]"]),
}
TARGETS = {"store": 0.80, "orchestration": 0.80}  # the other core groups: 0.70
# Minutes per group when --timeout-min is not given: all five fit in 55 minutes on this 2-core box.
# store and chunking finish well inside theirs; the others stop where their time ends, and the
# mutants not reached are reported as "not checked" (left out of the rates). Give a group more
# with --timeout-min for a complete run (graph: about 30, orchestration about 50 minutes here).
DEFAULT_MINUTES = {"store": 5.0, "chunking": 3.0, "graph": 16.0, "orchestration": 18.0, "isne": 13.0}
LINE = re.compile(r"^\s*(?P<name>[\w.ǁ]+__mutmut_\d+):\s*(?P<status>[\w ]+?)\s*$")


def scratch_copy(group: str, base: Path) -> Path:
    """The working tree's tracked and untracked (not ignored) files, with this group's mutmut config."""
    dest = base / group
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    mutate, tests = GROUPS[group]
    with open(dest / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write("\n[tool.mutmut]\n"
                'source_paths = ["hades_gpu"]\n'
                # what tests read beside the package: Hydra configs, sample corpus, Triton repo, scripts
                'also_copy = ["conf", "examples", "triton_models", "scripts"]\n'
                f"only_mutate = {json.dumps(mutate)}\n"
                f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
                'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]\n'
                # torch and worker processes are not fork-safe after pytest ran: fork from a clean server
                'process_isolation = "forkserver"\n')
    return dest


def run_group(group: str, base: Path, children: int, timeout_s: float, collect_only: bool = False) -> dict[str, Any]:
    mutmut = [sys.executable, "-m", "mutmut"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("HADES_TEST_STRICT", None)
    t0 = time.monotonic()
    if collect_only:  # results of an earlier run in `base`; its time is in its stamp file
        work = base / group
        stamp = work / "mutmut-run.seconds"
        seconds, rc = (json.loads(stamp.read_text()) if stamp.is_file() else [0.0, -1])
    else:
        work = scratch_copy(group, base)
        with open(work / "mutmut-run.log", "w", encoding="utf-8") as log:
            try:
                rc = subprocess.run([*mutmut, "run", "--max-children", str(children)], cwd=work, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = 124  # stopped at --timeout-min: the mutants not reached stay "not checked"
        seconds = time.monotonic() - t0
        (work / "mutmut-run.seconds").write_text(json.dumps([seconds, rc]))
    listing = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                             text=True).stdout
    mutants = [(m.group("name"), m.group("status")) for m in map(LINE.match, listing.splitlines()) if m]
    def show(name: str) -> dict[str, Any]:
        diff = subprocess.run([*mutmut, "show", name], cwd=work, env=env, capture_output=True, text=True).stdout
        changed = [line for line in diff.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
        return {"name": name, "diff": changed[:4], "reason": classify(changed[:4], name)}

    with ThreadPoolExecutor(max_workers=max(2, children * 2)) as pool:  # one `mutmut show` process each
        survivors = list(pool.map(show, [name for name, status in mutants if status == "survived"]))
    return {"group": group, "rc": rc, "seconds": round(seconds, 1), "mutants": mutants, "survivors": survivors,
            "tests": GROUPS[group][1], "mutate": GROUPS[group][0]}


# Survivors whose change cannot alter behaviour users see, recognised by the changed line; anything
# else is listed as "unexplained" (a test to add, or an equivalent mutant to reason about by hand).
EQUIVALENT_PATTERNS: list[tuple[str, str]] = [
    (r"\blog(ger)?\.(debug|info|warning|error|exception)\(", "log text or arguments only"),
    (r"\bwarnings\.warn\(", "warning text only"),
    (r"pa\.array\(\[.*\], (None|)\)", "the table's schema fixes the column type either way"),
    (r"compression=\"ZSTD\"", "codec names are case-insensitive"),
    (r"json\.dumps\(.*separators", "JSON whitespace only"),
    (r"rsplit\(\"-\", (2|)\)|\)\[\+1\]", "part names have a single '-' before their number"),
    (r"with open\(tmp, \) as fh", "only fileno() of the handle is used (fsync)"),
    (r"^\s*def \w+\(.*=", "a default every caller overrides"),
    (r"GaugeMetricFamily\(f\"\{PREFIX\}_\{name\}\", doc, value=value, (unit=None|)\)",
     "no gauge passes a unit: '' and None both mean none"),
    (r"raise PipelineAborted\(None\)", "the stop signal's text: run() re-raises the first stage error instead"),
    (r"\.put\((doc|batch|out), (timeout=None|timeout=1\.5|)\)",
     "a put's poll interval: every stop aborts the queues, which wakes a blocked put at once"),
    (r"kwargs=\{\"poll_interval\": 1\.2\}|kwargs=None,", "the HTTP loop's shutdown poll interval only"),
]
# Survivors recognised by the function they are in: code this box cannot run.
NAME_PATTERNS: list[tuple[str, str]] = [
    (r"ǁNvmlProbeǁread__", "GPU-only: reads each CUDA device, and this box has none (scripts/gpu_check.sh runs it)"),
]


def _text_only(removed: str, added: str) -> bool:
    """True when `added` is `removed` with one string literal's text wrapped in XX or re-cased: a
    help, log or error text. (Keys and names are strings too, but changing one breaks a test, so
    such a mutant is killed and never reaches this check.)"""
    for m in re.finditer(r'"([^"]*)"', removed):
        text = m.group(1)
        for variant in (f"XX{text}XX", text.upper(), text.lower()):
            if variant != text and removed[:m.start(1)] + variant + removed[m.end(1):] == added and " " in text:
                return True
    return False


# Survivors reviewed by hand, by the function they are in: one line of why each group survives. They
# stay in the score's denominator (reviewed is not equivalent); the line says what a test would need.
REVIEWED: list[tuple[str, str]] = [
    (r"graph\.build\.x_build_chunk_graph__", "per-kind timings (`seconds`) and log arguments, dtype arguments on arrays "
     "that already have that dtype, and the dedup key's arithmetic (a collision needs > 2^31 chunks)"),
    (r"graph\.io\.x_load_chunk_table__", "dtype arguments of arrays that already hold that type, the no-chunks "
     "placeholders, and the stable sort (ids are unique after the dedup, so stability cannot show)"),
    (r"graph\.build\.x_reference_edges__", "the zero-length results of branches the fixtures do not reach (documents "
     "without chunks on one side only) and their dtypes; the counts' initial values on those branches"),
    (r"graph\.build\.x_same_document_edges__", "equivalent: offsets that the 'small document' rule and the spread rule "
     "both give; duplicate offsets are removed by build_chunk_graph's dedup, so the edge set is the same"),
    (r"graph\.references\.xǁReferenceResolverǁresolve_(link|module)__", "separators and split limits that only differ "
     "for targets with several '#'/'?' or one-sided '<'/'>' that no corpus here writes"),
    (r"graph\.(build|io|knn)\.x_(make_data|symmetrize|load_graph|embeddings_to_numpy|knn_brute_force|index_of|"
     r"load_chunk_ids|_ordered_int32|_topk_by_value_then_index)__", "dtype and copy arguments that numpy/torch/arrow "
     "resolve to the same values, and sort stability where the keys are already distinct"),
    (r"graph\.device\.x_resolve_device__", "removed since: one device-selection function (gpu.device.select_device), "
     "tested in tests/gpu/test_cuda_embedder.py"),
    (r"graph\.io\.x_(list_part_files|read_parts|write_parquet_atomic)__", "removed since: part listing, reading and "
     "atomic writes moved to store/ (tests/store/test_reader.py, test_atomic_and_resume.py)"),
    (r"store\.manifest\.(x__connect|xǁManifestǁ(load|_import_legacy|__init__)|x_committed_parts)__", "durability "
     "and locking settings (synchronous=FULL, busy timeout, read-only mode, thread check) that only a power loss or a "
     "second writer shows, the directory fsync after creating the file, and the import's log line"),
    (r"store\.(reader|writer)\.(x_embeddings_to_numpy|x_read_isne_embeddings|x_read_table|xǁDatasetWriterǁ(_tables|"
     r"__init__|begin_document|flush|_drop_documents))__", "dtype and zero-copy arguments Arrow/numpy resolve to the "
     "same values, mkdir(parents=...) for folders that exist, the empty-table placeholders"),
    (r"isne\.stage\.x_run_isne_stage__", "keys, values and timings of the stage's report in metrics.json and of the "
     "checkpoint's config (tested since, value by value, by test_the_stage_report_is_exact_and_the_checkpoint_"
     "records_its_training), and the device argument (CPU either way here)"),
    (r"isne\.stage\.x_write_isne_embeddings__", "dtype and offset-type arguments Arrow resolves to the same column"),
    (r"isne\.evaluation\.x_(evaluate|knn_cv_accuracy|sbm_graph)__", "the evaluation harness (scripts/eval_isne.py): "
     "devices and flags of its baselines and generator settings; its tests check thresholds, not exact figures"),
    (r"isne\.(checkpoint|inference)\.x_(load_checkpoint|_decode_ids|infer_from_checkpoint)__", "device arguments "
     "(CPU either way here) and the text of a wrong-format error"),
    (r"isne\.trainer\.x_train_isne__", "CUDA-only branches (AMP, peak-memory stats), device arguments, per-epoch "
     "timings and the log line"),
    (r"orchestration\.queue\.xǁMemoryAwareQueueǁ(get|put|__init__|_can_admit|stats)__|orchestration\.queue\.x__default",
     "backoff and deadline arithmetic of waits the tests end by closing or aborting, counters' exact increments "
     "(tests check > 0), the text of QueueClosed, and argument-validation bounds at their edge (exact wait counts and "
     "the bounds are tested since: test_edges_of_the_arguments_and_exact_wait_counts)"),
    (r"orchestration\.workers\.(x__reset_foreign_start_method|xǁWorkerPoolǁ(__init__|_start_worker|has_room|"
     r"_reap_dead_workers)|x__worker_main)__", "the loky start-method reset (only inside a joblib worker; the "
     "Hydra joblib sweep test runs it in a subprocess mutmut cannot see), worker process name and daemon flag, a "
     "default every caller overrides, has_room at exactly full capacity, the dead-worker log line"),
    (r"orchestration\.(monitoring\.xǁ(RunMetrics|PeakMemorySampler)ǁ__init__|prometheus\.xǁNvmlProbeǁ(__init__|close))__",
     "initial values every run overwrites before reading (documents_total, peaks), and the NVML probe list on a "
     "box without a GPU"),
    (r"orchestration\.batcher\.(xǁLengthSortedBatcherǁ(__init__|_cut|add|flush)|x_fill_batch)__", "keep_last=None "
     "(falsy, as False) and the window's running token count reset, which the next add recomputes; the validation "
     "bound at max_batch_tokens == max_seq_len (tested since)"),
    (r"documents\.chunking\.x_(process_document|chunk_text|chunk_document)__", "the skip paths' placeholder fields "
     "(ref, content_hash of a skipped document, read by nobody), the shared-tokenizer argument (the same tokenizer "
     "either way), and the re-encode flag's default that every caller passes"),
    (r"graph\.build\.x_(build_graph|_doc_groups)__|graph\.build\.xǁChunkGraphǁ(to_table|counts_by_type)__|"
     r"graph\.io\.x__committed_parts__|graph\.references\.(xǁReferenceResolverǁ(_exact_module|_module_candidates)"
     r"|x__module_parts)__", "log arguments on a continuation line, Arrow types given where the schema fixes them, "
     "`.pyi` spellings no corpus here has, and defaults of lookups whose key always exists"),
    (r"isne\.(checkpoint\.x_(_encode_ids|save_checkpoint)|sampling\.xǁCSRGraphǁto)__", "codec-name case ('UTF-8' "
     "is 'utf-8'), dtype arguments numpy infers the same, JSON default=str for configs that are plain JSON, "
     "device moves on a CPU-only box"),
    (r"orchestration\.pipeline\.xǁStreamingPipelineǁrun__", "stage thread names and daemon flags (tested since by "
     "test_ctrl_c_ends_the_run_promptly_and_stage_threads_are_named_daemons), join poll intervals, and the cause "
     "unwrapping of a PipelineAborted that is never the first error"),
    (r"orchestration\.pipeline\.xǁ(StreamingPipeline|WorkerPoolSource)ǁ(_feed|_emit|_embed|_batch|_guard|_fail|"
     r"documents|__init__)__", "poll intervals of waits that a stop also ends (ring acquire, pool results), the "
     "debug log of a failed stage, and stage meters' busy time (timings, not results)"),
    (r"orchestration\.prometheus\.xǁ(MetricsEndpoint|_QuietHandler)ǁ", "the HTTP server's poll interval, registry "
     "describe-at-register, the quiet handler's debug text, attributes reset by start()"),
    (r"orchestration\.prometheus\.x_start_endpoint__", "called only by an ingest with monitoring.prometheus=true: the "
     "real-ingest scrape test, which is not one of the fast tests"),
    (r"orchestration\.monitoring\.xǁProgressReporterǁ(start|update|__init__)__", "rich column choices and the "
     "bar's transient flag (what a terminal draws), and the log line's schedule comparison (>= vs >)"),
    (r"orchestration\.monitoring\.xǁPeakMemorySamplerǁ(sample|start)__", "a byte's offset in a sum of RSS, psutil "
     "error paths (a process that exits while sampled), the sampler thread's name"),
]


def classify(diff: list[str], name: str = "") -> str:
    for pattern, reason in NAME_PATTERNS:
        if re.search(pattern, name):
            return f"equivalent here (by function): {reason}"
    added = [line[1:] for line in diff if line.startswith("+")]
    removed = [line[1:] for line in diff if line.startswith("-")]
    if len(added) == len(removed) == 1 and _text_only(removed[0], added[0]):
        return "equivalent (by pattern): the text of a message (help, log or error text), not a key"
    for pattern, reason in EQUIVALENT_PATTERNS:
        if any(re.search(pattern, line) for line in added + removed):
            return f"equivalent (by pattern): {reason}"
    if removed and added and all('"' in a for a in added) and \
            re.sub(r'"[^"]*"', '""', added[0]) == re.sub(r'"[^"]*"', '""', removed[0]) and "raise" in removed[0]:
        return "equivalent (by pattern): error-message text only"
    for pattern, reason in REVIEWED:
        if re.search(pattern, name):
            return f"reviewed: {reason}"
    return "unexplained"


def module_of(name: str) -> str:
    """hades_gpu.store.writer.xǁDatasetWriterǁclose__mutmut_3 -> hades_gpu/store/writer.py"""
    parts = name.split(".")
    mod = [p for p in parts if not p.startswith("x")]
    return "/".join(mod) + ".py"


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    table = []
    for r in results:
        counts: dict[str, int] = {}
        per_module: dict[str, dict[str, int]] = {}
        for name, status in r["mutants"]:
            counts[status] = counts.get(status, 0) + 1
            m = per_module.setdefault(module_of(name), {})
            m[status] = m.get(status, 0) + 1
        unchecked = counts.get("not checked", 0)
        total = sum(counts.values()) - unchecked  # mutants the run reached
        killed = counts.get("killed", 0) + counts.get("timeout", 0)  # a timeout is a detected change
        target = TARGETS.get(r["group"], 0.70)
        table.append({"group": r["group"], "total": total, "killed": counts.get("killed", 0),
                      "timeout": counts.get("timeout", 0), "survived": counts.get("survived", 0),
                      "no_tests": counts.get("no tests", 0), "not_checked": unchecked,
                      "other": {k: v for k, v in counts.items()
                                if k not in ("killed", "timeout", "survived", "no tests", "not checked")},
                      "kill_rate": round(killed / total, 3) if total else None, "target": target,
                      "seconds": r["seconds"], "rc": r["rc"], "per_module": per_module, "tests": r["tests"]})
        _score(table[-1], r["survivors"])
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "tool": _mutmut_version(),
            "groups": table, "survivors": {r["group"]: r["survivors"] for r in results}}


def reclassify(summary: dict[str, Any]) -> dict[str, Any]:
    """Classify a stored report's survivors again (after the patterns or the reviewed notes changed)
    and recompute each group's score; the mutants themselves are not run again."""
    for g in summary["groups"]:
        survivors = summary["survivors"].get(g["group"], [])
        for sv in survivors:
            sv["reason"] = classify(sv["diff"], sv["name"])
        _score(g, survivors)
    return summary


def _score(g: dict[str, Any], survivors: list[dict[str, Any]]) -> None:
    """The mutation score proper: equivalent survivors leave the denominator; `met` is checked on it."""
    killed = g["killed"] + g["timeout"]
    g["equivalent"] = sum(1 for sv in survivors if sv.get("reason", "unexplained").startswith("equivalent"))
    scored = g["total"] - g["equivalent"]
    g["score"] = round(killed / scored, 3) if scored else None
    g["met"] = bool(scored) and killed / scored >= g["target"]


def _mutmut_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"mutmut {version('mutmut')}"
    except PackageNotFoundError:  # reclassifying a stored report needs no mutmut
        return "mutmut (not installed here)"


def write_report(summary: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [f"# Mutation testing ({summary['tool']}, {summary['date']})", "",
             "Kill rate = (killed + timeout) / mutants checked; \"no tests\" mutants count as not killed. "
             "Score = (killed + timeout) / (checked - equivalent): the mutation score proper, with the survivors "
             "classified below as equivalent (a change users cannot see, or code this box cannot run) left out; "
             "the target is checked on it. \"not checked\": mutants a run did not reach before --timeout-min.", "",
             "| group | tests | mutants checked | killed | timeout | survived | equivalent | no tests | not checked | kill rate | score | target | met | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in summary["groups"]:
        lines.append(f"| {g['group']} | {' '.join(g['tests'])} | {g['total']} | {g['killed']} | {g['timeout']} | "
                     f"{g['survived']} | {g.get('equivalent', '')} | {g['no_tests']} | {g.get('not_checked', 0)} | "
                     f"{g['kill_rate']} | {g.get('score', '')} | {g['target']} | "
                     f"{'yes' if g['met'] else 'NO'} | {g['seconds'] / 60:.1f} |")
    lines += ["", "## Per module", "", "| module | killed | survived | no tests |", "|---|---|---|---|"]
    for g in summary["groups"]:
        for mod, c in sorted(g["per_module"].items()):
            lines.append(f"| {mod} | {c.get('killed', 0) + c.get('timeout', 0)} | {c.get('survived', 0)} | "
                         f"{c.get('no tests', 0)} |")
    lines += ["", "## Survivors", ""]
    for group, survivors in summary["survivors"].items():
        lines.append(f"### {group} ({len(survivors)})")
        lines.append("")
        unexplained = [s for s in survivors if s.get("reason", "unexplained") == "unexplained"]
        reviewed = [s for s in survivors if s.get("reason", "").startswith("reviewed")]
        lines.append(f"{len(survivors) - len(unexplained) - len(reviewed)} equivalent (by pattern or function), "
                     f"{len(reviewed)} reviewed by hand (a reason per function), {len(unexplained)} unexplained "
                     f"(listed first)")
        lines.append("")
        for s in sorted(survivors, key=lambda s: s.get("reason", "unexplained") != "unexplained"):
            lines.append(f"- `{s['name']}` ({s.get('reason', 'unexplained')}): "
                         f"`{' / '.join(d.strip() for d in s['diff'])[:200]}`")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("groups", nargs="*", default=list(GROUPS), help=f"groups to run (default: all of {list(GROUPS)})")
    ap.add_argument("--children", type=int, default=max(1, os.cpu_count() or 1), help="parallel mutants")
    ap.add_argument("--timeout-min", type=float, default=None,
                    help=f"minutes per group (default: {DEFAULT_MINUTES}, 55 in all)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mutation"))
    ap.add_argument("--work", default=os.environ.get("HADES_MUTATION_DIR", "/tmp/hades-mutation"))
    ap.add_argument("--collect-only", action="store_true", help="report the results already in --work")
    ap.add_argument("--reclassify", action="store_true",
                    help="classify the survivors in --out's results.json again and rewrite the report (no run)")
    args = ap.parse_args(argv)
    if args.reclassify:
        out = Path(args.out)
        summary = reclassify(json.loads(out.joinpath("results.json").read_text(encoding="utf-8")))
        write_report(summary, out)
        print(f"mutation_check: {out / 'report.md'} (reclassified)")
        return 0 if all(g["met"] for g in summary["groups"]) else 1
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; choose from {list(GROUPS)}")
    results = []
    for group in args.groups:
        print(f"mutation_check: {group} ...", flush=True)
        minutes = args.timeout_min if args.timeout_min is not None else DEFAULT_MINUTES[group]
        r = run_group(group, Path(args.work), args.children, minutes * 60, args.collect_only)
        results.append(r)
        done = summarise(results)
        g = done["groups"][-1]
        print(f"mutation_check: {group}: {g['total']} mutants, kill rate {g['kill_rate']} (target {g['target']}), "
              f"{g['survived']} survived, {g['no_tests']} without tests, {g['seconds'] / 60:.1f} min", flush=True)
    summary = summarise(results)
    out = Path(args.out)
    if out.joinpath("results.json").is_file() and set(args.groups) != set(GROUPS):  # merge a partial run
        old = json.loads(out.joinpath("results.json").read_text(encoding="utf-8"))
        keep = [g for g in old.get("groups", []) if g["group"] not in args.groups]
        summary["groups"] = sorted(keep + summary["groups"], key=lambda g: list(GROUPS).index(g["group"]))
        summary["survivors"] = {**{k: v for k, v in old.get("survivors", {}).items() if k not in args.groups},
                                **summary["survivors"]}
    write_report(summary, out)
    print(f"mutation_check: {out / 'report.md'}")
    return 0 if all(g["met"] for g in summary["groups"]) else 1


if __name__ == "__main__":
    sys.exit(main())
