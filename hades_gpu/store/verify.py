"""Verification of committed parts: is every part a manifest names still on disk as it was written?

Each committed part file has a `FileRecord` in its shard's manifest (rows, size, sha256, mtime and
ctime at commit; `store.manifest`). Two depths:

- **quick** (every run's start, `DatasetWriter`): a file must exist with its recorded size; when its
  mtime and ctime are also as recorded it is trusted without reading it (one `stat` per file; a
  write to the file, `truncate` or a restored mtime all change the ctime, which `os.utime` cannot
  set back). Otherwise it is hashed in full and its Parquet footer's row count checked. A part
  committed before files were recorded is checked by footer row count against its documents, then
  hashed and recorded. What quick cannot see: bytes changed beneath the filesystem (bit rot), which
  leave the stat alone — `hades-verify` (full) finds those.
- **full** (`verify_output`, `hades-verify`): every file hashed and its row count checked against the
  manifest's documents, read-only.

A damaged part at start is named in one warning line, and it and its documents leave the manifest,
so this run ingests them again (nothing lost, nothing twice); its leftover files are then orphans.

`hades-verify <output> [--quick]`: one line per problem on stdout; exit 0 clean, 1 damaged, 2 bad
argument (not an output folder, unreadable manifest). It never changes the output.
"""

from __future__ import annotations

import argparse
import logging
import errno
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pyarrow.parquet as pq

from hades_gpu.records import printable, user_path
from hades_gpu.store.atomic import FileRecord, file_checksum
from hades_gpu.records import error_line
from hades_gpu.store.layout import (TABLES, edges_path, isne_embeddings_files, isne_model_path, no_manifest_detail,
                                    output_argument, part_path)
from hades_gpu.store.manifest import Manifest, ManifestError, _connect, has_manifest, unreadable_manifest

log = logging.getLogger(__name__)


@dataclass
class PartProblem:
    shard: str
    part: str
    table: str
    problem: str  # "missing", "size 10 bytes, recorded 4096 (truncated?)", "checksum mismatch", ...
    documents: int = 0

    def line(self, output: Path) -> str:
        return f"{part_path(output, self.table, self.part)}: {self.problem} (shard {self.shard}, part {self.part})"

    @property
    def unreadable(self) -> bool:
        """This process may not read the file: no evidence of damage (`repair_at_start`)."""
        return self.problem.startswith(UNREADABLE + ":")


@dataclass
class VerifyReport:
    output: Path
    parts_checked: int = 0
    files_checked: int = 0
    bytes_hashed: int = 0
    problems: list[PartProblem] = field(default_factory=list)
    derived_problems: list[str] = field(default_factory=list)  # the graph's and ISNE's files (hades-isne rebuilds them)
    notes: list[str] = field(default_factory=list)  # not damage: orphans, a run in progress

    @property
    def ok(self) -> bool:
        return not self.problems and not self.derived_problems

    def lines(self) -> list[str]:
        return [p.line(self.output) for p in self.problems] + self.derived_problems


UNREADABLE = "unreadable"  # a part file this process may not read: no evidence of damage


def _footer_rows(path: Path) -> int:
    return int(pq.ParquetFile(path).metadata.num_rows)


