"""Console entry points. Hydra apps over the same `conf/` that `load_pipeline_config` reads.

`hades-ingest corpus=<dir-or-file> output=<dir> [profile=...]` and `hades-ingest -m profile=a,b ...`
(one job per combination, each in its own folder under `output`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from hades_gpu.config import ConfigError, PipelineConfig, conf_dir, register_configs, to_pipeline_config

log = logging.getLogger("hades_gpu")


def _job_output_dir(cfg: PipelineConfig) -> Path:
    """The job's output folder: Hydra's run/sweep dir (which is `output` or `output/<job>` in `-m`)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        if not cfg.output:
            raise ConfigError("output=<dir> is required") from None
        return Path(cfg.output)


def _run_hydra_app(task: Callable[[PipelineConfig, Path], None], prog: str) -> None:
    """Run `task` as a Hydra app; configuration errors become one line on stderr and exit code 2."""
    import hydra

    register_configs()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(dcfg: DictConfig) -> None:
        from hades_gpu.embedding.base import EmbedderError
        from hades_gpu.gpu.device import DeviceError
        from hades_gpu.optional import MissingDependencyError

        try:
            cfg = to_pipeline_config(dcfg)
            task(cfg, _job_output_dir(cfg))
        except (ConfigError, DeviceError, MissingDependencyError) as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(2)
        except EmbedderError as err:  # server gone, model missing: committed parts stay, re-run resumes
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(1)
        except RuntimeError as err:
            from hades_gpu.pipelines.ingest import NothingIngestedError
            from hades_gpu.store.lock import OutputLockedError  # another run holds the output: one line

            if not isinstance(err, (NothingIngestedError, OutputLockedError)):
                raise
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(1)

    sys.argv[0] = prog
    app()


def _ingest_task(cfg: PipelineConfig, out: Path) -> None:
    from hades_gpu.pipelines.ingest import TextParallelPipeline

    if not cfg.corpus:
        raise ConfigError("corpus=<dir-or-file> is required")
    if not Path(cfg.corpus).exists():
        raise ConfigError(f"corpus must be an existing file or folder (got {cfg.corpus!r})")
    result = TextParallelPipeline(cfg).process_batch([cfg.corpus], output=out)
    print(f"{out}: {result.documents_ingested} document(s) ingested, {result.chunks_written} chunk(s), "
          f"{result.documents_unchanged} unchanged, {result.documents_skipped} skipped; "
          f"{result.metrics.get('chunks_per_s', 0.0):.1f} chunks/s")
    for skip in result.skipped[:20]:
        print(f"  skipped {skip['path']}: {skip['reason']}{': ' + skip['detail'] if skip['detail'] else ''}")
    if len(result.skipped) > 20:
        print(f"  ... {len(result.skipped) - 20} more in {out / 'metrics.json'}")


def ingest_main() -> None:
    """`hades-ingest`: the main job."""
    _run_hydra_app(_ingest_task, "hades-ingest")


def _isne_task(cfg: PipelineConfig, out: Path) -> None:
    from hades_gpu.pipelines.isne_training import ISNETrainingPipeline

    dataset = Path(cfg.output or out)
    result = ISNETrainingPipeline(cfg).train(corpus_path=dataset)
    print(f"{dataset}: ISNE {result}")


def isne_main() -> None:
    """`hades-isne output=<ingest output>`: build the chunk graph and train ISNE on it."""
    _run_hydra_app(_isne_task, "hades-isne")


def serve_main(argv: Optional[list[str]] = None) -> None:
    """`hades-serve`: start a real tritonserver on `triton_models/` (argparse, not Hydra)."""
    from hades_gpu.embedding.serve_cli import serve_cli

    sys.exit(serve_cli(argv))


def bench_main() -> None:
    """`hades-bench [-m] corpus=<dir> [bench=ingest|embed_only|triton|isne] [profile=...] ...`: one
    benchmark job per combination, each writing `result.json` into its Hydra output folder."""
    from hades_gpu.benchmarks.jobs import run_bench_app

    run_bench_app("hades-bench")


def report_main(argv: Optional[list[str]] = None) -> None:
    """`hades-report <multirun-dir>`: the sweep's results as `report.md` and PNG plots."""
    from hades_gpu.benchmarks.report import report_cli

    sys.exit(report_cli(argv))
