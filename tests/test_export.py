"""`sparsevlm-export` on the demo checkpoint.

- ONNX Runtime on the exported graphs reproduces the PyTorch method (SparseLlava on the same
  checkpoint and inputs): same kept positions per pruning layer, logits within 1e-4, same
  greedy tokens for 16 steps, at batch 1 and batch 3 (different prompt lengths).
- The graphs hold real `sparsevlm` custom-op nodes, pass the full ONNX checker and run under
  `polygraphy run --onnxrt`.
- Exports are deterministic, atomic (a killed export leaves nothing that loads) and bad input
  is a one-line error with exit code 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from export_helpers import (EXTRA_BUDGETS, PRIMARY, PROMPTS, artifact_root, artifacts,  # noqa: F401
                            assert_same_decisions, inputs_images, method_config, pipelines, runs)
from sparsevlm.export import main
from sparsevlm.export.manifest import MANIFEST, ArtifactError, read_manifest

STEPS = 16
VENV_BIN = Path(sys.executable).parent

# The custom ops each method must put into its graphs: {graph: ops}.
EXPECTED_OPS = {
    "sparsevlm_v15_b192": {"segment_1": {"TokenPrune", "TokenRecycle"}, "segment_2": {"TokenPrune", "TokenRecycle"},
                           "segment_3": {"TokenPrune", "TokenRecycle"}},
    "sparsevlm_v10_b192": {f"segment_{i}": {"TokenPrune", "TokenRecycle"} for i in range(1, 5)},
    "fastv_R0.5": {"segment_1": {"TopKTokenSelect"}},
    "fastervlm_b64": {"vision": {"TopKTokenSelect"}},
}


def _graphs(path: Path) -> dict:
    manifest = read_manifest(path)
    return {name: path / g["file"] for name, g in manifest["graphs"].items()}


# ------------------------------------------------------------------------------------------
# Parity with the PyTorch method
# ------------------------------------------------------------------------------------------

PARITY_CASES = [(name, batch) for name in PRIMARY for batch in (1, 3)] + [(name, 3) for name in EXTRA_BUDGETS]


@pytest.mark.parametrize("name,batch", PARITY_CASES)
def test_onnxruntime_matches_pytorch_reference(name, batch, runs):
    """ONNX Runtime on the exported graphs vs the PyTorch method (the `torch` backend: the same
    TorchExecutor SparseLlava runs, on the checkpoint the manifest names), 16 greedy steps.
    The v1.5 budgets 128/64 run at batch 3 only (batch 1 is covered by the budget-192 cases)."""
    ref = runs(name, "torch", batch)
    ort = runs(name, "onnxruntime", batch)
    assert len(ort.trace["layers"]) == len(ref.trace["layers"]) >= 1
    assert_same_decisions(ort.trace, ref.trace, steps=STEPS)
    assert [row[:STEPS] for row in ort.token_ids] == [row[:STEPS] for row in ref.token_ids]
    for layer in ort.trace["layers"]:  # pruning really happened
        assert all(0 < count < 576 for count in layer["keep_count"])


def test_onnxruntime_matches_sparsellava_directly(runs, make_vlm, inputs_images):
    """The rank rule at batch 3 against `SparseLlava` itself (not through the runtime)."""
    from sparsevlm.methods.model import prepare_inputs
    name = "sparsevlm_v10_b192"
    vlm = make_vlm(method_config(name))
    enc = prepare_inputs(vlm.processor, inputs_images, PROMPTS)
    ref = vlm.generate(enc["input_ids"], enc["pixel_values"], max_new_tokens=STEPS)
    ort = runs(name, "onnxruntime", 3)
    assert_same_decisions(ort.trace, ref.trace, steps=STEPS)
    assert [row[:STEPS] for row in ort.token_ids] == ref.sequences.tolist()
    assert all(r is not None for layer in ort.trace["layers"] for r in layer["rank"])


def test_batch_prompts_have_different_lengths(pipelines, artifacts, inputs_images):
    from sparsevlm.methods.model import prepare_inputs
    pipe = pipelines(artifacts("fastervlm_b64"), "onnxruntime")
    ids = prepare_inputs(pipe.processor, inputs_images, PROMPTS)["input_ids"]
    assert len({len(row) for row in ids}) == 3


# ------------------------------------------------------------------------------------------
# Graph structure: custom ops, checker, polygraphy
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRIMARY)
def test_custom_op_nodes_and_checker(name, artifacts):
    path = artifacts(name)
    manifest = read_manifest(path)
    assert manifest["ops"]["domain"] == "sparsevlm"
    for graph_name, file in _graphs(path).items():
        onnx.checker.check_model(str(file), full_check=True)
        model = onnx.load(str(file))
        assert model.ir_version == 10
        imports = {o.domain: o.version for o in model.opset_import}
        nodes = [n for n in model.graph.node if n.domain == "sparsevlm"]
        ops = {n.op_type for n in nodes}
        assert ops == EXPECTED_OPS[name].get(graph_name, set()), graph_name
        assert sorted(ops) == sorted(manifest["graphs"][graph_name]["custom_ops"])
        if nodes:
            assert imports.get("sparsevlm") == 1
        functions = {(f.domain, f.name) for f in model.functions}
        for node in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.get("plugin_namespace") == b"sparsevlm", node.name
            assert attrs.get("plugin_version") == b"1", node.name
            assert ("sparsevlm", node.op_type) in functions  # the ONNX Runtime fallback body
        _assert_int32_mask_boundary(model, nodes)


@pytest.mark.parametrize("name", PRIMARY)
def test_graph_names_and_axes_are_the_declared_ones(name, artifacts, hf_model):
    """Every graph's inputs and outputs carry the names and named dynamic axes of its module's
    `graph_signature`, and the runtime reads the outputs back by that rule alone (the manifest
    holds no rename map)."""
    from sparsevlm.methods.segments import (DecodeStep, PrefillSegment, VisionEncoder, graph_signature,
                                            method_output_name, plan_segments)
    from sparsevlm.runtime.artifact import Artifact

    artifact = Artifact.load(artifacts(name))
    specs = plan_segments(artifact.plan)
    modules = {"vision": VisionEncoder(hf_model, artifact.plan), "decode": DecodeStep(hf_model, specs)}
    modules.update({f"segment_{s.index}": PrefillSegment(hf_model, artifact.plan, s) for s in specs})
    assert set(modules) == set(artifact.manifest["graphs"])
    for graph_name, module in modules.items():
        assert "output_names" not in artifact.manifest["graphs"][graph_name]
        signature = graph_signature(module)
        graph = onnx.load(str(artifact.graph_path(graph_name)), load_external_data=False).graph
        # The tracer drops an input the graph does not use (the last segment's `rater_mask`).
        inputs = [v.name for v in graph.input]
        assert inputs == [n for n in signature.inputs if n in inputs] and len(inputs) >= len(signature.inputs) - 1
        assert [v.name for v in graph.output] == list(signature.outputs), graph_name
        for values, declared in ((graph.input, signature.inputs), (graph.output, signature.outputs)):
            for value in values:
                dims = value.type.tensor_type.shape.dim
                named = {axis: d.dim_param for axis, d in enumerate(dims) if d.dim_param}
                if values is graph.input:  # exactly the declared axes are dynamic
                    assert named == declared[value.name], (graph_name, value.name)
                else:  # the tracer names an output's other computed sizes itself (`Addvisual_dim_1`)
                    assert {axis: named.get(axis) for axis in declared[value.name]} == declared[value.name], \
                        (graph_name, value.name)
        assert [method_output_name(v.name) for v in graph.output] == module.output_names, graph_name
    # By hand: a SparseVLM pruning segment passes its state on under the `_out` names.
    if name == "sparsevlm_v15_b192":
        outputs = [v.name for v in onnx.load(str(artifact.graph_path("segment_1")), load_external_data=False).graph.output]
        assert outputs[:4] == ["kept_source", "hidden_out", "visual_valid_out", "scores_out"]


def test_an_artifact_with_the_old_output_name_map_still_runs(artifacts, pipelines, inputs_images, tmp_path):
    """Artifacts written before the names were declared in one place carry a per-graph
    `output_names` map (graph output -> tensor); readers ignore it and run them unchanged."""
    import json
    import shutil
    from sparsevlm.runtime import Pipeline

    source = artifacts("sparsevlm_v15_b192")
    old = tmp_path / "old"
    shutil.copytree(source, old)
    manifest = json.loads((old / MANIFEST).read_text())
    for graph in manifest["graphs"].values():  # the old exporter's map: `<input>_out` -> `<input>`
        inputs = {i["name"] for i in graph["inputs"]}
        graph["output_names"] = {o["name"]: o["name"][:-4] if o["name"][:-4] in inputs else o["name"]
                                 for o in graph["outputs"]}
    assert manifest["graphs"]["segment_1"]["output_names"]["hidden_out"] == "hidden"
    (old / MANIFEST).write_text(json.dumps(manifest))
    images, prompts = inputs_images[:2], PROMPTS[:2]
    got = Pipeline.load(old, threads=2).generate(images, prompts, max_new_tokens=3)
    want = pipelines(source, "onnxruntime").generate(images, prompts, max_new_tokens=3)
    assert got.token_ids == want.token_ids and got.trace["layers"] == want.trace["layers"]


# Mask positions (inputs, outputs) per op, from OPS.md: masks cross the node boundary as int32
# (TensorRT plugins take no bool), cast from bool before the node and back to bool after it.
MASKS = {"TokenPrune": ({2, 5}, {1}), "TokenRecycle": ({2}, {1}), "TopKTokenSelect": (set(), set())}


def _assert_int32_mask_boundary(model, nodes):
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    cast_to = lambda n: n is not None and n.op_type == "Cast" and onnx.helper.get_attribute_value(n.attribute[0])
    for node in nodes:
        mask_inputs, mask_outputs = MASKS[node.op_type]
        for i in mask_inputs:
            assert cast_to(producer.get(node.input[i])) == onnx.TensorProto.INT32, (node.name, i)
        for i in mask_outputs:
            users = consumers.get(node.output[i], [])
            assert users and all(cast_to(u) == onnx.TensorProto.BOOL for u in users), (node.name, i)
    # The graph's own masks stay bool.
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name.endswith(("valid", "valid_out")) or value.name.startswith("key_valid"):
            assert value.type.tensor_type.elem_type == onnx.TensorProto.BOOL, value.name


def _polygraphy(*args, timeout=240):
    exe = VENV_BIN / "polygraphy"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "polygraphy"]
    result = subprocess.run(cmd + ["run", *map(str, args), "--onnxrt"], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASSED" in result.stdout + result.stderr
    return result


def test_polygraphy_runs_vision_graph(artifacts):
    """FasterVLM's vision graph holds TopKTokenSelect: polygraphy's own random inputs."""
    vision = artifacts("fastervlm_b64") / "vision.onnx"
    _polygraphy(vision, "--input-shapes", "pixel_values:[1,3,336,336]")


def test_polygraphy_runs_pruning_segment(artifacts, demo_dir, tmp_path):
    """A SparseVLM pruning segment (TokenPrune + TokenRecycle), fed the inputs the method
    really produced (random bools/ints would break TokenPrune's preconditions)."""
    from sparsevlm.export.exporter import _example_run
    from sparsevlm.methods import modeling
    from sparsevlm.methods.config import resolve
    from sparsevlm.methods.loading import load_model
    from sparsevlm.methods.spec import ModelSpec
    model, _ = load_model(str(demo_dir))
    plan = resolve(method_config("sparsevlm_v15_b192"), model.config.text_config.num_hidden_layers,
                   modeling.num_visual_tokens(model))
    recorded = _example_run(model, plan, ModelSpec.from_hf_config(model.config))["segment_1"]
    graph = artifacts("sparsevlm_v15_b192") / "segment_1.onnx"
    names = [i.name for i in onnx.load(str(graph), load_external_data=False).graph.input]
    assert set(names) <= set(recorded)
    data = tmp_path / "inputs.npz"
    np.savez(data, **{n: recorded[n].numpy() for n in names})
    script = tmp_path / "loader.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        def load_data():
            with np.load({str(data)!r}) as f:
                yield {{k: f[k] for k in f.files}}
    """))
    _polygraphy(graph, "--data-loader-script", f"{script}:load_data")


# ------------------------------------------------------------------------------------------
# Determinism and atomic output
# ------------------------------------------------------------------------------------------

def _export_cmd(demo_dir, out):
    return [sys.executable, "-m", "sparsevlm.export.exporter", "--model", str(demo_dir), "--method", "fastervlm",
            "--budget", "64", "--out", str(out), "--quiet"]


def test_killed_export_leaves_nothing_valid_rerun_succeeds_and_is_deterministic(demo_dir, tmp_path, artifacts):
    """SIGKILL mid-export -> nothing that loads; the re-run (CLI) succeeds and its graphs are
    byte-identical to the session's API export of the same configuration (export twice ->
    same graphs)."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(_export_cmd(demo_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        written = []  # kill once the first graph is on disk: midway, with files in place
        while time.monotonic() < deadline and proc.poll() is None and not written:
            written = list(tmp_path.glob(".killed.partial-*/*.onnx"))
            time.sleep(0.01)
        assert written, f"no graph was written (exit {proc.poll()}): {proc.stderr.read()[-2000:]}"
        assert proc.poll() is None, "export finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists()
    with pytest.raises(ArtifactError):
        read_manifest(out)
    for leftover in tmp_path.glob(".killed.partial-*"):  # the temporary directory is never an artifact
        assert not (leftover / MANIFEST).exists()
        with pytest.raises(ArtifactError):
            read_manifest(leftover)
    # re-running succeeds and gives a valid artifact
    assert main(_export_cmd(demo_dir, out)[3:]) == 0
    manifest = read_manifest(out)
    assert manifest["method"]["method"] == "fastervlm" and manifest["method"]["budget"] == 64
    first = artifacts("fastervlm_b64")
    graphs_a, graphs_b = _graphs(first), _graphs(out)
    assert graphs_a.keys() == graphs_b.keys() == {"vision", "segment_0", "decode"}
    for name in graphs_a:
        assert graphs_a[name].read_bytes() == graphs_b[name].read_bytes(), name
    assert read_manifest(first)["files"] == manifest["files"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _bad(capsys, argv, *needles):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    err = captured.err.strip()
    assert len(err.replace("\r", "\n").splitlines()) == 1, err  # with --quiet: no progress bars either
    assert err.startswith("sparsevlm-export: error:")
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_unknown_alias(capsys, tmp_path):
    _bad(capsys, ["--model", "llava-9.9-1b", "--out", str(tmp_path / "o"), "--quiet"], "unknown alias", "'llava-9.9-1b'")
    assert not (tmp_path / "o").exists()


def test_bad_missing_local_path(capsys, tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    _bad(capsys, ["--model", str(missing), "--out", str(tmp_path / "o"), "--quiet"], str(missing), "does not exist")
    assert not (tmp_path / "o").exists()


def test_bad_budget_larger_than_visual_tokens(capsys, demo_dir, tmp_path):
    _bad(capsys, ["--model", str(demo_dir), "--method", "fastervlm", "--budget", "1000",
                  "--out", str(tmp_path / "o"), "--quiet"], "budget", "1000", "576")
    assert not (tmp_path / "o").exists()


def test_bad_unsupported_architecture(capsys, llama_dir, tmp_path):
    _bad(capsys, ["--model", str(llama_dir), "--out", str(tmp_path / "o"), "--quiet"], "llama", "LLaVA")
    assert not (tmp_path / "o").exists()