def check_file(path: Path, record: Optional[FileRecord], expected_rows: int, full: bool) -> tuple[Optional[str], Optional[FileRecord]]:
    """(problem or None, the file's current record when it was hashed and found good)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing", None
    except PermissionError as err:
        return f"{UNREADABLE}: {err.strerror}", None
    except OSError as err:  # a link loop where the part should be, an I/O error
        return f"cannot be examined: {err.strerror}", None
    if record is not None:
        if st.st_size != record.size:
            return f"size {st.st_size} bytes, recorded {record.size} (truncated or rewritten)", None
        if record.rows != expected_rows:
            return f"manifest records {record.rows} rows for it but {expected_rows} for its documents", None
        if not full and (st.st_mtime_ns, st.st_ctime_ns) == (record.mtime_ns, record.ctime_ns):
            return None, None  # as written: trusted without reading it (module docstring)
    try:
        rows = _footer_rows(path)
        checksum = file_checksum(path) if rows == expected_rows else ""
    except PermissionError as err:  # not damage: the bytes may be fine (see `repair_at_start`)
        return f"{UNREADABLE}: {err.strerror}", None
    except Exception as err:  # noqa: BLE001 - any damage pyarrow reports
        return f"not a readable Parquet file ({type(err).__name__}: {str(err).splitlines()[0][:120]})", None
    if rows != expected_rows:
        return f"{rows} rows, the manifest says {expected_rows}", None
    if record is not None and checksum != record.checksum:
        return "checksum mismatch (content changed since it was written)", None
    return None, FileRecord(size=st.st_size, checksum=checksum, rows=rows, mtime_ns=st.st_mtime_ns,
                            ctime_ns=st.st_ctime_ns)


def _expected(table: str, contents: tuple[int, int]) -> int:
    docs, chunks = contents
    return docs if table != "chunks" else chunks


def verify_manifest(manifest: Manifest, full: bool, report: Optional[VerifyReport] = None,
                    contents: Optional[dict[str, tuple[int, int]]] = None) -> tuple[list[PartProblem], dict[str, dict[str, FileRecord]]]:
    """Check every part of one shard's manifest: (problems, part -> {table: new record} for files
    hashed and found good whose record should be written or refreshed)."""
    records = manifest.part_files()
    problems: list[PartProblem] = []
    refresh: dict[str, dict[str, FileRecord]] = {}
    for part in manifest.parts():
        recs = records.get(part, {})
        if contents is not None:
            have = contents.get(part, (0, 0))
        elif recs and all(t in recs for t in TABLES):  # the records themselves say how many rows
            have = (recs["documents"].rows, recs["chunks"].rows)
        else:
            have = manifest.part_contents(part)
        first: Optional[PartProblem] = None
        for table in TABLES:
            path = part_path(manifest.output, table, part)
            problem, good = check_file(path, recs.get(table), _expected(table, have), full)
            if report is not None:
                report.files_checked += 1
                if good is not None:
                    report.bytes_hashed += good.size
            if problem is not None:
                problems.append(PartProblem(manifest.shard, part, table, problem, have[0]))
                first = first or problems[-1]
            elif good is not None and recs.get(table) != good:
                refresh.setdefault(part, {})[table] = good
        if first is not None:
            refresh.pop(part, None)
        if report is not None:
            report.parts_checked += 1
    return problems, refresh


def repair_at_start(manifest: Manifest) -> list[PartProblem]:
    """The writer's start: quick-verify the shard, log one warning line per damaged part, drop it and
    its documents from the manifest (ingested again by this run), record hashed files. Returns the
    problems found."""
    problems, refresh = verify_manifest(manifest, full=False)
    denied = next((p for p in problems if p.unreadable), None)
    if denied is not None:
        # a part that cannot be read is not damaged: dropping it deleted good chunks, and documents
        # this run's corpus does not hold were never ingested again (a silent loss)
        raise PermissionError(errno.EACCES, f"committed part file cannot be read ({denied.problem}): give this user "
                              f"read permission and re-run; nothing was changed (a damaged part is ingested again, "
                              f"one that cannot be read is not damaged)",
                              str(part_path(manifest.output, denied.table, denied.part)))
    by_part: dict[str, list[PartProblem]] = {}
    for p in problems:
        by_part.setdefault(p.part, []).append(p)
    for part, found in by_part.items():
        what = "; ".join(f"{p.table}/{part}.parquet {p.problem}" for p in found)
        log.warning("verify: committed part %s of shard %s is damaged (%s): its %d document(s) leave the output; "
                    "this run ingests again those its corpus holds", part, manifest.shard, what, found[0].documents)
    manifest.drop_parts(by_part)
    for part, files in refresh.items():
        manifest.record_files(part, files)
    return problems


def _shards(output: Path) -> list[str]:
    return sorted(p.name[len("manifest-"):-len(".sqlite")] for p in output.glob("manifest-*.sqlite"))


class _ReadOnlyManifest(Manifest):
    """A shard's manifest opened read-only (no schema created, nothing imported)."""

    @classmethod
    def open(cls, output: Path, shard: str) -> "_ReadOnlyManifest":
        from hades_gpu.store.manifest import manifest_path

        path = manifest_path(output, shard)
        try:
            conn = _connect(path, readonly=True)
            conn.execute("SELECT COUNT(*) FROM parts").fetchone()
            has_files = conn.execute("SELECT name FROM sqlite_master WHERE name = 'part_files'").fetchone()
        except sqlite3.DatabaseError as err:
            raise unreadable_manifest(path, err) from err
        m = cls(output, shard, conn)
        m._has_files = has_files is not None
        return m

    def part_files(self) -> dict[str, dict[str, FileRecord]]:
        return super().part_files() if self._has_files else {}


