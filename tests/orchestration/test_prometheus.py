"""The live Prometheus endpoint: the collector on a hand-filled RunMetrics, and a real ingest scraped
while it runs, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hades_gpu.config import load_pipeline_config
from hades_gpu.orchestration.monitoring import RunMetrics
from hades_gpu.orchestration.prometheus import MetricsEndpoint, RunMetricsCollector
from hades_gpu.orchestration.queue import MemoryAwareQueue


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`{(sample name, sorted labels): value}` of a Prometheus text page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200
        return resp.read().decode()


class _Item:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def filled_metrics() -> RunMetrics:
    m = RunMetrics()
    m.documents_total = 10
    m.documents_resumed = 1
    m.stages["read_chunk"].record(items=4, nbytes=4000, tokens=900)
    m.stages["embed"].record(items=12, tokens=1500, busy_s=0.5)
    m.stages["write"].record(items=8, nbytes=12288)
    for _ in range(3):
        m.document_done(0)
    m.add_padding(real=1500, padded=2000)
    m.add_skip("/x/blob.bin", "binary")
    q = MemoryAwareQueue("batches", max_bytes=1 << 20, max_items=8)
    q.put(_Item(300))
    q.put(_Item(200))
    m.queues = [q]
    m.memory.sample()
    return m


class _FakeNvml:
    active = True
    reason = "1 GPU(s)"

    def read(self):
        return [(0, 3 * 2**30, 80 * 2**30, 0.42)]


def test_collector_renders_run_metrics():
    m = filled_metrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunMetricsCollector(m))
    got = samples(generate_latest(registry).decode())

    assert got[("hades_stage_items_total", (("stage", "embed"),))] == 12
    assert got[("hades_stage_tokens_total", (("stage", "embed"),))] == 1500
    assert got[("hades_stage_bytes_total", (("stage", "write"),))] == 12288
    assert got[("hades_stage_busy_seconds_total", (("stage", "embed"),))] == pytest.approx(0.5)
    assert got[("hades_stage_items_per_second", (("stage", "embed"),))] > 0
    assert got[("hades_queue_items", (("queue", "batches"),))] == 2
    assert got[("hades_queue_bytes", (("queue", "batches"),))] == 500
    assert got[("hades_queue_max_bytes", (("queue", "batches"),))] == 1 << 20
    assert got[("hades_queue_backpressure_waits_total", (("queue", "batches"),))] == 0
    assert ("hades_queue_backpressure_wait_seconds_total", (("queue", "batches"),)) in got
    assert got[("hades_padding_efficiency", ())] == pytest.approx(0.75)
    assert got[("hades_tokens_real_total", ())] == 1500
    assert got[("hades_tokens_padded_total", ())] == 2000
    assert got[("hades_documents_discovered", ())] == 10
    assert got[("hades_documents_done", ())] == 3
    assert got[("hades_documents_resumed", ())] == 1
    assert got[("hades_documents_skipped", ())] == 1
    assert got[("hades_chunks_embedded_total", ())] == 12
    assert got[("hades_chunks_written_total", ())] == 8
    assert got[("hades_chunks_per_second", ())] > 0
    assert got[("hades_peak_rss_bytes", ())] > 10 * 2**20  # this Python process alone
    assert got[("hades_run_finished", ())] == 0
    assert got[("hades_nvml_available", ())] == 0
    assert not any(name.startswith("hades_gpu_") for name, _ in got)

    m.finish()
    assert samples(generate_latest(registry).decode())[("hades_run_finished", ())] == 1


def test_collector_gpu_families_from_nvml():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunMetricsCollector(filled_metrics(), _FakeNvml()))
    got = samples(generate_latest(registry).decode())
    assert got[("hades_nvml_available", ())] == 1
    assert got[("hades_gpu_memory_used_bytes", (("gpu", "0"),))] == 3 * 2**30
    assert got[("hades_gpu_memory_total_bytes", (("gpu", "0"),))] == 80 * 2**30
    assert got[("hades_gpu_utilization_ratio", (("gpu", "0"),))] == pytest.approx(0.42)


def _threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.ident is not None}


def test_endpoint_binds_loopback_free_port_and_stops_cleanly():
    before = _threads()
    endpoint = MetricsEndpoint(filled_metrics(), 0)
    port = endpoint.start()
    assert port > 0 and endpoint.url == f"http://127.0.0.1:{port}/metrics"
    with pytest.raises(RuntimeError, match="already serving"):
        endpoint.start()
    for _ in range(3):
        got = samples(scrape(endpoint.url))
        assert got[("hades_queue_items", (("queue", "batches"),))] == 2
    endpoint.stop()
    endpoint.stop()  # idempotent
    assert _threads() <= before, "a thread outlived stop()"
    with pytest.raises(urllib.error.URLError):
        scrape(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_endpoint_port_in_use_says_which():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            MetricsEndpoint(RunMetrics(), port).start()
    with pytest.raises(ValueError, match="got 70000"):
        MetricsEndpoint(RunMetrics(), 70000)


class _SlowEmbedder:
    """The real embedder, slowed down so that a scrape lands while batches are in flight."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.concurrency = 1
        self.description = f"slowed {getattr(inner, 'description', '')}"

    def embed(self, input_ids, attention_mask):
        time.sleep(self.delay_s)
        return self.inner.embed(input_ids, attention_mask)

    def close(self) -> None:  # the shared session embedder is closed by its fixture
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_scrape_during_a_real_ingest(tmp_path: Path, embedder, monkeypatch):
    from hades_gpu.pipelines.ingest import TextParallelPipeline

    final: dict = {}  # the page a scraper gets just before the endpoint goes (hades_run_finished read 0 there)
    stop = MetricsEndpoint.stop

    def stop_after_a_last_scrape(self) -> None:
        if self._server is not None:
            final.update(samples(scrape(self.url, timeout=2)))
        stop(self)

    monkeypatch.setattr(MetricsEndpoint, "stop", stop_after_a_last_scrape)

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        words = " ".join(f"word{i}_{j} sentence about topic {j % 7}." for j in range(60))
        (corpus / f"doc{i}.md").write_text(f"# Document {i}\n\n{words}\n")
    port = _free_port()
    cfg = load_pipeline_config("low_memory", ["isne.enabled=false", "monitoring.progress=off",
                                              "monitoring.prometheus=true", f"monitoring.prometheus_port={port}",
                                              "profile.max_batch_tokens=256", "profile.lookahead_batches=1"])
    url = f"http://127.0.0.1:{port}/metrics"
    pipeline = TextParallelPipeline(cfg, embedder=_SlowEmbedder(embedder, 0.15))
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", pipeline.process_batch(
        [corpus], output=tmp_path / "out")))
    before = _threads()
    runner.start()

    pages = []
    while runner.is_alive():
        try:
            text = scrape(url, timeout=2)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
            continue
        pages.append(samples(text))
        time.sleep(0.1)
    runner.join()
    result = outcome["result"]
    assert result.chunks_written > 0

    live = [p for p in pages if ("hades_queue_items", (("queue", "batches"),)) in p]
    assert live, f"no scrape saw the queues ({len(pages)} pages)"
    last = live[-1]
    for stage in ("read_chunk", "batch", "embed", "write"):
        assert ("hades_stage_items_total", (("stage", stage),)) in last
        assert ("hades_stage_items_per_second", (("stage", stage),)) in last
    assert last[("hades_slabs", ())] >= 3 and 0 <= last[("hades_slabs_free", ())] <= last[("hades_slabs", ())]
    for queue in ("batches", "embedded"):
        for name in ("hades_queue_items", "hades_queue_bytes", "hades_queue_backpressure_waits_total",
                     "hades_queue_backpressure_wait_seconds_total"):
            assert (name, (("queue", queue),)) in last
    assert last[("hades_documents_discovered", ())] == 8
    assert 0 < last[("hades_padding_efficiency", ())] <= 1
    assert last[("hades_peak_rss_bytes", ())] > 0
    embedded = [p[("hades_chunks_embedded_total", ())] for p in live]
    assert embedded == sorted(embedded), "a counter went backwards"
    assert max(embedded) > 0, "no scrape landed while chunks were being embedded"

    assert final[("hades_run_finished", ())] == 1
    with pytest.raises(urllib.error.URLError):  # stopped with the run
        scrape(url, timeout=1)
    assert not any(t.name == "hades-prometheus" for t in threading.enumerate())
    assert _threads() <= before | {runner.ident}


