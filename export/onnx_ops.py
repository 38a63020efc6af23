"""The `sparsevlm` custom ops in ONNX: schemas, node emission, local-function bodies.

- Schemas are registered with `onnx.defs` so the checker and shape inference know them.
- `ONNX_OPS` has the same functions as `sparsevlm.methods.token_ops`; inside an export it
  emits one `sparsevlm::<Op>` node (legacy TorchScript exporter, `autograd.Function.symbolic`)
  carrying `plugin_namespace`/`plugin_version`, and outside an export it simply runs the
  reference. The segment modules take it as their `ops=` argument.
- Each node gets a model-local function body, traced from the same PyTorch reference
  (`function_body`), so stock ONNX Runtime runs the graph with no native library and
  TensorRT's parser can still map the node to the plugin. Attribute values (k, the
  recycling constants) are baked into the body of the model that uses them.
The op contracts are in OPS.md beside this file.
"""

from __future__ import annotations

import io

import onnx
import torch
from onnx import defs, helper

from sparsevlm.methods import token_ops

DOMAIN = "sparsevlm"
OP_VERSION = 1
PLUGIN_ATTRS = {"plugin_namespace_s": DOMAIN, "plugin_version_s": str(OP_VERSION)}
FUNCTION_OPSET = 17  # default-domain opset of the exported graphs and of the bodies

_T = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schema(name, doc, inputs, outputs, attributes):
    params = lambda items: [defs.OpSchema.FormalParameter(n, t, d) for n, t, d in items]
    return defs.OpSchema(name, DOMAIN, OP_VERSION, doc=doc, inputs=params(inputs), outputs=params(outputs),
                         type_constraints=[("T", _T, "visual states and scores")], attributes=attributes)


def _attr(name, kind, doc):
    return defs.OpSchema.Attribute(name, kind, doc, required=False) if kind != defs.OpSchema.AttrType.INT \
        or name != "k" else defs.OpSchema.Attribute(name, kind, doc, required=True)


def register_schemas() -> None:
    """Register the four op schemas once per process."""
    if defs.has("TokenPrune", DOMAIN):
        return
    A = defs.OpSchema.AttrType
    plugin = [_attr("plugin_namespace", A.STRING, "TensorRT plugin namespace"),
              _attr("plugin_version", A.STRING, "TensorRT plugin version")]
    ops = [
        _schema("TopKTokenSelect", "Keep the k best-scoring tokens in original order.",
                [("tokens", "T", ""), ("scores", "T", "")],
                [("selected", "T", ""), ("indices", "tensor(int64)", "")],
                [_attr("k", A.INT, "tokens kept")] + plugin),
        _schema("TokenPrune", "Rebuild the visual region: kept (original order) | merged | padding.",
                [("visual", "T", ""), ("scores", "T", ""), ("visual_valid", "tensor(bool)", ""),
                 ("keep_count", "tensor(int64)", ""), ("merged", "T", ""), ("merged_valid", "tensor(bool)", ""),
                 ("out_width", "tensor(int64)", "shape input: only its length W is read")],
                [("pruned", "T", ""), ("pruned_valid", "tensor(bool)", ""), ("source_index", "tensor(int64)", "")],
                plugin),
        _schema("TokenRecycle", "SparseVLM recycling: DPC-kNN clusters of the best deleted tokens, mean merge.",
                [("visual", "T", ""), ("scores", "T", ""), ("visual_valid", "tensor(bool)", ""),
                 ("keep_count", "tensor(int64)", "")],
                [("merged", "T", ""), ("merged_valid", "tensor(bool)", "")],
                [_attr("candidate_percent", A.INT, "tau in percent"), _attr("cluster_divisor", A.INT, "")] + plugin),
        _schema("RankKeepCount", "Matrix rank of the rater-by-visual block and the keep rule.",
                [("rater_attention", "tensor(float)", ""), ("rater_mask", "tensor(bool)", ""),
                 ("visual_valid", "tensor(bool)", "")],
                [("rank", "tensor(int64)", ""), ("keep_count", "tensor(int64)", "")],
                [_attr("rule", A.STRING, "v1.0 or paper"), _attr("scale", A.FLOAT, ""), _attr("bias", A.FLOAT, ""),
                 _attr("lam", A.FLOAT, "")] + plugin),
    ]
    for schema in ops:
        defs.register_schema(schema)


# --------------------------------------------------------------------------------------
# Node emission (legacy exporter) with the reference as the eager/trace-time computation
# --------------------------------------------------------------------------------------

class _TopKTokenSelect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, scores, k):
        return token_ops.topk_token_select(tokens, scores, k)

    @staticmethod
    def symbolic(g, tokens, scores, k):
        return g.op(f"{DOMAIN}::TopKTokenSelect", tokens, scores, k_i=k, outputs=2, **PLUGIN_ATTRS)


class _TokenPrune(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visual, scores, visual_valid, keep_count, merged, merged_valid, out_width):
        return token_ops.token_prune(visual, scores, visual_valid, keep_count, merged, merged_valid, out_width)

    @staticmethod
    def symbolic(g, visual, scores, visual_valid, keep_count, merged, merged_valid, out_width):
        return g.op(f"{DOMAIN}::TokenPrune", visual, scores, visual_valid, keep_count, merged, merged_valid,
                    out_width, outputs=3, **PLUGIN_ATTRS)


