"""Stand-ins and checks shared by the orchestration tests (tests/orchestration/test_pipeline.py,
test_workers.py); imported by name, the tests/support folder being on sys.path.

- `RowModel`: a stand-in *model* whose vector of a row is a function of that row's token ids, and
  whose first component indexes a record of the exact ids it was given: a row routed to the wrong
  chunk, or a slab overwritten between the embed call and the writer's copy, is caught.
- `RecordingSink`: the pipeline's columnar sink contract (begin_document / add_rows / abandon) held
  as strictly as `store.writer.DatasetWriter` holds it (rows of a key never begun raise, more rows
  than chunks raise), keeping what arrived per chunk id.
- `CheckedRing`: a real `SlabRing` that also asserts, per slab, that acquire and release alternate
  (a slab is never handed out again while a batch in it is queued, embedded or written).
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa

from hades_gpu.gpu.slabs import SlabRing


def row_vector(real_ids: np.ndarray) -> np.ndarray:
    """(sum, count, first, last, checksum) of a row's real token ids: identifies the row."""
    ids = np.asarray(real_ids).astype(np.float64)
    return np.array([ids.sum(), len(ids), ids[0], ids[-1], (ids * np.arange(1, len(ids) + 1)).sum() % 9973],
                    dtype=np.float32)


class RowModel:
    """Stand-in model (see the module docstring): vector = (index into `rows`, *row_vector(ids)).

    Records each call's shape and thread; raises on call number `fail_on_call` (1-based).
    """

    dim = 6

    def __init__(self, concurrency: int = 2, fail_on_call: int = 0, delay_s: float = 0.0) -> None:
        self.concurrency = concurrency
        self.fail_on_call = fail_on_call
        self.delay_s = delay_s
        self.calls: list[tuple[int, int]] = []
        self.rows: list[np.ndarray] = []  # the real (unpadded) ids of every row embedded, in vector-index order
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        real = [ids[i][mask[i].astype(bool)].copy() for i in range(ids.shape[0])]
        with self._lock:
            self.calls.append(tuple(ids.shape))
            self.threads.add(threading.current_thread().name)
            n = len(self.calls)
            first = len(self.rows)
            self.rows.extend(real)
        if n == self.fail_on_call:
            raise RuntimeError("model crashed on purpose")
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        return np.stack([np.concatenate([[first + i], row_vector(r)]).astype(np.float32) for i, r in enumerate(real)])

    def ids_of(self, vector: np.ndarray) -> np.ndarray:
        """The exact ids of the row this vector was computed from."""
        return self.rows[int(vector[0])]


class RecordingSink:
    """The columnar sink, strict about its contract (see the module docstring)."""

    def __init__(self) -> None:
        self.begun: dict[int, tuple] = {}  # key -> (ref, result)
        self.abandoned: set[int] = set()
        self.remaining: dict[int, int] = {}
        self.rows_by_key: dict[int, list[dict]] = defaultdict(list)
        self.dropped_rows = 0  # rows that arrived under an abandoned key
        self.blocks = 0
        self.nbytes = 0
        self.embedding_types: set = set()
        self._lock = threading.Lock()

    def begin_document(self, key, ref, result) -> None:
        with self._lock:
            if key in self.begun or key in self.abandoned:
                raise ValueError(f"document key {key} registered twice")
            self.begun[key] = (ref, result)
            self.remaining[key] = result.n_chunks

    def abandon(self, key) -> None:
        with self._lock:
            self.abandoned.add(key)
            self.dropped_rows += len(self.rows_by_key.pop(key, []))

    def add_rows(self, rows: pa.RecordBatch) -> None:
        assert isinstance(rows, pa.RecordBatch)
        with self._lock:
            self.blocks += 1
            self.nbytes += rows.nbytes
            self.embedding_types.add(rows.schema.field("embedding").type)
            emb = np.asarray(rows.column("embedding").values.to_numpy()).reshape(rows.num_rows, -1)
            for i, row in enumerate(rows.to_pylist()):
                key = row["doc_key"]
                if key in self.abandoned:
                    self.dropped_rows += 1
                    continue
                if key not in self.begun:
                    raise KeyError(f"row of unregistered document key {key}")
                self.remaining[key] -= 1
                if self.remaining[key] < 0:
                    raise ValueError(f"more rows than chunks for key {key}")
                row["embedding"] = emb[i]
                row["rel_path"] = self.begun[key][0].rel_path
                self.rows_by_key[key].append(row)

    # -- views for the assertions ---------------------------------------------------------------
    def live_keys(self) -> dict[int, tuple]:
        return {k: v for k, v in self.begun.items() if k not in self.abandoned}

    def rows(self) -> list[dict]:
        return [r for k, rows in self.rows_by_key.items() if k not in self.abandoned for r in rows]

    def count_by_chunk(self) -> Counter:
        return Counter(r["chunk_id"] for r in self.rows())

    def row_by_chunk(self) -> dict[str, dict]:
        return {r["chunk_id"]: r for r in self.rows()}

    def complete(self) -> bool:
        return all(self.remaining[k] == 0 for k in self.live_keys())


class CheckedRing(SlabRing):
    """A real ring that records every acquire and release and fails on a slab handed out twice
    without a release in between (or released while not out)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.out: set[int] = set()
        self.violations: list[str] = []
        self.max_out = 0
        self.handed = Counter()
        self._check = threading.Lock()

    def _took(self, slab):
        if slab is not None:
            with self._check:
                if slab in self.out:
                    self.violations.append(f"slab {slab} handed out while it is still out")
                self.out.add(slab)
                self.handed[slab] += 1
                self.max_out = max(self.max_out, len(self.out))
        return slab

    def try_acquire(self):
        return self._took(super().try_acquire())

    def acquire(self, timeout=None):
        return self._took(super().acquire(timeout))

    def release(self, slab: int) -> None:
        with self._check:
            if slab not in self.out:
                self.violations.append(f"slab {slab} released while not out")
            self.out.discard(slab)
        super().release(slab)

    def holds(self, slab: int) -> bool:
        with self._check:
            return slab in self.out

    def slab_of(self, array: np.ndarray) -> int:
        """Which slab a view into this ring's mapping lies in."""
        offset = array.__array_interface__["data"][0] - self.mapping.address
        assert 0 <= offset < self.mapping.nbytes, "not a view into the ring's mapping"
        return offset // self.mapping.slab_bytes
