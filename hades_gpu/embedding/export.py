"""Export all-MiniLM-L6-v2 to ONNX and OpenVINO IR (fp32 and NNCF int8), cached on disk.

The exported graph is the whole embedder, not just the encoder: mean pooling over the attention mask
and L2 normalisation run inside it, so every runtime (ONNX Runtime, OpenVINO, a Triton backend) returns
the final vectors.

.. math::
    e_b = \\frac{\\sum_t m_{bt} h_{bt}}{\\max(\\sum_t m_{bt}, 10^{-9})}, \\qquad
    v_b = \\frac{e_b}{\\max(\\lVert e_b \\rVert_2, 10^{-12})}

Shapes:
    inputs ``input_ids`` int64 (B, L), ``attention_mask`` int64 (B, L), both dynamic;
    output ``embedding`` float32 (B, 384).

Cache layout (``EmbedderConfig.cache_dir``, else ``~/.cache/hades-gpu/models``)::

    <root>/minilm-<key>/onnx/model.onnx
    <root>/minilm-<key>/openvino-<ov version>/model.xml, model.bin
    <root>/minilm-<key>/openvino-int8-<ov>-nncf<v>-n<samples>/model.xml, model.bin

``key`` hashes the weights file, its config and ``EXPORTER_VERSION``. Every artifact folder is built in
a temporary folder beside it and renamed into place (a rename is atomic), under a file lock (py-filelock), so
parallel processes (Hydra multirun jobs, pytest workers) never see or write a half-made file; a
folder that exists is complete.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from filelock import FileLock

from hades_gpu.documents.tokenizer import load_tokenizer, model_dir, special_ids
from hades_gpu.file_digest import file_sha256
from hades_gpu.optional import import_openvino

log = logging.getLogger(__name__)

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

EXPORTER_VERSION = "1"  # bump when the exported graph changes: old cache entries are then ignored
ONNX_OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
DIM = 384
WEIGHTS_FILE = "model.safetensors"

# int8: NNCF post-training quantization keeps these in float (FACTS.md: layer 0 is this model's
# sensitive spot; quantizing it and the attention-score products costs cosine 0.984 -> 0.9958).
INT8_IGNORED_PATTERNS = (
    r".*/layer\.0/.*",  # every node of the first encoder layer
    r".*/attention/self/MatMul.*",  # Q.K^T and softmax(.).V (the projections are .../query/MatMul)
)
INT8_CALIBRATION_SAMPLES = 128


# ---------------------------------------------------------------------------------------------------
# cache plumbing


def cache_root(cache_dir: str = "") -> Path:
    """The cache folder: `cache_dir` if given, else ``~/.cache/hades-gpu/models``."""
    root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "hades-gpu" / "models"
    root.mkdir(parents=True, exist_ok=True)
    return root


def model_key() -> str:
    """Hash of the packaged weights + config + exporter version: names the cache entry."""
    mdir = model_dir()
    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, "config.json"):
        p = mdir / name
        h.update(file_sha256(p).encode())  # remembered per stat: hashing the weights is ~0.08 s
    h.update(f"exporter={EXPORTER_VERSION};opset={ONNX_OPSET}".encode())
    return h.hexdigest()[:16]


def model_cache_dir(cache_dir: str = "") -> Path:
    """``<root>/minilm-<key>``: where this model's artifacts live."""
    d = cache_root(cache_dir) / f"minilm-{model_key()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _publish(build: Callable[[Path], None], final: Path, force: bool, meta: dict) -> Path:
    """Build an artifact folder atomically: `build(tmp)` fills a temporary folder that is renamed to
    `final`. Under a lock on ``final.lock``; an existing `final` is kept unless `force`."""
    if final.is_dir() and not force:  # fast path without the lock: a folder that exists is complete
        return final
    with FileLock(final.parent / f".{final.name}.lock"):  # between processes (py-filelock)
        if final.is_dir() and not force:  # another process made it while we waited
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed process; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            t0 = time.perf_counter()
            build(tmp)
            meta = {**meta, "seconds": round(time.perf_counter() - t0, 2), "created": time.time()}
            (tmp / "export.json").write_text(json.dumps(meta, indent=2))
            trash = None
            if final.exists():
                trash = final.with_name(f".old-{final.name}-{os.getpid()}")
                os.rename(final, trash)  # open handles in other processes keep working (POSIX)
            os.rename(tmp, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("exported %s in %.1f s", final, meta["seconds"])
    return final


# ---------------------------------------------------------------------------------------------------
# ONNX


def load_torch_model(attn_implementation: str = "sdpa"):
    """The packaged BertModel via ``transformers.AutoModel``, offline, eval mode, fp32."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir()), attn_implementation=attn_implementation,
                                      local_files_only=True)
    return model.eval()


def mean_pool_normalize(hidden, attention_mask):
    """Masked mean over tokens, then L2 normalisation (fp32). hidden (B, L, H), mask (B, L) -> (B, H)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # (B, L, 1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)  # (B, H)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1, eps=1e-12)


def pooled_module(bert):
    """Wrap a BertModel as ``(input_ids, attention_mask) -> embedding`` (what we export)."""
    import torch

    class PooledEncoder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.bert = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return mean_pool_normalize(hidden, attention_mask)

    return PooledEncoder(bert).eval()


def _build_onnx(out: Path) -> None:
    import torch

    # Eager attention exports as explicit MatMul/Softmax nodes that NNCF's ignored scope can name.
    module = pooled_module(load_torch_model(attn_implementation="eager"))
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0]] * 2, dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
           OUTPUT_NAME: {0: "batch"}}
    with torch.inference_mode(), warnings.catch_warnings():
        # TracerWarnings about shape-dependent Python branches: the branches do not depend on B or L.
        warnings.simplefilter("ignore")
        # The legacy (TorchScript) exporter needs only `onnx`; dynamo=True would need onnxscript.
        torch.onnx.export(module, (ids, mask), str(out / "model.onnx"), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=dyn, opset_version=ONNX_OPSET,
                          do_constant_folding=True, dynamo=False)
    # The tracer leaves the output width symbolic; state it, so consumers see (batch, 384).
    import onnx

    path = out / "model.onnx"
    proto = onnx.load(str(path))
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_value = DIM
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_onnx(cache_dir: str = "", force: bool = False) -> Path:
    """Path of the cached ``model.onnx`` (pooling + normalisation inside), exporting it if missing.

    Idempotent: a second call returns the same file without touching it. `force` re-exports.
    """
    import torch

    final = model_cache_dir(cache_dir) / "onnx"
    meta = {"artifact": "onnx", "key": model_key(), "exporter_version": EXPORTER_VERSION,
            "opset": ONNX_OPSET, "torch": torch.__version__}
    return _publish(_build_onnx, final, force, meta) / "model.onnx"


