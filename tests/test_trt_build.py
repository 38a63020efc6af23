"""sparsevlm-build (export/trt_build.py): profile tables from the manifest, atomic manifest
updates and the CLI's errors run everywhere; the engine build and inference test needs the
full `tensorrt` package, a GPU and the built plugin library, and is skipped without them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sparsevlm.export import trt_build
from sparsevlm.export.trt_build import (InputShapes, ManifestError, main, plan_engines, plan_graph, profile_table,
                                        record_engines)
from sparsevlm.methods import token_ops

SEGMENT = {
    "file": "segment_1.onnx",
    "inputs": [{"name": "hidden", "dtype": "float32", "shape": ["batch", "seq_in", 64]},
               {"name": "out_width", "dtype": "int64", "shape": ["visual_width"]},
               {"name": "keep_count", "dtype": "int64", "shape": ["batch"]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq_out", 10]}],
    "profiles": [{"batch": [1, 1, 8], "seq_in": [40, 300, 600], "visual_width": [1, 100, 144], "seq_out": [1, 1, 9]},
                 {"batch": [1, 2, 8], "seq_in": [40, 300, 600], "visual_width": [145, 200, 288]}],
}


def write_artifact(root: Path, graphs: dict, files: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if files:
        for graph in graphs.values():
            (root / graph["file"]).write_bytes(b"not parsed before TensorRT is imported")
    manifest = {"schema": "sparsevlm-artifact/1", "graphs": graphs, "method": {"name": "sparsevlm"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_profiles_substitute_dimension_names():
    plan = plan_graph("segment_1", SEGMENT)
    assert plan.onnx_file == "segment_1.onnx"
    assert plan.profiles == (
        (InputShapes("hidden", (1, 40, 64), (1, 300, 64), (8, 600, 64)),
         InputShapes("out_width", (1,), (100,), (144,)),
         InputShapes("keep_count", (1,), (1,), (8,))),
        (InputShapes("hidden", (1, 40, 64), (2, 300, 64), (8, 600, 64)),
         InputShapes("out_width", (145,), (200,), (288,)),
         InputShapes("keep_count", (1,), (2,), (8,))),
    )


def test_profile_table_is_the_manifest_record():
    table = profile_table(plan_graph("segment_1", SEGMENT))
    assert len(table) == 2
    assert table[1]["dims"]["visual_width"] == [145, 200, 288]
    assert table[0]["inputs"]["hidden"] == {"min": [1, 40, 64], "opt": [1, 300, 64], "max": [8, 600, 64]}
    assert json.loads(json.dumps(table)) == table


def test_static_graph_needs_no_profile():
    graph = {"file": "v.onnx", "inputs": [{"name": "pixels", "dtype": "float32", "shape": [1, 3, 336, 336]}]}
    assert plan_graph("vision", graph).profiles == ()


@pytest.mark.parametrize("change,message", [
    (lambda g: g["profiles"][1].pop("seq_in"), r"profile 1: input 'hidden' has dimension 'seq_in'"),
    (lambda g: g["profiles"][0].update(batch=[2, 1, 8]), r"profile 0, dimension 'batch'.*min <= opt <= max"),
    (lambda g: g["profiles"][0].update(batch=[1, 8]), r"dimension 'batch': expected \[min, opt, max\]"),
    (lambda g: g["profiles"][0].update(batch=[1, 1.5, 8]), r"dimension 'batch': expected \[min, opt, max\]"),
    (lambda g: g.update(profiles=[]), r"dynamic dimensions \['batch', 'seq_in', 'visual_width'\].*no profiles"),
    (lambda g: g["inputs"][0].update(shape=["batch", True, 64]), r"input 'hidden' has dimension True"),
    (lambda g: g["inputs"][0].update(shape=["batch", -1, 64]), r"input 'hidden' has dimension -1"),
    (lambda g: g.pop("file"), r"graph 'segment_1': expected an object with a 'file'"),
    (lambda g: g.update(inputs=[]), r"non-empty 'inputs'"),
])
def test_inconsistent_profiles_are_named(change, message):
    graph = json.loads(json.dumps(SEGMENT))
    change(graph)
    with pytest.raises(ManifestError, match=message):
        plan_graph("segment_1", graph)


def test_plan_engines_selects_graphs_in_order():
    manifest = {"graphs": {"a": dict(SEGMENT, file="a.onnx"), "b": dict(SEGMENT, file="b.onnx")}}
    assert [p.name for p in plan_engines(manifest)] == ["a", "b"]
    assert [p.name for p in plan_engines(manifest, ["b", "a"])] == ["b", "a"]
    with pytest.raises(ManifestError, match=r"no graph named 'c'"):
        plan_engines(manifest, ["c"])
    with pytest.raises(ManifestError, match=r"non-empty 'graphs'"):
        plan_engines({"graphs": {}})


def test_record_engines_merges_atomically(tmp_path):
    root = write_artifact(tmp_path / "artifact", {"segment_1": SEGMENT})
    record_engines(root, {"segment_1": {"file": "engines/segment_1.plan"}})
    record_engines(root, {"decode": {"file": "engines/decode.plan"}})
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["engines"] == {"segment_1": {"file": "engines/segment_1.plan"},
                                   "decode": {"file": "engines/decode.plan"}}
    assert manifest["graphs"]["segment_1"] == SEGMENT and manifest["method"] == {"name": "sparsevlm"}
    assert sorted(os.listdir(root)) == ["manifest.json", "segment_1.onnx"]  # no temporary left behind


def test_cli_dry_run_prints_profile_tables(tmp_path, capsys):
    root = write_artifact(tmp_path / "artifact", {"segment_1": SEGMENT}, files=False)
    assert main([str(root), "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"segment_1": profile_table(plan_graph("segment_1", SEGMENT))}


def test_cli_reports_manifest_errors_in_one_line(tmp_path, capsys):
    broken = dict(SEGMENT, profiles=[{"batch": [1, 1, 8]}])
    root = write_artifact(tmp_path / "artifact", {"segment_1": broken})
    assert main([str(root), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sparsevlm-build: error: graph 'segment_1', profile 0") and error.count("\n") == 1
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def _full_tensorrt_available() -> bool:
    try:
        trt_build.import_tensorrt()
    except trt_build.BuildError:
        return False
    return True


def test_cli_without_full_tensorrt_exits_with_one_line(tmp_path, capsys):
    if _full_tensorrt_available():
        pytest.skip("the full tensorrt package is installed here: this checks the error without it")
    root = write_artifact(tmp_path / "artifact", {"segment_1": SEGMENT})
    assert main([str(root)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sparsevlm-build: error: the full TensorRT Python package is not installed")
    assert error.count("\n") == 1
    assert "engines" not in json.loads((root / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# Engine build and inference: full TensorRT + GPU + plugin library


def _topk_model(path: Path, num_tokens: int, dim: int, k: int) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("TopKTokenSelect", ["tokens", "scores"], ["selected", "indices"], domain="sparsevlm",
                            k=k, plugin_namespace="sparsevlm", plugin_version="1")
    graph = helper.make_graph(
        [node], "topk",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", num_tokens, dim]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", num_tokens])],
        [helper.make_tensor_value_info("selected", TensorProto.FLOAT, ["batch", k, dim]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sparsevlm", 1)])
    onnx.save(model, str(path))


def test_engine_build_and_inference_match_the_reference(tmp_path):
    if not _full_tensorrt_available():
        pytest.skip("the full tensorrt package (builder + ONNX parser) is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT engines can only be built and run on one")
    from sparsevlm.trt_plugins import find_plugin_library
    try:
        library = find_plugin_library()
    except FileNotFoundError as error:
        pytest.skip(f"plugin library not built: {error}")
    import tensorrt as trt

    num_tokens, dim, k = 40, 16, 7
    graph = {"file": "topk.onnx",
             "inputs": [{"name": "tokens", "dtype": "float32", "shape": ["batch", num_tokens, dim]},
                        {"name": "scores", "dtype": "float32", "shape": ["batch", num_tokens]}],
             "outputs": [], "profiles": [{"batch": [1, 2, 4]}, {"batch": [5, 6, 8]}]}
    root = write_artifact(tmp_path / "artifact", {"topk": graph}, files=False)
    _topk_model(root / "topk.onnx", num_tokens, dim, k)
    built = trt_build.build_engines(root, library)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["engines"]["topk"]["file"] == "engines/topk.plan" and built["topk"].is_file()
    assert len(manifest["engines"]["topk"]["profiles"]) == 2

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(built["topk"].read_bytes())
    assert engine.num_optimization_profiles == 2
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    context.set_optimization_profile_async(1, stream.cuda_stream)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, num_tokens, dim, generator=generator)
    scores = torch.randint(0, 5, (6, num_tokens), generator=generator).float()  # many ties
    inputs = {"tokens": tokens.cuda(), "scores": scores.cuda()}
    outputs = {"selected": torch.empty(6, k, dim, device="cuda"),
               "indices": torch.empty(6, k, dtype=torch.int64, device="cuda")}
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
    for name, tensor in {**inputs, **outputs}.items():
        context.set_tensor_address(name, tensor.data_ptr())
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    want_selected, want_indices = token_ops.topk_token_select(tokens, scores, k)
    assert torch.equal(outputs["indices"].cpu(), want_indices)
    assert torch.equal(outputs["selected"].cpu(), want_selected)
