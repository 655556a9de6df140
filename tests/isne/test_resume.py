"""A stopped ISNE training goes on from its last saved epoch (`isne/resume.py`) and ends exactly as an
uninterrupted one; a state of another graph, other settings or a damaged file is not used; a real
`hades-isne` SIGKILLed mid-training resumes; two stages on one output at once are refused."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import numpy as np
import torch

from hades_gpu.config import IsneConfig
from hades_gpu.isne.evaluation import sbm_graph
from hades_gpu.isne.resume import load_training_state
from hades_gpu.isne.stage import run_isne_stage
from hades_gpu.isne.trainer import train_isne
from hades_gpu.store.lock import OutputLockedError
from tests.isne.test_trainer import _cfg, _write_output

REPO = Path(__file__).resolve().parents[2]


def _isne_cfg(**changes) -> IsneConfig:
    base = IsneConfig(dim=16, epochs=6, batch_size=128, walk_length=8, walks_per_node=2, device="cpu", patience=100,
                      checkpoint_interval_s=0.0)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def graph() -> torch.Tensor:
    ei, _ = sbm_graph(500, 4, 0.04, 0.002, seed=3)
    return ei


def test_a_resumed_training_ends_as_an_uninterrupted_one(graph: torch.Tensor, tmp_path: Path) -> None:
    state = tmp_path / "training-state.pt"
    whole = train_isne(graph, 500, _isne_cfg())
    assert not state.exists()
    # the first run stops after 3 epochs: the state of epoch 2 is on disk (the last epoch's model is the
    # result, so a finished run saves none)
    first = train_isne(graph, 500, _isne_cfg(), epochs=3, state_path=state)
    assert first.epochs_run == 3 and first.resumed_from_epoch == 0
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 2 and saved["theta"].shape == (500, 16)
    rest = train_isne(graph, 500, _isne_cfg(), state_path=state)
    assert rest.resumed_from_epoch == 2 and rest.epochs_run == 6 and len(rest.history) == 6
    assert torch.equal(rest.model.theta.weight, whole.model.theta.weight)
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in whole.history]
    assert rest.pos_pairs == whole.pos_pairs and rest.best_epoch == whole.best_epoch


def test_early_stopping_state_survives_a_resume(graph: torch.Tensor, tmp_path: Path) -> None:
    """The best θ and the epochs without improvement are part of the state: a resumed run stops where
    the uninterrupted one stops and restores the same best θ."""
    cfg = _isne_cfg(epochs=40, patience=2, min_delta=0.05, lr=0.5)
    whole = train_isne(graph, 500, cfg)
    assert whole.stopped_early and whole.best_epoch < whole.epochs_run  # the best θ is an earlier epoch's
    state = tmp_path / "s.pt"
    train_isne(graph, 500, cfg, epochs=whole.best_epoch + 2, state_path=state)
    saved = load_training_state(state, torch.load(state, weights_only=True)["key"])
    assert saved.epoch == whole.best_epoch + 1 and saved.stopper["bad"] == 1 and saved.best_theta is not None
    rest = train_isne(graph, 500, cfg, state_path=state)
    assert rest.resumed_from_epoch == whole.best_epoch + 1
    assert (rest.epochs_run, rest.best_epoch, rest.stopped_early) == (whole.epochs_run, whole.best_epoch, True)
    assert torch.equal(rest.model.theta.weight, whole.model.theta.weight)


def test_a_state_past_the_epochs_asked_for_is_not_used(graph: torch.Tensor, tmp_path: Path, caplog) -> None:
    """120 epochs asked, stopped after 47, then `train(epochs=5)`: the result was the 47-epoch model
    (`epochs_run` 47), nothing said. Fewer epochs than the state holds now train from the start."""
    state = tmp_path / "training-state.pt"
    train_isne(graph, 500, _isne_cfg(), epochs=5, state_path=state)  # stops after 5 of 6: state of epoch 4
    assert torch.load(state, weights_only=True)["epoch"] == 4
    fresh = train_isne(graph, 500, _isne_cfg(), epochs=3)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.trainer"):
        short = train_isne(graph, 500, _isne_cfg(), epochs=3, state_path=state)
    assert short.resumed_from_epoch == 0 and short.epochs_run == 3
    assert torch.equal(short.model.theta.weight, fresh.model.theta.weight)
    assert any("more than the 3 asked for" in r.getMessage() for r in caplog.records)


def test_a_state_at_exactly_the_epochs_asked_for_finishes_from_it(graph: torch.Tensor, tmp_path: Path,
                                                                   caplog) -> None:
    """Stopped after epoch 3 of 6, then run with `epochs=3`: the state was called "more than the 3
    asked for" and all 3 epochs trained again. It holds exactly the model a 3-epoch run ends with."""
    state = tmp_path / "training-state.pt"
    train_isne(graph, 500, _isne_cfg(), epochs=4, state_path=state)  # stops after 4: state of epoch 3
    assert torch.load(state, weights_only=True)["epoch"] == 3
    fresh = train_isne(graph, 500, _isne_cfg(), epochs=3)
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.trainer"):
        done = train_isne(graph, 500, _isne_cfg(), epochs=3, state_path=state)
    assert (done.resumed_from_epoch, done.epochs_run, done.best_epoch) == (3, 3, fresh.best_epoch)
    assert torch.equal(done.model.theta.weight, fresh.model.theta.weight)
    assert [h["loss"] for h in done.history] == [h["loss"] for h in fresh.history]
    assert not any("more than" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("change", ["graph", "lr", "batch_size", "damaged"])
def test_a_state_of_another_training_is_not_used(graph: torch.Tensor, tmp_path: Path, change: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "s.pt"
    train_isne(graph, 500, _isne_cfg(), epochs=3, state_path=state)
    assert state.is_file()
    cfg, edges, batch = _isne_cfg(), graph, None
    if change == "graph":
        u, v = graph[:, 0].tolist()  # one undirected edge fewer, both directions
        edges = graph[:, ~(((graph[0] == u) & (graph[1] == v)) | ((graph[0] == v) & (graph[1] == u)))]
    elif change == "lr":
        cfg = _isne_cfg(lr=0.05)
    elif change == "batch_size":
        batch = 64
    else:
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    fresh = train_isne(edges, 500, cfg, batch_size=batch)
    with caplog.at_level(logging.INFO, logger="hades_gpu.isne.resume"):
        again = train_isne(edges, 500, cfg, batch_size=batch, state_path=state)
    assert again.resumed_from_epoch == 0
    assert torch.equal(again.model.theta.weight, fresh.model.theta.weight)
    lines = [r.getMessage() for r in caplog.records if r.name == "hades_gpu.isne.resume"]
    assert len(lines) == 1 and ("another graph or other settings" in lines[0] if change != "damaged"
                                else "ignoring the training state" in lines[0]), lines


def test_keys_that_do_not_change_a_step_may_change(graph: torch.Tensor, tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    train_isne(graph, 500, _isne_cfg(), epochs=3, state_path=state)
    rest = train_isne(graph, 500, _isne_cfg(epochs=5, patience=50, time_budget_s=3600.0, keep_freed_memory=False),
                      state_path=state)
    assert rest.resumed_from_epoch == 2 and rest.epochs_run == 5


def test_resume_off_and_no_saving(graph: torch.Tensor, tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    train_isne(graph, 500, _isne_cfg(checkpoint_interval_s=None), epochs=3, state_path=state)
    assert not state.exists()
    train_isne(graph, 500, _isne_cfg(), epochs=3, state_path=state)
    assert state.exists()
    assert train_isne(graph, 500, _isne_cfg(resume=False), state_path=state).resumed_from_epoch == 0


# -- the real command, killed ---------------------------------------------------------------------------
def _hades_isne(output: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HADES_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [f"output={output}", "isne.dim=8", "isne.batch_size=32", "isne.walk_length=6", "isne.walks_per_node=2",
            "isne.device=cpu", "isne.patience=1000", "isne.checkpoint_interval_s=0", "graph.knn_k=3",
            "graph.knn_threshold=0.0", "graph.same_document_fanout=2", "monitoring.progress=off", *overrides]
    return subprocess.Popen([sys.executable, "-c", "from hades_gpu.cli import isne_main; isne_main()", *args],
                            cwd=output.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _model_theta(output: Path) -> torch.Tensor:
    from hades_gpu.isne.checkpoint import load_checkpoint

    return load_checkpoint(output / "isne" / "model.safetensors").theta


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_hades_isne_killed_mid_training_resumes(tmp_path: Path, sig: int) -> None:
    out, ref = tmp_path / "out", tmp_path / "ref"
    out.mkdir()
    _write_output(out, {f"d{i}.md": 3 + i % 5 for i in range(40)})
    shutil.copytree(out, ref)
    epochs = "isne.epochs=60"
    victim = _hades_isne(out, epochs)
    state = out / "isne" / "training-state.pt"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            if state.is_file() and torch.load(state, weights_only=True)["epoch"] >= 3:
                break
            time.sleep(0.05)
        assert victim.poll() is None, "training finished before it could be killed: " + victim.stdout.read()[-2000:]
        os.kill(victim.pid, sig)
        if sig == signal.SIGTERM:  # one line saying what is kept (it said "committed parts", an ingest's words)
            said, _ = victim.communicate(timeout=60)
            assert victim.returncode == 143, said[-2000:]
            assert said.strip().splitlines()[-1] == ("hades-isne: error: terminated by SIGTERM (the training state "
                                                     "is kept: re-run to resume)"), said[-2000:]
    finally:
        victim.kill()
        victim.wait()
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert 3 <= killed_at < 59 and not (out / "isne" / "model.safetensors").exists()

    resumed = _hades_isne(out, epochs)
    text, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, text[-3000:]
    assert f"resuming from the training state {state} after epoch" in text, text[-3000:]
    assert not state.exists()  # the model is written: nothing left to resume
    summary = [ln for ln in text.splitlines() if ln.startswith(f"{out}: ISNE trained: ")]
    assert len(summary) == 1 and f"resumed after epoch " in summary[0] and "60 epoch(s)" in summary[0], text[-2000:]
    assert "history" not in summary[0] and str(out / "isne" / "model.safetensors") in summary[0]
    whole = _hades_isne(ref, epochs)
    text_ref, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, text_ref[-3000:]
    assert "resuming" not in text_ref
    assert torch.allclose(_model_theta(out), _model_theta(ref), atol=1e-5)


def test_two_stages_on_one_output_at_once_are_refused(tmp_path: Path) -> None:
    _write_output(tmp_path, {f"d{i}.md": 3 for i in range(4)})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hades_gpu.store.lock import OutputLock\n"
        f"lock = OutputLock({str(tmp_path)!r}, 'isne').acquire(); print('held', flush=True); time.sleep(60)")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=r"\(its graph and ISNE stage\) is in use by PID"):
            run_isne_stage(_cfg(), tmp_path)
        assert not (tmp_path / "edges.parquet").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_isne_stage(_cfg(), tmp_path)["mode"] == "trained"


def test_a_cluster_drivers_lock_refuses_every_stage_but_its_own(tmp_path: Path) -> None:
    """Between a cluster driver's discovery and its last shard no shard lock may be held: hades-isne
    trained on half the corpus, exit 0, and the driver then added chunks without ISNE vectors. Only
    the stage the driver runs itself (it names its host and PID) passes its lock."""
    import socket

    _write_output(tmp_path, {f"d{i}.md": 3 for i in range(4)})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hades_gpu.store.lock import OutputLock\n"
        f"lock = OutputLock({str(tmp_path)!r}, 'driver').acquire(); print('held', flush=True); time.sleep(60)")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=r"\(shard driver\) is in use by PID"):
            run_isne_stage(_cfg(), tmp_path)
        with pytest.raises(OutputLockedError):  # another driver's identity does not pass
            run_isne_stage(_cfg(), tmp_path, driver=(socket.gethostname(), os.getpid()))
        assert not (tmp_path / "edges.parquet").exists()
        assert run_isne_stage(_cfg(), tmp_path, driver=(socket.gethostname(), holder.pid))["mode"] == "trained"
    finally:
        holder.kill()
        holder.wait()


_SIZE_LIMITED = """
import resource, sys, torch
from pathlib import Path
from hades_gpu.config import IsneConfig
from hades_gpu.isne.checkpoint import save_checkpoint
from hades_gpu.isne.evaluation import sbm_graph
from hades_gpu.isne.resume import TrainingState, save_training_state
from hades_gpu.isne.trainer import train_isne

folder = Path(sys.argv[1])
(folder / "model.safetensors").write_bytes(b"old model")
(folder / "state.pt").write_bytes(b"old state")
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # `ulimit -f`; Python ignores SIGXFSZ
theta = torch.zeros(4000, 64)
for what, save in [("checkpoint", lambda: save_checkpoint(folder / "model.safetensors", theta, [str(i) for i in range(4000)], {})),
                   ("state", lambda: save_training_state(folder / "state.pt", TrainingState(
                       key="k", epoch=1, theta=theta, optimizer={}, generator=torch.Generator().get_state(),
                       train_seconds=0.0, pos_pairs=0, best_epoch=1, stopper={}, best_theta=None, history=[])))]:
    try:
        save()
        print(what, "saved")
    except OSError as err:
        print(what, "OSError", err.errno, err.filename)
ei, _ = sbm_graph(4000, 4, 0.005, 0.0005, seed=0)
cfg = IsneConfig(dim=64, epochs=2, batch_size=512, val_fraction=0.0, early_stop="off", checkpoint_interval_s=0.0)
res = train_isne(ei, 4000, cfg, state_path=folder / "train-state.pt")
print("trained", res.epochs_run)
print(sorted(p.name for p in folder.iterdir()), (folder / "model.safetensors").read_bytes(), (folder / "state.pt").read_bytes())
"""


def test_a_full_disk_or_size_limit_while_saving_is_an_os_error_and_a_failed_state_save_does_not_end_training(
        tmp_path: Path) -> None:
    """safetensors (SafetensorError "... (os error 27)") and torch.save (RuntimeError "unexpected pos")
    failed on a full disk or `ulimit -f` with tracebacks, and a training-state save that failed
    ended the whole training. Now each is the OSError behind it, naming the file, the old file is
    left as it was, and a failed state save is a warning while training goes on (a real limit,
    RLIMIT_FSIZE, in a child process)."""
    script = tmp_path / "limited.py"
    script.write_text(_SIZE_LIMITED)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"checkpoint OSError 27 {tmp_path / 'model.safetensors'}"
    assert lines[1] == f"state OSError 27 {tmp_path / 'state.pt'}"
    assert lines[2] == "trained 2"
    assert "could not save the training state after epoch 1" in out.stderr and "training goes on" in out.stderr
    assert lines[3] == f"{sorted(['limited.py', 'model.safetensors', 'state.pt'])} b'old model' b'old state'"


_API_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines.isne_training import ISNETrainingPipeline
cfg = load_pipeline_config(overrides=["isne.dim=8", "isne.batch_size=32", "isne.walk_length=6", "isne.walks_per_node=2",
                                      "isne.device=cpu", "isne.patience=1000", "isne.checkpoint_interval_s=0",
                                      "graph.knn_k=3", "graph.knn_threshold=0.0", "graph.same_document_fanout=2"])
ISNETrainingPipeline(cfg).train(corpus_path=sys.argv[1], epochs=60)
"""


def test_the_api_stopped_by_sigterm_says_the_training_state_is_kept(tmp_path: Path) -> None:
    """`ISNETrainingPipeline.train` in a plain script, SIGTERM mid-training: the line said "the
    finished documents are committed", an ingest's words."""
    out = tmp_path / "out"
    out.mkdir()
    _write_output(out, {f"d{i}.md": 3 + i % 5 for i in range(40)})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([sys.executable, "-c", _API_SCRIPT, str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    state = out / "isne" / "training-state.pt"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and victim.poll() is None and not state.is_file():
            time.sleep(0.05)
        assert victim.poll() is None, "training finished before it could be stopped: " + victim.stdout.read()[-2000:]
        os.kill(victim.pid, signal.SIGTERM)
        said, _ = victim.communicate(timeout=60)
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == -signal.SIGTERM, said[-2000:]
    assert "terminated by SIGTERM: the training state of the last saved epoch is kept; re-run to resume" in said
    assert "documents" not in said, said[-2000:]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_state_file_is_one_short_line_without_torchs_advice(graph: torch.Tensor, tmp_path: Path, caplog,
                                                                    damage: str) -> None:
    """Garbage bytes gave a 510-character line repeating torch's advice to load with
    `weights_only=False` (unsafe, and no help); a truncated file only "[Errno 22] Invalid argument"."""
    state = tmp_path / "training-state.pt"
    train_isne(graph, 500, _isne_cfg(), epochs=3, state_path=state)
    state.write_bytes(np.random.default_rng(0).bytes(5000) if damage == "garbage" else state.read_bytes()[: state.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="hades_gpu.isne.resume"):
        again = train_isne(graph, 500, _isne_cfg(), epochs=3, state_path=state)
    assert again.resumed_from_epoch == 0
    said = [r.getMessage() for r in caplog.records if r.name == "hades_gpu.isne.resume"]
    assert len(said) == 1 and "damaged: torch cannot read it" in said[0], said
    assert "weights_only" not in said[0] and len(said[0]) < 300, said[0]
