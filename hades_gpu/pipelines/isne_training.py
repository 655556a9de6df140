"""The seed's `ISNETrainingPipeline` API: ISNE on an ingest output (ingesting a raw corpus first
when asked). The stage itself is `hades_gpu.isne.stage`; this module only composes it."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hades_gpu.config import PipelineConfig, to_pipeline_config, validate
from hades_gpu.exit_guard import ISNE_KEPT, stoppable_run
from hades_gpu.isne.stage import NotAnIngestOutputError, run_isne_stage, stage_shard_name
from hades_gpu.store.layout import isne_embeddings_path, isne_model_path, metrics_path, no_manifest_detail
from hades_gpu.store.metrics_file import INGEST_TOTALS, ingest_totals, read_metrics, write_metrics
from hades_gpu.store.reader import is_ingest_output
from hades_gpu.records import path_argument, user_path

__all__ = ["ISNETrainingPipeline", "ISNETrainingResult", "NotAnIngestOutputError", "NothingTrainedError"]


class NothingTrainedError(RuntimeError):
    """`hades-isne` was asked to train and no batch ran (a time budget shorter than one batch): the
    output keeps its earlier model, if any; exit 1 rather than a success line."""


@dataclass
class ISNETrainingResult:
    """What `ISNETrainingPipeline.train` returns."""

    output_dir: Path
    model_path: Optional[Path]  # None: no model exists (no chunks, or a graph without edges)
    embeddings_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for people (`hades-isne` prints it): what the stage did and where the files are."""
        m = self.metrics
        mode = m.get("mode", "?")
        parts = [f"{m.get('n_nodes', 0)} chunk(s)", f"{m.get('n_edges', 0)} edge(s)"]
        if mode == "trained":
            last = (m.get("history") or [{}])[-1]
            cut = (f" (epoch {last.get('epoch')} cut at {last.get('batches')} of {last.get('of_batches')} batches)"
                   if m.get("last_epoch_partial") else "")
            parts.append(f"{m.get('epochs_run', 0)} epoch(s){cut}, best {m.get('best_epoch', 0)}")
            if m.get("resumed_from_epoch"):
                parts.append(f"resumed after epoch {m['resumed_from_epoch']}")
            if m.get("stopped_early"):
                parts.append("stopped early")
            if m.get("stopped_by_budget"):
                parts.append(f"time budget of {m.get('time_budget_s', 0.0):.3g} s reached")
            parts.append(f"{m.get('pairs_per_s', 0.0) / 1e6:.2f} M pairs/s")
        elif mode == "inferred":
            parts.append(f"{m.get('n_inferred', 0)} vector(s) inferred")
        elif mode == "no_edges":
            parts.append("nothing to learn: every vector is 0")
        elif mode == "untrained":
            parts.append(f"the time budget of {m.get('time_budget_s') or 0.0:.3g} s ended training before its first "
                         f"batch: " + ("the earlier model is kept" if m.get("kept_model") else "every vector is 0"))
        total = m.get("seconds", {}).get("total", 0.0)
        model = self.model_path if self.model_path is not None else "none"
        return (f"{self.output_dir}: ISNE {mode}: {', '.join(parts)}; {total:.1f} s; model {model}, "
                f"vectors {self.embeddings_path}")


def _record_in_metrics_file(output: Path, stage: dict[str, Any]) -> None:
    """The stage's figures as metrics.json's ``isne`` (graph, kNN recall, training), as an ingest
    records its own: `hades-isne` left the file describing an earlier graph and model. Only where the
    file exists: an output of by-hand shards has none (its ISNE budget sums the shards' own files)."""
    path = metrics_path(output)
    current = read_metrics(path) if path.is_file() else None
    if current is None:
        return
    if not isinstance(current.get(INGEST_TOTALS), dict):  # written before totals existed: its own run, once
        current[INGEST_TOTALS] = ingest_totals(current, 0.0, 0)
    current["isne"] = stage
    write_metrics(path, current)


