"""Connecting to Ray for a run: an existing cluster (`cluster=ray`) or one started here (`local`).

Why the environment is set before `ray.init` (FACTS.md, Ray 2.60 on these machines): usage reporting
is on unless ``RAY_USAGE_STATS_ENABLED=0``; a local Ray listens on every interface unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (then everything stays on 127.0.0.1). Both are defaults a
user's own environment overrides. `ray.init` against an address nobody answers retries for a long
time, so a ``host:port`` address is first checked with a plain TCP connect under
`cluster.connect_timeout_s`, and a failure is one line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
from typing import Any, Iterator, Optional

from hades_gpu.config import ClusterConfig, ClusterMode, ConfigError
from hades_gpu.records import error_line

log = logging.getLogger(__name__)


class ClusterConnectError(RuntimeError):
    """Ray is missing, or the cluster could not be reached in time."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ConfigError("cluster=ray|local needs Ray: pip install 'hades-gpu[cluster]'") from err
    return ray


def _effective_address(cfg: ClusterConfig) -> str:
    """The head `ray.init` will dial: `cluster.address`, or for ``auto`` (Ray's default) the
    ``RAY_ADDRESS`` environment variable when set. A loopback head named only there was dialled at the
    host's other address without end (the loopback settings below looked at "auto")."""
    address = cfg.address or "auto"
    if address == "auto":
        return os.environ.get("RAY_ADDRESS", "").strip() or "auto"
    return address


def _use_token_auth_like_ray_start() -> None:
    """Token authentication when the user's Ray has a token and RAY_AUTH_MODE is unset, as `ray start`
    decides: a head it started then refuses a driver without the token, and the driver said only
    "Failed to connect" after 20 lines of InvalidAuthToken. (A private Ray helper: without it,
    nothing changes.)"""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:
        return
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception as err:  # noqa: BLE001 - a Ray of another version: connect as before
        log.debug("cluster: token authentication not checked (%s)", err)


def _init_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.runtime_env:
        kwargs["runtime_env"] = dict(cfg.runtime_env)
    if cfg.mode == ClusterMode.LOCAL:
        kwargs.update(address="local", include_dashboard=False, object_store_memory=int(cfg.object_store_bytes),
                      _node_ip_address="127.0.0.1")
    else:
        kwargs["address"] = cfg.address or "auto"
        if _is_loopback(_effective_address(cfg)):
            kwargs["_node_ip_address"] = "127.0.0.1"  # the driver's node is where the head is
    return kwargs


@contextlib.contextmanager
def ray_session(cfg: ClusterConfig) -> Iterator[Any]:
    """`ray`, initialised for this run and shut down after it (unless the caller had already
    initialised it: then their session is used and left running)."""
    # before Ray is imported: its constants read the environment at import
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.mode == ClusterMode.LOCAL or _is_loopback(_effective_address(cfg)):
        # a head on loopback: without it the driver registers the host's other address and dials the
        # head there, retrying without end (seen: 10 minutes of "Failed to connect to GCS at 192.0.2.2")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs = _init_kwargs(cfg)
    where = "a local Ray" if cfg.mode == ClusterMode.LOCAL else f"the Ray cluster at {kwargs['address']!r}"
    if cfg.mode != ClusterMode.LOCAL:
        _check_reachable(_effective_address(cfg), cfg.connect_timeout_s)
        _use_token_auth_like_ray_start()
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**kwargs)  # in the caller's thread: Ray sets signal handlers and fails elsewhere
    except Exception as err:  # noqa: BLE001 - one line for the user
        first = error_line(err)
        raise ClusterConnectError(f"could not connect to {where}: {first}") from err
    finally:
        # Ray's core worker installs a native SIGTERM handler that dumps a stack and exits 1; the
        # caller's (the command line's one line and exit 143) is put back
        if on_sigterm is not None and signal.getsignal(signal.SIGTERM) is not on_sigterm:
            signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield ray
    finally:
        ray.shutdown()


def _is_loopback(address: Optional[str]) -> bool:
    """`127.x.x.x:port`, `localhost:port` or `[::1]:port` (a head on this box's loopback)."""
    host = (address or "").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_reachable(address: str, timeout_s: float) -> None:
    """A `<host>:<port>` address must accept a TCP connection within `timeout_s`: ray.init itself
    would retry for minutes against an address nobody answers. (`auto` is Ray's to resolve.)"""
    if address in ("auto", "local") or address.startswith("ray://") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as err:
        raise ClusterConnectError(f"could not connect to the Ray cluster at {address!r}: {err}; is `ray start "
                                  f"--head` running there (cluster.address)?") from err


def node_slots(ray: Any, num_cpus: float, num_gpus: float) -> int:
    """How many shard tasks of this shape the live nodes can run at once (at least 1)."""
    slots = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        fit = int(res.get("CPU", 0) // num_cpus) if num_cpus > 0 else 1 << 20
        if num_gpus > 0:
            fit = min(fit, int(res.get("GPU", 0) // num_gpus))
        slots += max(0, fit)
    return max(1, slots)


def largest_cpus(ray: Any, num_gpus: float) -> float:
    """The most CPUs one live node offers among those with `num_gpus` GPUs (0.0 when none has)."""
    best = 0.0
    for node in ray.nodes():
        res = node.get("Resources", {})
        if node.get("Alive") and res.get("GPU", 0.0) >= num_gpus:
            best = max(best, float(res.get("CPU", 0.0)))
    return best


def cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


__all__ = ["ray_session", "import_ray", "node_slots", "largest_cpus", "cluster_gpus", "ClusterConnectError"]
