"""sparsevlm-build (export/trt_build.py): profile tables from the manifest, atomic manifest
updates and the CLI's errors run everywhere; the engine build and inference test needs the
full `tensorrt` package, a GPU and the built plugin library, and is skipped without them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsevlm.export import trt_build
from sparsevlm.export.trt_build import (InputShapes, LayerInfo, ManifestError, PluginNode, main,
                                        missing_plugin_layers, plan_engines, plan_graph, profile_table,
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


MODEL = {"source": "demo", "config_sha256": "0" * 64, "num_layers": 2, "hidden_size": 64, "intermediate_size": 128,
         "vocab_size": 100, "image_token_id": 99, "image_size": 32, "num_visual": 16, "pad_token_id": 0}


def write_artifact(root: Path, graphs: dict, files: bool = True) -> Path:
    """A manifest with every field the manifest reader requires, holding `graphs`."""
    root.mkdir(parents=True, exist_ok=True)
    if files:
        for graph in graphs.values():
            (root / graph["file"]).write_bytes(b"not parsed before TensorRT is imported")
    graphs = {name: {"output_names": {}, "profiles": [], **graph} for name, graph in graphs.items()}
    manifest = {"schema": "sparsevlm-artifact/1", "model": MODEL, "method": {"method": "sparsevlm"},
                "prune_layers": [], "dtype": "float32", "segments": [], "graphs": graphs, "files": {}}
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
    assert manifest["graphs"]["segment_1"] == dict(SEGMENT, output_names={})
    assert manifest["method"] == {"method": "sparsevlm"} and manifest["model"] == MODEL
    assert sorted(os.listdir(root)) == ["manifest.json", "segment_1.onnx"]  # no temporary left behind


def test_cli_dry_run_prints_profile_tables(tmp_path, capsys):
    root = write_artifact(tmp_path / "artifact", {"segment_1": SEGMENT}, files=False)
    assert main(["--artifact", str(root), "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"segment_1": profile_table(plan_graph("segment_1", SEGMENT))}
    assert main([str(root), "--dry-run"]) == 0  # the deprecated positional form still works
    assert json.loads(capsys.readouterr().out) == printed


def test_cli_wants_the_artifact_once(tmp_path, capsys):
    assert main(["--dry-run"]) == 2
    assert "required: --artifact" in capsys.readouterr().err
    assert main(["--artifact", str(tmp_path / "a"), str(tmp_path / "b"), "--dry-run"]) == 2
    assert "the artifact is given twice" in capsys.readouterr().err


def test_cli_reports_manifest_errors_in_one_line(tmp_path, capsys):
    broken = dict(SEGMENT, profiles=[{"batch": [1, 1, 8]}])
    root = write_artifact(tmp_path / "artifact", {"segment_1": broken})
    assert main(["--artifact", str(root), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sparsevlm-build: error: graph 'segment_1', profile 0") and error.count("\n") == 1
    assert main(["--artifact", str(tmp_path / "nowhere")]) == 2
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
    assert main(["--artifact", str(root)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sparsevlm-build: error: the full TensorRT Python package is not installed")
    assert error.count("\n") == 1
    assert "engines" not in json.loads((root / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# TensorRT version, plugin layers, parser flags and the manifest entry (fakes, no TensorRT)


@pytest.mark.parametrize("version,ok", [("10.6.0.26", False), ("9.3.0", False), ("10.7.0", True),
                                        ("10.10.0.31", True), ("11.4.0.106", True)])
def test_tensorrt_version_must_prefer_plugins_over_local_functions(version, ok):
    if ok:
        trt_build.check_tensorrt_version(version)
    else:
        with pytest.raises(trt_build.BuildError, match=rf"TensorRT {version} is too old: .* needs >= 10\.7"):
            trt_build.check_tensorrt_version(version)


def test_import_tensorrt_rejects_an_old_builder(monkeypatch):
    old = SimpleNamespace(__version__="10.6.0", Builder=object, OnnxParser=object)
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(trt_build.BuildError, match=r"TensorRT 10.6.0 is too old"):
        trt_build.import_tensorrt()


def _plugin(name, op, namespace="sparsevlm"):
    return LayerInfo(name, op, namespace)


def test_missing_plugin_layers_match_by_name_then_by_count():
    nodes = [PluginNode("n_topk", "TopKTokenSelect"), PluginNode("n_prune", "TokenPrune"),
             PluginNode("n_recycle", "TokenRecycle"), PluginNode("n_rank", "RankKeepCount")]
    layers = [LayerInfo("Gather_1"), _plugin("n_topk", "TopKTokenSelect"),
              _plugin("n_prune_1", "TokenPrune"),                      # renamed: matched by count
              LayerInfo("n_recycle/TopK"), LayerInfo("n_recycle/Gather"),  # the function body was imported
              _plugin("n_rank", "RankKeepCount", namespace="")]         # another namespace's plugin
    assert missing_plugin_layers(nodes, layers) == [nodes[2], nodes[3]]
    assert missing_plugin_layers(nodes[:2], layers) == []
    two = [PluginNode("a", "TokenPrune"), PluginNode("b", "TokenPrune")]
    assert missing_plugin_layers(two, [_plugin("x", "TokenPrune")]) == two  # which one is unknown: both named
    assert missing_plugin_layers(two, [_plugin("b", "TokenPrune")]) == [two[0]]
    assert missing_plugin_layers([], layers) == []


def test_check_plugin_layers_names_the_nodes():
    nodes = [PluginNode("n_topk", "TopKTokenSelect"), PluginNode("n_prune", "TokenPrune")]
    with pytest.raises(trt_build.BuildError) as info:
        trt_build.check_plugin_layers("segment_1", nodes, [_plugin("n_topk", "TopKTokenSelect")])
    message = str(info.value)
    assert message.startswith("graph 'segment_1': 1 of 2 `sparsevlm` node(s) did not become TensorRT plugin layers "
                              "in namespace 'sparsevlm' (TokenPrune 'n_prune')")


def test_plugin_nodes_are_the_sparsevlm_domain_nodes(tmp_path):
    import onnx
    _topk_model(tmp_path / "topk.onnx", 10, 4, 3)
    model = onnx.load(str(tmp_path / "topk.onnx"))
    model.graph.node[0].name = "select"
    model.graph.node.append(onnx.helper.make_node("Identity", ["selected"], ["copy"], name="copy"))
    assert trt_build.plugin_nodes(model) == [PluginNode("select", "TopKTokenSelect")]


class _FakeLayer:
    def __init__(self, name, type_, plugin=None):
        self.name, self.type, self._plugin = name, type_, plugin


def _fake_builder_trt(version="11.4.0"):
    """What build_engines and describe_layers use of the `tensorrt` module."""
    class IPluginV3Layer(_FakeLayer):
        plugin = property(lambda self: SimpleNamespace(
            get_capability_interface=lambda kind: SimpleNamespace(plugin_name=self._plugin[0],
                                                                  plugin_namespace=self._plugin[1])))

    registry = SimpleNamespace(load_library=lambda path: object(), get_creator=lambda *args: object())
    return SimpleNamespace(__version__=version, Builder=object, OnnxParser=object,
                           LayerType=SimpleNamespace(PLUGIN_V3="PLUGIN_V3", GATHER="GATHER"),
                           IPluginV3Layer=IPluginV3Layer, PluginCapabilityType=SimpleNamespace(CORE="CORE"),
                           MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
                           get_plugin_registry=lambda: registry)


def test_describe_layers_reads_plugin_name_and_namespace():
    trt = _fake_builder_trt()
    layers = [_FakeLayer("gather", "GATHER"), _FakeLayer("select", "PLUGIN_V3", ("TopKTokenSelect", "sparsevlm"))]
    network = SimpleNamespace(num_layers=2, get_layer=layers.__getitem__)
    assert trt_build.describe_layers(trt, network) == [LayerInfo("gather"),
                                                        LayerInfo("select", "TopKTokenSelect", "sparsevlm")]


@pytest.fixture
def fake_builder(monkeypatch, tmp_path):
    """build_engines with a fake TensorRT and fake polygraphy loaders: records the parser
    arguments and the builder config; the parsed network's layers are `state.layers`."""
    import polygraphy.backend.trt as polygraphy_trt

    state = SimpleNamespace(parser_kwargs=[], configs=[], layers=[])
    trt = _fake_builder_trt()
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: trt)

    def network_from_onnx_path(path, **kwargs):
        state.parser_kwargs.append(kwargs)
        network = SimpleNamespace(num_layers=len(state.layers), get_layer=state.layers.__getitem__)
        return lambda: ("builder", network, "parser")

    def postprocess_config(config, function):
        cfg = SimpleNamespace()
        function("builder", "network", cfg)
        config["postprocessed"] = vars(cfg)
        return config

    def create_config(**kwargs):
        state.configs.append(kwargs)
        return kwargs

    monkeypatch.setattr(polygraphy_trt, "NetworkFromOnnxPath", network_from_onnx_path)
    monkeypatch.setattr(polygraphy_trt, "CreateConfig", create_config)
    monkeypatch.setattr(polygraphy_trt, "PostprocessConfig", postprocess_config)
    monkeypatch.setattr(polygraphy_trt, "EngineBytesFromNetwork", lambda network, config, **kw: lambda: b"plan")
    library = tmp_path / "libsparsevlm_plugins.so"
    library.write_bytes(b"")
    state.library = library
    return state