# ---------------------------------------------------------------------------------------------------
# OpenVINO IR


def _ov_version() -> str:
    ov = import_openvino()  # without its usage telemetry (optional.py)

    return ov.get_version().split("-")[0]


def export_openvino(cache_dir: str = "", force: bool = False) -> Path:
    """Path of the cached OpenVINO IR ``model.xml`` (+ ``model.bin``), converted from the ONNX file.

    Weights stay fp32 in the IR (``compress_to_fp16=False``); the runtime picks bf16/f32 at compile time.
    """
    ov = import_openvino()  # without its usage telemetry (optional.py)

    onnx_path = export_onnx(cache_dir)
    final = model_cache_dir(cache_dir) / f"openvino-{_ov_version()}"

    def build(out: Path) -> None:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)

    meta = {"artifact": "openvino", "key": model_key(), "openvino": ov.get_version()}
    return _publish(build, final, force, meta) / "model.xml"


def export_openvino_int8(cache_dir: str = "", force: bool = False,
                         calibration_samples: Optional[int] = None) -> Path:
    """Path of the cached NNCF int8 IR: post-training quantization calibrated on local text.

    Layer 0 and the attention-score MatMuls stay float (``INT8_IGNORED_PATTERNS``). Calibration text
    comes from this machine (Python stdlib sources, /usr/share/doc); nothing is downloaded.
    `calibration_samples` defaults to ``INT8_CALIBRATION_SAMPLES`` (read at call time).

    Measured (2 cores, f32 for the float part, 150-200 chunks of 256 tokens): cosine to fp32 min
    0.981-0.987, mean 0.995, top-10 neighbour overlap 0.93-0.94. Keeping the FFN output projections
    float too gave min 0.988 / mean 0.996 / top-10 0.95 at a further speed cost; not the default.

    Raises:
        ImportError: `nncf` is not installed (extra ``hades-gpu[int8]``).
    """
    ov = import_openvino()  # before nncf imports it: without its usage telemetry (optional.py)
    try:
        import nncf
    except ImportError as err:
        # MissingDependencyError (an ImportError): one line and exit 2 from the CLI, not a traceback
        from hades_gpu.optional import MissingDependencyError

        raise MissingDependencyError("precision=int8 needs the 'nncf' package: pip install 'hades-gpu[int8]'") from err

    calibration_samples = int(calibration_samples or INT8_CALIBRATION_SAMPLES)
    fp32_xml = export_openvino(cache_dir)
    name = f"openvino-int8-{_ov_version()}-nncf{nncf.__version__}-n{calibration_samples}"
    final = model_cache_dir(cache_dir) / name

    def build(out: Path) -> None:
        model = ov.Core().read_model(str(fp32_xml))
        texts = local_text_chunks(calibration_samples, seed=1234)
        samples = [token_batch([t]) for t in texts]  # one sequence per sample, no padding
        dataset = nncf.Dataset(samples, lambda s: {INPUT_NAMES[0]: s[0], INPUT_NAMES[1]: s[1]})
        qmodel = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                               subset_size=len(samples),
                               ignored_scope=nncf.IgnoredScope(patterns=list(INT8_IGNORED_PATTERNS),
                                                               validate=False))
        ov.save_model(qmodel, str(out / "model.xml"), compress_to_fp16=False)

    meta = {"artifact": "openvino-int8", "key": model_key(), "openvino": ov.get_version(),
            "nncf": nncf.__version__, "calibration_samples": calibration_samples,
            "ignored_patterns": list(INT8_IGNORED_PATTERNS)}
    return _publish(build, final, force, meta) / "model.xml"


