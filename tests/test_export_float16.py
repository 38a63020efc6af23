"""float16 artifacts on ONNX Runtime, the int32 mask boundary of the op bodies, and the
dtype the exporter refuses.

- Every method exported with `--dtype float16` on the demo checkpoint loads and generates
  with ONNX Runtime. (The op bodies were typed float32 in every graph: a graph traced
  without its weights has no initializers to read the dtype from, so TokenRecycle's body
  ended in a float32 cast where the node is float16 and no SparseVLM float16 artifact loaded.)
- SparseVLM / FastV / FasterVLM float16 artifacts keep as many tokens per pruning layer as
  the float32 artifacts. Which tokens may differ: float16 attention scores break near-ties
  differently (the demo model's random weights give near-uniform scores), so the kept
  indices are counted and printed, not asserted. Without pruning, the float16 logits stay
  close to the float32 method's.
- Each op body, run alone in ONNX Runtime with int32 0/1 masks and float32 or float16
  data, equals the PyTorch reference (bool masks) on rows with invalid slots.
- bfloat16 is not offered: ONNX Runtime's CPU provider has no bfloat16 kernel for MatMul,
  Add, Softmax, ... and opset-17 Conv does not accept it (the export died in the checker).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export_helpers import METHODS, PROMPTS, artifact_root, artifacts, make_images, pipelines  # noqa: F401
from sparsevlm.export import export, main
from sparsevlm.export.manifest import read_manifest
from sparsevlm.methods import SparseVLMConfig, token_ops

BATCH, NEW_TOKENS = 2, 4
# Every method; the pruning ones as the float32 parity tests export them (so their float32
# artifacts come from export_helpers' cache).
FLOAT16_METHODS = {"none": dict(method="none", budgets=None)} | {
    name: METHODS[name] for name in ("sparsevlm_v15_b192", "sparsevlm_v10_b192", "fastv_R0.5", "fastervlm_b64")}
NONE_LOGITS_ATOL = 0.25  # float16 vs float32 without pruning: measured 0.05 on logits of magnitude ~3

_FLOAT16_ARTIFACTS: dict = {}
_RUNS: dict = {}


@pytest.fixture(scope="module")
def images():
    return make_images(BATCH)


@pytest.fixture(scope="module")
def float16_artifact(demo_dir, artifact_root):  # noqa: F811
    def get(name: str):
        if name not in _FLOAT16_ARTIFACTS:
            out = artifact_root / f"{name}_float16"
            export(str(demo_dir), out, dtype="float16", progress=False, **FLOAT16_METHODS[name])
            _FLOAT16_ARTIFACTS[name] = out
        return _FLOAT16_ARTIFACTS[name]
    return get


def _generate(pipelines, path, images):  # noqa: F811
    key = str(path)
    if key not in _RUNS:
        _RUNS[key] = pipelines(path, "onnxruntime").generate(images, PROMPTS[:BATCH], max_new_tokens=NEW_TOKENS,
                                                             temperature=0.0, stop_token_ids=())
    return _RUNS[key]


def _kept_index_differences(trace_a: dict, trace_b: dict) -> list[int]:
    """Per pruning layer: kept indices in one trace and not in the other, summed over rows."""
    return [sum(len(set(a) - set(b)) for a, b in zip(la["kept_indices"], lb["kept_indices"]))
            for la, lb in zip(trace_a["layers"], trace_b["layers"])]


@pytest.mark.parametrize("name", list(FLOAT16_METHODS))
def test_float16_artifact_runs_on_onnxruntime(name, float16_artifact, artifacts, pipelines, images, make_vlm):  # noqa: F811
    path = float16_artifact(name)
    manifest = read_manifest(path)
    assert manifest["dtype"] == "float16"
    visual = {o["name"]: o["dtype"] for o in manifest["graphs"]["vision"]["outputs"]}["visual"]
    assert visual == "float16"  # the graphs really compute in float16

    run = _generate(pipelines, path, images)
    assert [len(row) for row in run.token_ids] == [NEW_TOKENS] * BATCH
    logits = np.asarray(run.trace["logits_last"])
    assert logits.shape[0] == BATCH and np.isfinite(logits).all()
    for graph_file in path.glob("*.onnx"):  # the op bodies cast their float32 scoring back to float16
        model = onnx.load(str(graph_file), load_external_data=False)
        for function in model.functions:
            casts = [helper.get_attribute_value(a) for n in function.node if n.op_type == "Cast" for a in n.attribute]
            assert TensorProto.FLOAT16 in casts or function.name == "TopKTokenSelect", (graph_file.name, function.name)

    if name == "none":  # no decision to flip: float16 logits close to the float32 method's
        from sparsevlm.methods.model import prepare_inputs
        vlm = make_vlm(SparseVLMConfig(method="none"))
        enc = prepare_inputs(vlm.processor, images, PROMPTS[:BATCH])
        ref = vlm.generate(enc["input_ids"], enc["pixel_values"], max_new_tokens=NEW_TOKENS)
        diff = float(np.abs(logits - np.asarray(ref.trace["logits_last"])).max())
        assert diff <= NONE_LOGITS_ATOL, f"float16 logits differ from float32 by {diff}"
        assert run.token_ids == ref.sequences.tolist()
        assert run.trace["layers"] == []
        return

    reference = _generate(pipelines, artifacts(name), images)  # the float32 artifact
    assert read_manifest(artifacts(name))["dtype"] == "float32"
    assert len(run.trace["layers"]) == len(reference.trace["layers"]) >= 1
    for got, want in zip(run.trace["layers"], reference.trace["layers"]):
        assert got["layer"] == want["layer"]
        assert got["keep_count"] == want["keep_count"], f"layer {got['layer']}: keep counts differ"
        assert got["recycled"] == want["recycled"], f"layer {got['layer']}: recycled counts differ"
        assert all(0 < count < 576 for count in got["keep_count"])  # pruning really happened
    differ = _kept_index_differences(run.trace, reference.trace)
    kept = [sum(layer["keep_count"]) for layer in run.trace["layers"]]
    print(f"\n{name}: float16 vs float32 kept indices differing per layer: {differ} of {kept}")


# ------------------------------------------------------------------------------------------
# One op body alone: int32 masks in and out, float32 or float16 data
# ------------------------------------------------------------------------------------------

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64}


def _op_inputs(dtype):
    """Three rows with invalid slots and different keep counts (one keeps nothing)."""
    batch, visual, dim = 3, 40, 16
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, visual, dim, generator=gen).to(dtype)
    scores = torch.rand(batch, visual, generator=gen).to(dtype)
    valid = torch.ones(batch, visual, dtype=torch.bool)
    valid[1, 30:] = False
    valid[2, ::3] = False
    keep = torch.tensor([10, 25, 0])
    return x, scores, valid, keep


def _run_body(op: str, dtype, inputs: list, attrs: dict, output_types: list) -> tuple[list, dict]:
    """A one-node model `sparsevlm::<op>` with the exporter's body for `dtype`, its outputs
    declared with the contract's types (OPS.md), run in ORT. Returns (outputs, input types)."""
    import onnxruntime as ort
    from sparsevlm.export.onnx_ops import DOMAIN, FUNCTION_OPSET, OP_VERSION, function_body
    body = function_body(op, dtype, attrs)
    names = list(body.input)
    graph = helper.make_graph(
        [helper.make_node(op, names, list(body.output), domain=DOMAIN, **attrs)], op,
        [helper.make_tensor_value_info(n, ONNX_TYPES[v.dtype], list(v.shape)) for n, v in zip(names, inputs)],
        [helper.make_tensor_value_info(n, ONNX_TYPES[t], None) for n, t in zip(body.output, output_types)])
    model = helper.make_model(graph, functions=[body], opset_imports=[
        helper.make_opsetid("", FUNCTION_OPSET), helper.make_opsetid(DOMAIN, OP_VERSION)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    declared = {i.name: i.type for i in session.get_inputs()}
    return session.run(None, {n: v.numpy() for n, v in zip(names, inputs)}), declared


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_op_bodies_take_int32_masks_and_match_reference(dtype):
    x, scores, valid, keep = _op_inputs(dtype)

    selected, indices = token_ops.topk_token_select(x, scores, 12)
    (got_selected, got_indices), _ = _run_body("TopKTokenSelect", dtype, [x, scores], {"k": 12},
                                                    [dtype, torch.int64])
    assert got_selected.dtype == x.numpy().dtype
    np.testing.assert_array_equal(got_indices, indices.numpy())
    np.testing.assert_array_equal(got_selected, selected.numpy())

    merged, merged_valid = token_ops.token_recycle(x, scores, valid, keep)
    (got_merged, got_merged_valid), declared = _run_body("TokenRecycle", dtype, [x, scores, valid.int(), keep], {},
                                                                [dtype, torch.int32])
    assert declared["visual_valid"] == "tensor(int32)"
    assert got_merged.dtype == x.numpy().dtype and got_merged_valid.dtype == np.int32
    np.testing.assert_array_equal(got_merged_valid, merged_valid.int().numpy())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-3  # float32 matmuls in another order, then cast
    np.testing.assert_allclose(got_merged.astype(np.float32), merged.float().numpy(), rtol=tolerance, atol=tolerance)
    assert merged_valid.any(dim=1).tolist() == [True, True, True]  # every row recycles something

    width = int((keep + merged_valid.sum(dim=1)).max())
    out_width = torch.zeros(width, dtype=torch.long)
    pruned, pruned_valid, source = token_ops.token_prune(x, scores, valid, keep, merged, merged_valid, out_width)
    (got_pruned, got_pruned_valid, got_source), declared = _run_body(
        "TokenPrune", dtype, [x, scores, valid.int(), keep, merged, merged_valid.int(), out_width], {},
        [dtype, torch.int32, torch.int64])
    assert declared["visual_valid"] == declared["merged_valid"] == "tensor(int32)"
    assert got_pruned_valid.dtype == np.int32 and set(np.unique(got_pruned_valid)) <= {0, 1}
    np.testing.assert_array_equal(got_pruned_valid, pruned_valid.int().numpy())
    np.testing.assert_array_equal(got_source, source.numpy())
    np.testing.assert_array_equal(got_pruned, pruned.numpy())
    assert not pruned_valid.all()  # padding exists: the valid mask really matters


# ------------------------------------------------------------------------------------------
# bfloat16 is refused up front
# ------------------------------------------------------------------------------------------

def test_bfloat16_is_refused_by_cli_and_api(capsys, tmp_path):
    out = tmp_path / "o"
    code = main(["--model", "demo", "--dtype", "bfloat16", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sparsevlm-export: error:") and "--dtype" in last, last
    assert "float16" in last and "float32" in last and "'bfloat16'" in last, last
    with pytest.raises(ValueError) as raised:
        export("demo", out, dtype="bfloat16", progress=False)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("--dtype") and "float16, float32" in message, message
    assert not out.exists()
