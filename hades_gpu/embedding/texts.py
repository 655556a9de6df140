"""Raw text to model rows, exactly as ingest builds them, and `embed_texts` for any embedder.

A chunk's row in ingest is ``[CLS] ids[: max_seq_len - 2] [SEP] [PAD]...`` with the model folder's
own tokenizer (no truncation or padding of its own, kitoken where it passes its self-check against
HF `tokenizers`): `documents.tokenizer` and `orchestration.batcher.write_padded`. A query, or a
string sent to the `minilm_text` Triton ensemble, must get the very same row, so both the local
path here and the server's tokenizer model (triton_models/minilm_tokenizer) call `encode_texts`.

`embed_texts(embedder, texts)`: an embedder with its own `embed_texts` (the Triton one: the server
tokenizes) uses it; any other (local CPU, CUDA) gets the rows from `encode_texts` and its `embed`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from hades_gpu.config import EmbedderConfig
from hades_gpu.documents.fast_tokenizer import fast_tokenizer_for
from hades_gpu.documents.tokenizer import load_tokenizer, special_ids
from hades_gpu.orchestration.batcher import write_padded

# Rows per `embed` call in `embed_texts`: texts are sorted by length first, so a batch pads little.
# Not user-tunable: the embedders split or merge batches themselves (max_batch_size, sub-batches).
_TEXTS_PER_CALL = 32


def text_token_ids(texts: Sequence[str]) -> list[np.ndarray]:
    """Each text's ids without special tokens (the chunkers' ids: kitoken when it agrees with HF)."""
    tok = load_tokenizer()
    fast = fast_tokenizer_for(tok)
    if fast is not None:
        rows = fast.encode_batch(list(texts))
    else:
        rows = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    return [np.asarray(r, dtype=np.int64) for r in rows]


def encode_texts(texts: Sequence[str], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 (n, L) ids and mask for `texts`, L = the longest row (<= max_seq_len), as ingest pads.

    Content past ``max_seq_len - 2`` tokens is cut, like a batch row in ingest (chunks never are that
    long; queries may be).
    """
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts must be str (item {i} is {type(t).__name__})")
    return model_rows(text_token_ids(texts), max_seq_len)


def model_rows(token_ids: Sequence[np.ndarray], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] ids[: max_seq_len - 2] [SEP]`` rows padded to the longest: int64 (n, L) ids and mask."""
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must leave room for [CLS] content [SEP] (>= 3) (got {max_seq_len})")
    cls_id, sep_id, pad_id = special_ids()
    rows = [np.asarray(r, dtype=np.int64)[: max_seq_len - 2] for r in token_ids]
    length = max((r.shape[0] for r in rows), default=0) + 2
    ids = np.empty((len(rows), length), dtype=np.int64)
    mask = np.empty((len(rows), length), dtype=np.int64)
    write_padded(rows, ids, mask, cls_id, sep_id, pad_id)
    return ids, mask


def embed_texts(embedder, texts: Sequence[str], max_seq_len: Optional[int] = None) -> np.ndarray:
    """float32 (n, dim), L2-normalised, one row per text, in order. Thread-safe when `embedder.embed` is.

    `max_seq_len`: for an embedder without its own `embed_texts` or `max_seq_len` attribute (the
    CUDA one): ``embedder.max_seq_len`` of the config (default: EmbedderConfig's).
    """
    own = getattr(embedder, "embed_texts", None)
    if callable(own):
        return own(texts)
    limit = max_seq_len or getattr(embedder, "max_seq_len", None) or EmbedderConfig().max_seq_len
    return embed_texts_locally(embedder, texts, int(limit))


def embed_texts_locally(embedder, texts: Sequence[str], max_seq_len: int) -> np.ndarray:
    """Tokenize here (`encode_texts`), embed with `embedder.embed` in length-sorted batches."""
    texts = list(texts)
    out = np.empty((len(texts), int(embedder.dim)), dtype=np.float32)
    if not texts:
        return out
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lengths.__getitem__)  # similar lengths share a batch: less padding
    for start in range(0, len(order), _TEXTS_PER_CALL):
        part = order[start:start + _TEXTS_PER_CALL]
        ids, mask = encode_texts([texts[i] for i in part], max_seq_len)
        out[part] = embedder.embed(ids, mask)
    return out


# A fixed text whose vector stands for the model in an output's manifest (`model_probe`).
MODEL_PROBE_TEXT = ("def mean(values):\n    \"\"\"The arithmetic mean of a non-empty list of numbers.\"\"\"\n"
                    "    return sum(values) / len(values)\n\nRetrieval engineers embed documents and code "
                    "into vectors, then search them by cosine similarity.")


def model_probe(embedder, max_seq_len: int) -> np.ndarray:
    """float32 (dim,): `embedder`'s vector for `MODEL_PROBE_TEXT`, from rows tokenized here (the
    ingest path, whatever the embedder). Two embedders of the same model give cosine ~1 (bf16 vs fp32
    included); another model does not, so the manifest can tell a server that runs a different model
    than the one an output was embedded with (`store.manifest.Manifest.check_model_probe`)."""
    return embed_texts_locally(embedder, [MODEL_PROBE_TEXT], max_seq_len)[0]


__all__ = ["MODEL_PROBE_TEXT", "embed_texts", "embed_texts_locally", "encode_texts", "model_probe", "model_rows",
           "text_token_ids"]
