"""The TensorRT plugins against the exported graphs, on real tensors.

Every method that uses custom ops is run through ONNX Runtime at batch 3 (prompts of
different lengths): SparseVLM v1.5 and v1.0 (TokenRecycle + TokenPrune in each pruning
segment), FastV and FasterVLM (TopKTokenSelect). Each graph that holds `sparsevlm` nodes runs
as a copy whose nodes' inputs and outputs are extra graph outputs, so every call records what
the node received and what ONNX Runtime's function body answered. Then:

- the plugins' host path (the `__host__ __device__` code the kernels run, through
  trt_plugins/tests/host_ops.cpp) on the recorded inputs must give identical indices and
  masks, and float outputs within one unit in the last place of the graph's;
- the built library's `getOutputShapes` (the C++ harness in its `--output-shapes` mode) on the
  recorded input shapes must give the shapes ONNX Runtime produced, with constant and with
  dynamic dimensions.

Masks are recorded as the graph has them (bool, or int32 where the exported graph casts to
int32 around each node) and fed to the host path as int32.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# Shared fixtures: the artifacts exported and the pipelines loaded once per session, the host
# path library, the built plugin library and harness (each cached where it is defined).
from export_helpers import PROMPTS, artifact_root, artifacts, inputs_images, pipelines  # noqa: F401
from test_trt_plugin_kernels import host_ops, run_prune, run_recycle, run_topk  # noqa: F401
from test_trt_plugin_library import built  # noqa: F401

from sparsevlm.trt_plugins import LIBRARY_NAME, PLUGIN_NAMESPACE

# Every method whose graphs hold sparsevlm nodes, and the ops they must hold.
METHOD_OPS = {
    "sparsevlm_v15_b192": {"TokenRecycle", "TokenPrune"},
    "sparsevlm_v10_b192": {"TokenRecycle", "TokenPrune"},
    "fastv_R0.5": {"TopKTokenSelect"},
    "fastervlm_b64": {"TopKTokenSelect"},
}
BATCH = 3  # the three prompts of export_helpers, of different lengths
ROW_DEPENDENT_KEEP = {"sparsevlm_v10_b192"}  # the rank rule: a keep count per row
# The ops' integer attributes the plugins read (plugin_namespace / plugin_version are the parser's).
PLUGIN_ATTRIBUTES = {"TopKTokenSelect": ("k",), "TokenRecycle": ("candidate_percent", "cluster_divisor"),
                     "TokenPrune": ()}


@dataclass
class NodeCall:
    """One execution of one sparsevlm node: what it received and what ONNX Runtime answered."""
    graph: str
    op: str
    attributes: dict
    inputs: list
    outputs: list


class RecordingSession:
    """Stands in for an onnxruntime session of one artifact graph: runs a copy of the graph in
    which every sparsevlm node's inputs and outputs are also graph outputs, keeps them as
    NodeCalls, and returns only the outputs the caller asked for."""

    def __init__(self, artifact_dir: Path, graph: str, threads: int):
        import onnx
        import onnxruntime as ort
        model = onnx.load(artifact_dir / f"{graph}.onnx", load_external_data=False)
        graph_inputs = {value.name for value in model.graph.input}
        graph_outputs = {value.name for value in model.graph.output}
        self.graph, self.nodes, self.extra, self.calls = graph, [], [], []
        for node in model.graph.node:
            if node.domain != PLUGIN_NAMESPACE:
                continue
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            self.nodes.append((node.op_type, {name: int(attributes[name]) for name in PLUGIN_ATTRIBUTES[node.op_type]},
                               list(node.input), list(node.output)))
            for name in list(node.input) + list(node.output):
                if name not in graph_inputs and name not in graph_outputs and name not in self.extra:
                    self.extra.append(name)
                    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        if not self.nodes:
            return  # nothing to record: the caller keeps its own session
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # The copy lives in memory; its external weights stay where the artifact has them.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(artifact_dir))
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, output_names, feed):
        values = self.session.run(list(output_names) + self.extra, feed)
        known = dict(feed)
        known.update(zip(list(output_names) + self.extra, values))
        for op, attributes, inputs, outputs in self.nodes:
            self.calls.append(NodeCall(self.graph, op, attributes, [np.asarray(known[n]) for n in inputs],
                                       [np.asarray(known[n]) for n in outputs]))
        return values[:len(output_names)]


_RECORDED: dict = {}


@pytest.fixture(scope="module")
def recorded(artifacts, pipelines, inputs_images):  # noqa: F811 - pytest fixtures imported above
    """recorded(method) -> the NodeCalls of one batch-3 prefill of that method's artifact (cached).
    Runs the session-cached onnxruntime Pipeline with its custom-op graphs swapped for
    recording copies, and puts its own sessions back afterwards."""

    def get(method: str) -> list[NodeCall]:
        if method not in _RECORDED:
            artifact_dir = Path(artifacts(method))
            pipe = pipelines(artifact_dir, "onnxruntime")
            originals = dict(pipe.executor.sessions)
            recordings = [RecordingSession(artifact_dir, graph, threads=2) for graph in originals]
            recordings = [recording for recording in recordings if recording.nodes]
            try:
                pipe.executor.sessions.update({recording.graph: recording for recording in recordings})
                pipe.generate(inputs_images[:BATCH], PROMPTS[:BATCH], max_new_tokens=1, temperature=0.0,
                              stop_token_ids=())
            finally:
                pipe.executor.sessions.update(originals)
            _RECORDED[method] = [call for recording in recordings for call in recording.calls]
        return _RECORDED[method]
    return get


def _float32(array: np.ndarray) -> torch.Tensor:
    assert array.dtype == np.float32, f"the host path runs float32, the graph has {array.dtype}"
    return torch.from_numpy(np.ascontiguousarray(array))


def _mask(array: np.ndarray) -> torch.Tensor:
    """A recorded mask (bool, or int32 0/1) as the int32 the plugins take."""
    assert array.dtype in (np.bool_, np.int32), array.dtype
    values = array.astype(np.int32)
    assert np.isin(values, (0, 1)).all()
    return torch.from_numpy(np.ascontiguousarray(values))


def _int64(array: np.ndarray) -> torch.Tensor:
    assert array.dtype == np.int64, array.dtype
    return torch.from_numpy(np.ascontiguousarray(array))


def run_host_path(lib, call: NodeCall) -> list[torch.Tensor]:
    """The plugin's host path on the recorded inputs; masks come back as bool."""
    if call.op == "TopKTokenSelect":
        tokens, scores = call.inputs
        return list(run_topk(lib, _float32(tokens), _float32(scores), call.attributes["k"]))
    if call.op == "TokenRecycle":
        visual, scores, visual_valid, keep_count = call.inputs
        return list(run_recycle(lib, _float32(visual), _float32(scores), _mask(visual_valid), _int64(keep_count),
                                call.attributes["candidate_percent"], call.attributes["cluster_divisor"]))
    visual, scores, visual_valid, keep_count, merged, merged_valid, out_width = call.inputs
    return list(run_prune(lib, _float32(visual), _float32(scores), _mask(visual_valid), _int64(keep_count),
                          _float32(merged), _mask(merged_valid), out_width.shape[0]))