def _count_argument(name: str, value: Any) -> Optional[int]:
    """`epochs` / `batch_size` as an int >= 1 (numpy integers too), or None; else ValueError."""
    if value is None:
        return None
    try:
        count = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    return count


class ISNETrainingPipeline:
    """Train ISNE on an existing ingest output (the seed's API).

    Args:
        config (PipelineConfig, optional): default `PipelineConfig()`.
    """

    def __init__(self, config: Optional[PipelineConfig] = None) -> None:
        self.config = to_pipeline_config(config) if config is not None else PipelineConfig()

    def train(self, corpus_path: Optional[str | Path] = None, epochs: Optional[int] = None,
              batch_size: Optional[int] = None) -> ISNETrainingResult:
        """Build the graph of `corpus_path` and train ISNE (a new model, not the output's last one),
        writing the model and every chunk's vector. A training of the same graph and settings that
        was stopped (Ctrl-C, a kill) goes on from its last saved epoch (`isne.resume`), unless it is
        already past `epochs`: then it starts from the beginning.

        Training runs `epochs` epochs unless early stopping or the time budget ends it first (by
        default ISNE takes at most as long as ingesting the chunks took: `isne.time_budget_vs_embedding`;
        set it to 0 for no budget). A budget stop is one warning line and ``metrics["stopped_by_budget"]``.

        `corpus_path` is an ingest output folder (default `config.output`). If it is a raw corpus
        instead and `config.output` is set, it is ingested into `config.output` first (resuming
        whatever is already there), and ISNE trains on that output.

        Raises:
            NotAnIngestOutputError: `corpus_path` is no ingest output and no `config.output` is set.
            ValueError: `epochs` or `batch_size` is given and not an integer >= 1 (0 epochs wrote an
                untrained model over the trained one; batch size 0 divided by zero mid-run).
        """
        epochs, batch_size = _count_argument("epochs", epochs), _count_argument("batch_size", batch_size)
        # the config again: a field set after the pipeline was made (config.isne.epochs = 0 trained
        # nothing and saved that over the model)
        validate(self.config)
        path = corpus_path if corpus_path is not None else self.config.output
        if path is None:
            raise NotAnIngestOutputError("no ingest output given: pass corpus_path=<output folder> "
                                         "(or set output=...)")
        if isinstance(path, (str, bytes)) and not path.strip():  # Path("") is the working directory
            raise NotAnIngestOutputError("corpus_path is an empty path: pass the ingest output folder")
        path = path_argument(path, "corpus_path" if corpus_path is not None else "config.output")
        if not is_ingest_output(path) and self.config.output and path.exists():
            from hades_gpu.pipelines.ingest import TextParallelPipeline

            ingest_cfg = dataclasses.replace(self.config, isne=dataclasses.replace(self.config.isne, enabled=False))
            TextParallelPipeline(ingest_cfg).process_batch([path], output=self.config.output)
            path = user_path(self.config.output)
        if not is_ingest_output(path):
            if not path.exists():
                raise NotAnIngestOutputError(f"{path} does not exist: pass an ingest output folder")
            # a folder of documents: ingest it into another folder (an output inside its corpus is refused)
            raise NotAnIngestOutputError(
                f"{path} is not an ingest output {no_manifest_detail(path)}; ingest it first "
                f"(`hades-ingest corpus={path} output=<another folder>`) and pass that output, or set "
                f"output=<another folder> to have train() ingest it there")
        with stoppable_run(ISNE_KEPT):  # SIGTERM, interpreter exit: stopped as by Ctrl-C (`exit_guard`)
            metrics = run_isne_stage(self.config, path, train=True, epochs=epochs, batch_size=batch_size)
            _record_in_metrics_file(path, metrics)
        model_path = isne_model_path(path)
        return ISNETrainingResult(output_dir=path, model_path=model_path if model_path.is_file() else None,
                                  embeddings_path=isne_embeddings_path(path, stage_shard_name(self.config.shard)), metrics=metrics)
