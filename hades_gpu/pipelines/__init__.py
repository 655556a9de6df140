"""Top layer: the seed's pipeline API (`TextParallelPipeline`, `CodeParallelPipeline`, `ISNETrainingPipeline`)."""

from hades_gpu.pipelines.ingest import CodeParallelPipeline, IngestPipeline, IngestResult, NothingIngestedError, TextParallelPipeline

__all__ = ["CodeParallelPipeline", "IngestPipeline", "IngestResult", "NothingIngestedError", "TextParallelPipeline", "ISNETrainingPipeline"]


def __getattr__(name: str):  # ISNE pulls in torch-geometric: import it only when asked for
    if name == "ISNETrainingPipeline":
        from hades_gpu.pipelines.isne_training import ISNETrainingPipeline

        return ISNETrainingPipeline
    raise AttributeError(name)