class _PartialNvml:
    """Stand-in NVML readings with refused fields (NVML answers some queries and not others)."""

    active = True
    reason = "2 GPU(s)"

    def read(self):
        return [(0, None, 80 * 2**30, 0.5), (1, 2**30, 40 * 2**30, None)]


def test_collector_every_run_family_and_partial_gpu_readings():
    m = filled_metrics()
    m.finish()  # frozen wall clock: rates in the scrape and in the snapshot are the same numbers
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunMetricsCollector(m, _PartialNvml()))
    got = samples(generate_latest(registry).decode())
    snap = m.snapshot()
    for stage, values in snap["stages"].items():
        assert got[("hades_stage_items_total", (("stage", stage),))] == values["items"]
        assert got[("hades_stage_tokens_total", (("stage", stage),))] == values["tokens"]
        assert got[("hades_stage_bytes_total", (("stage", stage),))] == values["bytes"]
        assert got[("hades_stage_busy_seconds_total", (("stage", stage),))] == pytest.approx(values["busy_s"])
        assert got[("hades_stage_items_per_second", (("stage", stage),))] == pytest.approx(values["items_per_s"])
    q = snap["queues"]["batches"]
    for key, name in (("peak_items", "queue_peak_items"), ("peak_bytes", "queue_peak_bytes"),
                      ("max_items", "queue_max_items"), ("get_wait_s", "queue_get_wait_seconds_total"),
                      ("put_wait_s", "queue_backpressure_wait_seconds_total")):
        assert got[(f"hades_{name}", (("queue", "batches"),))] == pytest.approx(q[key]), name
    assert got[("hades_batches_total", ())] == 1
    assert got[("hades_tokens_per_second", ())] == pytest.approx(snap["tokens_per_s"])
    assert got[("hades_peak_main_rss_bytes", ())] == snap["memory"]["peak_main_rss_bytes"]
    assert got[("hades_wall_seconds", ())] == pytest.approx(snap["wall_s"])
    assert got[("hades_chunks_per_second", ())] == pytest.approx(12 / snap["wall_s"])
    assert got[("hades_run_finished", ())] == 1
    # GPU 0 refused its memory reading, GPU 1 its utilisation: each family holds what was read
    assert ("hades_gpu_memory_used_bytes", (("gpu", "0"),)) not in got
    assert ("hades_gpu_memory_total_bytes", (("gpu", "0"),)) not in got
    assert got[("hades_gpu_utilization_ratio", (("gpu", "0"),))] == 0.5
    assert got[("hades_gpu_memory_used_bytes", (("gpu", "1"),))] == 2**30
    assert got[("hades_gpu_memory_total_bytes", (("gpu", "1"),))] == 40 * 2**30
    assert ("hades_gpu_utilization_ratio", (("gpu", "1"),)) not in got


