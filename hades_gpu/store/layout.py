"""Where each file of an output folder lives and what its columns are (docs/CONTRACTS.md).

One place for names and schemas, so the writer, every reader, the graph and the ISNE stage agree:

```
<output>/chunks/part-<shard>-<n:05d>.parquet     CHUNK schema (one row per chunk, with its embedding)
<output>/documents/part-<shard>-<n:05d>.parquet  DOCUMENT schema (one row per document)
<output>/manifest-<shard>.sqlite                 committed parts and documents (store.manifest)
<output>/edges.parquet                           EDGES schema (the chunk graph)
<output>/isne/model.safetensors                  θ, node ids and config (isne.checkpoint)
<output>/isne/embeddings-<shard>.parquet         ISNE_EMBEDDINGS schema
<output>/isne/training-state.pt                  an unfinished training's last epoch (isne.resume)
<output>/index/knn.faiss                         approximate kNN index (graph.ann, FAISS format)
<output>/index/knn-ids.parquet                   chunk_id of each FAISS id, in id order
<output>/index/knn.json                          its metric, nprobe, recall, fingerprint, checksums
<output>/metrics.json                            run metrics (a cluster run: the driver's, over all shards)
<output>/metrics-<shard>.json                    one shard's run metrics (shard=i/n runs)
<output>/shards.json, shards/<shard>.json        the shard map and finished shards (store.shard_map)
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection

import pyarrow as pa

CHUNKS_DIR = "chunks"
DOCUMENTS_DIR = "documents"
EDGES_FILE = "edges.parquet"
ISNE_DIR = "isne"
ISNE_MODEL_FILE = "model.safetensors"
ISNE_TRAINING_STATE_FILE = "training-state.pt"
ISNE_LOCK_NAME = "isne"  # the graph + ISNE stage's output lock (store.lock: `.lock-isne`)
DRIVER_LOCK_NAME = "driver"  # a cluster run's driver (cluster.driver): held while its shards and stage run
METRICS_FILE = "metrics.json"
INDEX_DIR = "index"
KNN_INDEX_FILE = "knn.faiss"
KNN_INDEX_IDS_FILE = "knn-ids.parquet"
KNN_INDEX_META_FILE = "knn.json"
TABLES = (CHUNKS_DIR, DOCUMENTS_DIR)


def is_output_listing(names: Collection[str]) -> bool:
    """Whether a folder holding these entries is an ingest output: a shard manifest beside `chunks/`
    (discovery does not walk such a folder: its Parquet, metrics and index files are not documents)."""
    return CHUNKS_DIR in names and any(n.startswith("manifest-") and n.endswith(".sqlite") for n in names)


def chunk_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("doc_id", pa.string()),
        ("chunk_id", pa.string()),
        ("path", pa.string()),
        ("modality", pa.string()),
        ("ordinal", pa.int32()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("n_tokens", pa.int32()),
        ("text", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


DOCUMENT_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("path", pa.string()),
    ("rel_path", pa.string()),
    ("modality", pa.string()),
    ("language", pa.string()),
    ("content_hash", pa.string()),
    ("n_chunks", pa.int32()),
    ("references", pa.list_(pa.string())),
    ("rel_path_bytes", pa.binary()),  # the exact relative path (rel_path is its text form, records.display_path)
    ("path_bytes", pa.binary()),  # the exact absolute path
    ("encoding", pa.string()),  # codec the text was decoded with: raw.decode(encoding) is the indexed text
])

EDGES_SCHEMA = pa.schema([
    ("src_chunk_id", pa.string()),
    ("dst_chunk_id", pa.string()),
    ("type", pa.string()),
    ("weight", pa.float32()),
])

ISNE_EMBEDDINGS_SCHEMA = pa.schema([("chunk_id", pa.string()), ("isne_embedding", pa.list_(pa.float32()))])
# schema metadata key of the ISNE vectors file: the `model_id` of the checkpoint that made them
ISNE_MODEL_ID_KEY = b"hades_isne_model_id"


def no_manifest_detail(folder: str | os.PathLike) -> str:
    """Why `folder` is no ingest output, in parentheses: no manifest, and, when chunk parts are there
    anyway, that the manifest is what is missing (it read as if the folder had never been an output)."""
    path = Path(folder)
    if not os.path.lexists(path):
        return "(it does not exist)"
    if not path.is_dir():
        return "(a file, not a folder)"
    if any((path / CHUNKS_DIR).glob("part-*.parquet")):
        return ("(its chunks/ parts are there but no manifest-*.sqlite: the manifest was deleted or moved; put it "
                "back, or re-run hades-ingest over the corpus into this folder, which ingests the documents again)")
    return "(no manifest in it)"


def output_argument(arg: str) -> str:
    """An output folder given on a command line as `output=<folder>`, as hades-ingest and hades-isne
    take it, or as the folder itself (a path that exists under the literal name wins)."""
    return arg[len("output="):] if arg.startswith("output=") and not os.path.lexists(arg) else arg


def part_name(shard: str, number: int) -> str:
    return f"part-{shard}-{number:05d}"


def part_path(output: Path, table: str, part: str) -> Path:
    return Path(output) / table / f"{part}.parquet"


def edges_path(output: Path) -> Path:
    return Path(output) / EDGES_FILE


def isne_model_path(output: Path) -> Path:
    return Path(output) / ISNE_DIR / ISNE_MODEL_FILE


def isne_training_state_path(output: Path) -> Path:
    return Path(output) / ISNE_DIR / ISNE_TRAINING_STATE_FILE


def isne_embeddings_path(output: Path, shard: str) -> Path:
    return Path(output) / ISNE_DIR / f"embeddings-{shard}.parquet"


def isne_embeddings_files(output: Path) -> list[Path]:
    return sorted((Path(output) / ISNE_DIR).glob("embeddings-*.parquet"))


def knn_index_path(output: Path) -> Path:
    return Path(output) / INDEX_DIR / KNN_INDEX_FILE


def knn_index_ids_path(output: Path) -> Path:
    return Path(output) / INDEX_DIR / KNN_INDEX_IDS_FILE


def knn_index_meta_path(output: Path) -> Path:
    return Path(output) / INDEX_DIR / KNN_INDEX_META_FILE


def metrics_path(output: Path) -> Path:
    return Path(output) / METRICS_FILE


def shard_metrics_path(output: Path, shard: str) -> Path:
    return Path(output) / f"metrics-{shard}.json"
