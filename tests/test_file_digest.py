"""`file_digest`: the weights' digest is remembered across processes by stat, never trusted after a change."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hades_gpu import file_digest
from hades_gpu.file_digest import CACHE_ENV, MAX_ENTRIES, MIN_CACHED_BYTES, file_sha256


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache" / "file-digests.json"
    monkeypatch.setenv(CACHE_ENV, str(path))
    monkeypatch.setattr(file_digest, "_memo", {})  # a fresh process's view
    return path


def big_file(path: Path, fill: bytes = b"a") -> Path:
    path.write_bytes(fill * (MIN_CACHED_BYTES + 17))
    return path


def test_digest_is_sha256_and_remembered_on_disk(tmp_path: Path, cache: Path) -> None:
    f = big_file(tmp_path / "weights.bin")
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [hashlib.sha256(f.read_bytes()).hexdigest()]


def test_a_later_process_reads_it_back_and_a_changed_file_is_hashed_again(tmp_path: Path, cache: Path) -> None:
    f = big_file(tmp_path / "weights.bin")
    file_sha256(f)
    # what a later process finds: plant a value only the cache can give, then ask with a fresh memo
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps({k: "f" * 64 for k in entries}))
    file_digest._memo.clear()
    assert file_sha256(f) == "f" * 64  # trusted: same file, same stat
    # the same size, new bytes: mtime/ctime change, so it is hashed again
    big_file(f, b"b")
    file_digest._memo.clear()
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    # a file put in its place (same name, new inode) is not the remembered one either
    other = big_file(tmp_path / "other.bin", b"c")
    os.replace(other, f)
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_small_files_are_not_written_to_the_cache(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text("{}")
    assert file_sha256(f) == hashlib.sha256(b"{}").hexdigest()
    assert not cache.exists()


@pytest.mark.parametrize("damage", [b"\x00garbage", b"[1, 2]", b'{"k": 5}', b""])
def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path: Path, cache: Path, damage: bytes) -> None:
    f = big_file(tmp_path / "weights.bin")
    cache.parent.mkdir(parents=True)
    cache.write_bytes(damage)
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert list(json.loads(cache.read_text()).values()) == [hashlib.sha256(f.read_bytes()).hexdigest()]


def test_an_unwritable_cache_only_costs_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "sub" / "file-digests.json"))  # under a file: mkdir fails
    monkeypatch.setattr(file_digest, "_memo", {})
    f = big_file(tmp_path / "weights.bin")
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    monkeypatch.setattr(file_digest, "_memo", {})
    assert file_digest.cache_file() is None
    f = big_file(tmp_path / "weights.bin")
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert not any(p.name == "file-digests.json" for p in tmp_path.rglob("*"))


def test_the_cache_keeps_the_newest_entries(tmp_path: Path, cache: Path) -> None:
    files = [big_file(tmp_path / f"w{i}.bin", bytes([65 + i % 26])) for i in range(MAX_ENTRIES + 3)]
    for f in files:
        file_sha256(f)
    entries = json.loads(cache.read_text())
    assert len(entries) == MAX_ENTRIES
    assert hashlib.sha256(files[-1].read_bytes()).hexdigest() in entries.values()
    assert all(str(files[0].resolve()) + "|" not in k for k in entries)


def test_model_fingerprint_is_the_same_value_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs record the fingerprint: remembering it must not change it (else every existing output
    would be refused as made by another model). Computed in a fresh process, twice (hashed, then read
    back from the cache), against the formula written out here."""
    from hades_gpu.documents.tokenizer import FINGERPRINTED_FILES, model_dir

    expected = hashlib.sha256()
    for name in FINGERPRINTED_FILES:
        path = model_dir() / name
        if path.is_file():
            expected.update(name.encode() + b"\0" + path.read_bytes())
    env = {**os.environ, CACHE_ENV: str(tmp_path / "digests.json")}
    code = "from hades_gpu.documents.tokenizer import model_fingerprint; print(model_fingerprint())"
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)]
    assert runs == [expected.hexdigest()[:16]] * 2
    assert "model-fingerprint|" in (tmp_path / "digests.json").read_text()