def test_nvml_probe_says_why_it_is_inactive_or_how_many_gpus():
    from hades_gpu.orchestration.prometheus import NvmlProbe

    off = NvmlProbe(enabled=False)
    assert off.active is False and off.reason == "disabled" and off.read() == []
    probe = NvmlProbe()
    try:
        if probe.active:  # a GPU machine
            assert re.fullmatch(r"\d+ GPU\(s\)", probe.reason) and len(probe.read()) == int(probe.reason.split()[0])
        else:
            assert probe.active is False and probe.read() == []
            assert re.fullmatch(r"no CUDA device visible \(torch .+\)", probe.reason), probe.reason
    finally:
        probe.close()
    assert probe.active is False and probe.read() == []


def test_endpoint_port_range_and_a_quiet_daemon_server_thread(capfd):
    m = RunMetrics()
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match=r"port must be in \[0, 65535\]"):
            MetricsEndpoint(m, bad)
    assert MetricsEndpoint(m, 65535).requested_port == 65535
    ep = MetricsEndpoint(m, 0, nvml=False)
    ep.start()
    try:
        served = [t for t in threading.enumerate() if t.name == "hades-prometheus"]
        assert len(served) == 1 and served[0].daemon  # never keeps a finished script alive
        capfd.readouterr()
        scrape(ep.url)
        scrape(ep.url)
        err = capfd.readouterr().err
        assert "GET /metrics" not in err and err == ""  # no access log on the user's terminal
    finally:
        ep.stop()
    assert not [t for t in threading.enumerate() if t.name == "hades-prometheus"]


