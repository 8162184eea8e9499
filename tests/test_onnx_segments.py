"""Cutting an ONNX graph at named tensors (`pabee.onnx_segments`), on a hand-built graph."""

from __future__ import annotations

import numpy as np
import pytest

from pabee.errors import PabeeError
from pabee.onnx_segments import Segments

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _model():
    """x, y → a = x + x → b = a * y → c = b + w (w a constant); every one of a, b, c an output."""
    from onnx import TensorProto, helper, numpy_helper

    vector = [2]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "x"], ["a"]),
            helper.make_node("Mul", ["a", "y"], ["b"]),
            helper.make_node("Add", ["b", "w"], ["c"]),
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, vector) for n in ("x", "y")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, vector) for n in ("a", "b", "c")],
        [numpy_helper.from_array(np.array([10.0, 20.0], dtype=np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_segment_reads_only_what_its_outputs_need():
    segments = Segments(_model())
    assert segments.inputs_for(["c"], ["b", "x", "y"]) == ["b"]  # a constant needs no feeding
    assert segments.inputs_for(["b"], ["a", "y"]) == ["y", "a"]  # graph inputs first, then the outputs' order
    assert segments.inputs_for(["c"], ["x", "y"]) == ["x", "y"]
    cut = segments.cut(["b"], ["c"])
    assert [node.op_type for node in cut.graph.node] == ["Add"]
    session = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    (c,) = session.run(None, {"b": np.array([1.0, 2.0], dtype=np.float32)})
    assert c.tolist() == [11.0, 22.0]


def test_a_cut_that_needs_what_is_not_available_is_a_clear_error():
    with pytest.raises(PabeeError, match="cannot be cut before b: it needs 'y'"):
        Segments(_model()).inputs_for(["b"], ["a"])