def verify_output(path: str | os.PathLike, full: bool = True) -> VerifyReport:
    """Check a finished output without changing it: every committed part of every shard (`full`:
    hashed; else the quick check of a run's start). Raises ManifestError for an unreadable manifest
    and FileNotFoundError when `path` is not an ingest output."""
    output = user_path(path)
    if not output.exists():
        raise FileNotFoundError(f"{output} does not exist")
    if not output.is_dir() or not has_manifest(output):
        raise FileNotFoundError(f"{output} is not an ingest output {no_manifest_detail(output)}")
    report = VerifyReport(output=output)
    named: set[str] = set()
    for shard in _shards(output):
        m = _ReadOnlyManifest.open(output, shard)
        try:
            problems, _ = verify_manifest(m, full, report, m.contents_by_part() if full else None)
            report.problems.extend(problems)
            named.update(m.parts())
        finally:
            m.close()
    from hades_gpu.store.lock import held_elsewhere

    # the lock held now (its flock), not a record that names a live PID: a record left by another
    # host's run was reported as a run writing it, though no one held it
    for shard, holder in held_elsewhere(output):
        report.notes.append(f"shard {shard} is locked by PID {holder.get('pid')} on {holder.get('host')}: "
                            "a run may be writing it now")
    if any(output.glob("manifest*.json")):
        report.notes.append("older JSON manifest(s) present: their parts are not verified (open the output "
                            "with hades-ingest once to convert them)")
    report.derived_problems.extend(_check_derived(output, full))
    report.notes.extend(_unfinished_shards(output))
    if named and not edges_path(output).is_file():  # not damage: an ingest with isne.enabled=false, or a stopped stage
        report.notes.append(f"no chunk graph or ISNE vectors yet (no {edges_path(output).name}): `hades-isne "
                            f"output={output}` builds them")
    elif named and not isne_embeddings_files(output):
        report.notes.append(f"no ISNE vectors yet (no isne/embeddings-*.parquet): `hades-isne output={output}` "
                            f"trains or infers them")
    if named and full and not report.problems and not report.derived_problems:
        report.notes.extend(_derived_behind_the_chunks(output))
    for table in TABLES:
        folder = output / table
        if folder.is_dir():
            entries = sorted(folder.iterdir())
            orphans = [p.name for p in entries if p.name.startswith("part-") and p.suffix == ".parquet"
                       and p.stem not in named and not (p.is_dir() and not p.is_symlink())]
            if orphans:
                report.notes.append(f"{len(orphans)} uncommitted file(s) in {table}/ (an interrupted run's; "
                                    f"never read, removed by the next run), e.g. {orphans[0]}")
            # anything else is no file of this tool's: the README's `pd.read_parquet("<output>/chunks")`
            # failed on a text file there, and read a copied part's rows twice, while verify said ok
            # names pyarrow's dataset discovery skips itself (".DS_Store", "_SUCCESS") are no trouble
            ours = {f"{n}.parquet" for n in named}.union(orphans)
            strays = [p.name for p in entries if p.name not in ours and not p.name.startswith((".", "_"))]
            if strays:
                report.notes.append(f"{len(strays)} file(s) or folder(s) in {table}/ that are no part of this output, "
                                    f"e.g. {strays[0]}: never removed; readers of the whole folder (pandas, "
                                    f"pyarrow.dataset) read them too: move them out")
    return report


