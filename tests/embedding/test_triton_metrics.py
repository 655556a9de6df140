"""Triton's Prometheus page read with prometheus_client's parser (the live server is in tests/triton)."""

from hades_gpu.embedding.triton_metrics import metric_total

PAGE = """# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="minilm_python",version="1"} 12
nv_inference_request_success{model="minilm_python",version="2"} 3
nv_inference_request_success{model="other",version="1"} 100
# HELP nv_inference_exec_count Number of model executions performed
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="minilm_python",version="1"} 5
# HELP nv_gpu_utilization GPU utilization rate
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
"""


def test_sums_a_counter_over_versions_of_one_model_or_all():
    assert metric_total(PAGE, "nv_inference_request_success", "minilm_python") == 15
    assert metric_total(PAGE, "nv_inference_request_success") == 115
    assert metric_total(PAGE, "nv_inference_exec_count", "minilm_python") == 5
    assert metric_total(PAGE, "nv_inference_request_success", "absent") == 0
    assert metric_total(PAGE, "nv_inference_request") == 0  # a prefix is not the metric
    assert metric_total(PAGE, "nv_gpu_utilization") == 0.5
    assert metric_total("", "nv_inference_exec_count") == 0