def test_collector_chunk_rate_is_zero_before_any_time_passed():
    m = RunMetrics()
    m.stages["embed"].record(items=5)
    m.finished = m.started
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunMetricsCollector(m))
    got = samples(generate_latest(registry).decode())
    assert got[("hades_chunks_per_second", ())] == 0.0 and got[("hades_chunks_embedded_total", ())] == 5


def test_a_scraper_sees_the_finished_run_while_the_endpoint_lingers(tmp_path: Path, embedder):
    """The endpoint closed the moment the run finished: no scraper ever read hades_run_finished 1 or
    the final counters (747 scrapes every 10 ms, none). With monitoring.prometheus_linger_s it serves
    them that long."""
    from hades_gpu.pipelines.ingest import TextParallelPipeline

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.md").write_text(f"# Document {i}\n\n" + "A sentence about a topic. " * 40)
    port = _free_port()
    cfg = load_pipeline_config("low_memory", ["isne.enabled=false", "monitoring.progress=off",
                                              "monitoring.prometheus=true", f"monitoring.prometheus_port={port}",
                                              "monitoring.prometheus_linger_s=1.5"])
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", TextParallelPipeline(
        cfg, embedder=embedder).process_batch([corpus], output=tmp_path / "out")))
    runner.start()
    finished = []
    while runner.is_alive():
        try:
            page = samples(scrape(f"http://127.0.0.1:{port}/metrics", timeout=2))
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
            continue
        if page.get(("hades_run_finished", ())) == 1:
            finished.append(page)
        time.sleep(0.1)
    runner.join()
    assert finished, "no scrape saw the finished run"
    assert finished[-1][("hades_chunks_embedded_total", ())] == outcome["result"].chunks_written


def test_ctrl_c_while_the_endpoint_lingers_stops_it_and_keeps_the_finished_runs_metrics(tmp_path: Path):
    """A Ctrl-C in the linger left the endpoint serving (its port held) and no metrics.json, though
    every document was committed; an infinite linger passed validation and crashed the run."""
    import signal
    import subprocess
    import sys

    from hades_gpu.config import ConfigError

    with pytest.raises(ConfigError, match="prometheus_linger_s"):
        load_pipeline_config("low_memory", ["monitoring.prometheus_linger_s=inf"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# A\n\n" + "A sentence about a topic. " * 40)
    port = _free_port()
    code = (f"import logging\nlogging.basicConfig(level=logging.INFO)\nfrom hades_gpu.config import load_pipeline_config\nfrom hades_gpu.pipelines import TextParallelPipeline\n"
            f"cfg = load_pipeline_config('low_memory', ['isne.enabled=false', 'monitoring.progress=off', "
            f"'monitoring.prometheus=true', 'monitoring.prometheus_port={port}', 'monitoring.prometheus_linger_s=60'])\n"
            f"TextParallelPipeline(cfg).process_batch([{str(corpus)!r}], output={str(tmp_path / 'out')!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "serving the finished run's values" in line:
            break
    assert samples(scrape(f"http://127.0.0.1:{port}/metrics", timeout=5))[("hades_run_finished", ())] == 1
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert (tmp_path / "out" / "metrics.json").is_file()
    with pytest.raises(urllib.error.URLError):
        scrape(f"http://127.0.0.1:{port}/metrics", timeout=1)