def _check_derived(output: Path, full: bool) -> list[str]:
    """One line per unreadable file derived from the chunks (`edges.parquet`, the ISNE vectors and
    model): search refused them naming `hades-verify`, which said "ok". `full` reads them whole."""
    problems = []
    from hades_gpu.store.reader import isne_vectors_with_damage

    isne_files = set(isne_embeddings_files(output))
    for path in [edges_path(output), *sorted(isne_files)]:
        if path.is_file():
            try:
                if path in isne_files:  # values read too: bytes overwritten read as NaN (a few MB per 10^5 chunks)
                    table = pq.read_table(path) if full else pq.read_table(path, columns=["isne_embedding"])
                    bad = int(isne_vectors_with_damage(table.column("isne_embedding"))[1].sum())
                    if bad:
                        problems.append(f"{path}: {bad} damaged ISNE vector(s) (not finite, or of an absurd length); "
                                        f"`hades-isne output={output}` writes them again")
                else:
                    pq.read_table(path) if full else pq.read_metadata(path)
            except Exception as err:  # noqa: BLE001 - any reader error is damage, named in one line
                problems.append(f"{path}: unreadable ({error_line(err)}); `hades-isne output={output}` writes it again")
    problems.extend(_check_knn_index(output))
    model = isne_model_path(output)
    if model.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(model), framework="numpy") as f:
                for key in (f.keys() if full else []):
                    f.get_tensor(key)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{model}: unreadable ({error_line(err)}); `hades-isne output={output} isne.retrain=true` "
                            f"trains it again")
    return problems


