"""The cluster driver: discover once, plan shards, run one Ray task per shard, then the graph once.

`ClusterIngest(config).run(paths, output)` (what ``hades-ingest ... cluster=ray`` calls):

1. discovers the corpus here (the only serial pass over the file names) and fixes the output's
   shard map (`store.shard_map`: the first run chooses the cuts, later runs reuse them);
2. skips every shard whose completion record matches its planned files (a restarted driver redoes
   nothing that finished), and submits the others as Ray tasks (`tasks.ingest_shard`: one GPU each
   where the cluster has GPUs, CPUs from the profile), at most as many at once as the live nodes can
   run, so a task's timeout counts its run, not its wait in a queue;
3. resubmits a failed or lost task (a node that died, a worker killed, a timeout) up to
   `cluster.max_retries` times: the new attempt resumes the shard from its manifest, so every chunk
   is still written exactly once;
4. shows one progress bar (documents committed over all shards, read from their manifests);
5. writes the run's metrics.json (all shards) and runs the graph and ISNE stage once, as one more
   task (on a GPU node when there is one).

Every wait on the cluster has a timeout (`cluster.poll_s`, `task_timeout_s`, `connect_timeout_s`).
The driver holds the output's ``driver`` lock, so two drivers never run on one output at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from hades_gpu.cluster.runtime import cluster_gpus, largest_cpus, node_slots, ray_session
from hades_gpu.cluster.tasks import ingest_shard, run_graph_stage
from hades_gpu.config import ClusterMode, PipelineConfig, ProgressMode, config_to_dict, to_pipeline_config
from hades_gpu.documents.discovery import Skip
from hades_gpu.documents.document_list import DocumentList
from hades_gpu.documents.sharding import shard_bytes, split_refs
from hades_gpu.pipelines.ingest import IngestResult, NothingIngestedError, discover_for_output
from hades_gpu.records import shard_label, user_path
from hades_gpu.store.layout import DRIVER_LOCK_NAME, metrics_path
from hades_gpu.store.metrics_file import write_metrics
from hades_gpu.store.lock import OutputLock
from hades_gpu.store.manifest import committed_document_count
from hades_gpu.store.shard_map import (check_shard_count, ensure_shard_map, load_shard_map, plan_fingerprint,
                                       read_shard_done)

log = logging.getLogger(__name__)

DRIVER_LOCK = DRIVER_LOCK_NAME
SHARDS_PER_SLOT = 4  # cluster.shards=0: more shards than parallel tasks, so stragglers do not hold the run


def _embedder_of(runs: list["ShardRun"]) -> Any:
    """The embedder the shards that ran this time used: one description when they agree, the
    sorted distinct ones when not, None when no shard embedded anything."""
    named = {(r.summary or {}).get("embedder") for r in runs if not r.done_earlier}
    seen = sorted(str(e) for e in named if e)
    return seen[0] if len(seen) == 1 else (seen or None)


class ClusterRunError(RuntimeError):
    """A shard still failed after `cluster.max_retries` resubmissions (the others are committed)."""


@dataclass
class ShardRun:
    """The driver's view of one shard."""

    index: int
    label: str
    refs: DocumentList
    skips: list[Skip]
    fingerprint: str
    attempts: int = 0
    submitted_at: float = 0.0
    started: float = 0.0
    seconds: float = 0.0
    summary: Optional[dict[str, Any]] = None
    done_earlier: bool = False
    errors: list[str] = field(default_factory=list)
    committed: int = 0  # documents in its manifest at the last poll


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # a RayTaskError's text starts with the remote traceback's header: keep its last line (the error)
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:400]


