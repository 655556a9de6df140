"""Triton Python-backend model: all-MiniLM-L6-v2 embeddings from the project's own local embedder.

The Triton glue (this class) is kept apart from the model: the model is
`hades_gpu.embedding.factory.build_embedder` with `embedder.name=local` — OpenVINO (bf16 where the
CPU has it) on a CPU server, torch on CUDA when the server sees a GPU — so a chunk embedded through
Triton gets the vector `embedder=local` would give it.

Per execution (a list of requests the dynamic batcher merged):
  * each request is checked on its own; a bad one gets its own error response and the others are
    still served;
  * each request keeps its own sequence length (inputs are `allow_ragged_batch`), so merging never
    pads a short request to a long one;
  * the rows of all good requests are cut into pieces of `sub_batch_size` and the pieces run
    concurrently on the embedder's `concurrency` streams (the runtime releases the GIL);
  * exactly one response per request, in request order.

Shapes:
    input_ids int64 (B, L), attention_mask int64 (B, L), 1 <= L <= max_seq_len -> embedding float32 (B, 384)

Tensors stay in host memory on purpose: the inputs are a few KB of token ids the embedder copies
to its device itself, and the output is the Embedder protocol's float32 numpy array (384 floats a
row), so a DLPack hand-off of GPU tensors would save nothing here.

The server's Python must be an environment with `hades_gpu` installed and numpy < 2 (FACTS.md); see
docs/triton.md.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils


def _honour_pythonpath() -> None:
    """Put $PYTHONPATH first on sys.path, as a normal interpreter would.

    The Python backend's stub builds sys.path from the `python` on the server's PATH and drops
    $PYTHONPATH (seen in the stub's sys.path: it keeps the variable but not its folders), so a
    checkout run with PYTHONPATH=<checkout> would otherwise import the installed `hades_gpu`,
    not its own. Both models of the minilm_text ensemble do this, so both run the same code.
    """
    for folder in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
        if folder not in sys.path:
            sys.path.insert(0, folder)


def _param(model_config: dict, key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


class _BadRequest(ValueError):
    """A request the model cannot run; its message goes back to that request's client only."""


def _input(request, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise _BadRequest(f"request must carry input {name!r} (got none)")
    return tensor.as_numpy()


class _Embedder:
    """The model, apart from Triton: the project's local embedder plus the sub-batch scheduling."""

    def __init__(self, params: dict[str, str], device: str):
        from hades_gpu.config import EmbedderConfig, PipelineConfig
        from hades_gpu.documents.tokenizer import model_dir
        from hades_gpu.embedding.factory import build_embedder

        ecfg = EmbedderConfig(
            name="local",  # never "triton": this *is* the server
            runtime=params["runtime"],
            precision=params["precision"],
            device=device,
            threads=int(params["threads"]),
            streams=int(params["streams"]),
            max_seq_len=int(params["max_seq_len"]),
        )
        self.embedder = build_embedder(PipelineConfig(embedder=ecfg))
        self.dim = int(self.embedder.dim)
        self.max_seq_len = ecfg.max_seq_len
        limit = int(getattr(self.embedder, "max_batch_size", 0) or 0)  # 0: the embedder takes any batch
        on_gpu = bool(getattr(self.embedder, "cuda", False))
        want = params["sub_batch_size"]
        # auto: small pieces on a CPU (OpenVINO is fastest at ~8 rows a stream), whole batches on a GPU
        size = ((limit or 128) if on_gpu else 8) if want == "auto" else int(want)
        self.sub_batch_size = max(1, min(size, limit) if limit else size)
        with open(model_dir() / "config.json") as f:
            self.vocab_size = int(json.load(f)["vocab_size"])
        self.concurrency = max(1, int(getattr(self.embedder, "concurrency", 1)))
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="minilm")
        self.description = self.embedder.description

    def check(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Raise `_BadRequest` (expected ..., got ...) for a request the embedder must not see."""
        if ids.ndim != 2:
            raise _BadRequest(f"input_ids must be 2-D [batch, seq] (got shape {list(ids.shape)})")
        if mask.shape != ids.shape:
            raise _BadRequest(f"attention_mask must have the shape of input_ids {list(ids.shape)} (got {list(mask.shape)})")
        if not 1 <= ids.shape[1] <= self.max_seq_len:
            raise _BadRequest(f"sequence length must be in [1, {self.max_seq_len}] (got {ids.shape[1]})")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise _BadRequest(f"input_ids must be in [0, {self.vocab_size}) (got [{int(ids.min())}, {int(ids.max())}])")
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
            raise _BadRequest(f"attention_mask must hold 0 or 1 (got [{int(mask.min())}, {int(mask.max())}])")

    def embed_many(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray | Exception]:
        """Embed every (ids, mask) batch; the result for a batch is its (B, dim) array or its error."""
        jobs = []  # (batch index, row start, future)
        for i, (ids, mask) in enumerate(batches):
            for start in range(0, ids.shape[0], self.sub_batch_size):
                stop = start + self.sub_batch_size
                jobs.append((i, start, self._pool.submit(self.embedder.embed, ids[start:stop], mask[start:stop])))
        out: list[np.ndarray | Exception] = [np.empty((ids.shape[0], self.dim), np.float32) for ids, _ in batches]
        for i, start, fut in jobs:  # waits here for the runtime's streams
            try:
                part = fut.result()
            except Exception as err:  # noqa: BLE001 - becomes that request's error response
                out[i] = err
                continue
            if isinstance(out[i], np.ndarray):
                out[i][start:start + part.shape[0]] = part
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.embedder.close()


class TritonPythonModel:
    """Triton glue: config parsed once, one response per request, errors per request."""

    def initialize(self, args: dict) -> None:
        _honour_pythonpath()
        self.model_config = config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        out_cfg = pb_utils.get_output_config_by_name(config, "embedding")
        if out_cfg is None:
            raise pb_utils.TritonModelException("model config must declare output 'embedding' (got none)")
        self.out_dtype = pb_utils.triton_string_to_numpy(out_cfg["data_type"])
        params = {
            key: _param(config, key, default)
            for key, default in (("runtime", "auto"), ("precision", "default"), ("device", "auto"),
                                 ("threads", "0"), ("streams", "0"), ("max_seq_len", "256"),
                                 ("sub_batch_size", "auto"))
        }
        device = params["device"]
        if args.get("model_instance_kind") == "GPU":  # a KIND_GPU instance group pins the device
            device = f"cuda:{args['model_instance_device_id']}"
        self.model = _Embedder(params, device)
        declared = int(out_cfg["dims"][-1])
        if declared != self.model.dim:
            raise pb_utils.TritonModelException(
                f"output 'embedding' must have dims [{self.model.dim}] for this model (got [{declared}])")
        pb_utils.Logger.log_info(
            f"{self.model_name}: {self.model.description}, {self.model.concurrency} streams, "
            f"sub-batch {self.model.sub_batch_size}")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[int] = []
        batches: list[tuple[np.ndarray, np.ndarray]] = []
        for i, request in enumerate(requests):
            try:
                ids, mask = (_input(request, name) for name in ("input_ids", "attention_mask"))
                self.model.check(ids, mask)
            except _BadRequest as err:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))
                continue
            good.append(i)
            batches.append((ids, mask))
        for i, result in zip(good, self.model.embed_many(batches)):
            if isinstance(result, Exception):
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(result).__name__}: {result}"))
            else:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("embedding", result.astype(self.out_dtype, copy=False))])
        return responses

    def finalize(self) -> None:
        model, self.model = getattr(self, "model", None), None
        if model is not None:
            model.close()