def _check_knn_index(output: Path) -> list[str]:
    """The saved kNN index against the checksums its knn.json records (search fell back to exact
    search over a damaged index with a warning, and verify said "ok"). Checked whole: a few files."""
    import json

    from hades_gpu.store.atomic import file_checksum
    from hades_gpu.store.layout import knn_index_ids_path, knn_index_meta_path, knn_index_path

    meta_path = knn_index_meta_path(output)
    if not meta_path.is_file():
        return []
    remedy = f"`hades-isne output={output}` builds it again (search falls back to exact search meanwhile)"
    try:
        meta = json.loads(meta_path.read_text())
        expected = {knn_index_path(output): meta["index_checksum"], knn_index_ids_path(output): meta["ids_checksum"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{meta_path}: unreadable ({type(err).__name__}: {err}); {remedy}"]
    problems = []
    for path, checksum in expected.items():
        if not path.is_file():
            problems.append(f"{path}: missing; {remedy}")
        elif file_checksum(path) != checksum:
            problems.append(f"{path}: damaged (its checksum does not match {meta_path.name}); {remedy}")
    return problems


def _derived_behind_the_chunks(output: Path) -> list[str]:
    """Notes (not damage: search skips what is gone and ranks what is new by text) for a graph or ISNE
    vectors of an earlier state of the chunks: "ok" said nothing of 234 edges to removed chunks."""
    chunk_ids = _committed_chunk_ids(output)
    notes = []
    edges = edges_path(output)
    if edges.is_file():
        t = pq.read_table(edges, columns=["src_chunk_id", "dst_chunk_id"])
        ends = t.column("src_chunk_id").to_pylist() + t.column("dst_chunk_id").to_pylist()
        gone = sum(1 for c in ends if c not in chunk_ids)
        if gone:
            notes.append(f"{edges.name} is older than the chunks: {gone} edge end(s) are chunks no longer in the "
                         f"output; `hades-isne output={output}` builds the graph again")
    from hades_gpu.store.layout import knn_index_ids_path

    index_ids = knn_index_ids_path(output)
    if index_ids.is_file():
        try:
            indexed = set(pq.read_table(index_ids, columns=["chunk_id"]).column("chunk_id").to_pylist())
        except Exception:  # noqa: BLE001 - a damaged file is reported by _check_knn_index
            indexed = chunk_ids
        if indexed != chunk_ids:
            notes.append(f"the kNN index ({index_ids.parent}) is of an earlier state of the chunks ({len(indexed)} "
                         f"indexed, {len(chunk_ids)} in the output): search answers exactly meanwhile; the next "
                         f"graph build on the approximate path (`hades-isne output={output}`) builds it again")
    files = isne_embeddings_files(output)
    if files:
        ids = {c for f in files for c in pq.read_table(f, columns=["chunk_id"]).column("chunk_id").to_pylist()}
        removed, missing = len(ids - chunk_ids), len(chunk_ids - ids)
        if removed or missing:
            notes.append(f"ISNE vectors: {missing} chunk(s) have none (ingested since the last ISNE stage) and "
                         f"{removed} row(s) are of chunks no longer in the output; `hades-isne output={output}` "
                         f"infers or trains them again")
        from hades_gpu.store.reader import isne_vectors_model_ids

        model_id = _model_id(isne_model_path(output))
        if model_id is not None and isne_vectors_model_ids(output) != {model_id}:
            notes.append(f"ISNE vectors were not made by {isne_model_path(output)} (a stage stopped between writing "
                         f"the two); the next ingest or `hades-isne output={output}` infers them from the model again")
    return notes


def _model_id(model: Path) -> Optional[str]:
    """The `model_id` an ISNE checkpoint records (None: none, unreadable, or older than the id)."""
    import json

    from safetensors import safe_open

    if not model.is_file():
        return None
    try:
        with safe_open(str(model), framework="numpy") as f:
            return json.loads((f.metadata() or {}).get("config", "{}")).get("model_id")
    except Exception:  # noqa: BLE001 - a damaged model is reported by _check_derived
        return None


def _committed_chunk_ids(output: Path) -> set[str]:
    from hades_gpu.store.reader import read_chunks

    return set(read_chunks(output, ["chunk_id"]).column("chunk_id").to_pylist())


def _unfinished_shards(output: Path) -> list[str]:
    """A sharded output whose shards have not all finished (a killed driver): its parts verify, but
    files of the corpus are missing from it until the cluster command runs again."""
    from hades_gpu.store.shard_map import unfinished_shards

    unfinished, count = unfinished_shards(output)
    if not unfinished:
        return []
    return [f"{len(unfinished)} of {count} shard(s) have not finished (no shards/<shard>.json), e.g. "
            f"{unfinished[0]}: the output lacks their files until the cluster command (or shard=i/n) runs again"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hades-verify", description="Check a finished ingest output: every "
                                     "committed part file present and as written. Changes nothing.")
    parser.add_argument("output", help="the output folder (output=<folder>, as the other commands take it, too)")
    parser.add_argument("--quick", action="store_true", help="size and stat only (hash only files whose stat "
                        "changed), as a run's start does")
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:
        return int(err.code or 0)
    output = output_argument(args.output)  # `output=o` was read as a folder named "output=o"
    try:
        report = verify_output(output, full=not args.quick)
    except FileNotFoundError as err:  # not an ingest output: a usage error
        print(printable(f"hades-verify: error: {err}"), file=sys.stderr)
        return 2
    except ManifestError as err:  # the manifest itself is damaged: damage, like a damaged part
        print(printable(f"hades-verify: error: {err}"), file=sys.stderr)
        return 1
    for line in report.lines():
        print(printable(line))
    for note in report.notes:
        print(printable(f"note: {note}"), file=sys.stderr)
    denied = [p for p in report.problems if p.unreadable]
    # a part this user may not read is no evidence of damage (the ingest refuses it as such, too)
    status = "ok" if report.ok else ("unreadable" if denied and len(denied) == len(report.lines()) else "damaged")
    print(f"hades-verify: {status}: {report.parts_checked} part(s), {report.files_checked} file(s), "
          f"{report.bytes_hashed / 1e6:.1f} MB hashed, {len(report.lines())} problem(s)", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
