"""The main job: discover -> read/chunk/tokenize (processes) -> batch -> embed -> Parquet dataset.

`TextParallelPipeline(config).process_batch(paths)` is the seed's API. It resumes by itself: a
document whose size and mtime match the manifest is not read again, one whose content hash matches
is not embedded again, and one that changed replaces its old rows.

With ``shard=i/n`` it ingests only shard i of n (`documents.sharding`; the output's shard map fixes
which files those are) under that shard's own lock, manifest, part files and metrics, and records
the shard as finished (`store.shard_map`); the graph and ISNE stage is then left for one run over
all shards (`hades-isne`, or the cluster driver, `hades_gpu.cluster`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import stat
import sqlite3
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from hades_gpu.config import (ConfigError, DocumentsConfig, PipelineConfig, config_to_dict, load_pipeline_config,
                              to_pipeline_config, validate)
from hades_gpu.documents.chunking import process_document_as, warm_up
from hades_gpu.documents.discovery import SAME_FILE_AS, Skip, discover, dotted_extensions, source_list
from hades_gpu.documents.document_list import DocumentList, as_document_list
from hades_gpu.documents.sharding import select_refs
from hades_gpu.documents.tokenizer import model_fingerprint, special_ids, use_model_dir
from hades_gpu.embedding.base import Embedder, EmbedderError
from hades_gpu.embedding.texts import model_probe
from hades_gpu.exit_guard import interrupts_held, stoppable_run
from hades_gpu.orchestration.monitoring import ProgressReporter, RunMetrics
from hades_gpu.orchestration.pipeline import StreamingPipeline, WorkerPoolSource, slab_count, slab_layout
from hades_gpu.orchestration.workers import WorkerLaunch, WorkerPool
from hades_gpu.orchestration.writer_process import WriterProcess, open_writer
from hades_gpu.gpu.slabs import SlabRing, copies_to_cuda
from hades_gpu.records import (DocumentRef, DocumentResult, ShardSpec, error_line, path_argument, path_within, printable,
                               user_path)
from hades_gpu.regular_file import NOT_A_REGULAR_FILE
from hades_gpu.store.atomic import check_writable
from hades_gpu.store.layout import CHUNKS_DIR, DOCUMENTS_DIR, is_output_listing, metrics_path, shard_metrics_path
from hades_gpu.store.manifest import (Manifest, ManifestError, claimed_by_other_shards, committed_parts, has_manifest,
                                      manifest_path, uncommitted_indices)
from hades_gpu.store.reader import DamagedOutputError, committed_paths_of_documents, committed_rel_paths_of_files
from hades_gpu.store.metrics_file import write_metrics
from hades_gpu.store.claims import claim_documents, release_claims
from hades_gpu.store.lock import OutputLock, running_shards
from hades_gpu.store.shard_map import (check_unsharded, clear_shard_done, ensure_shard_map, plan_fingerprint,
                                       write_shard_done)
from hades_gpu.store.resume import Resume, ResumePolicy
from hades_gpu.store.writer import DatasetWriter

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass
class IngestResult:
    """What one `process_batch` call did."""

    output_dir: Path
    documents_total: int = 0  # discovered (skipped ones included)
    documents_ingested: int = 0  # chunked and embedded in this run
    documents_unchanged: int = 0  # already in the output, left alone (resume)
    documents_removed: int = 0  # no longer in the corpus, removed from the output (documents.remove_missing)
    chunks_written: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # path, reason, detail
    metrics: dict[str, Any] = field(default_factory=dict)
    isne: Optional[dict[str, Any]] = None

    @property
    def errors(self) -> dict[str, str]:
        """Per-document errors: path -> "reason: detail"."""
        return {s["path"]: f"{s['reason']}: {s['detail']}" if s["detail"] else s["reason"] for s in self.skipped}

    @property
    def documents_skipped(self) -> int:
        return len(self.skipped)


class NothingIngestedError(RuntimeError):
    """Every document of a run failed or was skipped: nothing was ingested and nothing was already
    there. Raised so that a script, a notebook cell or the CLI exits non-zero; the run's
    `IngestResult` (with every skip named, and metrics.json on disk) is in `.result`."""

    def __init__(self, result: "IngestResult", none_found: Optional[str] = None) -> None:
        self.result = result
        self.none_found = none_found
        if none_found is not None:
            super().__init__(f"nothing ingested: no documents found in {none_found} (hidden files, .gitignore'd files, "
                             f"files outside documents.include (case-sensitive globs) or in documents.exclude, and "
                             f"ingest outputs are not documents)")
            return
        reasons: dict[str, int] = {}
        # the run's own output inside the corpus is no document: it is not one of those that failed
        documents = [s for s in result.skipped if s["reason"] != "output_folder"] or list(result.skipped)
        for skip in documents:
            reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        first = documents[0] if documents else None
        # printable: a name with a newline (a path list read with readlines()) made the one line two
        example = (f"; first: {printable(first['path'])}: {first['reason']}"
                   + (f": {printable(first['detail'])}" if first["detail"] else "")) if first else ""
        super().__init__(f"nothing ingested: all {len(documents) or result.documents_total} document(s) failed or "
                         f"were skipped "
                         f"({summary}){example}")

    def __reduce__(self):  # re-raised in a parent process (joblib/loky, multiprocessing): rebuilt from the result
        return (type(self), (self.result, self.none_found))


def _write_metrics(out: Path, snapshot: dict[str, Any], shard: Optional[ShardSpec] = None) -> dict[str, Any]:
    """metrics.json (metrics-<shard>.json for a by-hand shard) with the output's carried ingest totals."""
    path = shard_metrics_path(out, shard.label) if shard is not None and shard.sharded else metrics_path(out)
    return write_metrics(path, snapshot)


