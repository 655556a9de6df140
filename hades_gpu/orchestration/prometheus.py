"""Live Prometheus text endpoint for a running ingest.

`MetricsEndpoint(metrics, port).start()` serves `GET /metrics` on 127.0.0.1 from its own registry.
The collector reads `RunMetrics.snapshot()` on every scrape (no copies kept between scrapes), so the
numbers are those `metrics.json` will hold at the end of the run. GPU memory and utilisation come from
NVML when a driver is present; without one the GPU families are simply absent and
`hades_nvml_available` is 0.

Metric names (all prefixed `hades_`):

- per stage (`stage` label: read_chunk, batch, embed, write): `stage_items_total`,
  `stage_tokens_total`, `stage_bytes_total`, `stage_busy_seconds_total` (counters, use `rate()`),
  `stage_items_per_second` (run average);
- per queue (`queue` label): `queue_items`, `queue_bytes` (depth now), `queue_peak_items`,
  `queue_peak_bytes`, `queue_max_items`, `queue_max_bytes`, `queue_backpressure_waits_total`,
  `queue_backpressure_wait_seconds_total`, `queue_get_wait_seconds_total`;
- slabs: `slabs` (in the ring), `slabs_free` (now);
- run: `documents_discovered`, `documents_done`, `documents_resumed`, `documents_skipped`,
  `chunks_embedded_total`, `chunks_written_total`, `chunks_per_second`, `tokens_per_second`,
  `batches_total`, `tokens_real_total`, `tokens_padded_total`, `padding_efficiency` (real/padded),
  `peak_rss_bytes`, `peak_main_rss_bytes`, `wall_seconds`, `run_finished`;
- GPU (`gpu` label, NVML index): `gpu_memory_used_bytes`, `gpu_memory_total_bytes`,
  `gpu_utilization_ratio` (0..1), and `nvml_available`.

Threads: one server thread plus one short-lived thread per request; `stop()` shuts the server down,
joins every one of them and closes the socket, so nothing is left running after it returns.
"""

from __future__ import annotations

import errno
import logging
import threading
from socketserver import ThreadingMixIn
from typing import Any, Iterator, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from hades_gpu.orchestration.monitoring import RunMetrics

log = logging.getLogger(__name__)

PREFIX = "hades"
HOST = "127.0.0.1"