# ---------------------------------------------------------------------------------------------------
# local text and token batches (calibration, tests, precision measurements)


def token_batch(texts: Sequence[str], max_seq_len: int = 256, bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize like the pipeline's batcher: ``[CLS] + ids[:max_seq_len-2] + [SEP]``, pad id 0 to the
    longest row rounded up to a multiple of `bucket`, mask 1 on real tokens.

    Shapes: -> input_ids int64 (B, L), attention_mask int64 (B, L)
    """
    tok = load_tokenizer()
    cls, sep, pad = special_ids()
    rows = [[cls, *e.ids[: max_seq_len - 2], sep] for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    longest = max((len(r) for r in rows), default=1)
    width = min(-(-longest // bucket) * bucket, max(max_seq_len, longest))
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _local_text_files() -> list[Path]:
    """Text found on this machine: the Python stdlib's sources and /usr/share/doc's plain-text docs."""
    files: list[Path] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" not in p.parts and "site-packages" not in p.parts:
            files.append(p)
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        for p in sorted(doc.glob("*/*")):
            n = p.name.lower()
            if p.is_file() and (n.startswith(("readme", "changelog", "news", "copyright"))
                                or n.endswith((".txt", ".md", ".rst"))):
                files.append(p)
    return files


def _read_text(p: Path, limit: int = 200_000) -> str:
    try:
        raw = gzip.open(p).read(limit) if p.suffix == ".gz" else p.read_bytes()[:limit]
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return ""


def local_text_chunks(n: int, chunk_tokens: int = 254, seed: int = 0,
                      files: Optional[Sequence[Path]] = None) -> list[str]:
    """`n` text chunks of about `chunk_tokens` tokens cut from local files (deterministic per seed).

    At most two chunks per file, from random windows, so code and prose from many sources mix.
    """
    tok = load_tokenizer()
    paths = list(files) if files is not None else _local_text_files()
    rng = random.Random(seed)
    rng.shuffle(paths)
    out: list[str] = []
    for p in paths:
        if len(out) >= n:
            break
        text = _read_text(p)
        if len(text) < 200:
            continue
        enc = tok.encode(text, add_special_tokens=False)
        if len(enc.ids) < chunk_tokens:
            continue
        starts = rng.sample(range(0, len(enc.ids) - chunk_tokens + 1), k=min(2, len(enc.ids) - chunk_tokens + 1))
        for s in starts[: n - len(out)]:
            a, b = enc.offsets[s][0], enc.offsets[s + chunk_tokens - 1][1]
            out.append(text[a:b])
    if len(out) < n:
        raise RuntimeError(f"found only {len(out)} local text chunks of {chunk_tokens} tokens (wanted {n})")
    return out