def discover_for_output(paths: Union[PathLike, Sequence[PathLike]], documents: DocumentsConfig,
                        out: Path, skip_folders: Sequence[PathLike] = ()) -> tuple[DocumentList, list[Skip]]:
    """The documents of `paths` for an ingest into `out`: neither that output, nor `skip_folders`
    (a `-m` sweep's own folder: Hydra's multirun.yaml), nor any other ingest output inside the corpus
    is walked (their metrics and index files are not documents)."""
    return discover(paths, documents, root=documents.root or None, skip_folders=[out, *map(Path, skip_folders)],
                    is_output_folder=is_output_listing)


def refuse_output_in_sources(out: Path, sources: Sequence[str]) -> None:
    """Raise before anything is written when the output folder is one of the source folders: its
    manifest would sit at the corpus root, every later discovery of that corpus would take the whole
    corpus for an ingest output and skip it. (An output *inside* the corpus is fine: it is skipped.)"""
    target = Path(os.path.abspath(out)).resolve()
    for source in sources:
        if Path(os.path.abspath(source)).resolve() == target:
            raise ConfigError(f"the output folder {printable(str(out))} is the corpus folder {printable(source)} "
                              "itself: write the output elsewhere (a folder inside the corpus is fine: discovery skips it)")


def ingest_settings(cfg: PipelineConfig, force_code: bool = False) -> dict[str, Any]:
    """What shapes an output's chunks and vectors: chunking (and whether every file is chunked as
    code: `CodeParallelPipeline`, or which extensions are prose or code: `documents.extra_*_extensions`),
    the vector size and the model (its files' fingerprint). A resumed run must match them
    (`Manifest.check_settings`); the runtime, precision and embedder (local or Triton) may change
    between runs, the model may not."""
    c = cfg.chunking
    return {"chunking.chunk_tokens": c.chunk_tokens, "chunking.overlap_tokens": c.overlap_tokens,
            "chunking.min_chunk_tokens": c.min_chunk_tokens, "chunking.window_chars": c.window_chars,
            "chunking.modality": "code" if force_code else "by_extension",
            "documents.extra_code_extensions": dotted_extensions(cfg.documents.extra_code_extensions),
            "documents.extra_prose_extensions": dotted_extensions(cfg.documents.extra_prose_extensions),
            "embedder.dim": cfg.embedder.dim, "model": model_fingerprint()}


# skip reasons that describe a file's present content, not a passing failure (unreadable, worker_crashed):
# a committed document whose file now reads so has no chunks any more
NO_LONGER_DOCUMENT = frozenset({"empty", "binary", "decode_error", "too_large"})


def not_a_file_any_more(reason: str, detail: str) -> bool:
    """A skip that says the path is no regular file now (a FIFO or socket: `unreadable: not a regular
    file`; a symlink not followed): like NO_LONGER_DOCUMENT, its committed document is removed. Other
    `unreadable` causes (permissions, I/O) pass and keep it."""
    return reason == "symlink" or (reason == "unreadable" and detail.startswith(NOT_A_REGULAR_FILE))


def _worker_count(configured: int, documents: int) -> int:
    """`profile.num_workers`, but no more workers than documents to read (16 workers for 7 documents
    took 2.4x the time and 2.2x the memory of one); one warning when they outnumber the usable cores
    (they only share them, each with its own tokenizer and slabs in memory)."""
    workers = max(1, min(int(configured), int(documents)))
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    if workers > cores:
        log.warning("profile.num_workers=%d on %d usable core(s): the workers share the cores (more memory, no more "
                    "speed) and the embedder needs one too; a profile with fewer workers fits this box", workers, cores)
    return workers


def _keep_finished_documents(writer: Union[DatasetWriter, WriterProcess], why: str = "interrupted") -> None:
    """An interrupted run commits the documents whose every chunk is embedded, as its end would: at
    most one part's rows to encode (well under a second), so Ctrl-C keeps the finished work instead
    of up to `writer_commit_interval_s` of it. Documents still missing chunks are redone next run.
    If that commit fails too (a second Ctrl-C, a dead writer process), the open part is dropped."""
    try:
        writer.close(interrupted=True)
    except BaseException as err:  # noqa: BLE001 - the interrupt is what the caller raises
        writer.discard_open_part()
        log.warning("%s: the finished documents could not be committed (%s); re-run to resume", why,
                    f"{type(err).__name__}: {err}".splitlines()[0] if str(err) else type(err).__name__)
        return
    # INFO: the command line's own line says "committed parts are kept" (one line per fault)
    log.info("%s: %d document(s) of this run are committed; re-run to resume the rest", why,
             writer.documents_committed)