class NvmlProbe:
    """Memory and utilisation of every CUDA device this process can use, read through the package's
    one GPU memory reader (`gpu.nvml`: NVML by UUID, or cudaMemGetInfo); inactive (and silent)
    without a GPU.

    Args:
        enabled (bool, optional): look for devices at all (default: True).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.active = False
        self.reason = "disabled"
        self._probes: list[Any] = []
        self._lock = threading.Lock()
        if enabled:
            from hades_gpu.gpu.nvml import device_probes

            self._probes, self.reason = device_probes()
            self.active = bool(self._probes)

    def read(self) -> list[tuple[int, Optional[int], Optional[int], Optional[float]]]:
        """`[(cuda index, used_bytes, total_bytes, utilisation 0..1)]`; a field that cannot be read is None."""
        with self._lock:
            if not self.active:
                return []
            rows = []
            for probe in self._probes:
                used = total = util = None
                try:
                    used, total = probe.read_memory()
                except Exception:  # noqa: BLE001 - a failed reading is a missing sample, not a failed scrape
                    pass
                if probe.read_utilization is not None:
                    try:
                        util = float(probe.read_utilization())
                    except Exception:  # noqa: BLE001
                        pass
                rows.append((probe.index, used, total, util))
            return rows

    def close(self) -> None:
        with self._lock:
            self.active = False
            self._probes = []


class RunMetricsCollector(Collector):
    """Renders a `RunMetrics` (and NVML readings) as metric families on each scrape.

    Args:
        metrics (RunMetrics): the live run's counters.
        nvml (NvmlProbe, optional): GPU probe (default: none, so no GPU families).
    """

    def __init__(self, metrics: RunMetrics, nvml: Optional[NvmlProbe] = None) -> None:
        self.metrics = metrics
        self.nvml = nvml

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot()
        m = self.metrics

        def gauge(name: str, doc: str, value: float, unit: str = "") -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value, unit=unit)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        # -- stages -----------------------------------------------------------------------------
        stage_fams = {
            "items": CounterMetricFamily(f"{PREFIX}_stage_items", "Items a stage has finished", labels=["stage"]),
            "tokens": CounterMetricFamily(f"{PREFIX}_stage_tokens", "Real tokens through a stage", labels=["stage"]),
            "bytes": CounterMetricFamily(f"{PREFIX}_stage_bytes", "Bytes through a stage", labels=["stage"]),
            "busy_s": CounterMetricFamily(f"{PREFIX}_stage_busy_seconds", "Time a stage spent working",
                                          labels=["stage"]),
            "items_per_s": GaugeMetricFamily(f"{PREFIX}_stage_items_per_second",
                                             "Stage items per second, averaged over the run", labels=["stage"]),
        }
        for stage, values in snap["stages"].items():
            for key, fam in stage_fams.items():
                fam.add_metric([stage], float(values[key]))
        yield from stage_fams.values()

        # -- queues -----------------------------------------------------------------------------
        queue_fams = {
            "items": GaugeMetricFamily(f"{PREFIX}_queue_items", "Items queued now", labels=["queue"]),
            "bytes": GaugeMetricFamily(f"{PREFIX}_queue_bytes", "Bytes queued now", labels=["queue"]),
            "peak_items": GaugeMetricFamily(f"{PREFIX}_queue_peak_items", "Most items ever queued", labels=["queue"]),
            "peak_bytes": GaugeMetricFamily(f"{PREFIX}_queue_peak_bytes", "Most bytes ever queued", labels=["queue"]),
            "max_items": GaugeMetricFamily(f"{PREFIX}_queue_max_items", "Item cap of the queue", labels=["queue"]),
            "max_bytes": GaugeMetricFamily(f"{PREFIX}_queue_max_bytes", "Byte budget of the queue", labels=["queue"]),
            "put_waits": CounterMetricFamily(f"{PREFIX}_queue_backpressure_waits",
                                             "Puts that had to wait for room (backpressure events)", labels=["queue"]),
            "put_wait_s": CounterMetricFamily(f"{PREFIX}_queue_backpressure_wait_seconds",
                                              "Time producers spent blocked on the queue", labels=["queue"]),
            "get_wait_s": CounterMetricFamily(f"{PREFIX}_queue_get_wait_seconds",
                                              "Time consumers spent waiting for input", labels=["queue"]),
        }
        for name, stats in snap["queues"].items():
            for key, fam in queue_fams.items():
                fam.add_metric([name], float(stats[key]))
        yield from queue_fams.values()
        ring = m.ring
        if ring is not None:  # the slabs are the first bound on batches in flight
            yield gauge("slabs", "Shared-memory slabs in the ring (one packed batch each)", ring.count)
            yield gauge("slabs_free", "Slabs free now (neither granted to a worker nor holding a batch)", ring.free)

        # -- run --------------------------------------------------------------------------------
        docs = snap["documents"]
        wall = snap["wall_s"]
        embedded = m.stages["embed"].items
        yield gauge("documents_discovered", "Documents discovered (skipped ones included)", docs["total"])
        yield gauge("documents_done", "Documents chunked and sent to the embedder", docs["done"])
        yield gauge("documents_resumed", "Documents already in the output, left alone", docs["resumed"])
        yield gauge("documents_skipped", "Documents skipped (binary, undecodable, too large, ...)", docs["skipped"])
        yield counter("chunks_embedded", "Chunks embedded so far", embedded)
        yield counter("chunks_written", "Chunks handed to the dataset writer so far", m.stages["write"].items)
        yield gauge("chunks_per_second", "Chunks embedded per second, averaged over the run",
                    embedded / wall if wall > 0 else 0.0)
        yield gauge("tokens_per_second", "Real tokens batched per second, averaged over the run",
                    snap["tokens_per_s"])
        yield counter("batches", "Model batches built", snap["batches"])
        yield counter("tokens_real", "Real (non-padding) tokens in model batches", snap["real_tokens"])
        yield counter("tokens_padded", "Padded tokens in model batches (batch x bucketed length)",
                      snap["padded_tokens"])
        yield gauge("padding_efficiency", "Real tokens / padded tokens in model batches", snap["padding_efficiency"])
        yield gauge("peak_rss_bytes", "Peak resident memory of the run (main process + workers)",
                    snap["memory"]["peak_rss_bytes"])
        yield gauge("peak_main_rss_bytes", "Peak resident memory of the main process",
                    snap["memory"]["peak_main_rss_bytes"])
        yield gauge("wall_seconds", "Seconds since the run started", wall)
        yield gauge("run_finished", "1 once the run has finished", 1.0 if m.finished is not None else 0.0)

        # -- GPU --------------------------------------------------------------------------------
        active = self.nvml is not None and self.nvml.active
        yield gauge("nvml_available", "1 when NVML readings are served", 1.0 if active else 0.0)
        if not active:
            return
        assert self.nvml is not None
        used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory in all (NVML)", labels=["gpu"])
        util = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_ratio",
                                 "Fraction of the last sample period a kernel ran (NVML)", labels=["gpu"])
        for index, mem_used, mem_total, busy in self.nvml.read():
            if mem_used is not None and mem_total is not None:
                used.add_metric([str(index)], float(mem_used))
                total.add_metric([str(index)], float(mem_total))
            if busy is not None:
                util.add_metric([str(index)], busy)
        yield used
        yield total
        yield util


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("prometheus: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    """Threaded WSGI server whose request threads are joined on close (prometheus_client's own
    server marks them daemon, so a scrape in flight could outlive `stop()`)."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True


