"""`hades-report <multirun-dir>`: every job's `result.json` -> `report.md` + PNG plots.

The table has one row per job (sorted by job kind, profile, batch budget); the best configuration
(highest chunks/s among the jobs that finished, per job kind) is marked. Plots (matplotlib, Agg):

- `throughput.png`: chunks/s and tokens/s against `profile.max_batch_tokens`, one line per profile;
- `peak_memory.png`: peak RSS (main process + workers) per profile and batch budget;
- `padding.png`: padding efficiency (real / padded tokens) per profile and batch budget.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hades_gpu.benchmarks.jobs import RESULT_FILE, is_bench_result
from hades_gpu.optional import require

PLOTS = {"throughput": "throughput.png", "memory": "peak_memory.png", "padding": "padding.png"}
PROFILE_ORDER = ("high_throughput", "balanced", "low_memory")
BEST_MARK = "★"
STAND_IN = "(ZERO-COST STAND-IN model)"
STAGE_JOBS = ("isne", "graph")  # time their own stage over an untimed ingest: not on the throughput plots


def collect_results(root: Path) -> list[dict[str, Any]]:
    """Every `result.json` under `root` (any depth), with `folder` = its job folder relative to `root`."""
    rows = []
    results = sorted(root.rglob(RESULT_FILE))
    for path in results:
        try:
            row = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"hades-report: skipping unreadable {path}: {err}", file=sys.stderr)
            continue
        if not isinstance(row, dict):  # valid JSON, but no job's result
            print(f"hades-report: skipping {path}: not a JSON object (a {type(row).__name__})", file=sys.stderr)
            continue
        if not is_bench_result(row):
            print(f"hades-report: skipping {path}: not a hades-bench result (no job and status)", file=sys.stderr)
            continue
        budget = row.get("max_batch_tokens")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
            print(f"hades-report: skipping {path}: max_batch_tokens is {budget!r}, not a number", file=sys.stderr)
            continue
        row["folder"] = str(path.parent.relative_to(root)) or "."
        rows.append(row)
    if not results:  # a hades-ingest sweep has job folders too: every job read as "failed"
        return rows
    rows += _jobs_without_a_result(root, {path.parent for path in results})
    return rows


def _is_bench_job(folder: Path) -> bool:
    """A Hydra job folder of `hades-bench` (its config has the `bench` group), not an ingest output
    or another app's run: `hades-report` on a parent folder counted every ingest output as a failed job."""
    import yaml

    try:
        config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and isinstance(config.get("bench"), dict)


def _jobs_without_a_result(root: Path, with_result: set[Path]) -> list[dict[str, Any]]:
    """A row for each Hydra job folder (`.hydra/overrides.yaml`) that wrote no result: a job that
    failed before it could (a bad value, a missing extra) was left out, and the report said
    "1 job(s), 1 finished" of a sweep of 2."""
    import yaml

    rows = []
    for marker in sorted(root.rglob(".hydra/overrides.yaml")):
        folder = marker.parent.parent
        if folder in with_result or folder == root or not _is_bench_job(folder):
            continue
        try:
            overrides = yaml.safe_load(marker.read_text()) or []
        except (OSError, yaml.YAMLError):
            overrides = []
        overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
        profile = next((o.split("=", 1)[1] for o in overrides if o.startswith("profile=")), "?")
        job = next((o.split("=", 1)[1] for o in overrides if o.startswith("bench=")), "?")
        rows.append({"folder": str(folder.relative_to(root)), "job": job, "status": "failed", "profile": profile,
                     "error": "no result.json: the job failed before writing one (see its log)",
                     "overrides": overrides})
    return rows


