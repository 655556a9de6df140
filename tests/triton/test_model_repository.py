"""The model repository's configs parse as Triton ModelConfig and match the exported graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from requirements import require_module  # noqa: E402  (tests/support)

require_module("tritonclient.grpc", "tritonclient[grpc] is not installed (the lent GPU machine has none)")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from hades_gpu.embedding import export

REPO = Path(__file__).resolve().parents[2] / "triton_models"
MODELS = ("minilm_python", "minilm_onnx", "minilm_openvino")
TRITON_TO_NUMPY = {mc.TYPE_INT64: np.int64, mc.TYPE_FP32: np.float32}


def load_config(name: str) -> mc.ModelConfig:
    return text_format.Parse((REPO / name / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.mark.parametrize("name", MODELS)
def test_config_declares_the_embedder_interface(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.max_batch_size > 0
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("input_ids", mc.TYPE_INT64, [-1]), ("attention_mask", mc.TYPE_INT64, [-1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("embedding", mc.TYPE_FP32, [export.DIM])]
    db = cfg.dynamic_batching
    assert cfg.HasField("dynamic_batching")
    assert db.default_queue_policy.max_queue_size > 0  # a bounded queue
    assert (REPO / name / "1").is_dir()


def test_backends():
    assert load_config("minilm_python").backend == "python"
    assert load_config("minilm_onnx").backend == "onnxruntime"
    assert load_config("minilm_onnx").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert load_config("minilm_openvino").backend == "openvino"
    assert load_config("minilm_openvino").default_model_filename == "model.xml"
    assert (REPO / "minilm_python" / "1" / "model.py").is_file()


def test_exported_onnx_matches_config():
    import onnx

    model = onnx.load(str(export.export_onnx()), load_external_data=False)
    cfg = load_config("minilm_onnx")
    elem = {onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.FLOAT: mc.TYPE_FP32}
    graph_inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    graph_outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    for tensors, declared in ((graph_inputs, cfg.input), (graph_outputs, cfg.output)):
        for t in declared:
            assert t.name in tensors, f"{t.name} not in the exported graph ({sorted(tensors)})"
            tt = tensors[t.name]
            assert elem[tt.elem_type] == t.data_type
            assert len(tt.shape.dim) == 1 + len(t.dims)  # batch dimension + declared dims
            if t.dims[-1] > 0:
                assert tt.shape.dim[-1].dim_value == t.dims[-1]


def test_exported_openvino_matches_config():
    import openvino as ov

    model = ov.Core().read_model(str(export.export_openvino()))
    cfg = load_config("minilm_openvino")
    names = {n for port in model.inputs for n in port.get_names()}
    assert {i.name for i in cfg.input} <= names
    out = model.output(0)
    assert "embedding" in out.get_names()
    assert out.get_partial_shape()[1].get_length() == export.DIM and out.get_partial_shape()[0].is_dynamic


def test_text_ensemble_wires_tokenizer_into_embedding():
    """minilm_text: BYTES text [batch, 1] -> minilm_tokenizer -> minilm_python -> embedding [batch, 384]."""
    ens = load_config("minilm_text")
    assert ens.platform == "ensemble" and (REPO / "minilm_text" / "1").is_dir()
    assert [(i.name, i.data_type, list(i.dims)) for i in ens.input] == [("text", mc.TYPE_STRING, [1])]
    assert [(o.name, o.data_type, list(o.dims)) for o in ens.output] == [("embedding", mc.TYPE_FP32, [export.DIM])]
    tok_step, emb_step = ens.ensemble_scheduling.step
    assert (tok_step.model_name, emb_step.model_name) == ("minilm_tokenizer", "minilm_python")
    assert dict(tok_step.input_map) == {"text": "text"}
    # each tokenizer output feeds the embedding input of the same name
    for name in ("input_ids", "attention_mask"):
        assert tok_step.output_map[name] == emb_step.input_map[name]
    assert dict(emb_step.output_map) == {"embedding": "embedding"}
    tok, emb = load_config("minilm_tokenizer"), load_config("minilm_python")
    assert tok.backend == "python" and (REPO / "minilm_tokenizer" / "1" / "model.py").is_file()
    assert [(i.name, i.data_type) for i in tok.input] == [("text", mc.TYPE_STRING)]
    assert tok.HasField("dynamic_batching") and emb.HasField("dynamic_batching")  # both steps batch
    assert ens.max_batch_size <= min(tok.max_batch_size, emb.max_batch_size)
    # one max length for both steps: the tokenizer cuts exactly where the embedding model stops
    assert tok.parameters["max_seq_len"].string_value == emb.parameters["max_seq_len"].string_value