class IngestPipeline:
    """Ingest files or folders into a dataset folder.

    Args:
        config (PipelineConfig, optional): the job's configuration (default: the `balanced` profile).
        embedder (Embedder, optional): a ready embedder to use instead of building one from config
            (tests and benchmarks share one this way).
        skip_folders (paths, optional): folders inside the corpus that are not documents, besides
            the output and other ingest outputs (the CLI passes a `-m` sweep's folder). (default: none)
    """

    force_code = False

    def __init__(self, config: Optional[PipelineConfig] = None, embedder: Optional[Embedder] = None, *,
                 skip_folders: Sequence[PathLike] = ()) -> None:
        self.config = to_pipeline_config(config) if config is not None else load_pipeline_config()
        self._embedder = embedder
        self.skip_folders = tuple(user_path(f) for f in skip_folders)
        self.shard = ShardSpec.parse(self.config.shard)

    def process_batch(self, paths: Union[PathLike, Sequence[PathLike]], output: Optional[PathLike] = None) -> IngestResult:
        """The job: ingest `paths` (files and/or folders) into `output` (default: `config.output`),
        then, when `isne.enabled`, the graph and ISNE stage (`hades_gpu.isne.stage`) over it. The
        output's lock (`store.lock`, per shard) is held for the whole job: a second run on the same
        output and shard raises `OutputLockedError` at once. A ``shard=i/n`` run ingests its shard
        only and leaves the graph and ISNE stage to one run over all shards (one log line says so)."""
        out, sources = self._checked_output_and_sources(output, paths)
        if self.config.isne.enabled and not self.shard.sharded:
            from hades_gpu.isne.stage import stage_devices

            stage_devices(self.config)  # a device the graph and ISNE stage cannot have: said before any embedding
        # SIGTERM and interpreter exit stop the job as Ctrl-C does, after its clean-up (`exit_guard`)
        with stoppable_run(), OutputLock(out, self.shard.label):
            result = self._ingest_sources(sources, out)
            if self.config.isne.enabled and self.shard.sharded:
                log.info("shard %d/%d: the graph and ISNE stage runs once over all shards: `hades-isne output=%s` "
                         "after the last shard (cluster=ray does it by itself)", self.shard.index, self.shard.count,
                         printable(str(result.output_dir)))
            elif self.config.isne.enabled:
                result.isne = self._run_isne(result.output_dir)
                result.metrics["isne"] = result.isne
                _write_metrics(result.output_dir, result.metrics)
        return result

    def _output_dir(self, output: Optional[PathLike]) -> Path:
        chosen = output if output is not None else self.config.output
        # Path("") is "." (the working directory): test the value given, not the Path made of it
        if chosen is None or (isinstance(chosen, (str, bytes, os.PathLike)) and not os.fspath(chosen).strip()):
            raise ConfigError("an output folder is required (config.output or process_batch(..., output=...))")
        return path_argument(chosen, "output" if output is not None else "config.output")

    def ingest(self, paths: Union[PathLike, Sequence[PathLike]], output: Optional[PathLike] = None) -> IngestResult:
        """The ingest stage alone: discover, read/chunk/tokenize, embed, write (and metrics.json),
        under the output's lock (taken here unless `process_batch` holds it already)."""
        out, sources = self._checked_output_and_sources(output, paths)
        with stoppable_run(), OutputLock(out, self.shard.label):
            return self._ingest_sources(sources, out)

    def _checked_output_and_sources(self, output: Optional[PathLike],
                                    paths: Union[PathLike, Sequence[PathLike]]) -> tuple[Path, list[str]]:
        """The output folder and the sources as a list (read once: `paths` may be an iterator),
        checked before anything is written (`refuse_output_in_sources`)."""
        validate(self.config)  # again: a field may have been set since the pipeline was made
        out = self._output_dir(output)
        try:
            os.fspath(out).encode("utf-8")
        except UnicodeEncodeError:  # pyarrow takes text paths only: it failed after the whole run's work
            raise ConfigError(f"output folder {printable(str(out))} is not valid UTF-8 (a byte that is not UTF-8 in "
                              "its path): pyarrow, which writes the Parquet files, cannot open it; choose another "
                              "output folder (documents may have such names, the output may not)") from None
        if os.path.lexists(out) and not out.is_dir():  # FileExistsError from a mkdir, as a traceback
            raise ConfigError(f"output {printable(str(out))} is {'a file' if out.is_file() else 'no folder'}: give a "
                              "folder (made when missing) for the output")
        sources = source_list(paths)
        if not sources:  # an empty glob or list: a mistake, not an empty corpus (that is a folder without documents)
            raise ConfigError("no paths given: pass the files and/or folders to ingest (got an empty list)")
        refuse_output_in_sources(out, sources)
        # what the run would refuse only after making the output (its lock, manifest and folders stayed)
        use_model_dir(self.config.embedder.model_dir)
        if self._embedder is None and self.config.embedder.name == "local":
            from hades_gpu.embedding.local import check_model_settings

            check_model_settings(self.config.embedder)
        return out, sources

    def _ingest_sources(self, sources: list[str], out: Path) -> IngestResult:
        """Discover `sources` and ingest them into `out` (under its lock)."""
        refs, skips = discover_for_output(sources, self.config.documents, out, self.skip_folders)
        result = self._ingest_releasing_claims(refs, skips, out, sources)
        if not refs and all(skip.reason == "output_folder" for skip in skips):  # the corpus has no document at all
            where = ", ".join(map(printable, sources))
            if result.documents_removed or committed_parts(out):
                # an emptied corpus re-run over an output that holds documents: no failure, said once
                log.warning("no documents found in %s (hidden files, .gitignore'd files, files outside documents.include "
                            "or in documents.exclude and the output folder itself are not documents): nothing to "
                            "ingest", where)
            else:
                # an empty output made of nothing: a glob that matched nothing (`include=[**/*.py]` over
                # MAIN.PY) exited 0, and `hades-ingest ... && hades-isne ...` went on
                raise NothingIngestedError(result, none_found=where)
        return result

    def _ingest_releasing_claims(self, refs: DocumentList, skips: list[Skip], out: Path,
                                 sources: Optional[list[str]] = None, corpus_found: bool = False) -> IngestResult:
        """`_ingest`, then this run's document claims (store/claims.py) dropped, however it ended."""
        try:
            return self._ingest(refs, skips, out, sources, corpus_found)
        finally:
            if not self.shard.sharded:
                try:
                    release_claims(out, self.shard.label)
                except sqlite3.Error as err:  # a stale claim is taken over by the next run: harmless
                    log.warning("could not drop this run's document claims in %s: %s", printable(str(out)), err)

    def ingest_planned(self, refs: Sequence[DocumentRef], skips: Sequence[Skip], output: PathLike,
                       corpus_found: bool = False) -> IngestResult:
        """The ingest stage over documents discovered elsewhere (the cluster driver discovers once and
        hands every shard task its refs), under the output's lock for this shard. With ``shard=i/n``
        the refs are the whole corpus's or the shard's own: only the shard's are ingested.
        `corpus_found`: the discovery found documents, though maybe none of this shard's (then
        `documents.remove_missing` still removes the shard's deleted ones)."""
        out = user_path(output)
        with stoppable_run(), OutputLock(out, self.shard.label):
            return self._ingest_releasing_claims(as_document_list(refs), list(skips), out, corpus_found=corpus_found)

    def _select_shard(self, refs: DocumentList, skips: list[Skip], out: Path) -> tuple[DocumentList, list[Skip]]:
        """This run's documents: all of them, or shard i of n's under the output's shard map."""
        if not self.shard.sharded:
            check_unsharded(out, self.shard.label)
            refs, skips = self._keep_committed_link_names(refs, skips, out)
            return self._without_other_shards_documents(self._keep_committed_identities(refs, out), skips, out)
        smap = ensure_shard_map(out, self.shard.count, refs)
        mine = select_refs(refs, smap.cuts, self.shard.index)
        # discovery's skips (paths not documents) are reported by shard 0 only, so a sum over shards counts each once
        return mine, (skips if self.shard.index == 0 else [])

    def _keep_committed_link_names(self, refs: DocumentList, skips: list[Skip],
                                   out: Path) -> tuple[DocumentList, list[Skip]]:
        """A file with several names (hard links; followed symlinks) is taken under the first name the
        walk meets, the others `duplicate` skips. When the output holds it under one of the others and
        not under the first, that name is kept: a new hard link sorted before the old name (`hl.md`
        beside `note2.md`) stored the file a second time, and `remove_missing` took the old name for
        gone. (Unsharded runs, as `_keep_committed_identities`.)"""
        links = {s.path: s for s in skips if s.reason == "duplicate" and s.detail.startswith(SAME_FILE_AS)}
        if not links or not len(refs) or not has_manifest(out):
            return refs, skips
        try:
            committed = committed_rel_paths_of_files(out, set(links)) if committed_parts(out) else {}
        except (ManifestError, OSError, ValueError):  # damaged: opening the output for the run says so
            return refs, skips
        if not committed:
            return refs, skips
        by_shown = {printable(refs[i].path): i for i in range(len(refs))}
        new = set(uncommitted_indices(out, (refs.rel_path(i) for i in range(len(refs)))))
        swaps: dict[int, Skip] = {}
        for path, rel in committed.items():
            i = by_shown.get(links[path].detail[len(SAME_FILE_AS):])
            if i is not None and i in new and i not in swaps:  # the first name is new, the link's is the output's
                swaps[i] = links[path]
        if not swaps:
            return refs, skips
        kept = DocumentList()
        replaced: dict[str, Skip] = {}
        for i, ref in enumerate(refs):
            link = swaps.get(i)
            if link is not None:
                replaced[link.path] = Skip(ref.path, "duplicate", f"{SAME_FILE_AS}{printable(link.path)}")
                ref = dataclasses.replace(ref, path=link.path, rel_path=committed[link.path], rel_path_raw=None)
            kept.append(ref)
        log.info("%d file(s) with several names keep the name %s holds them under (e.g. %s)", len(swaps),
                 printable(str(out)), printable(next(iter(replaced))))
        return kept, [replaced.get(s.path, s) for s in skips]

    def _keep_committed_identities(self, refs: DocumentList, out: Path) -> DocumentList:
        """A file the output already holds under another relative path keeps that identity: its folder
        was the corpus before and a subfolder of it is now (or the other way round), so this run names
        it differently (`c6/sub/x.txt` was `sub/x.txt`, now `x.txt`) and wrote its chunks a second time.
        Only documents whose own name is new are looked up, by absolute path; names that are not UTF-8
        keep this run's identity. (Unsharded runs: a shard's identities are its shard map's.)"""
        if not len(refs) or not has_manifest(out):
            return refs
        try:
            if not committed_parts(out):  # a first run into the output (or after a failed one): nothing to keep
                return refs
        except ManifestError:  # damaged: opening it for the run says so
            return refs
        new = uncommitted_indices(out, (refs.rel_path(i) for i in range(len(refs))))
        if not new:
            return refs
        # a corpus given through a symbolic link (`L/a` with L -> r, after `corpus=r`): its files are
        # looked up by their real path too, or they were stored a second time under the link's names
        real_roots = {root: os.path.join(os.path.realpath(root), "") for root in refs.roots()}
        candidates: dict[str, int] = {}
        aliases: dict[int, str] = {}  # document index -> its path under its root's real path
        for i in new:
            ref = refs[i]
            if ref.rel_path_raw is None:
                candidates[ref.path] = i
                root = ref.path[: len(ref.path) - len(ref.rel_path)]
                real = real_roots.get(root)
                if real is not None and real != root:
                    aliases[i] = real + ref.rel_path
                    candidates.setdefault(aliases[i], i)
        try:
            known = committed_rel_paths_of_files(out, set(candidates))
        except (ManifestError, OSError, ValueError):  # damaged (pyarrow's ArrowInvalid is a ValueError) or half
            return refs  # made (a full disk): opening the output for the run names the part and repairs it
        # a name this run already gives another file (c6/sub/sub/x.md is "sub/x.md" in a run of c6/sub)
        # stays that file's: two files under one identity would each replace the other
        targets = set(known.values())
        taken = {r for r in (refs.rel_path(i) for i in range(len(refs))) if r in targets}
        known = {path: rel for path, rel in known.items() if rel not in taken}
        if not known:
            return refs
        kept = DocumentList()
        example = ""
        for i, ref in enumerate(refs):
            rel = known.get(ref.path) if candidates.get(ref.path) == i else None
            alias = aliases.get(i)
            if rel is None and alias is not None and candidates.get(alias) == i:
                rel = known.get(alias)
            if rel is not None and rel != ref.rel_path:
                example = example or f"{printable(ref.path)} stays {printable(rel)}, not {printable(ref.rel_path)}"
                ref = dataclasses.replace(ref, rel_path=rel, rel_path_raw=None)
            kept.append(ref)
        log.info("%d document(s) already in %s under another relative path keep it (e.g. %s)", len(known),
                 printable(str(out)), example)
        return kept

    def _without_other_shards_documents(self, refs: DocumentList, skips: list[Skip],
                                        out: Path) -> tuple[DocumentList, list[Skip]]:
        """A by-hand shard name (`shard=<name>`) writes its own manifest: documents another name has
        committed to this output are skipped as ``duplicate`` (each chunk once in the dataset)."""
        claimed = claimed_by_other_shards(out, self.shard.label, (ref.rel_path for ref in refs)) if refs else {}
        # what no manifest holds yet is claimed for this run; another name's run in progress may have
        # claimed it first (two runs at once both found nothing committed and wrote every chunk twice)
        new = uncommitted_indices(out, (refs.rel_path(i) for i in range(len(refs)))) if len(refs) else []
        others_running = running_shards(out) - {self.shard.label}
        in_progress = claim_documents(out, self.shard.label, (refs.rel_path(i) for i in new), others_running)
        if not claimed and not in_progress:
            return refs, skips
        keep = [i for i, ref in enumerate(refs) if ref.rel_path not in claimed and ref.rel_path not in in_progress]
        extra = [Skip(ref.path, "duplicate", f"already in this output under shard {claimed[ref.rel_path]!r} "
                                             f"(run shard={claimed[ref.rel_path]} to update it)")
                 for ref in refs if ref.rel_path in claimed]
        extra += [Skip(ref.path, "duplicate", f"being ingested now into this output by the run of shard "
                                              f"{in_progress[ref.rel_path]!r}")
                  for ref in refs if ref.rel_path in in_progress]
        return refs.take(keep), [*skips, *extra]

    def _run_config(self, out: Path, sources: Optional[list[str]]) -> dict[str, Any]:
        """The run's configuration for metrics.json, with what it read and wrote as absolute paths, also
        when they came as process_batch's arguments (not in the config: both were null)."""
        config = config_to_dict(self.config)
        if sources is not None:
            absolute = [os.path.abspath(s) for s in sources]
            config["corpus"] = absolute[0] if len(absolute) == 1 else absolute
        config["output"] = os.path.abspath(out)
        return config

    def _record_interrupted_run(self, metrics: RunMetrics, writer: Union[DatasetWriter, WriterProcess],
                                out: Path, sources: Optional[list[str]] = None) -> None:
        """metrics.json for a run that was interrupted after committing chunks: the earlier file
        described an output without them, and the ingest totals (ISNE's default time budget) never
        counted this run's seconds and chunks. Nothing committed: the earlier file stays true."""
        if not writer.rows_written:
            return
        try:
            metrics.finish()
            metrics.chunks_done = writer.rows_written
            # the committed documents, not those read (112 read, 29 committed was recorded as 112 done)
            metrics.documents_done = writer.documents_committed
            snapshot = metrics.snapshot()
            snapshot.update(interrupted=True, parts_written=writer.parts_written, rows_written=writer.rows_written,
                            config=self._run_config(out, sources))
            _write_metrics(out, snapshot, self.shard)
        except Exception as err:  # noqa: BLE001 - the interrupt is what the caller sees
            log.warning("interrupted: metrics.json could not be written (%s)", error_line(err))

    def _ingest(self, refs: DocumentList, skips: list[Skip], out: Path,
                sources: Optional[list[str]] = None, corpus_found: bool = False) -> IngestResult:
        """`corpus_found`: the cluster driver's discovery found documents (this shard's `refs` may be none)."""
        cfg = self.config
        out.mkdir(parents=True, exist_ok=True)
        check_writable([out, out / CHUNKS_DIR, out / DOCUMENTS_DIR])
        use_model_dir(cfg.embedder.model_dir)  # before workers spawn: they tokenize with the same folder

        metrics = RunMetrics()
        source_missing = next((s.path for s in skips if s.reason == "missing"), None)  # before shard 0 takes the skips
        corpus_found = corpus_found or len(refs) > 0  # before the shard's share, which may be empty
        where = _WhereDocumentsWere(refs, skips, sources)  # before shard 0 takes the skips
        refs, skips = self._select_shard(refs, skips, out)
        removed = self._reconcile_missing(refs, source_missing, out, corpus_found, where)
        metrics.extra["documents_removed"] = removed
        if self.shard.sharded:
            clear_shard_done(out, self.shard.label)  # exists again only once this run has finished
        fingerprint = plan_fingerprint(refs) if self.shard.sharded else ""
        for skip in skips:
            metrics.add_skip(skip.path, skip.reason, skip.detail)
        metrics.documents_total = len(refs) + len(skips)

        writer = open_writer(out, self.shard.label, cfg.embedder.dim, cfg.profile, ingest_settings(cfg, self.force_code))
        writer_process = isinstance(writer, WriterProcess)
        metrics.extra["writer"] = "process" if writer_process else "thread"
        resume = ResumePolicy(writer.manifest)
        changed = array("q")  # indices of what the workers read (8 bytes a document)
        for i, ref in enumerate(refs):
            if resume.by_stat(ref) is Resume.UNCHANGED:
                metrics.documents_resumed += 1
                metrics.documents_unchanged_stat += 1
            else:
                changed.append(i)
        # a fresh output reads every document: the same columns, not a second copy (document_list.py)
        todo = refs if len(changed) == len(refs) else refs.take(changed)
        metrics.bytes_to_read = int(todo.sizes().sum()) if len(todo) else 0
        if metrics.documents_resumed:
            log.info("resume: %d document(s) already in %s are unchanged", metrics.documents_resumed, printable(str(out)))

        no_longer_documents: list[tuple[str, str]] = []  # (rel_path, reason): see _remove_no_longer_documents
        if writer.manifest.parts():
            # files that discovery now skips as no file at all (a FIFO, a socket, a symlink not followed):
            # their committed documents go too (they kept their old chunks, and "re-ingest it" did nothing)
            gone = {s.path: s.reason for s in skips if not_a_file_any_more(s.reason, s.detail)}
            if gone:
                for path, rel in committed_rel_paths_of_files(out, set(gone)).items():
                    no_longer_documents.append((rel, gone[path]))

        def triage(ref: DocumentRef, result: DocumentResult) -> bool:
            metrics.documents_read += 1
            metrics.bytes_read += int(ref.size or 0)
            if result.skip_reason is not None:
                metrics.add_skip(ref.path, result.skip_reason, result.skip_detail)
                if result.skip_reason in NO_LONGER_DOCUMENT or not_a_file_any_more(result.skip_reason,
                                                                                   result.skip_detail or ""):
                    no_longer_documents.append((ref.rel_path, result.skip_reason))
                return False
            if result.unchanged:
                metrics.documents_resumed += 1  # touched but identical: keep the committed rows
                metrics.documents_unchanged_hash += 1
                writer.note_unchanged(ref.rel_path, ref.size, ref.mtime_ns, ref.stat_tag)
                return False
            metrics.document_done(0, chunks_read=result.n_chunks)
            return True

        metrics.memory.start()
        endpoint = None  # live Prometheus text on 127.0.0.1 (monitoring.prometheus)
        if cfg.monitoring.prometheus:
            from hades_gpu.orchestration.prometheus import start_endpoint

            endpoint = start_endpoint(metrics, cfg.monitoring)
        progress = ProgressReporter(metrics, cfg.monitoring.progress, cfg.monitoring.log_interval_s)
        embedder = self._embedder
        owns_embedder = embedder is None and bool(todo)
        launch: Optional[WorkerLaunch] = None
        try:
            if todo:
                num_workers = _worker_count(cfg.profile.num_workers, len(todo))
                # the workers start first: they warm up (~0.35 s) while the embedder loads the model
                launch = WorkerLaunch(num_workers, functools.partial(warm_up, cfg.chunking))
                # One governor per GPU, built once and handed to the embedder (it waits for headroom
                # inside embed() with cache relief) and to the stage (its batcher sizes batches from
                # the governor's budget). A caller's own embedder brings its own.
                if embedder is None:
                    with interrupts_held():  # torch's import, cut by Ctrl-C, broke every later call
                        from hades_gpu.embedding.factory import build_embedder

                        governor = self._governor()
                    embedder = build_embedder(cfg, governor=governor)
                else:
                    governor = getattr(embedder, "governor", None)
                metrics.extra["embedder"] = getattr(embedder, "description", type(embedder).__name__)
                if owns_embedder or getattr(embedder, "serves_remotely", False):
                    # what the model answers, against what made the output's vectors (a server may run
                    # another model than the local folder the settings fingerprint); a caller's own
                    # embedder object is trusted
                    writer.manifest.check_model_probe(model_probe(embedder, cfg.embedder.max_seq_len),
                                                      metrics.extra["embedder"])
                ring = SlabRing(slab_count(cfg.profile, num_workers, getattr(embedder, "concurrency", 1),
                                           writer_process),
                                slab_layout(cfg.profile, cfg.embedder.max_seq_len,
                                            vector_dim=cfg.embedder.dim if writer_process else 0),
                                pin=copies_to_cuda(embedder))
                if writer_process:
                    writer.attach_ring(ring)  # it reads each batch from its slab
                packing = dict(max_batch_tokens=cfg.profile.max_batch_tokens, max_batch_size=cfg.profile.max_batch_size,
                               length_bucket=cfg.profile.length_bucket, max_seq_len=cfg.embedder.max_seq_len,
                               lookahead_batches=cfg.profile.lookahead_batches, special_ids=special_ids())
                try:
                    with WorkerPool(num_workers, process_document_as,
                                    (cfg.documents, cfg.chunking, self.force_code), ring, packing,
                                    cfg.profile.inflight_docs_per_worker, launched=launch) as pool:
                        metrics.memory.watch(pool.pids)
                        stream = StreamingPipeline(cfg.profile, WorkerPoolSource(pool, todo, resume.known_hash), embedder,
                                                   writer, metrics, triage, special_ids(), cfg.embedder.max_seq_len,
                                                   governor=governor, progress=progress, ring=ring)
                        progress.start()
                        stream.run()
                        metrics.extra["worker_restarts"] = pool.restarts
                        pool.stop()  # the workers exit while the last part is committed (~0.03 s each)
                        writer.flush()
                    metrics.extra["slabs"] = {"count": ring.count, "bytes": ring.nbytes, "pinned": ring.pinned,
                                              "starved_grants": pool.starved_grants}
                finally:
                    ring.close()
                if governor is not None:
                    metrics.extra["gpu_governor"] = governor.metrics()
                if hasattr(embedder, "metrics"):
                    metrics.extra["embedder_metrics"] = embedder.metrics()
            writer.close()
        except KeyboardInterrupt:
            _keep_finished_documents(writer)  # Ctrl-C or SIGTERM (exit_guard.Terminated): what is done stays done
            self._record_interrupted_run(metrics, writer, out, sources)
            raise
        except EmbedderError:
            # the rows embedded before it failed are good (a server that came back with another model is
            # refused before any of its answers is used): keep what they complete, as Ctrl-C does
            _keep_finished_documents(writer, "the embedder failed")
            raise
        except BaseException:
            writer.discard_open_part()  # its rows are uncommitted: the next run redoes those documents
            raise
        finally:
            if launch is not None:
                launch.close()  # those no pool adopted (the embedder failed to load)
            progress.stop(finished=sys.exc_info()[0] is None)  # an interrupted run's bar is not drawn full
            metrics.finish()  # before the endpoint goes: its last scrapes read hades_run_finished 1
            if endpoint is not None and not (cfg.monitoring.prometheus_linger_s > 0 and sys.exc_info()[0] is None):
                endpoint.stop()  # a finished run's lingers below, once its metrics.json is written
            if owns_embedder and embedder is not None:
                embedder.close()
        if no_longer_documents:
            try:
                removed += self._remove_no_longer_documents(no_longer_documents, out)
            except BaseException:
                if endpoint is not None:
                    endpoint.stop()  # it was left serving for the linger below
                raise
            metrics.extra["documents_removed"] = removed
        metrics.chunks_done = writer.rows_written
        result = IngestResult(output_dir=out.absolute(), documents_total=metrics.documents_total,
                              documents_ingested=writer.documents_committed,
                              documents_unchanged=metrics.documents_resumed, documents_removed=removed,
                              chunks_written=writer.rows_written,
                              skipped=list(metrics.skipped))
        snapshot = metrics.snapshot()
        snapshot["parts_written"] = writer.parts_written
        snapshot["rows_written"] = writer.rows_written  # docs/metrics.md lists it: it was never written
        snapshot["config"] = self._run_config(out, sources)
        snapshot = _write_metrics(out, snapshot, self.shard)
        result.metrics = snapshot
        if self.shard.sharded:
            write_shard_done(out, self.shard.label, {
                "shard": self.shard.label, "index": self.shard.index, "count": self.shard.count,
                "fingerprint": fingerprint, "remove_missing": bool(cfg.documents.remove_missing),
                "documents_total": result.documents_total,
                "documents_ingested": result.documents_ingested, "documents_unchanged": result.documents_unchanged,
                "chunks_written": result.chunks_written, "skipped": result.skipped,
                "wall_s": snapshot.get("wall_s"), "host": os.uname().nodename, "pid": os.getpid(),
                "finished_unix": time.time()})
        log.info("ingested %d document(s), %d chunk(s) into %s (%d unchanged, %d skipped)",
                 result.documents_ingested, result.chunks_written, printable(str(out)), result.documents_unchanged,
                 result.documents_skipped)
        if endpoint is not None and cfg.monitoring.prometheus_linger_s > 0:
            self._linger(endpoint)
        documents = [skip for skip in result.skipped if skip["reason"] != "output_folder"]
        if documents and not result.documents_ingested and not result.documents_unchanged:
            # (an output folder inside the corpus is no document: a run that found only it is one that
            # found nothing, said by `_ingest_sources`; it was "all 1 document(s) failed (1 output_folder)")
            raise NothingIngestedError(result)
        return result

    def _linger(self, endpoint: Any) -> None:
        """Serve the finished run's final values `monitoring.prometheus_linger_s` more seconds (a scraper
        never read hades_run_finished 1), after its metrics.json is written: a Ctrl-C there ends the
        wait only (it left the endpoint serving and no metrics.json behind)."""
        linger = self.config.monitoring.prometheus_linger_s
        log.info("Prometheus: serving the finished run's values for %.3g s more (monitoring.prometheus_linger_s)", linger)
        try:
            time.sleep(linger)
        finally:
            endpoint.stop()

    def _remove_no_longer_documents(self, skipped: list[tuple[str, str]], out: Path) -> int:
        """Documents committed by an earlier run whose file now reads as no document (emptied, binary,
        undecodable, too large) lose their earlier chunks, as a changed document's are replaced: the
        output held the old text of a file that is now empty (search still found it). One warning line."""
        cfg = self.config
        writer = DatasetWriter(out, self.shard.label, cfg.embedder.dim, cfg.profile.writer_rows_per_part,
                               settings=ingest_settings(cfg, self.force_code))
        try:
            known = writer.manifest.lookup_many(rel for rel, _ in skipped)
            gone = [(rel, why) for rel, why in skipped if rel in known]
            removed = writer.remove_documents([rel for rel, _ in gone]) if gone else 0
        finally:
            writer.close()
        if removed:
            rel, why = gone[0]
            log.warning("removed %d document(s) from %s whose file is no longer a document, with the chunks of their "
                        "earlier version (e.g. %s, now skipped as %s)", removed, printable(str(out)), printable(rel), why)
        return removed

    def _reconcile_missing(self, refs: DocumentList, source_missing: Optional[str], out: Path, corpus_found: bool,
                           where: "_WhereDocumentsWere") -> int:
        """The output's documents (of this shard) this run did not find, before anything is ingested:

        - a path that is a folder now is no longer a document: removed, as an emptied file is;
        - a path this run could not read or list (permissions: a skip says `unreadable`) is kept
          whatever `documents.remove_missing` says (it deleted a document whose file was there);
        - a document read from a file that is still there, outside this run's corpus (an output filled
          from `c`, then `corpus=c/sub` or one file of it), is kept too: it is not gone from the
          corpus, this run was given less of it (`remove_missing` removed every other document);
        - the rest are gone: removed with `documents.remove_missing`, else named in one line (a deleted
          file went on being found by search and nothing said so).
        Nothing is removed when a named source is missing or the corpus held no document (a typo must
        not empty an output): one warning line says so."""
        remove = self.config.documents.remove_missing
        if not refs and not corpus_found:
            if remove:
                why = f"the source {printable(source_missing)} is missing" if source_missing else "this run found no documents"
                log.warning("documents.remove_missing: nothing removed from %s: %s", printable(str(out)), why)
            return 0
        if not manifest_path(out, self.shard.label).is_file():
            return 0
        try:
            with Manifest.load(out, self.shard.label) as manifest:
                gone = manifest.absent_from(refs.rel_path(i) for i in range(len(refs)))
        except (ManifestError, OSError):  # the run itself reports a damaged manifest
            return 0
        if not gone:
            return 0
        folders, unreadable, absent = where.classify(gone)
        if unreadable:
            log.warning("%d document(s) of %s were not read by this run, their file or folder unreadable (e.g. %s): "
                        "kept with their chunks%s", len(unreadable), printable(str(out)), printable(unreadable[0]),
                        " (documents.remove_missing removes only files that are gone)" if remove else "")
        if remove and source_missing is not None:
            log.warning("documents.remove_missing: nothing removed from %s: the source %s is missing",
                        printable(str(out)), printable(source_missing))
            absent = []
        if remove and absent:
            absent, elsewhere = where.outside_this_corpus(out, absent)
            if elsewhere:
                log.warning("%d document(s) of %s were read from files outside this run's corpus that are still there "
                            "(e.g. %s): kept with their chunks (documents.remove_missing removes the documents whose "
                            "files are gone, and those under the given corpus that it no longer includes)",
                            len(elsewhere), printable(str(out)), printable(elsewhere[0]))
        doomed = folders + (absent if remove else [])
        removed = self._remove_documents(out, doomed) if doomed else 0
        if folders:
            log.warning("removed %d document(s) from %s whose path is a folder now, with their chunks (e.g. %s)",
                        len(folders), printable(str(out)), printable(folders[0]))
        if absent and remove:
            log.info("removed %d document(s) no longer in the corpus from %s (documents.remove_missing), e.g. %s",
                     len(absent), printable(str(out)), printable(absent[0]))
        elif absent:
            log.info("%d document(s) in %s were not found by this run, e.g. %s: they stay, with their chunks "
                     "(documents.remove_missing=true removes them, when the run is given the whole corpus)",
                     len(absent), printable(str(out)), printable(absent[0]))
        return removed

    def _remove_documents(self, out: Path, rel_paths: list[str]) -> int:
        cfg = self.config
        writer = DatasetWriter(out, self.shard.label, cfg.embedder.dim, cfg.profile.writer_rows_per_part,
                               settings=ingest_settings(cfg, self.force_code))
        try:
            return writer.remove_documents(rel_paths)
        finally:
            writer.close()

    def _governor(self) -> Any:
        """The NVML memory governor when a GPU is in use, else None."""
        try:
            from hades_gpu.gpu.nvml_governor import MemoryGovernor
        except ImportError:
            return None
        from hades_gpu.embedding.factory import device_spec
        from hades_gpu.gpu.device import select_device

        device = str(select_device(device_spec(self.config)))
        if not device.startswith("cuda") or self.config.embedder.name != "local":
            return None
        index = int(device.split(":")[1]) if ":" in device else 0
        return MemoryGovernor(self.config.gpu, index)

    def _run_isne(self, out: Path) -> Optional[dict[str, Any]]:
        try:
            from hades_gpu.isne.stage import run_isne_stage
        except ImportError:  # the ISNE stage is not installed in this build
            log.warning("isne.enabled is true but the ISNE stage is unavailable; skipped")
            return None
        return run_isne_stage(self.config, out)


