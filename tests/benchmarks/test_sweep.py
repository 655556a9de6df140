"""`hades-bench -m` over a two-by-two grid on a tiny corpus, then `hades-report`; plus the pieces
(config group, GPU round-robin, report table) without a sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hades_gpu.benchmarks import jobs, report
from hades_gpu.benchmarks.config import BenchConfig
from hades_gpu.config import ConfigError, load_pipeline_config

REPO = Path(__file__).resolve().parents[2]


def _run_cli(entry: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A console entry point of hades_gpu.cli in a fresh interpreter (no generated scripts needed)."""
    code = f"import sys; from hades_gpu.cli import {entry}; sys.argv[1:] = {args!r}; {entry}()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tiny_corpus(root: Path) -> Path:
    root.mkdir()
    (root / "notes.md").write_text("# Notes\n\n" + "Batches are packed to a token budget. " * 40)
    (root / "guide.txt").write_text("Padding is what a batch wastes when its rows differ in length. " * 30)
    (root / "tool.py").write_text("import os\n\n\ndef main(path):\n    return os.listdir(path)\n" * 8)
    return root


@pytest.mark.slow
def test_two_by_two_sweep_and_report(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    sweep = tmp_path / "sweep"
    proc = _run_cli("bench_main", [
        "-m", f"corpus={corpus}", f"output={sweep}",
        "profile=balanced,low_memory", "profile.max_batch_tokens=1024,2048",
        "isne.enabled=false", "monitoring.progress=off",
    ], timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = sorted(sweep.glob("*/result.json"))
    assert len(results) == 4
    seen = set()
    for path in results:
        r = json.loads(path.read_text())
        assert r["status"] == "ok", r["error"]
        assert r["job"] == "ingest" and r["chunks"] > 0
        assert r["chunks_per_s"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert 0 < r["padding_efficiency"] <= 1 and r["peak_rss_bytes"] > 0
        assert f"profile={r['profile']}" in r["overrides"]
        assert f"profile.max_batch_tokens={r['max_batch_tokens']}" in r["overrides"]
        assert not (path.parent / jobs.DATASET_DIR).exists()  # bench.keep_dataset=false
        seen.add((r["profile"], r["max_batch_tokens"]))
    assert seen == {(p, b) for p in ("balanced", "low_memory") for b in (1024, 2048)}

    proc = _run_cli("report_main", [str(sweep)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (sweep / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| ingest |" in line]
    assert len(rows) == 4
    assert sum(report.BEST_MARK in row for row in rows) == 1
    assert "Best `ingest` configuration" in text
    for name in report.PLOTS.values():
        png = sweep / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def fake_result(folder: Path, profile: str, budget: int, chunks_per_s: float, status: str = "ok") -> None:
    folder.mkdir(parents=True)
    folder.joinpath("result.json").write_text(json.dumps({
        "job": "ingest", "status": status, "error": None if status == "ok" else "RuntimeError: boom",
        "profile": profile, "max_batch_tokens": budget, "chunks": 100, "chunks_per_s": chunks_per_s,
        "tokens_per_s": chunks_per_s * 200, "padding_efficiency": 0.9, "peak_rss_bytes": 500 * 2**20,
        "wall_s": 100 / chunks_per_s, "backpressure_waits": 0, "overrides": [f"profile={profile}"],
        "corpus": "/c", "host": {"cpus": 2, "gpus_visible": 0}, "embedder": "fake"}))


def test_report_marks_best_and_lists_failures(tmp_path):
    fake_result(tmp_path / "0_a", "low_memory", 4096, 10.0)
    fake_result(tmp_path / "1_b", "balanced", 4096, 30.0)
    fake_result(tmp_path / "2_c", "balanced", 16384, 20.0)
    fake_result(tmp_path / "3_d", "high_throughput", 16384, 99.0, status="error")
    assert report.report_cli([str(tmp_path)]) == 0
    lines = [line for line in (tmp_path / "report.md").read_text().splitlines() if "| ingest |" in line]
    assert len(lines) == 4
    best = [line for line in lines if report.BEST_MARK in line]
    assert len(best) == 1 and "| balanced | 4096 |" in best[0]  # the failed job is never "best"
    assert any("error: RuntimeError: boom" in line for line in lines)
    assert (tmp_path / report.PLOTS["throughput"]).is_file()


def test_report_keeps_apart_configurations_that_differ_in_other_swept_keys(tmp_path):
    """`-m profile.num_workers=1,2`: both jobs share profile and budget, and the report called them
    one configuration, "mean of 2 runs", both starred."""
    for folder, workers, rate in (("0_w1", 1, 10.0), ("1_w2", 2, 30.0)):
        fake_result(tmp_path / folder, "balanced", 4096, rate)
        path = tmp_path / folder / "result.json"
        row = json.loads(path.read_text())
        row["overrides"] = ["profile=balanced", f"profile.num_workers={workers}", f"corpus=/c", f"output={tmp_path}"]
        path.write_text(json.dumps(row))
    assert report.report_cli([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    best = [line for line in text.splitlines() if "| ingest |" in line and report.BEST_MARK in line]
    assert len(best) == 1 and "profile.num_workers=2" in best[0] and "mean of" not in text
    assert "`profile=balanced profile.max_batch_tokens=4096 profile.num_workers=2`" in text


def test_report_shows_jobs_without_a_result_keeps_corpora_apart_and_sorts_and_formats_numbers(tmp_path):
    """A job that failed before writing result.json was left out ("1 job(s), 1 finished" of 2); jobs
    over two corpora were averaged as one configuration; folder 10_ came before 2_; a column with a
    failed job's gap printed 100 as "100.0"."""
    for i, (corpus, rate) in enumerate((("/data/small", 10.0), ("/data/big", 40.0))):
        fake_result(tmp_path / f"{i}_profile=balanced", "balanced", 4096, rate)
        path = tmp_path / f"{i}_profile=balanced" / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "corpus": corpus}))
    fake_result(tmp_path / "10_late", "balanced", 4096, 20.0)
    (tmp_path / "2_broken" / ".hydra").mkdir(parents=True)
    (tmp_path / "2_broken" / ".hydra" / "overrides.yaml").write_text("- bench=feed\n- profile.num_workers=-1\n")
    (tmp_path / "2_broken" / ".hydra" / "config.yaml").write_text("corpus: /c\nbench:\n  job: feed\n")
    # an ingest output (and another app's Hydra run) beside the jobs is no failed bench job
    for other, config in (("ingested", "corpus: /c\nprofile:\n  name: balanced\n"), ("app", "x: 1\n")):
        (tmp_path / other / ".hydra").mkdir(parents=True)
        (tmp_path / other / ".hydra" / "overrides.yaml").write_text("- corpus=/c\n")
        (tmp_path / other / ".hydra" / "config.yaml").write_text(config)
    assert report.report_cli([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "4 job(s), 3 finished" in text and "`/data/big`, `/data/small`" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line and "job |" not in line]
    folders = [line.rsplit("`", 2)[-2] for line in rows]
    ingest = [f for f in folders if f != "2_broken"]
    assert ingest == sorted(ingest, key=lambda f: int(f.split("_")[0]))  # 0, 1, 10: numbers, not text
    failed = next(line for line in rows if "2_broken" in line)
    assert "failed: no result.json" in failed and "| feed |" in failed
    assert "mean of" not in text  # the two corpora are two configurations
    assert all("| 100 |" in line for line in rows if "2_broken" not in line)  # chunks as an integer


def test_report_on_empty_folder_fails_with_a_message(tmp_path, capsys):
    assert report.report_cli([str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err


def test_bench_group_composes_and_rejects_unknown_keys():
    from hydra import compose, initialize_config_dir

    from hades_gpu.benchmarks.config import register_bench_configs
    from hades_gpu.config import conf_dir, register_configs

    register_configs()
    register_bench_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            for job in ("ingest", "embed_only", "triton", "isne"):
                dcfg = compose(config_name="bench_config", overrides=[f"bench={job}", "profile=low_memory",
                                                                      "profile.max_batch_tokens=4096"])
                cfg, bench = jobs.split_bench_config(dcfg)
                assert bench.job == job and cfg.profile.name == "low_memory"
                assert cfg.profile.max_batch_tokens == 4096
            default = compose(config_name="bench_config")
            assert jobs.split_bench_config(default)[1].job == "ingest"
            with pytest.raises(Exception, match="bench.nope"):
                compose(config_name="bench_config", overrides=["bench.nope=1"])
    finally:
        register_configs()  # point pipeline_schema back at the main job's schema
    assert load_pipeline_config().profile.name == "balanced"  # hades-ingest's config is untouched


def test_gpu_round_robin():
    assert jobs.choose_gpu(0, []) is None
    assert jobs.choose_gpu(3, ["0"]) is None  # one GPU: nothing to spread
    assert [jobs.choose_gpu(n, ["2", "5"]) for n in range(4)] == [(0, "2"), (1, "5"), (0, "2"), (1, "5")]


def test_run_job_requires_an_existing_corpus(tmp_path):
    cfg = load_pipeline_config("low_memory", ["isne.enabled=false", f"corpus={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="corpus must be an existing"):
        jobs.run_job(cfg, BenchConfig(), tmp_path / "job", job_info={})


def test_an_interrupted_bench_job_is_marked_so_and_the_line_says_what_a_re_run_does(tmp_path, monkeypatch):
    """Ctrl-C during a bench job wrote "error: KeyboardInterrupt" and said "committed parts are kept:
    re-run to resume", though a re-run runs every job again. (The interrupt is raised by the job
    function here: a signal cannot be timed into the job.)"""
    corpus = tiny_corpus(tmp_path / "corpus")
    cfg = load_pipeline_config("low_memory", ["isne.enabled=false", f"corpus={corpus}"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(jobs.JOB_FUNCS, "ingest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jobs.run_job(cfg, BenchConfig(), tmp_path / "job", job_info={})
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    assert result["status"] == "interrupted" and "KeyboardInterrupt" not in str(result["error"])
    proc = subprocess.run([sys.executable, "-c", "from hades_gpu.cli import _report_interrupt; "
                           "_report_interrupt('hades-bench', KeyboardInterrupt())"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130
    assert proc.stderr.strip() == ("hades-bench: error: interrupted (the jobs that finished keep their result.json; "
                                   "a re-run runs every job again)")


def test_report_skips_results_that_are_no_object_or_have_no_numeric_budget(tmp_path, capsys):
    """A result.json that is valid JSON but no object, and a hand-edited non-numeric
    max_batch_tokens, gave tracebacks (list indices; pandas comparing str and int)."""
    import json

    fake_result(tmp_path / "0_a", "balanced", 4096, 30.0)
    fake_result(tmp_path / "1_b", "balanced", 16384, 20.0)
    odd = tmp_path / "1_b" / "result.json"
    odd.write_text(json.dumps({**json.loads(odd.read_text()), "max_batch_tokens": "16k"}))
    (tmp_path / "2_c").mkdir()
    (tmp_path / "2_c" / "result.json").write_text("[1, 2]")
    assert report.report_cli([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "2_c/result.json: not a JSON object" in err and "1_b/result.json: max_batch_tokens is '16k'" in err
    lines = [line for line in (tmp_path / "report.md").read_text().splitlines() if "| ingest |" in line]
    assert len(lines) == 1 and "| 4096 |" in lines[0]


def test_the_throughput_plot_draws_one_line_per_configuration_not_per_profile(tmp_path, monkeypatch):
    """`-m bench=feed profile.num_workers=1,2`: the plot drew one "balanced" dot at the mean of the
    two, captioned "mean over repeated runs"."""
    from matplotlib.figure import Figure

    for folder, workers, rate in (("0_w1", 1, 188.3), ("1_w2", 2, 123.0)):
        fake_result(tmp_path / folder, "balanced", 4096, rate)
        path = tmp_path / folder / "result.json"
        row = json.loads(path.read_text())
        # bench=feed is on every job's command line: not part of a configuration (it was in every label)
        row["overrides"] = ["bench=feed", "profile=balanced", f"profile.num_workers={workers}"]
        path.write_text(json.dumps(row))
    drawn: list[tuple[str, list[str], list[float]]] = []
    save = Figure.savefig

    def recording(fig, path, *args, **kwargs):
        for ax in fig.axes:
            for line in ax.get_lines():
                drawn.append((ax.get_title(), line.get_label(), list(line.get_ydata())))
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    assert report.report_cli([str(tmp_path)]) == 0
    chunks = [(label, ys) for title, label, ys in drawn if title == "Throughput: chunks / s"]
    assert sorted(label for label, _ in chunks) == ["balanced profile.num_workers=1", "balanced profile.num_workers=2"]
    assert sorted(ys[0] for _, ys in chunks) == [123.0, 188.3]  # each its own value, no mean of the two


def test_stage_jobs_show_their_own_figures_and_labels_and_stand_ins_are_labelled_on_every_row(tmp_path):
    """bench=isne and bench=graph rows read "0 tokens/s, padding 0.880" (the untimed ingest's) and
    drew at 0 on the tokens/s plot; the graph job's SYNTHETIC kNN rows were left out; a feed job's
    zero-cost stand-in was named in the header only."""
    fake_result(tmp_path / "0_ingest", "balanced", 4096, 50.0)
    for folder, job, extra in (
            ("1_isne", "isne", {"pairs_per_s": 3.67e6, "tokens_per_s": 0.0}),
            ("2_graph", "graph", {"tokens_per_s": 0.0, "knn": {"rows": [{
                "data": "SYNTHETIC (3-level Gaussian mixture)", "method": "ann", "n": 2000, "dim": 384, "k": 15,
                "index_type": "IVF178,Flat", "nprobe": 8, "recall_at_k": 0.97, "recall_sample": 1000,
                "threshold": 0.5, "edge_recall": 0.99, "edge_nprobe": 4, "seconds": {"train": 0.1, "search": 0.2},
                "total_s": 0.5}]}}),
            ("3_feed", "feed", {"embedder": "ZERO-COST STAND-IN (no model: the feed's ceiling)"})):
        fake_result(tmp_path / folder, "balanced", 4096, 20.0)
        path = tmp_path / folder / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "job": job, **extra}))
    assert report.report_cli([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    isne = next(line for line in text.splitlines() if "| isne |" in line)
    assert "| 20.0 | – | – | 3,670,000 |" in isne  # chunks/s, no tokens/s nor the ingest's padding, pairs/s
    assert "SYNTHETIC" in text and "### kNN rows of `2_graph`" in text
    feed = [line for line in text.splitlines() if line.startswith("| ") and "3_feed" in line]
    assert len(feed) == 1 and report.STAND_IN in feed[0]
    assert f"feed {report.STAND_IN}" in text.split("|")[0] or any(
        line.startswith("**Best `feed " + report.STAND_IN) for line in text.splitlines())


def test_report_refuses_a_folder_without_bench_results_and_an_out_that_is_a_file(tmp_path, capsys):
    """A hades-ingest sweep (job folders, no result.json) was reported as N failed jobs, exit 0;
    --out naming a file was a FileExistsError traceback."""
    (tmp_path / "sweep" / "0_profile=balanced" / ".hydra").mkdir(parents=True)
    (tmp_path / "sweep" / "0_profile=balanced" / ".hydra" / "overrides.yaml").write_text("- profile=balanced\n")
    assert report.report_cli([str(tmp_path / "sweep")]) == 2
    assert "not a hades-bench folder" in capsys.readouterr().err
    fake_result(tmp_path / "bench" / "0_a", "balanced", 4096, 10.0)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as info:
        report.report_cli([str(tmp_path / "bench"), "--out", str(tmp_path / "afile")])
    assert info.value.code == 2 and "--out must be a folder" in capsys.readouterr().err


def test_bench_settings_are_checked_and_recorded(tmp_path):
    """bench.max_documents did nothing (removed); negative or empty sizes were accepted or failed
    deep in FAISS; result.json recorded no bench settings."""
    for bad in (dict(warmup_batches=-1), dict(knn_sizes=[0]), dict(isne_max_batches=0), dict(knn_bench_k=0)):
        with pytest.raises(ConfigError, match="bench." + next(iter(bad))):
            jobs.check_bench_config(BenchConfig(**bad))
    assert not hasattr(BenchConfig(), "max_documents")
    jobs.check_bench_config(BenchConfig())


@pytest.mark.slow
def test_a_bench_job_refused_for_a_bad_value_leaves_the_reason_in_its_result(tmp_path):
    """The job's log stayed empty and the report said "see its log": the reason was only on stderr."""
    corpus = tiny_corpus(tmp_path / "corpus")
    proc = _run_cli("bench_main", ["-m", "profile.max_batch_tokens=100,4096", "bench.isne_max_batches=0",
                                   f"corpus={corpus}", f"output={tmp_path / 'out'}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    results = sorted((tmp_path / "out").rglob("result.json"))
    assert len(results) == 2
    for path in results:
        row = json.loads(path.read_text())
        assert row["status"] == "error" and ("max_batch_tokens" in row["error"] or "isne_max_batches" in row["error"])
    assert report.report_cli([str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "must be >= 1 (got 0)" in text  # the whole reason, not cut at 80 characters


def test_the_report_header_names_every_jobs_embedder(tmp_path):
    fake_result(tmp_path / "0_a", "balanced", 4096, 10.0)
    fake_result(tmp_path / "1_b", "balanced", 4096, 20.0)
    path = tmp_path / "1_b" / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "job": "feed", "embedder": "ZERO-COST STAND-IN"}))
    assert report.report_cli([str(tmp_path)]) == 0
    header = (tmp_path / "report.md").read_text().splitlines()[2]
    assert "embedder: ZERO-COST STAND-IN, fake." in header, header


@pytest.mark.slow
def test_a_relative_corpus_with_hydra_job_chdir_is_read_from_where_the_command_ran(tmp_path):
    """hades-bench looked for corpus=corpus inside the job's own folder (hades-ingest did not)."""
    tiny_corpus(tmp_path / "corpus")
    code = "import sys; from hades_gpu.cli import bench_main; sys.argv[1:] = sys.argv[1:]; bench_main()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, "bench=feed", "corpus=corpus", "output=out",
                           "hydra.job.chdir=true"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((tmp_path / "out" / "result.json").read_text())
    assert row["status"] == "ok" and row["corpus"] == str((tmp_path / "corpus").resolve())
    assert row["bench"]["job"] == "feed"  # the job's own settings recorded


def _only_a_users_result(tmp_path):
    folder = tmp_path / "users"
    folder.mkdir()
    (folder / "result.json").write_text('{"acc": 1}')
    return folder


def test_a_bench_never_deletes_or_overwrites_what_it_did_not_make(tmp_path):
    """`hades-bench output=proj` deleted `proj/dataset` whatever it held (the corpus itself for
    `corpus=proj/dataset`), overwrote an ingest output's metrics.json, and a job folder inside the
    corpus ingested the bench's own files. Each is refused in one line before anything is written."""
    corpus = tiny_corpus(tmp_path / "corpus")
    proj = tmp_path / "proj"
    (proj / "dataset").mkdir(parents=True)
    (proj / "dataset" / "labels.csv").write_text("precious\n")
    proc = _run_cli("bench_main", ["bench=feed", f"corpus={corpus}", f"output={proj}"], timeout=120)
    assert proc.returncode == 2 and "hades-bench did not make it" in proc.stderr, proc.stderr[-2000:]
    assert (proj / "dataset" / "labels.csv").read_text() == "precious\n"

    with pytest.raises(ConfigError, match="is .* or inside it"):
        jobs.check_job_folder(proj, str(proj / "dataset"))  # the corpus is the folder a job replaces
    (tmp_path / "out" / "chunks").mkdir(parents=True)
    (tmp_path / "out" / "manifest-main.sqlite").write_bytes(b"")
    with pytest.raises(ConfigError, match="is an ingest output"):
        jobs.check_job_folder(tmp_path / "out", str(corpus))
    with pytest.raises(ConfigError, match="inside the corpus"):
        jobs.check_job_folder(corpus / "bench", str(corpus))
    # a folder an earlier bench run made (result.json beside its dataset/) is the bench's to replace
    earlier = tmp_path / "earlier"
    (earlier / "dataset").mkdir(parents=True)
    (earlier / "result.json").write_text('{"acc": 1}')  # a user's own result.json: not the bench's
    with pytest.raises(ConfigError, match="hades-bench did not make it"):
        jobs.check_job_folder(earlier, str(corpus))
    (earlier / "result.json").write_text('{"job": "ingest", "status": "ok"}')
    jobs.check_job_folder(earlier, str(corpus))
    assert report.collect_results(tmp_path / "earlier") and not report.collect_results(_only_a_users_result(tmp_path))


def test_a_bench_result_without_figures_is_listed_not_plotted(tmp_path):
    """`{"job": "ingest", "status": "ok"}` and nothing else: matplotlib failed on NaN axis limits, a
    traceback and exit 1."""
    (tmp_path / "1_b").mkdir()
    (tmp_path / "1_b" / "result.json").write_text('{"job": "ingest", "status": "ok"}')
    assert report.report_cli([str(tmp_path)]) == 0
    assert "1_b" in (tmp_path / "report.md").read_text()
    fake_result(tmp_path / "0_a", "balanced", 4096, 10.0)  # and beside a job with its figures
    assert report.report_cli([str(tmp_path)]) == 0
    (tmp_path / "2_c").mkdir()  # throughput figures but no peak memory: the memory plot's NaN limit
    (tmp_path / "2_c" / "result.json").write_text('{"job": "ingest", "status": "ok", "profile": "balanced", '
                                                  '"chunks_per_s": 10, "tokens_per_s": 100, "max_batch_tokens": 8192}')
    assert report.report_cli([str(tmp_path)]) == 0
