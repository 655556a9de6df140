"""The README's Python example as a user writes it, for tests/pipelines/test_entry_points.py.

`readme_example(...)` is the source text of a script; `run_readme_example` is the same example as a
function in an importable module (a joblib/loky worker can only run functions it can import).
"""

from __future__ import annotations

import json
from pathlib import Path

MARKER = "HADES-ENTRY-POINT-MARKER"

# The README's example ("From Python"), with the corpus/output paths and a marker filled in. The
# marker runs at module top level: a worker that re-imports the user's main module runs it again.
_EXAMPLE = '''\
import os
with open({mark!r}, "a") as _m:
    _m.write(f"{{os.getpid()}}\\n")
print({marker!r}, flush=True)

from hades_gpu.config import load_pipeline_config
from hades_gpu.pipelines import TextParallelPipeline, CodeParallelPipeline, ISNETrainingPipeline

config = load_pipeline_config(profile={profile!r}, overrides={overrides!r})
result = TextParallelPipeline(config).process_batch([{corpus!r}], output={output!r})
print(result.documents_ingested, result.chunks_written, result.errors)
import json
print("RESULT " + json.dumps({{"documents_ingested": result.documents_ingested,
                              "chunks_written": result.chunks_written,
                              "reasons": sorted({{s["reason"] for s in result.skipped}})}}), flush=True)
'''


def readme_example(corpus: Path, output: Path, mark: Path, profile: str = "low_memory", extra: tuple = ()) -> str:
    """The example's source, no `if __name__ == "__main__":` guard (as the README shows it); `extra`:
    overrides added to the example's own."""
    overrides = ["isne.enabled=false", "monitoring.progress=off", *extra]
    return _EXAMPLE.format(corpus=str(corpus), output=str(output), mark=str(mark), marker=MARKER, profile=profile,
                           overrides=overrides)


def run_readme_example(corpus: str, output: str, profile: str = "low_memory") -> dict:
    """The README example as a function (what a joblib/loky worker runs)."""
    from hades_gpu.config import load_pipeline_config
    from hades_gpu.pipelines import TextParallelPipeline

    config = load_pipeline_config(profile=profile, overrides=["isne.enabled=false", "monitoring.progress=off"])
    result = TextParallelPipeline(config).process_batch([corpus], output=output)
    return {"documents_ingested": result.documents_ingested, "chunks_written": result.chunks_written,
            "reasons": sorted({s["reason"] for s in result.skipped})}


def parse_result(stdout: str) -> dict:
    """The RESULT line the example prints."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise AssertionError(f"the example printed no RESULT line; stdout:\n{stdout[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])
