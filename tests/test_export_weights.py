"""External weights: graphs over 2 GB get one file per parameter from the exporter; the
export gathers them in weights/, shared between graphs, with no stray copies left behind.
Reproduced here with two tiny graphs saved as external data (the 2 GB path itself is too
big for CI; benchmarks/bench_export.py --full-7b exercises it)."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sparsevlm.export.exporter import WEIGHTS_DIR, _gather_external_weights


def _graph_with_weight(weight: np.ndarray, op: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_shared_parameter_file_is_gathered_once(tmp_path):
    weight = np.arange(4, dtype=np.float32) + 1.0
    root = tmp_path
    results = {}
    for name, op in (("first", "Add"), ("second", "Mul")):
        # As the legacy exporter does: each graph writes the parameter's file `w` beside it.
        onnx.save_model(_graph_with_weight(weight, op), str(root / f"{name}.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=False, size_threshold=0)
        assert (root / "w").exists()
        model = onnx.load(str(root / f"{name}.onnx"), load_external_data=False)
        referenced = _gather_external_weights(model, root)
        onnx.save_model(model, str(root / f"{name}.onnx"))
        assert referenced == weight.nbytes
        assert not (root / "w").exists(), "a stray copy of the parameter was left beside the graphs"
        session = ort.InferenceSession(str(root / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        results[op] = session.run(None, {"x": np.full(4, 2.0, dtype=np.float32)})[0]
    assert sorted(p.name for p in (root / WEIGHTS_DIR).iterdir()) == ["w"]
    np.testing.assert_array_equal(results["Add"], weight + 2.0)
    np.testing.assert_array_equal(results["Mul"], weight * 2.0)
