"""`sparsevlm-triton` repositories validated offline (no server): every config.pbtxt parses into
Triton's ModelConfig (tritonclient's model_config_pb2), names match folders, versions exist,
TensorRT models list every optimization profile, the BLS orchestrator's references resolve.
The TensorRT flavour is written from a real export's manifest; engines cannot be built here,
so a synthetic manifest with several profiles and placeholder plan files covers that case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export_helpers import artifact_root, artifacts  # noqa: F401

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install "
                    "'tritonclient[http,grpc]'); it ships Triton's model_config_pb2")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from sparsevlm.runtime.triton import RepoError, cli, repository  # noqa: E402
from sparsevlm.runtime.triton.config_text import NAME_TO_TRITON  # noqa: E402
from sparsevlm.runtime.triton.repository import write_repository  # noqa: E402
from sparsevlm.runtime.triton.validation import validate_repository  # noqa: E402

ARTIFACT = "sparsevlm_v15_b192"


def parse(path: Path) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


@pytest.fixture(scope="module")
def artifact(artifacts):  # noqa: F811
    return artifacts(ARTIFACT)


@pytest.fixture(scope="module")
def manifest(artifact):
    return json.loads((artifact / "manifest.json").read_text())


def test_python_flavour_configs(artifact, tmp_path):
    info = write_repository(artifact, tmp_path / "repo", instances=3, max_batch=4, queue_delay_us=1234)
    assert validate_repository(info.path) == []
    main, stream = parse(info.path / "sparsevlm" / "config.pbtxt"), parse(info.path / "sparsevlm_stream" / "config.pbtxt")
    for config in (main, stream):
        assert config.backend == "python" and config.max_batch_size == 4
        assert config.instance_group[0].count == 3 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert config.dynamic_batching.max_queue_delay_microseconds == 1234
        assert [(i.name, model_config_pb2.DataType.Name(i.data_type), i.optional) for i in config.input] == [
            ("image", "TYPE_STRING", False), ("prompt", "TYPE_STRING", False), ("max_new_tokens", "TYPE_INT32", True),
            ("temperature", "TYPE_FP32", True), ("top_p", "TYPE_FP32", True), ("seed", "TYPE_INT64", True)]
        assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
            ("text", "TYPE_STRING", [1]), ("token_ids", "TYPE_INT64", [-1]), ("kept_per_layer", "TYPE_INT64", [-1])]
        assert config.parameters["artifact"].string_value == str(artifact.resolve())
        site_dirs = config.parameters["sparsevlm_site_dirs"].string_value.split(":")
        assert site_dirs and all(Path(d).is_dir() for d in site_dirs)
    assert not main.model_transaction_policy.decoupled and stream.model_transaction_policy.decoupled
    assert (info.path / "sparsevlm" / "1" / "model.py").read_text() == \
        repository.MODEL_SHIM.read_text()
    assert "tritonserver --model-repository=" in " ".join(info.start_command)


def test_copied_artifact_is_referenced_relatively(artifact, tmp_path):
    info = write_repository(artifact, tmp_path / "repo", copy_artifact=True, streaming=False)
    assert info.models == ["sparsevlm"]
    config = parse(info.path / "sparsevlm" / "config.pbtxt")
    assert config.parameters["artifact"].string_value == "artifact"
    assert (info.path / "artifact" / "manifest.json").exists()
    assert validate_repository(info.path) == []
    moved = shutil.move(str(info.path), str(tmp_path / "moved"))  # self-contained: still valid elsewhere
    assert validate_repository(moved) == []


def test_tensorrt_flavour_from_the_manifest(artifact, manifest, tmp_path):
    info = write_repository(artifact, tmp_path / "repo", flavour="tensorrt", instances=2, max_batch=8,
                            plugin_library="/opt/sparsevlm/libsparsevlm_plugins_static.so")
    graphs = manifest["graphs"]
    assert sorted(info.models) == sorted(["sparsevlm"] + [f"sparsevlm_{g}" for g in graphs])
    assert validate_repository(info.path) == []
    for graph, entry in graphs.items():
        folder = info.path / f"sparsevlm_{graph}"
        config = parse(folder / "config.pbtxt")
        assert config.name == folder.name and config.platform == "tensorrt_plan" and config.max_batch_size == 0
        assert (folder / "1").is_dir()
        assert [i.name for i in config.input] == [i["name"] for i in entry["inputs"]]
        assert [o.name for o in config.output] == [o["name"] for o in entry["outputs"]]
        for tensor, spec in zip(list(config.input) + list(config.output), entry["inputs"] + entry["outputs"]):
            assert len(tensor.dims) == len(spec["shape"])
            assert model_config_pb2.DataType.Name(tensor.data_type) == NAME_TO_TRITON[spec["dtype"]]
        (group,) = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.count == 2
        assert list(group.profile) == [str(i) for i in range(len(entry["profiles"]))]
        assert config.parameters["execution_context_allocation_strategy"].string_value == "STATIC"
    bls = parse(info.path / "sparsevlm" / "config.pbtxt")
    assert bls.backend == "python" and bls.parameters["backend"].string_value == "triton-bls"
    assert json.loads(bls.parameters["graph_models"].string_value) == {g: f"sparsevlm_{g}" for g in graphs}
    # No engines in this artifact: said clearly, and a strict validation reports each missing plan.
    assert len(info.notes) == len(graphs) and all("model.plan is missing" in n for n in info.notes)
    strict = validate_repository(info.path, require_plans=True)
    assert sorted(strict) == sorted(f"sparsevlm_{g}/1: no model.plan" for g in graphs)
    assert "--backend-config=tensorrt,plugins=/opt/sparsevlm/libsparsevlm_plugins_static.so" in info.start_command
    assert "plugins=$PLUGINS" in (info.path / "start_server.sh").read_text()


def test_tensorrt_flavour_synthetic_engines_with_several_profiles(manifest, tmp_path):
    """A manifest as sparsevlm-build leaves it: rank-style buckets (3 profiles per pruning
    segment) and an `engines` table. Plans are placeholders (no TensorRT builder here)."""
    art = tmp_path / "art"
    (art / "engines").mkdir(parents=True)
    synthetic = json.loads(json.dumps(manifest))
    synthetic["files"] = {}
    synthetic["engines"] = {}
    for graph, entry in synthetic["graphs"].items():
        if "visual_width" in entry["profiles"][0]:
            base = entry["profiles"][0]
            entry["profiles"] = [dict(base, visual_width=b) for b in ([1, 50, 100], [101, 150, 200], [201, 300, 400])]
        (art / "engines" / f"{graph}.plan").write_bytes(b"placeholder")
        synthetic["engines"][graph] = {"file": f"engines/{graph}.plan"}
    (art / "manifest.json").write_text(json.dumps(synthetic))
    info = write_repository(art, tmp_path / "repo", flavour="tensorrt")
    assert info.notes == []
    assert validate_repository(info.path, require_plans=True) == []
    for graph, entry in synthetic["graphs"].items():
        folder = info.path / f"sparsevlm_{graph}"
        assert (folder / "1" / "model.plan").resolve() == (art / "engines" / f"{graph}.plan").resolve()
        (group,) = parse(folder / "config.pbtxt").instance_group
        assert list(group.profile) == [str(i) for i in range(len(entry["profiles"]))]
    segmented = [g for g, e in synthetic["graphs"].items() if "visual_width" in e["profiles"][0]]
    assert segmented and all(list(parse(info.path / f"sparsevlm_{g}" / "config.pbtxt").instance_group[0].profile)
                             == ["0", "1", "2"] for g in segmented)


def test_validation_pinpoints_broken_repositories(artifact, tmp_path):
    info = write_repository(artifact, tmp_path / "repo", flavour="tensorrt")
    root = info.path
    segment = root / "sparsevlm_segment_1" / "config.pbtxt"
    segment.write_text(segment.read_text().replace("TYPE_FP32", "TYPE_FLOAT32", 1))
    shutil.rmtree(root / "sparsevlm_decode" / "1")
    vision = root / "sparsevlm_vision" / "config.pbtxt"
    vision.write_text(vision.read_text().replace('name: "sparsevlm_vision"', 'name: "vision"'))
    seg0 = root / "sparsevlm_segment_0" / "config.pbtxt"
    seg0.write_text(seg0.read_text().replace('profile: [ "0" ]', "profile: [ ]"))
    problems = validate_repository(root)
    text = "\n".join(problems)
    assert "sparsevlm_segment_1/config.pbtxt:" in text and "TYPE_FLOAT32" in text
    assert "sparsevlm_decode: no version folder" in text
    assert "sparsevlm_vision/config.pbtxt: name 'vision' does not match its folder" in text
    assert "sparsevlm_segment_0: instance group lists no profile" in text
    # The orchestrator refers to segment_1, whose config no longer parses: the reference is unresolved.
    assert "BLS graph 'segment_1' refers to model 'sparsevlm_segment_1', which is not in the repository" in text


def test_cli_writes_validates_and_prints_how_to_start(artifact, tmp_path, capsys):
    out = tmp_path / "repo"
    assert cli.main(["--artifact", str(artifact), "--out", str(out), "--instances", "2", "--max-batch", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"tritonserver --model-repository={out}" in printed
    assert f"python -m sparsevlm.runtime.triton serve {out}" in printed
    assert parse(out / "sparsevlm" / "config.pbtxt").instance_group[0].count == 2
    assert cli.main(["--validate", str(out)]) == 0 and capsys.readouterr().out.strip() == "valid"
    assert cli.main(["validate", str(out)]) == 0 and capsys.readouterr().out.strip() == "valid"
    assert cli.main(["--artifact", str(artifact), "--out", str(out)]) == 2  # not empty, no --overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(["--artifact", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2  # user errors
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(RepoError, match="flavour"):
        write_repository(artifact, tmp_path / "r3", flavour="onnx")


def test_a_tensor_type_triton_cannot_serve_is_refused(manifest, tmp_path):
    """A manifest tensor type outside the Triton table is refused naming the graph and tensor
    (it used to be written as TYPE_FP32)."""
    art = tmp_path / "art"
    art.mkdir()
    synthetic = json.loads(json.dumps(manifest))
    synthetic["files"] = {}
    synthetic["graphs"]["decode"]["inputs"][0]["dtype"] = "complex64"
    (art / "manifest.json").write_text(json.dumps(synthetic))
    tensor = synthetic["graphs"]["decode"]["inputs"][0]["name"]
    with pytest.raises(RepoError, match=f"graph 'decode' tensor\\(s\\) \\['{tensor}'\\]"):
        write_repository(art, tmp_path / "repo", flavour="tensorrt")
    assert not (tmp_path / "repo").exists()


def test_validation_reports_an_artifact_that_does_not_load(artifact, tmp_path):
    info = write_repository(artifact, tmp_path / "repo", copy_artifact=True, streaming=False)
    (info.path / "artifact" / "manifest.json").write_text("{")
    problems = validate_repository(info.path)
    assert len(problems) == 1 and problems[0].startswith("sparsevlm: artifact:") and "not valid JSON" in problems[0]


def test_model_py_is_a_shim_that_loads_the_serving_model(artifact, manifest, tmp_path, monkeypatch):
    """Each Python model's model.py adds `sparsevlm_site_dirs` to the path and hands its calls
    to the class `serving_model` names: here the onnxruntime graph model, initialized as the
    stub would (its Triton module faked: initialize does not use it)."""
    import importlib.util
    import sys
    import types

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    info = write_repository(artifact, tmp_path / "repo", flavour="tensorrt", graph_backend="onnxruntime",
                            site_dirs=[str(site_dir)])
    model_dir = info.path / "sparsevlm_vision"
    config = parse(model_dir / "config.pbtxt")
    assert config.parameters["serving_model"].string_value == repository.GRAPH_MODEL
    assert parse(info.path / "sparsevlm" / "config.pbtxt").parameters["serving_model"].string_value == \
        repository.GENERATE_MODEL
    spec = importlib.util.spec_from_file_location("model", model_dir / "1" / "model.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    from google.protobuf import json_format

    args = {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(model_dir), "model_name": "sparsevlm_vision"}
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    loaded = [name for name in sys.modules if name.startswith("sparsevlm.runtime.triton.")]
    try:
        model = shim.TritonPythonModel()
        model.initialize(args)
        assert str(site_dir) in sys.path
        assert type(model.model).__name__ == "GraphModel"
        assert model.model.inputs == [i["name"] for i in manifest["graphs"]["vision"]["inputs"]]
        assert model.model.outputs == [o["name"] for o in manifest["graphs"]["vision"]["outputs"]]
    finally:  # the serving modules were imported against the fake Triton module: forget them
        for name in [n for n in sys.modules if n.startswith("sparsevlm.runtime.triton.") and n not in loaded]:
            del sys.modules[name]