class _WhereDocumentsWere:
    """Where this run's discovery looked (the corpus roots) and what it could not read, to tell a
    document it did not find that is gone from one whose file is still there but unreadable, or
    whose path is a folder now."""

    def __init__(self, refs: DocumentList, skips: list[Skip], sources: Optional[list[str]] = None) -> None:
        self.roots = refs.roots()
        # what this run was asked to read: a folder covers what is under it, a file itself (a cluster
        # shard task gets no sources: the roots its documents were found under stand for them)
        given = sources if sources is not None else self.roots
        self.scope = [os.path.abspath(s) for s in given]
        # permissions and I/O: the file may be there (a FIFO or an unfollowed symlink is no file any more)
        self.unreadable = {os.path.normpath(s.path) for s in skips
                           if s.reason == "unreadable" and not not_a_file_any_more(s.reason, s.detail)}

    def classify(self, rel_paths: list[str]) -> tuple[list[str], list[str], list[str]]:
        """(now folders, unreadable, absent) of documents not found, each in the given order. A path
        that is some other non-file now (FIFO, socket, symlink) is in none: the run removes those as
        no longer documents (`_remove_no_longer_documents`)."""
        folders, unreadable, absent = [], [], []
        for rel in rel_paths:
            state = "absent"
            for root in self.roots:
                path = os.path.normpath(root + rel)
                try:
                    st = os.lstat(path)
                except PermissionError:  # a folder above it that cannot be searched: it may well be there
                    state = "unreadable"
                    break
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    state = "folder"
                    break
                if not stat.S_ISREG(st.st_mode):
                    state = "elsewhere"
                    break
                if self._under_unreadable(path):
                    state = "unreadable"
                    break
            {"folder": folders, "unreadable": unreadable, "absent": absent, "elsewhere": []}[state].append(rel)
        return folders, unreadable, absent

    def outside_this_corpus(self, out: Path, rel_paths: list[str]) -> tuple[list[str], list[str]]:
        """(gone, elsewhere) of documents this run did not find: `elsewhere` were read from a regular
        file that is still there and lies outside every source of this run."""
        try:
            recorded = committed_paths_of_documents(out, set(rel_paths))
        except (DamagedOutputError, OSError, ValueError):  # the run itself reports a damaged part
            return rel_paths, []
        gone, elsewhere = [], []
        for rel in rel_paths:
            path = recorded.get(rel)
            kept = path is not None and not self._in_scope(os.path.abspath(path)) and _still_there(path)
            (elsewhere if kept else gone).append(rel)
        return gone, elsewhere

    def _in_scope(self, path: str) -> bool:
        return any(path == source or path_within(path, source) for source in self.scope)

    def _under_unreadable(self, path: str) -> bool:
        while True:
            if path in self.unreadable:
                return True
            parent = os.path.dirname(path)
            if parent == path:
                return False
            path = parent


def _still_there(path: str) -> bool:
    """A regular file is at `path`, or it cannot be told (permissions, an unmounted share: kept, as an
    unreadable document is; `remove_missing` deleted another folder's documents whose files were there)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


class TextParallelPipeline(IngestPipeline):
    """The seed's text pipeline: every file chunked by its modality (prose or code by extension)."""


class CodeParallelPipeline(IngestPipeline):
    """Treats every file as source code (code chunker, with its line-based fallback for unknown languages)."""

    force_code = True
