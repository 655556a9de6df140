"""Arrow arrays from buffers (store/arrow_columns.py) equal what `pa.array` builds, and an ingest's
main process stays free of pandas (pyarrow's `pa.array` / `to_numpy` would import it: ~0.2 s and
~40 MB per run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hades_gpu.store.arrow_columns import binaries, numeric, string_lists, strings, values_of


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.float64, np.bool_])
def test_numeric_equals_pa_array(dtype) -> None:
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 8, 9, 1000):
        values = (rng.integers(0, 2, n) if dtype is np.bool_ else rng.integers(-1000, 1000, n)).astype(dtype)
        got = numeric(values)
        assert got.equals(pa.array(values)), (dtype, n)
        assert got.to_pylist() == values.tolist()
    owned = np.arange(5, dtype=np.float32)
    copied, viewed = numeric(owned), numeric(owned, copy=False)
    owned[0] = 9.0
    assert copied.to_pylist()[0] == 0.0 and viewed.to_pylist()[0] == 9.0  # a view shares the memory
    view = np.arange(10, dtype=np.int64)[::2]  # not contiguous: copied
    assert numeric(view).to_pylist() == [0, 2, 4, 6, 8]
    with pytest.raises(TypeError):
        numeric(np.arange(3, dtype=np.uint16))
    with pytest.raises(ValueError):
        numeric(np.zeros((2, 2), dtype=np.int32))


def test_strings_binaries_and_lists_equal_pa_array() -> None:
    texts = ["", "plain", "café 東京 😀", "a\x00b", "x" * 1000]
    assert strings(texts).equals(pa.array(texts, pa.string()))
    assert strings([]).equals(pa.array([], pa.string()))
    raw = [b"", b"\xff\xfe odd bytes", "ü".encode()]
    assert binaries(raw).equals(pa.array(raw, pa.binary()))
    lists = [[], ["a", "b"], ["café"], [], ["x" * 10] * 3]
    assert string_lists(lists).equals(pa.array(lists, pa.list_(pa.string())))
    with pytest.raises(UnicodeEncodeError):
        strings(["\udc80 lone surrogate"])  # as pa.array refuses it


def test_values_of_reads_slices_and_chunks_without_copying_wrongly() -> None:
    arr = pa.array(np.arange(20, dtype=np.int64))
    assert values_of(arr).tolist() == list(range(20))
    assert values_of(arr.slice(5, 4)).tolist() == [5, 6, 7, 8]
    assert values_of(arr.slice(20, 0)).tolist() == []
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(10, 2), pa.array(np.array([], dtype=np.int64))])
    assert values_of(chunked).tolist() == [0, 1, 2, 10, 11]
    assert values_of(pa.array(np.array([1.5], dtype=np.float32))).dtype == np.float32
    batch = pa.RecordBatch.from_arrays([arr], ["k"]).slice(3, 2)
    assert values_of(batch.column("k")).tolist() == [3, 4]
    with pytest.raises(TypeError, match="nulls"):
        values_of(pa.array([1, None], pa.int64()))
    with pytest.raises(TypeError):
        values_of(pa.array(["a"]))


@pytest.mark.slow
def test_an_ingest_does_not_import_pandas(tmp_path: Path) -> None:
    """A real run (worker process, writer, manifest, commit) in a fresh interpreter: pandas is not in
    sys.modules after `process_batch`."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# Title\n\nSome prose. " * 50)
    (corpus / "b.py").write_text("import os\n\n\ndef f(x):\n    return x + 1\n" * 30)
    script = textwrap.dedent(f"""
        import sys
        from hades_gpu.benchmarks.feed_bench import ZeroCostEmbedder
        from hades_gpu.config import load_pipeline_config
        from hades_gpu.pipelines import TextParallelPipeline
        cfg = load_pipeline_config(profile="low_memory", overrides=["isne.enabled=false", "monitoring.progress=off"])
        cfg.profile.num_workers = 1
        result = TextParallelPipeline(cfg, embedder=ZeroCostEmbedder()).process_batch(
            [{str(corpus)!r}], output={str(tmp_path / "out")!r})
        print("chunks", result.chunks_written if hasattr(result, "chunks_written") else "?")
        print("pandas loaded:", "pandas" in sys.modules)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pandas loaded: False" in done.stdout, done.stdout + done.stderr[-2000:]
