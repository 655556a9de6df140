"""Read a Triton server's Prometheus metrics page (with prometheus_client's own text parser)."""

from __future__ import annotations

from typing import Optional

from prometheus_client.parser import text_string_to_metric_families


def metric_total(metrics_text: str, name: str, model: Optional[str] = None) -> float:
    """Sum of a metric's samples over its label sets (only those with `model="..."` when given).

    `name` as Triton writes it: the parser names a counter's samples `<name>_total`, so a family
    is matched by its own name too."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if name not in (family.name, sample.name) or sample.name.endswith(("_created", "_bucket")):
                continue
            if model is not None and sample.labels.get("model") != model:
                continue
            total += float(sample.value)
    return total