def _topk_artifact(root: Path) -> Path:
    graph = {"file": "topk.onnx", "inputs": [{"name": "tokens", "dtype": "float32", "shape": ["batch", 10, 4]},
                                             {"name": "scores", "dtype": "float32", "shape": ["batch", 10]}],
             "outputs": [], "profiles": [{"batch": [1, 2, 4]}]}
    root = write_artifact(root, {"topk": graph}, files=False)
    _topk_model(root / "topk.onnx", 10, 4, 3)
    return root


def test_build_keeps_default_parser_flags_and_records_the_lean_runtime(fake_builder, tmp_path):
    root = _topk_artifact(tmp_path / "artifact")
    fake_builder.layers = [_FakeLayer("", "PLUGIN_V3", ("TopKTokenSelect", "sparsevlm"))]
    trt_build.build_engines(root, fake_builder.library, version_compatible=True, log=lambda *a: None)
    # No parser flags: setting any replaces all of them, clearing NATIVE_INSTANCENORM.
    assert fake_builder.parser_kwargs == [{"strongly_typed": True}]
    entry = json.loads((root / "manifest.json").read_text())["engines"]["topk"]
    assert (entry["version_compatible"], entry["exclude_lean_runtime"], entry["embeds_lean_runtime"]) == (
        True, False, True)
    assert (root / "engines" / "topk.plan").read_bytes() == b"plan"

    trt_build.build_engines(root, fake_builder.library, version_compatible=True, exclude_lean_runtime=True,
                            log=lambda *a: None)
    entry = json.loads((root / "manifest.json").read_text())["engines"]["topk"]
    assert (entry["version_compatible"], entry["exclude_lean_runtime"], entry["embeds_lean_runtime"]) == (
        True, True, False)
    trt_build.build_engines(root, fake_builder.library, log=lambda *a: None)
    assert json.loads((root / "manifest.json").read_text())["engines"]["topk"]["embeds_lean_runtime"] is False


def test_build_stops_when_a_node_became_its_function_body(fake_builder, tmp_path):
    root = _topk_artifact(tmp_path / "artifact")
    fake_builder.layers = [_FakeLayer("node_TopK", "TOPK"), _FakeLayer("node_Gather", "GATHER")]
    with pytest.raises(trt_build.BuildError, match=r"graph 'topk': 1 of 1 `sparsevlm` node\(s\) did not become "
                                                  r"TensorRT plugin layers .*\(TopKTokenSelect ''\)"):
        trt_build.build_engines(root, fake_builder.library, log=lambda *a: None)
    assert "engines" not in json.loads((root / "manifest.json").read_text())
    assert not (root / "engines" / "topk.plan").exists()


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