class MetricsEndpoint:
    """Serve `metrics` as Prometheus text on http://127.0.0.1:<port>/metrics.

    Args:
        metrics (RunMetrics): the run to expose; read on every scrape.
        port (int): TCP port; 0 picks a free one (the chosen port is returned by `start()`).
        nvml (bool, optional): add GPU memory/utilisation from NVML when a driver is present
            (default: True).

    `start()` and `stop()` are paired: `stop()` reverses everything `start()` did (server thread
    joined, socket closed, NVML shut down) and may be called more than once.
    """

    def __init__(self, metrics: RunMetrics, port: int, nvml: bool = True) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in [0, 65535] (got {port})")
        self.metrics = metrics
        self.requested_port = int(port)
        self._use_nvml = nvml
        self.port: Optional[int] = None
        self._nvml: Optional[NvmlProbe] = None
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the endpoint is not started")
        return f"http://{HOST}:{self.port}/metrics"

    def start(self) -> int:
        """Bind 127.0.0.1:<port>, serve from a background thread, and return the bound port."""
        if self._server is not None:
            raise RuntimeError(f"the endpoint is already serving on port {self.port}")
        self._nvml = NvmlProbe(self._use_nvml)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RunMetricsCollector(self.metrics, self._nvml))
        try:
            server = make_server(HOST, self.requested_port, make_wsgi_app(registry), _Server,
                                 handler_class=_QuietHandler)
        except OSError as err:
            self._nvml.close()
            self._nvml = None
            hint = (" (another process has it; monitoring.prometheus_port=0 takes a free port, as parallel sweep "
                    "jobs need)" if err.errno == errno.EADDRINUSE else "")
            raise OSError(err.errno, f"cannot serve Prometheus metrics on {HOST}:{self.requested_port}: "
                                     f"{err.strerror or err}{hint}") from err
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="hades-prometheus", daemon=True)
        self._thread.start()
        log.info("Prometheus metrics at %s (GPU: %s)", self.url, self._nvml.reason)
        return self.port

    def stop(self) -> None:
        """Stop serving: shut the loop down, join its threads, close the socket, release NVML."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()  # waits for serve_forever to return
            server.server_close()  # joins request threads (block_on_close) and closes the socket
        if thread is not None:
            thread.join()
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def __enter__(self) -> "MetricsEndpoint":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_endpoint(metrics: RunMetrics, monitoring: Any) -> Optional[MetricsEndpoint]:
    """Start the endpoint when `monitoring.prometheus` is true (port `monitoring.prometheus_port`,
    0 = a free one; the URL is logged); return it for `stop()`, or None when disabled."""
    if not monitoring.prometheus:
        return None
    endpoint = MetricsEndpoint(metrics, monitoring.prometheus_port)
    endpoint.start()
    return endpoint