def _natural(text: str) -> tuple:
    """`10_x` after `2_x`: job folders sorted by their numbers, not as text."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text)))


def _profile_key(name: str) -> tuple[int, str]:
    return (PROFILE_ORDER.index(name) if name in PROFILE_ORDER else len(PROFILE_ORDER), name)


def to_frame(rows: list[dict[str, Any]]) -> Any:
    """A pandas DataFrame, one row per job, sorted, with a `best` column (True per job kind)."""
    pd = require("pandas", "pandas>=2", "hades-report", extra="report")

    cols = ["folder", "job", "status", "profile", "max_batch_tokens", "chunks", "chunks_per_s", "tokens_per_s",
            "padding_efficiency", "peak_rss_bytes", "wall_s", "backpressure_waits", "pairs_per_s", "error", "overrides"]
    frame = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)
    if frame.empty:
        frame["best"] = []
        return frame
    # a zero-cost stand-in's figures are labelled on every row and plot, not only in the header
    frame["job"] = [f"{job} {STAND_IN}" if "STAND-IN" in str(r.get("embedder") or "") else job
                    for job, r in zip(frame["job"], rows)]
    for c in ("chunks_per_s", "tokens_per_s", "padding_efficiency", "peak_rss_bytes", "wall_s", "pairs_per_s"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    # the graph and ISNE jobs time their own stage: no tokens/s, and the padding is the untimed ingest's
    stage = frame["job"].isin(STAGE_JOBS)
    frame.loc[stage, ["tokens_per_s", "padding_efficiency"]] = float("nan")
    frame["peak_rss_mib"] = frame["peak_rss_bytes"] / 2**20
    swept = _swept_keys([_kept_overrides(r.overrides) for r in frame.itertuples(index=False)])
    frame["config"] = [_config_of(r, swept) for r in frame.itertuples(index=False)]
    corpora = [r.get("corpus") for r in rows]
    if len({c for c in corpora if c}) > 1:  # jobs over several corpora are not one configuration
        frame["config"] = [f"{config} corpus={Path(str(c)).name}" if c else config
                           for config, c in zip(frame["config"], corpora)]
    frame["_pkey"] = frame["profile"].map(lambda p: _profile_key(str(p)))
    frame["_fkey"] = frame["folder"].map(_natural)
    frame = frame.sort_values(["job", "_pkey", "max_batch_tokens", "_fkey"]).drop(columns=["_pkey", "_fkey"])
    frame = frame.reset_index(drop=True)
    # best = the configuration (job kind, profile, budget) with the highest mean chunks/s over its
    # finished runs; every row of it is marked (a sweep repeated into one folder has several)
    frame["series"] = frame["config"].map(_series_of)
    frame["best"] = False
    ok = frame[(frame["status"] == "ok") & frame["chunks_per_s"].notna()]
    if not ok.empty:
        # a configuration is every swept key, not only profile and budget: a sweep over workers or
        # chunk sizes was averaged into "one configuration, mean of N runs"
        means = ok.groupby(["job", "config"])["chunks_per_s"].mean()
        for job, per_job in means.groupby(level="job"):
            _, config = per_job.idxmax()
            frame.loc[(frame["job"] == job) & (frame["config"] == config) & (frame["status"] == "ok"), "best"] = True
    return frame


_NOT_CONFIG = ("corpus=", "output=", "hydra.", "hydra/")


def _kept_overrides(overrides: Any) -> list[str]:
    """A job's overrides without the corpus, output and Hydra's own."""
    if isinstance(overrides, str):
        overrides = [o for o in overrides.split(",") if o] if overrides else []
    return [str(o) for o in (overrides or []) if not str(o).startswith(_NOT_CONFIG)]


def _swept_keys(per_job: list[list[str]]) -> set[str]:
    """The override keys whose value differs between the jobs (or that some jobs lack): what the sweep
    varied. A key every job sets alike (`bench=feed`, `bench.knn_sizes=[2000]`) is no configuration."""
    values: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for overrides in per_job:
        for o in overrides:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
        for key in {o.partition("=")[0] for o in overrides}:
            count[key] = count.get(key, 0) + 1
    return {k for k, v in values.items() if len(v) > 1 or count[k] < len(per_job)}


def _config_of(row: Any, swept: Optional[set[str]] = None) -> str:
    """The job's configuration: its swept overrides (`_swept_keys`; all of them when not given), and
    the profile and budget it ran with."""
    kept = [o for o in _kept_overrides(row.overrides) if swept is None or o.partition("=")[0] in swept]
    for key, value in (("profile", row.profile), ("profile.max_batch_tokens", _fmt(row.max_batch_tokens, "d"))):
        if not any(o.startswith(f"{key}=") for o in kept):  # what the job ran with, swept or not
            kept.append(f"{key}={value}")
    return " ".join(sorted(kept, key=lambda o: (not o.startswith("profile="), o)))  # the profile first


def _series_of(config: str) -> str:
    """A configuration without its batch budget: one line of the throughput plot (the budget is its
    x axis). Jobs of other workers, chunk sizes, ... were averaged into one line per profile."""
    return " ".join(o for o in str(config).split() if not o.startswith("profile.max_batch_tokens="))


def _fmt(value: Any, spec: str) -> str:
    try:
        if value is None or value != value:  # None or NaN
            return "–"
        if spec.endswith("d") and isinstance(value, float) and value.is_integer():
            value = int(value)  # a column with a failed job's NaN is float: 17.0 read as "17.0"
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(frame: Any) -> str:
    header = ("| | job | profile | max_batch_tokens | configuration | chunks | chunks/s | tokens/s | padding eff. | "
              "ISNE pairs/s | peak RSS (MiB) | wall (s) | backpressure waits | status | folder |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in frame.itertuples(index=False):
        error = str(row.error)
        status = row.status if row.status == "ok" else f"{row.status}: {error if len(error) <= 300 else error[:299] + '…'}"
        lines.append("| " + " | ".join([
            BEST_MARK if row.best else "",
            str(row.job), str(row.profile), _fmt(row.max_batch_tokens, "d"), f"`{row.config}`", _fmt(row.chunks, "d"),
            _fmt(row.chunks_per_s, ".1f"), _fmt(row.tokens_per_s, ",.0f"), _fmt(row.padding_efficiency, ".3f"),
            _fmt(row.pairs_per_s, ",.0f"), _fmt(row.peak_rss_mib, ",.0f"), _fmt(row.wall_s, ".2f"), _fmt(row.backpressure_waits, "d"),
            status.replace("|", "/"), f"`{row.folder}`",
        ]) + " |")
    return "\n".join(lines)


def _series_label(job: str, config: str, jobs: int) -> str:
    config = config.replace("profile=", "", 1)
    return f"{config}" if jobs == 1 and STAND_IN not in job else f"{job} / {config}"


def _throughput_jobs(frame: Any) -> Any:
    """The finished jobs whose figure is chunks/s of the pipeline (not the graph or ISNE stage), with
    the figures a plot needs (a result without them made matplotlib fail on NaN axis limits)."""
    import pandas as pd

    ok = frame[(frame["status"] == "ok") & ~frame["job"].isin(STAGE_JOBS)]
    figures = [c for c in ("chunks_per_s", "tokens_per_s", "max_batch_tokens") if c in ok.columns]
    if len(figures) < 3:
        return ok.iloc[0:0]
    numbers = ok[figures].apply(pd.to_numeric, errors="coerce")
    return ok[numbers.notna().all(axis=1) & (numbers["max_batch_tokens"] > 0)]


def _best_means(ok: Any, columns: list[str]) -> Any:
    """One row per best configuration (per job kind): its key and the mean of `columns` over its runs."""
    best = ok[ok["best"]]
    return best.groupby(["job", "profile", "max_batch_tokens", "config"], as_index=False)[columns].mean()


def _plot_throughput(frame: Any, path: Path) -> None:
    plt = require("matplotlib.pyplot", "matplotlib>=3.7", "hades-report's plots", extra="report")

    ok = _throughput_jobs(frame)
    jobs = ok["job"].nunique()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    repeated = bool(ok.groupby(["job", "config"]).size().max() > 1)
    series = sorted(ok.groupby(["job", "series"]), key=lambda kv: (kv[0][0], kv[0][1]))
    for (job, config), group in series:
        mean = group.groupby("max_batch_tokens")[["chunks_per_s", "tokens_per_s"]].mean().sort_index()
        label = _series_label(job, config, jobs)
        for ax, col in zip(axes, ("chunks_per_s", "tokens_per_s")):
            (line,) = ax.plot(mean.index, mean[col], marker="o", label=label)
            if repeated:  # single runs as faint dots, so the spread between repeats stays visible
                ax.scatter(group["max_batch_tokens"], group[col], s=18, color=line.get_color(), alpha=0.35,
                           zorder=3)
    best = _best_means(ok, ["chunks_per_s", "tokens_per_s"])
    for ax, col, title in zip(axes, ("chunks_per_s", "tokens_per_s"), ("chunks / s", "real tokens / s")):
        if not best.empty:
            ax.scatter(best["max_batch_tokens"], best[col], s=260, marker="*", color="gold", edgecolor="black",
                       zorder=5, label="best (chunks/s)")
        ax.set_xscale("log", base=2)
        ticks = sorted(ok["max_batch_tokens"].dropna().unique())
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(int(t)) for t in ticks])
        ax.set_xlabel("profile.max_batch_tokens (padded tokens per batch)")
        ax.set_ylabel(title)
        ax.set_ylim(0, max(float(ok[col].max()), 1e-9) * 1.15)  # all zero: not one identical pair of limits
        ax.grid(True, alpha=0.3)
        ax.set_title(f"Throughput: {title}")
    axes[0].legend(title="configuration", fontsize=8, loc="lower left")
    if repeated:
        fig.suptitle("lines: mean over repeated runs; dots: single runs", fontsize=9, color="dimgray")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bars(frame: Any, column: str, ylabel: str, title: str, path: Path, fmt: str,
               ylim: Optional[tuple[float, float]] = None) -> None:
    import numpy as np

    plt = require("matplotlib.pyplot", "matplotlib>=3.7", "hades-report's plots", extra="report")
    ok = _throughput_jobs(frame)
    jobs = ok["job"].nunique()
    groups = sorted({(j, p) for j, p in zip(ok["job"], ok["series"])})
    budgets = sorted(ok["max_batch_tokens"].dropna().unique())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(groups) + 2), 4.2), constrained_layout=True)
    width = 0.8 / max(1, len(budgets))
    x = np.arange(len(groups))
    for i, budget in enumerate(budgets):
        values = []
        for job, series in groups:
            sel = ok[(ok["job"] == job) & (ok["series"] == series) & (ok["max_batch_tokens"] == budget)][column]
            values.append(sel.mean() if not sel.empty else np.nan)
        bars = ax.bar(x + (i - (len(budgets) - 1) / 2) * width, values, width, label=f"{int(budget)} tokens")
        ax.bar_label(bars, labels=[_fmt(v, fmt) for v in values], fontsize=8, padding=2)
    best = _best_means(ok, [column])
    for row in best.itertuples(index=False):
        if (row.job, _series_of(row.config)) in groups and row.max_batch_tokens in budgets:
            offset = (budgets.index(row.max_batch_tokens) - (len(budgets) - 1) / 2) * width
            gx = groups.index((row.job, _series_of(row.config))) + offset
            value = getattr(row, column)
            ax.annotate(BEST_MARK + " best", (gx, value), xytext=(0, 14), textcoords="offset points", ha="center",
                        fontsize=9, color="darkgoldenrod", fontweight="bold")
    ax.set_xticks(x)
    ax.set_xticklabels([_series_label(j, c, jobs) for j, c in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        values = ok[column].to_numpy(dtype=float)
        values = values[np.isfinite(values)]  # a result without the figure (or an Infinity) is no limit: NaN crashed
        ax.set_ylim(0, float(values.max()) * 1.3 if values.size and values.max() > 0 else 1)
    runs = int(ok.groupby(["job", "config"]).size().max())
    ax.set_title(title if runs == 1 else f"{title} (bars: mean over repeated runs)")
    ax.set_xlabel("configuration")
    ax.legend(title="max_batch_tokens", fontsize=9, loc="upper center", ncol=max(1, len(budgets)))
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(root: Path, out: Optional[Path] = None) -> Path:
    """Collect `root`'s results; write `report.md` and the PNGs into `out` (default: `root`)."""
    require("matplotlib", "matplotlib>=3.7", "hades-report", extra="report").use("Agg")
    rows = collect_results(root)
    if not rows:
        raise FileNotFoundError(f"no {RESULT_FILE} under {root}: not a hades-bench folder (hades-ingest sweeps "
                                f"write none; give the output= of a hades-bench run)")
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    frame = to_frame(rows)
    ok = frame[frame["status"] == "ok"]
    plots: list[str] = []
    if not _throughput_jobs(frame).empty:
        _plot_throughput(frame, out / PLOTS["throughput"])
        _plot_bars(frame, "peak_rss_mib", "peak RSS (MiB, main process + workers)", "Peak memory",
                   out / PLOTS["memory"], ",.0f")
        _plot_bars(frame, "padding_efficiency", "real tokens / padded tokens", "Padding efficiency",
                   out / PLOTS["padding"], ".3f", ylim=(0, 1.3))
        plots = list(PLOTS.values())

    lines = [f"# Benchmark report: `{root.resolve().name or root.resolve()}`", ""]
    first = rows[0]
    host = first.get("host", {})
    corpora = sorted({str(r["corpus"]) for r in rows if r.get("corpus")}) or ["?"]
    # every job's, not the first's: a feed job's stand-in named the model of the isne jobs beside it
    embedders = sorted({str(r.get("embedder") or r.get("embedder_name")) for r in rows
                        if r.get("embedder") or r.get("embedder_name")})
    lines.append(f"{len(frame)} job(s), {len(ok)} finished; corpus {', '.join(f'`{c}`' for c in corpora)}; host: "
                 f"{host.get('cpus', '?')} CPU(s), {host.get('gpus_visible', 0)} GPU(s) visible; "
                 f"embedder: {', '.join(embedders) or '?'}.")
    lines.append("")
    for job, group in ok.groupby("job"):
        best = group[group["best"]]
        if job in STAGE_JOBS:
            continue  # their own section below
        if not best.empty:
            b = best[["chunks_per_s", "tokens_per_s", "padding_efficiency", "peak_rss_mib"]].mean()
            runs = f" (mean of {len(best)} runs)" if len(best) > 1 else ""
            lines.append(f"**Best `{job}` configuration {BEST_MARK}: `{best['config'].iloc[0]}`**{runs}: "
                         f"{b['chunks_per_s']:.1f} chunks/s, {b['tokens_per_s']:,.0f} tokens/s, "
                         f"padding efficiency {b['padding_efficiency']:.3f}, peak RSS {b['peak_rss_mib']:,.0f} MiB.")
            lines.append("")
    lines += ["Throughput counts chunks embedded and written (tokens: real, not padding) over the timed "
              "region; peak RSS is the main process plus its worker processes. The graph and ISNE jobs time "
              "their own stage over an untimed ingest: chunks/s there is chunks over that stage's time.", "",
              markdown_table(frame), ""]
    lines += _stage_sections(rows)
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _stage_sections(rows: list[dict[str, Any]]) -> list[str]:
    """The graph jobs' kNN rows (each labelled with its data: SYNTHETIC or the corpus's own vectors,
    extrapolated rows marked) and the ISNE figures of the graph and ISNE jobs."""
    from hades_gpu.benchmarks.knn_bench import table as knn_table

    lines: list[str] = []
    for row in rows:
        if row.get("status") != "ok" or row.get("job") not in STAGE_JOBS:
            continue
        knn = (row.get("knn") or {}).get("rows") or []
        if knn:
            lines += [f"### kNN rows of `{row['folder']}`", "", knn_table(knn), ""]
        isne = row.get("isne") or {}
        planted = isne.get("planted_partition") if isinstance(isne, dict) else None
        if planted:
            lines += [f"ISNE on SYNTHETIC planted-partition graphs (`{row['folder']}`, result.json "
                      f"`isne.planted_partition`): {json.dumps(planted.get('rows', planted), default=str)[:1500]}", ""]
        if row.get("pairs_per_s"):
            lines += [f"ISNE stage of `{row['folder']}`: {row['pairs_per_s']:,.0f} positive pairs/s over "
                      f"{row.get('chunks', 0)} chunks, {row.get('wall_s', 0.0):.1f} s.", ""]
    return lines


def report_cli(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hades-report",
        description="Collect every job's result.json of a hades-bench multirun folder into report.md and PNG plots.")
    parser.add_argument("multirun_dir", type=Path, help="the sweep's folder (output= or multirun/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.md and the PNGs "
                        "(default: the multirun folder)")
    args = parser.parse_args(argv)
    if not args.multirun_dir.is_dir():
        parser.error(f"multirun_dir must be a folder (got {str(args.multirun_dir)!r})")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder (got the file {str(args.out)!r})")
    try:
        path = write_report(args.multirun_dir, args.out)
    except FileNotFoundError as err:
        print(f"hades-report: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
