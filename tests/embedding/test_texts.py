"""Raw text to model rows (`embedding.texts`): the rows ingest's batcher builds, and `embed_texts`."""

from __future__ import annotations

import numpy as np
import pytest

from hades_gpu.embedding.export import local_text_chunks, token_batch
from hades_gpu.embedding.texts import embed_texts, encode_texts

TEXTS = ["hello world", "", "Café [SEP] 東京 😀", "def f(x):\n\treturn x ** 2\n"]


def test_rows_are_ingest_rows():
    """[CLS] ids[:254] [SEP], pad 0, padded to the longest row: what export.token_batch (HF ids) builds."""
    texts = TEXTS + [" ".join(local_text_chunks(2, chunk_tokens=200, seed=1))]  # ~400 tokens: cut
    ids, mask = encode_texts(texts, 256)
    want_ids, want_mask = token_batch(texts)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    assert ids.shape[1] == 256 and ids[-1, -1] == 102  # the long text ends in [SEP] at max_seq_len


def test_bad_input_is_one_line():
    with pytest.raises(TypeError, match="item 1 is bytes"):
        encode_texts(["ok", b"bytes"], 256)
    with pytest.raises(ValueError, match=">= 3"):
        encode_texts(["ok"], 2)


def test_local_embed_texts_keeps_order(embedder):
    """Length-sorted batches inside, the caller's order outside: row i is text i's vector."""
    texts = [f"{'word ' * (i * 7 % 40)}sentence {i} about topic {i * 31 % 97}" for i in range(40)]
    out = embed_texts(embedder, texts)
    assert out.shape == (40, 384) and out.dtype == np.float32
    ids, mask = token_batch(texts)
    np.testing.assert_allclose(np.sum(out * embedder.embed(ids, mask), axis=1), 1.0, atol=1e-3)
    assert embed_texts(embedder, []).shape == (0, 384)