def assert_within_one_ulp(got: np.ndarray, want: np.ndarray, what: str):
    """|got - want| <= one unit in the last place of `want` (float32), elementwise."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, what
    ulp = np.spacing(np.abs(want)).astype(np.float64)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = ~(diff <= ulp)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} elements differ by more than one ulp, "
                           f"the largest by {float(diff[bad].max())} at |value| {float(np.abs(want[bad]).max())}")


@pytest.mark.parametrize("method", sorted(METHOD_OPS))
def test_host_path_equals_the_graph_on_recorded_tensors(host_ops, recorded, method):  # noqa: F811
    calls = recorded(method)
    assert {call.op for call in calls} == METHOD_OPS[method]
    # The calls exercise what matters: tokens merged, and (the rank rule) rows of their own keep
    # counts and valid widths (v1.5's schedule gives every row the same count).
    if "TokenRecycle" in METHOD_OPS[method]:
        assert any(call.outputs[1].astype(bool).any() for call in calls if call.op == "TokenRecycle")
    if method in ROW_DEPENDENT_KEEP:
        assert any(len(set(call.inputs[3].tolist())) > 1 and len(set(call.inputs[2].sum(1).tolist())) > 1
                   for call in calls if call.op == "TokenPrune")
    for number, call in enumerate(calls):
        what = f"{method} {call.graph} {call.op} (call {number})"
        assert call.inputs[0].shape[0] == BATCH, what
        got = run_host_path(host_ops, call)
        assert len(got) == len(call.outputs), what
        for index, (mine, theirs) in enumerate(zip(got, call.outputs)):
            label = f"{what} output {index}"
            mine = mine.numpy()
            assert mine.shape == theirs.shape, f"{label}: shape {mine.shape}, the graph's {theirs.shape}"
            if theirs.dtype in (np.bool_, np.int32):  # a mask: the graph's bool, or its int32 0/1
                assert np.isin(theirs.astype(np.int32), (0, 1)).all(), label
                assert np.array_equal(mine, theirs.astype(bool)), label
            elif theirs.dtype == np.int64:  # indices
                assert np.array_equal(mine, theirs), label
            else:
                assert_within_one_ulp(mine, theirs, label)


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "-"


@pytest.mark.parametrize("method", sorted(METHOD_OPS))
def test_output_shapes_equal_onnxruntime(built, recorded, method):  # noqa: F811
    calls = recorded(method)
    requests, expected = [], []
    for call in calls:
        attributes = " ".join(f"{name}={value}" for name, value in call.attributes.items())
        requests.append(f"{call.op} {attributes} : " + " ".join(_shape_text(array.shape) for array in call.inputs))
        shapes = " ".join(_shape_text(array.shape) for array in call.outputs)
        expected.append(f"{shapes} | {shapes}")  # constant dims | dynamic dims
    result = subprocess.run([str(built / "sparsevlm_plugin_harness"), str(built / LIBRARY_NAME), "--output-shapes"],
                            input="\n".join(requests) + "\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    answers = result.stdout.splitlines()
    assert len(answers) == len(requests), result.stdout + result.stderr
    for request, answer, want in zip(requests, answers, expected):
        assert answer == want, f"{request}: getOutputShapes gave {answer}, ONNX Runtime {want}"