class _TokenRecycle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visual, scores, visual_valid, keep_count):
        return token_ops.token_recycle(visual, scores, visual_valid, keep_count)

    @staticmethod
    def symbolic(g, visual, scores, visual_valid, keep_count):
        return g.op(f"{DOMAIN}::TokenRecycle", visual, scores, visual_valid, keep_count, outputs=2,
                    candidate_percent_i=token_ops.CANDIDATE_PERCENT, cluster_divisor_i=token_ops.CLUSTER_DIVISOR,
                    **PLUGIN_ATTRS)


class OnnxOps:
    """Drop-in for `token_ops` in the segment modules: emits custom nodes when traced."""

    @staticmethod
    def topk_token_select(tokens, scores, k):
        return _TopKTokenSelect.apply(tokens, scores, k)

    @staticmethod
    def token_prune(visual, scores, visual_valid, keep_count, merged, merged_valid, out_width):
        return _TokenPrune.apply(visual, scores, visual_valid, keep_count, merged, merged_valid, out_width)

    @staticmethod
    def token_recycle(visual, scores, visual_valid, keep_count):
        return _TokenRecycle.apply(visual, scores, visual_valid, keep_count)


ONNX_OPS = OnnxOps()


# --------------------------------------------------------------------------------------
# Function bodies traced from the reference
# --------------------------------------------------------------------------------------

class _Reference(torch.nn.Module):
    def __init__(self, fn, **attrs):
        super().__init__()
        self.fn, self.attrs = fn, attrs

    def forward(self, *args):
        return self.fn(*args, **self.attrs)


def _example(op: str, dtype: torch.dtype):
    batch, visual, dim = 2, 12, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, visual, dim, generator=gen).to(dtype)
    s = torch.rand(batch, visual, generator=gen).to(dtype)
    valid = torch.ones(batch, visual, dtype=torch.bool)
    keep = torch.tensor([5, 7])
    if op == "TopKTokenSelect":
        return (x, s), ["tokens", "scores"], {"tokens": {0: "B", 1: "N"}, "scores": {0: "B", 1: "N"}}
    if op == "TokenRecycle":
        return (x, s, valid, keep), ["visual", "scores", "visual_valid", "keep_count"], \
            {"visual": {0: "B", 1: "V"}, "scores": {0: "B", 1: "V"}, "visual_valid": {0: "B", 1: "V"},
             "keep_count": {0: "B"}}
    merged, merged_valid = token_ops.token_recycle(x, s, valid, keep)
    return (x, s, valid, keep, merged, merged_valid, torch.zeros(9, dtype=torch.long)), \
        ["visual", "scores", "visual_valid", "keep_count", "merged", "merged_valid", "out_width"], \
        {"visual": {0: "B", 1: "V"}, "scores": {0: "B", 1: "V"}, "visual_valid": {0: "B", 1: "V"},
         "keep_count": {0: "B"}, "merged": {0: "B", 1: "C"}, "merged_valid": {0: "B", 1: "C"}, "out_width": {0: "W"}}


_REFERENCES = {"TopKTokenSelect": token_ops.topk_token_select, "TokenPrune": token_ops.token_prune,
               "TokenRecycle": token_ops.token_recycle}
_OUTPUTS = {"TopKTokenSelect": ["selected", "indices"], "TokenPrune": ["pruned", "pruned_valid", "source_index"],
            "TokenRecycle": ["merged", "merged_valid"]}


def function_body(op: str, dtype: torch.dtype, attrs: dict) -> onnx.FunctionProto:
    """A FunctionProto for `op`, traced from the PyTorch reference with `attrs` baked in."""
    args, names, axes = _example(op, dtype)
    fn_attrs = {"k": attrs["k"]} if op == "TopKTokenSelect" else {}
    if op == "TokenRecycle":
        fn_attrs = {"candidate_percent": attrs.get("candidate_percent", token_ops.CANDIDATE_PERCENT),
                    "cluster_divisor": attrs.get("cluster_divisor", token_ops.CLUSTER_DIVISOR)}
    if op == "TopKTokenSelect" and fn_attrs["k"] > args[0].shape[1]:
        args = tuple(a.repeat(1, -(-fn_attrs["k"] // a.shape[1]), *([1] * (a.dim() - 2))) for a in args)
    buffer = io.BytesIO()
    outputs = _OUTPUTS[op]
    torch.onnx.export(_Reference(_REFERENCES[op], **fn_attrs), args, buffer, dynamo=False,
                      opset_version=FUNCTION_OPSET, input_names=names, output_names=outputs,
                      dynamic_axes={**axes, **{o: {0: "B"} for o in outputs}}, do_constant_folding=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    nodes = [helper.make_node("Constant", [], [init.name], value=init) for init in graph.initializer]
    nodes += list(graph.node)
    return helper.make_function(DOMAIN, op, [i.name for i in graph.input], [o.name for o in graph.output],
                                nodes, [helper.make_opsetid("", FUNCTION_OPSET)])


def attach_functions(model: onnx.ModelProto) -> list[str]:
    """Give every `sparsevlm` node of `model` its local-function body; returns the op types."""
    register_schemas()
    dtype = torch.float32
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT16:
            dtype = torch.float16
            break
    used = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            key = (node.op_type, attrs.get("k"))
            if node.op_type in used and used[node.op_type] != key:
                raise ValueError(f"{node.op_type}: one graph uses it with different attributes {attrs}")
            used[node.op_type] = key
    del model.functions[:]
    for op, (_, k) in sorted(used.items()):
        model.functions.append(function_body(op, dtype, {"k": k}))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    return sorted(used)