class _Progress:
    """One bar over all shards on a terminal (rich), else a log line every `interval_s`."""

    def __init__(self, total: int, mode: str, interval_s: float) -> None:
        self.total = total
        self.interval_s = interval_s
        self.enabled = mode != ProgressMode.OFF
        self.bar: Any = None
        self._task: Any = None
        self._last = 0.0
        if self.enabled and (mode == ProgressMode.ON or sys.stderr.isatty()):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # on stderr (rich's default is stdout: `... > log` drew the bar into the log)
            self.bar = Progress(TextColumn("[bold]ingest (cluster)"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("docs  {task.fields[shards]}"), TimeElapsedColumn(),
                                console=Console(stderr=True))
            self.bar.start()
            self._task = self.bar.add_task("ingest", total=total, shards="")

    def update(self, done: int, shards_done: int, shards: int, running: int) -> None:
        text = f"shards {shards_done}/{shards} done, {running} running"
        if self.bar is not None:
            self.bar.update(self._task, completed=min(done, self.total), shards=text)
        elif self.enabled and time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            log.info("progress: %d/%d documents committed; %s", done, self.total, text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class ClusterIngest:
    """Ingest a corpus as shards on Ray, then run the graph and ISNE stage once (module docstring).

    Args:
        config (PipelineConfig): the job; `cluster.*` says where and how (``cluster.mode`` ray|local).
    """

    def __init__(self, config: PipelineConfig, *, skip_folders: Sequence[Union[str, os.PathLike]] = ()) -> None:
        self.config = to_pipeline_config(config)
        self.skip_folders = tuple(user_path(f) for f in skip_folders)
        self._source_missing = False  # a named source was not found (documents.remove_missing is then off)
        self._corpus_found = False  # discovery found documents (a shard's share may be none)
        if self.config.cluster.mode == ClusterMode.NONE:
            self.config = dataclasses.replace(self.config, cluster=dataclasses.replace(self.config.cluster,
                                                                                        mode=ClusterMode.LOCAL.value))

    # -- planning --------------------------------------------------------------------------------
    def _shard_shape(self, ray: Any) -> tuple[float, float]:
        k = self.config.cluster
        gpus = k.num_gpus_per_shard if k.num_gpus_per_shard >= 0 else (1.0 if cluster_gpus(ray) >= 1 else 0.0)
        room = largest_cpus(ray, gpus)
        if k.num_cpus_per_shard:
            cpus = float(k.num_cpus_per_shard)
            if room < cpus:  # Ray would queue the task forever: say so instead of waiting
                raise ClusterRunError(f"no node of the cluster offers {cpus:g} CPU(s) and {gpus:g} GPU(s) for one "
                                      f"shard (largest: {room:g} CPU(s)); lower cluster.num_cpus_per_shard or "
                                      f"cluster.num_gpus_per_shard")
            return cpus, gpus
        cpus = float(self.config.profile.num_workers + 1)
        if room <= 0:
            raise ClusterRunError(f"no node of the cluster offers {gpus:g} GPU(s) and a CPU for one shard; "
                                  f"set cluster.num_gpus_per_shard=0 or add nodes")
        if room < cpus:  # the profile's workers + router do not fit the biggest node: take all of it
            log.info("cluster: a shard would want %g CPU(s) (profile.num_workers + 1) but the largest node has %g: "
                     "each shard task asks for %g", cpus, room, room)
            cpus = room
        return cpus, gpus

    def _check_stage_shape(self, ray: Any, gpus: float) -> None:
        """The graph and ISNE task's shape must fit a node: Ray queues a task no node fits for ever
        (cluster.stage_num_cpus=16 on 2-CPU nodes waited, task_timeout_s x attempts)."""
        k = self.config.cluster
        stage_gpus = 1.0 if gpus > 0 else 0.0
        room = largest_cpus(ray, stage_gpus)
        if room < k.stage_num_cpus:
            raise ClusterRunError(f"no node of the cluster offers {k.stage_num_cpus:g} CPU(s) and {stage_gpus:g} GPU(s) "
                                  f"for the graph and ISNE stage (largest: {room:g} CPU(s)); lower "
                                  f"cluster.stage_num_cpus")

    def _shard_count(self, out: Path, slots: int) -> int:
        if self.config.cluster.shards:
            return int(self.config.cluster.shards)
        existing = load_shard_map(out)
        return existing.count if existing is not None else max(2, SHARDS_PER_SLOT * slots)

    def _plan(self, out: Path, refs: DocumentList, skips: list[Skip], count: int) -> list[ShardRun]:
        smap = ensure_shard_map(out, count, refs)
        groups = split_refs(refs, smap.cuts)
        sizes = shard_bytes(groups)
        log.info("cluster: %d documents (%.1f MB) in %d shards, %.1f-%.1f MB each", len(refs),
                 sum(sizes) / 1e6, smap.count, min(sizes) / 1e6, max(sizes) / 1e6)
        runs = []
        for i, group in enumerate(groups):
            label = shard_label(i, smap.count)
            run = ShardRun(i, label, group, list(skips) if i == 0 else [], plan_fingerprint(group))
            record = read_shard_done(out, label)
            # With remove_missing, a shard is skipped only if its last run removed them too: a plain
            # re-run after files were deleted records the same plan, and the shard kept their chunks
            if (record is not None and record.get("fingerprint") == run.fingerprint
                    and (record.get("remove_missing") or not self.config.documents.remove_missing)):
                run.done_earlier = True
                run.summary = record
            runs.append(run)
        return runs

    def _shard_config(self, run: ShardRun, count: int) -> PipelineConfig:
        cfg = self.config
        # shards other than 0 get no discovery skips: a missing source is decided here, once, for all
        documents = dataclasses.replace(cfg.documents, remove_missing=cfg.documents.remove_missing
                                        and not self._source_missing)
        return dataclasses.replace(cfg, shard=f"{run.index}/{count}", documents=documents,
                                   cluster=dataclasses.replace(cfg.cluster, mode=ClusterMode.NONE.value),
                                   monitoring=dataclasses.replace(cfg.monitoring, progress=ProgressMode.OFF.value,
                                                                  prometheus=False))

    # -- the run ---------------------------------------------------------------------------------
    def run(self, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
            output: Union[str, os.PathLike]) -> IngestResult:
        """Ingest `paths` into `output` on the cluster; returns the run summed over all shards."""
        out = Path(output)
        t0 = time.perf_counter()
        with OutputLock(out, DRIVER_LOCK):
            refs, skips = discover_for_output(paths, self.config.documents, out, self.skip_folders)
            self._source_missing = any(s.reason == "missing" for s in skips)
            self._corpus_found = len(refs) > 0
            if self._source_missing and self.config.documents.remove_missing:
                log.warning("documents.remove_missing: nothing removed from %s: a source is missing", out)
            t_discover = time.perf_counter() - t0
            if self.config.cluster.shards:  # refused before Ray starts, not ~6 s later
                check_shard_count(out, int(self.config.cluster.shards))
            with ray_session(self.config.cluster) as ray:
                t_connected = time.perf_counter()
                cpus, gpus = self._shard_shape(ray)
                if self.config.isne.enabled:
                    self._check_stage_shape(ray, gpus)  # before the shards, not after them
                slots = node_slots(ray, cpus, gpus)
                count = self._shard_count(out, slots)
                runs = self._plan(out, refs, skips, count)
                t_plan = time.perf_counter()
                self._run_shards(ray, runs, count, out, cpus, gpus)
                t_shards = time.perf_counter()
                result = self._result(out, runs, skips, refs)
                result.metrics.update(documents_total=result.documents_total,
                                      documents_ingested=result.documents_ingested,
                                      documents_unchanged=result.documents_unchanged,
                                      chunks_written=result.chunks_written, skipped=result.skipped)
                result.metrics.update(self._timings(t0, t_discover, t_connected, t_plan, t_shards, runs, count,
                                                    cpus, gpus, slots))
                self._write_metrics(out, result.metrics)
                nothing = bool(result.documents_total) and not result.documents_ingested and not result.documents_unchanged
                if self.config.isne.enabled and not nothing:  # a run of only bad files wrote a graph of nothing
                    result.isne = self._run_graph_stage(ray, out, gpus)
                    result.metrics["isne"] = result.isne
                    result.metrics["seconds_graph_stage"] = time.perf_counter() - t_shards
                    self._write_metrics(out, result.metrics)
        log.info("cluster: ingested %d document(s), %d chunk(s) into %s in %d shard(s) (%d done earlier), %.1f s",
                 result.documents_ingested, result.chunks_written, out, count,
                 sum(r.done_earlier for r in runs), time.perf_counter() - t0)
        if result.documents_total and not result.documents_ingested and not result.documents_unchanged:
            raise NothingIngestedError(result)
        return result

    def _run_shards(self, ray: Any, runs: list[ShardRun], count: int, out: Path, cpus: float, gpus: float) -> None:
        k = self.config.cluster
        remote = ray.remote(ingest_shard).options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                                   scheduling_strategy="SPREAD")
        queue = deque(r for r in runs if not r.done_earlier)
        pending: dict[Any, ShardRun] = {}
        failed: list[ShardRun] = []
        progress = _Progress(sum(len(r.refs) for r in runs), self.config.monitoring.progress,
                             self.config.monitoring.log_interval_s)
        for r in runs:
            if r.done_earlier:
                log.info("cluster: shard %s finished in an earlier run and its files are unchanged: not run again",
                         r.label)
                r.committed = len(r.refs)
        try:
            while queue or pending:
                limit = node_slots(ray, cpus, gpus)  # re-read: nodes join and leave during a run
                while queue and len(pending) < limit:
                    run = queue.popleft()
                    run.attempts += 1
                    run.submitted_at = time.monotonic()
                    ref = remote.remote(self._shard_config(run, count), run.refs, run.skips, str(out),
                                        self._corpus_found)
                    pending[ref] = run
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=k.poll_s)
                for ref in ready:
                    run = pending.pop(ref)
                    try:
                        run.summary = ray.get(ref, timeout=k.connect_timeout_s)
                        run.seconds = time.monotonic() - run.submitted_at
                    except Exception as err:  # noqa: BLE001 - a lost node, a killed worker, a bug: retried
                        self._failed(run, _one_line(err), queue, failed)
                now = time.monotonic()
                for ref, run in list(pending.items()):
                    if now - run.submitted_at > k.task_timeout_s:
                        ray.cancel(ref, force=True)
                        del pending[ref]
                        self._failed(run, f"timed out after {k.task_timeout_s:.0f} s (cluster.task_timeout_s)",
                                     queue, failed)
                self._progress(out, runs, pending, progress)
        finally:
            progress.stop()
        if failed:
            first = failed[0]
            raise ClusterRunError(f"{len(failed)} shard(s) failed after {k.max_retries} retries, e.g. {first.label}: "
                                  f"{first.errors[-1]}; the other shards are committed: run the same command "
                                  f"again to resume")

    def _failed(self, run: ShardRun, why: str, queue: deque, failed: list[ShardRun]) -> None:
        run.errors.append(why)
        if run.attempts <= self.config.cluster.max_retries:
            log.warning("cluster: shard %s attempt %d failed (%s); submitting it again (it resumes from its manifest)",
                        run.label, run.attempts, why)
            queue.appendleft(run)
        else:
            log.error("cluster: shard %s failed %d time(s), last: %s", run.label, run.attempts, why)
            failed.append(run)

    def _progress(self, out: Path, runs: list[ShardRun], pending: dict[Any, ShardRun], progress: _Progress) -> None:
        for run in pending.values():
            run.committed = committed_document_count(out, run.label)
        for run in runs:
            if run.summary is not None and not run.done_earlier:
                run.committed = len(run.refs)
        progress.update(sum(r.committed for r in runs), sum(r.summary is not None for r in runs), len(runs),
                        len(pending))

    # -- the summary and the final stage ---------------------------------------------------------
    def _result(self, out: Path, runs: list[ShardRun], skips: list[Skip], refs: DocumentList) -> IngestResult:
        result = IngestResult(output_dir=out, documents_total=len(refs) + len(skips))
        for run in runs:
            s = run.summary or {}
            if run.done_earlier:  # its documents are in the output, untouched by this run
                result.documents_unchanged += int(s.get("documents_ingested", 0)) + int(s.get("documents_unchanged", 0))
                result.skipped.extend(s.get("skipped", []))
                continue
            result.documents_ingested += int(s.get("documents_ingested", 0))
            result.documents_unchanged += int(s.get("documents_unchanged", 0))
            result.documents_removed += int(s.get("documents_removed", 0))
            result.chunks_written += int(s.get("chunks_written", 0))
            result.skipped.extend(s.get("skipped", []))
        return result

    def _timings(self, t0: float, t_discover: float, t_connected: float, t_plan: float, t_shards: float,
                 runs: list[ShardRun], count: int, cpus: float, gpus: float, slots: int) -> dict[str, Any]:
        wall = t_shards - t0
        ran = [r for r in runs if not r.done_earlier]
        chunks = sum(int((r.summary or {}).get("chunks_written", 0)) for r in ran)
        return {
            "wall_s": wall,
            "chunks": chunks,
            "chunks_per_s": chunks / wall if wall > 0 else 0.0,
            # what embedded (as an ingest's metrics.json says): the shards' embedders, one line when they agree
            "embedder": _embedder_of(runs),
            "cluster": {"mode": self.config.cluster.mode, "shards": count, "parallel_slots": slots,
                        "num_cpus_per_shard": cpus, "num_gpus_per_shard": gpus,
                        "seconds_discover": t_discover, "seconds_connect": t_connected - t0 - t_discover,
                        "seconds_plan": t_plan - t_connected, "seconds_shards": t_shards - t_plan,
                        "shards_done_earlier": sum(r.done_earlier for r in runs),
                        "retries": sum(max(0, r.attempts - 1) for r in ran)},
            "shards": [{"shard": r.label, "documents": len(r.refs), "bytes": sum(x.size for x in r.refs),
                        "attempts": r.attempts, "seconds": r.seconds, "done_earlier": r.done_earlier,
                        "errors": r.errors, "task_wall_s": (r.summary or {}).get("wall_s"),
                        "host": (r.summary or {}).get("host"), "node": (r.summary or {}).get("node"),
                        "gpu": (r.summary or {}).get("gpu")} for r in runs],
            "config": config_to_dict(self.config),
        }

    def _write_metrics(self, out: Path, metrics: dict[str, Any]) -> None:
        """metrics.json for the whole run, with the output's carried ingest totals (added to `metrics`
        on the first write, so the rewrite after the graph stage does not count the run twice)."""
        metrics.update(write_metrics(metrics_path(out), metrics))

    def _run_graph_stage(self, ray: Any, out: Path, gpus: float) -> dict[str, Any]:
        k = self.config.cluster
        cfg = dataclasses.replace(self.config, cluster=dataclasses.replace(k, mode=ClusterMode.NONE.value))
        remote = ray.remote(run_graph_stage).options(num_cpus=k.stage_num_cpus, num_gpus=1 if gpus > 0 else 0,
                                                      max_retries=0)
        errors: list[str] = []
        for attempt in range(1, k.max_retries + 2):
            ref = remote.remote(cfg, str(out), (socket.gethostname(), os.getpid()))  # this driver's lock: no refusal
            try:
                ready, _ = ray.wait([ref], timeout=k.task_timeout_s)
                if not ready:
                    ray.cancel(ref, force=True)
                    raise TimeoutError(f"timed out after {k.task_timeout_s:.0f} s (cluster.task_timeout_s)")
                return ray.get(ref, timeout=k.connect_timeout_s)
            except Exception as err:  # noqa: BLE001 - the stage rewrites its files: running it again is safe
                errors.append(_one_line(err))
                log.warning("cluster: the graph and ISNE stage failed (attempt %d): %s", attempt, errors[-1])
        raise ClusterRunError(f"the graph and ISNE stage failed {len(errors)} time(s), last: {errors[-1]}; every shard "
                              f"is committed: run `hades-isne output={out}` to retry it alone")


__all__ = ["ClusterIngest", "ClusterRunError", "DRIVER_LOCK"]
