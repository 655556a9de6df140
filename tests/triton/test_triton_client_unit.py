"""TritonEmbedder's client-side behaviour with a fake gRPC client (no server needed)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from requirements import require_module  # noqa: E402  (tests/support)

require_module("tritonclient.grpc", "tritonclient[grpc] is not installed (the lent GPU machine has none)")

from tritonclient.utils import InferenceServerException  # noqa: E402

from hades_gpu.config import EmbedderConfig
from hades_gpu.embedding.base import EmbedderError
from hades_gpu.embedding.triton import TritonEmbedder


class _Result:
    def __init__(self, n, request_id):
        self._out = np.ones((n, 384), np.float32)
        self._id = request_id

    def as_numpy(self, name):
        return self._out

    def get_response(self):
        return type("R", (), {"id": self._id})()


class FakeClient:
    """Counts concurrent calls; fails the first `failures` calls with `status`."""

    def __init__(self, failures=0, status="StatusCode.UNAVAILABLE", delay=0.02):
        self.failures, self.status, self.delay = failures, status, delay
        self.calls, self.active, self.peak, self.sizes = 0, 0, 0, []
        self._lock = threading.Lock()

    def infer(self, model, inputs, outputs=None, request_id="", client_timeout=None):
        with self._lock:
            self.calls += 1
            self.active += 1
            self.peak = max(self.peak, self.active)
            fail = self.calls <= self.failures
        try:
            time.sleep(self.delay)
            if fail:
                raise InferenceServerException("boom", status=self.status)
            n = inputs[0].shape()[0]
            self.sizes.append(n)
            return _Result(n, request_id)
        finally:
            with self._lock:
                self.active -= 1

    def close(self):
        pass


def make(monkeypatch, fake, **cfg):
    def fake_check(self):
        self.dim, self.max_batch_size = 384, 16

    monkeypatch.setattr(TritonEmbedder, "_check_server", fake_check)
    emb = TritonEmbedder(EmbedderConfig(name="triton", url="127.0.0.1:1", **cfg))
    emb._client = fake
    return emb


def batch(n, length=16):
    return np.ones((n, length), np.int64), np.ones((n, length), np.int64)


def test_inflight_requests_are_bounded(monkeypatch):
    fake = FakeClient()
    emb = make(monkeypatch, fake, max_inflight=3)
    with ThreadPoolExecutor(12) as pool:  # more callers than allowed requests in flight
        outs = list(pool.map(lambda _: emb.embed(*batch(40)), range(12)))
    assert all(o.shape == (40, 384) for o in outs)
    assert fake.peak <= 3 and emb.concurrency == 3
    assert max(fake.sizes) <= 16 and sum(fake.sizes) == 12 * 40  # split to the model's max_batch_size


def test_unavailable_is_retried_with_backoff(monkeypatch):
    fake = FakeClient(failures=2)
    emb = make(monkeypatch, fake, retries=3, retry_backoff_s=0.05)
    t0 = time.monotonic()
    out = emb.embed(*batch(4))
    assert out.shape == (4, 384) and fake.calls == 3
    assert time.monotonic() - t0 >= 0.05 + 0.1  # 0.05 then 0.1: exponential


def test_retries_exhausted_is_one_line_error(monkeypatch):
    fake = FakeClient(failures=100)
    emb = make(monkeypatch, fake, retries=2, retry_backoff_s=0.01)
    with pytest.raises(EmbedderError) as info:
        emb.embed(*batch(4))
    msg = str(info.value)
    assert fake.calls == 3 and "\n" not in msg and "127.0.0.1:1" in msg and "after 3 attempts" in msg


def test_other_errors_are_not_retried(monkeypatch):
    fake = FakeClient(failures=1, status="StatusCode.INVALID_ARGUMENT")
    emb = make(monkeypatch, fake, retries=5)
    with pytest.raises(EmbedderError, match="inference failed"):
        emb.embed(*batch(4))
    assert fake.calls == 1


def test_timeout_names_the_setting(monkeypatch):
    fake = FakeClient(failures=1, status="StatusCode.DEADLINE_EXCEEDED")
    emb = make(monkeypatch, fake, timeout_s=1.5)
    with pytest.raises(EmbedderError, match="timeout_s=1.5"):
        emb.embed(*batch(4))


def test_shape_mismatch_is_value_error(monkeypatch):
    emb = make(monkeypatch, FakeClient())
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        emb.embed(np.ones((2, 8), np.int64), np.ones((2, 7), np.int64))
    assert emb.embed(*batch(0)).shape == (0, 384)


def test_a_model_gone_mid_run_is_not_read_as_a_wrong_name(monkeypatch):
    """A server killed mid-ingest answered NOT_FOUND "unknown model ... has no available versions":
    the line read like a wrong model name. (Fake client: the status of a server whose model
    unloaded; the real server-killed path is tests/triton/test_ingest_triton.py.)"""
    fake = FakeClient(failures=100, status="StatusCode.NOT_FOUND")
    emb = make(monkeypatch, fake, retries=2, retry_backoff_s=0.01)
    with pytest.raises(EmbedderError, match="the model is no longer served .*after 3 attempts"):
        emb.embed(*batch(4))
    assert fake.calls == 3


def test_a_model_unloading_for_a_restart_is_retried(monkeypatch):
    """A graceful stop or restart unloads the model first (NOT_FOUND "no available versions"): the
    run failed at once though the docs promised a restart is ridden through."""
    fake = FakeClient(failures=2, status="StatusCode.NOT_FOUND")
    emb = make(monkeypatch, fake, retries=3, retry_backoff_s=0.01)
    assert emb.embed(*batch(4)).shape == (4, 384) and fake.calls == 3


@pytest.mark.parametrize("settings, needle", [
    (dict(retry_backoff_s=-1.0), "retry_backoff_s must be >= 0"),
    (dict(url="http://127.0.0.1:8001"), "drop the scheme"),
    (dict(url="127.0.0.1"), "must be host:port"),
    (dict(url="127.0.0.1:99999"), "port must be 1-65535"),
])
def test_bad_settings_are_refused_before_any_request(settings, needle):
    with pytest.raises(ValueError, match=needle):
        TritonEmbedder(EmbedderConfig(name="triton", **{"url": "127.0.0.1:1", **settings}))
