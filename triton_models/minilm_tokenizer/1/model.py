"""Triton Python-backend model: raw UTF-8 strings to MiniLM token rows, as ingest builds them.

The first step of the `minilm_text` ensemble. The tokenization is the project's own
(`hades_gpu.embedding.texts`: the model folder's tokenizer, kitoken where it passes its self-check,
``[CLS] ids[:max_seq_len - 2] [SEP]``, padded with [PAD]), so a string sent here gets the ids
`embedder=local` would give it and the vector of the second step (minilm_python) matches.

Per execution (the requests the dynamic batcher merged): every string of every request is tokenized
in one call; each request's rows are then padded to that request's longest row only (the embedding
model runs each request at its own length); a request that is not valid UTF-8 gets its own error.

Shapes:
    text BYTES (B, 1) -> input_ids int64 (B, L), attention_mask int64 (B, L), L <= max_seq_len

The server's Python must have `hades_gpu` importable (the same environment as minilm_python; see
docs/triton.md): the stub takes its site-packages from the `python` on the server's PATH.
"""

from __future__ import annotations

import json
import os
import sys

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


class _BadRequest(ValueError):
    """A request the model cannot run; its message goes back to that request's client only."""


def _texts(request) -> list[str]:
    tensor = pb_utils.get_input_tensor_by_name(request, "text")
    if tensor is None:
        raise _BadRequest("request must carry input 'text' (got none)")
    raw = tensor.as_numpy().reshape(-1)
    out = []
    for i, item in enumerate(raw):
        data = item if isinstance(item, (bytes, bytearray)) else str(item).encode()
        try:
            out.append(bytes(data).decode("utf-8"))
        except UnicodeDecodeError as err:
            raise _BadRequest(f"text must be UTF-8 (row {i}: {err.reason} at byte {err.start})") from err
    return out


class TritonPythonModel:
    """Triton glue: one tokenizer call per execution, one response per request."""

    def initialize(self, args: dict) -> None:
        _honour_pythonpath()
        from hades_gpu.embedding import texts

        config = json.loads(args["model_config"])
        value = config.get("parameters", {}).get("max_seq_len", {}).get("string_value", "")
        self.max_seq_len = int(value or 256)
        self._texts = texts
        texts.encode_texts(["warm up"], self.max_seq_len)  # loads the tokenizer (and kitoken's check) now
        pb_utils.Logger.log_info(f"{args['model_name']}: project tokenizer, max_seq_len {self.max_seq_len}")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[tuple[int, list[str]]] = []
        for i, request in enumerate(requests):
            try:
                good.append((i, _texts(request)))
            except _BadRequest as err:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))
        every = [t for _, ts in good for t in ts]
        try:
            token_ids = self._texts.text_token_ids(every)
        except Exception as err:  # noqa: BLE001 - every request of this execution gets the error
            for i, _ in good:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(err).__name__}: {err}"))
            return responses
        start = 0
        for i, ts in good:
            ids, mask = self._texts.model_rows(token_ids[start:start + len(ts)], self.max_seq_len)
            start += len(ts)
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)])
        return responses
