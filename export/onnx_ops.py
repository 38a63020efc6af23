"""The `sparsevlm` custom ops in ONNX: schemas, node emission, local-function bodies.

- Schemas are registered with `onnx.defs` so the checker and shape inference know them.
- `ONNX_OPS` has the same functions as `sparsevlm.methods.token_ops`; inside an export it
  emits one `sparsevlm::<Op>` node (legacy TorchScript exporter, `autograd.Function.symbolic`)
  carrying `plugin_namespace`/`plugin_version`, and outside an export it simply runs the
  reference. The segment modules take it as their `ops=` argument.
- Each node gets a model-local function body, traced from the same PyTorch reference
  (`function_body`), so stock ONNX Runtime runs the graph with no native library and
  TensorRT's parser can still map the node to the plugin. Attribute values (k, the
  recycling constants) are baked into the body of the model that uses them, and so is the
  graph's float type T (a body's casts back from its float32 scoring arithmetic are typed).
- Masks cross a node's boundary as int32 0/1, because TensorRT plugins cannot take or
  return bool tensors: the emitted graph casts bool -> int32 before each node and int32 ->
  bool after it, and each body casts back to bool around the reference. The segment graphs
  (and their inputs and outputs) keep bool everywhere else.
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

# float32 or float16: the float types the exporter writes (sparsevlm-export --dtype) and the
# plugins implement. No bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernel for
# MatMul, Add, Softmax, ... and opset-17 Conv does not accept it at all.
_T = ["tensor(float)", "tensor(float16)"]
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MASK = "tensor(int32)"  # 0/1 masks at the op boundary (TensorRT plugin I/O has no bool)


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
                [("visual", "T", ""), ("scores", "T", ""), ("visual_valid", MASK, "0/1"),
                 ("keep_count", "tensor(int64)", ""), ("merged", "T", ""), ("merged_valid", MASK, "0/1"),
                 ("out_width", "tensor(int64)", "shape input: only its length W is read")],
                [("pruned", "T", ""), ("pruned_valid", MASK, "0/1"), ("source_index", "tensor(int64)", "")],
                plugin),
        _schema("TokenRecycle", "SparseVLM recycling: DPC-kNN clusters of the best deleted tokens, mean merge.",
                [("visual", "T", ""), ("scores", "T", ""), ("visual_valid", MASK, "0/1"),
                 ("keep_count", "tensor(int64)", "")],
                [("merged", "T", ""), ("merged_valid", MASK, "0/1")],
                [_attr("candidate_percent", A.INT, "tau in percent"), _attr("cluster_divisor", A.INT, "")] + plugin),
        _schema("RankKeepCount", "Matrix rank of the rater-by-visual block and the keep rule.",
                [("rater_attention", "tensor(float)", ""), ("rater_mask", MASK, "0/1"),
                 ("visual_valid", MASK, "0/1")],
                [("rank", "tensor(int64)", ""), ("keep_count", "tensor(int64)", "")],
                [_attr("rule", A.STRING, "v1.0 or paper"), _attr("scale", A.FLOAT, ""), _attr("bias", A.FLOAT, ""),
                 _attr("lam", A.FLOAT, "")] + plugin),
    ]
    for schema in ops:
        defs.register_schema(schema)


# --------------------------------------------------------------------------------------
# Node emission (legacy exporter) with the reference as the eager/trace-time computation
# --------------------------------------------------------------------------------------

def _parameters(op: str, which: str) -> list:
    """The schema's formal inputs or outputs of `op` (the one list of names and types)."""
    register_schemas()
    return list(getattr(defs.get_schema(op, OP_VERSION, DOMAIN), which))


def _mask_positions(op: str, which: str) -> set[int]:
    return {i for i, p in enumerate(_parameters(op, which)) if p.type_str == MASK}


def _emit(g, op: str, *inputs, **attrs):
    """One `sparsevlm::<op>` node, with bool -> int32 casts on its mask inputs and int32 ->
    bool casts on its mask outputs, so the graph around it keeps bool masks."""
    masks_in, masks_out = _mask_positions(op, "inputs"), _mask_positions(op, "outputs")
    inputs = [g.op("Cast", v, to_i=onnx.TensorProto.INT32) if i in masks_in else v for i, v in enumerate(inputs)]
    outputs = g.op(f"{DOMAIN}::{op}", *inputs, outputs=len(_parameters(op, "outputs")), **attrs, **PLUGIN_ATTRS)
    for i in masks_out:  # declared int32 in the graph's value_info (the tracer cannot infer a custom op's types)
        outputs[i].setType(outputs[i].type().with_dtype(torch.int32))
    return tuple(g.op("Cast", v, to_i=onnx.TensorProto.BOOL) if i in masks_out else v for i, v in enumerate(outputs))


class _TopKTokenSelect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, scores, k):
        return token_ops.topk_token_select(tokens, scores, k)

    @staticmethod
    def symbolic(g, tokens, scores, k):
        return _emit(g, "TopKTokenSelect", tokens, scores, k_i=k)


class _TokenPrune(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visual, scores, visual_valid, keep_count, merged, merged_valid, out_width):
        return token_ops.token_prune(visual, scores, visual_valid, keep_count, merged, merged_valid, out_width)

    @staticmethod
    def symbolic(g, visual, scores, visual_valid, keep_count, merged, merged_valid, out_width):
        return _emit(g, "TokenPrune", visual, scores, visual_valid, keep_count, merged, merged_valid, out_width)


class _TokenRecycle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visual, scores, visual_valid, keep_count):
        return token_ops.token_recycle(visual, scores, visual_valid, keep_count)

    @staticmethod
    def symbolic(g, visual, scores, visual_valid, keep_count):
        return _emit(g, "TokenRecycle", visual, scores, visual_valid, keep_count,
                     candidate_percent_i=token_ops.CANDIDATE_PERCENT, cluster_divisor_i=token_ops.CLUSTER_DIVISOR)


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

_REFERENCES = {"TopKTokenSelect": token_ops.topk_token_select, "TokenPrune": token_ops.token_prune,
               "TokenRecycle": token_ops.token_recycle}


class _Reference(torch.nn.Module):
    """The bool reference behind the op's boundary: int32 0/1 masks in and out."""

    def __init__(self, op: str, **attrs):
        super().__init__()
        self.fn, self.attrs = _REFERENCES[op], attrs
        self.masks_in, self.masks_out = _mask_positions(op, "inputs"), _mask_positions(op, "outputs")

    def forward(self, *args):
        args = [a.bool() if i in self.masks_in else a for i, a in enumerate(args)]
        outputs = self.fn(*args, **self.attrs)
        return tuple(o.to(torch.int32) if i in self.masks_out else o for i, o in enumerate(outputs))


def _example(op: str, dtype: torch.dtype):
    """Example inputs (in schema order, masks as int32) and their dynamic axes."""
    batch, visual, dim = 2, 12, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, visual, dim, generator=gen).to(dtype)
    s = torch.rand(batch, visual, generator=gen).to(dtype)
    valid = torch.ones(batch, visual, dtype=torch.bool)
    keep = torch.tensor([5, 7])
    if op == "TopKTokenSelect":
        return (x, s), {"tokens": {0: "B", 1: "N"}, "scores": {0: "B", 1: "N"}}
    axes = {"visual": {0: "B", 1: "V"}, "scores": {0: "B", 1: "V"}, "visual_valid": {0: "B", 1: "V"},
            "keep_count": {0: "B"}}
    if op == "TokenRecycle":
        return (x, s, valid.int(), keep), axes
    merged, merged_valid = token_ops.token_recycle(x, s, valid, keep)
    return (x, s, valid.int(), keep, merged, merged_valid.int(), torch.zeros(9, dtype=torch.long)), \
        {**axes, "merged": {0: "B", 1: "C"}, "merged_valid": {0: "B", 1: "C"}, "out_width": {0: "W"}}


def function_body(op: str, dtype: torch.dtype, attrs: dict) -> onnx.FunctionProto:
    """A FunctionProto for `op` on float type `dtype` (T), traced from the PyTorch reference
    with `attrs` baked in. T is fixed in the body (its casts back from float32 scoring are
    typed), so a graph's body must be traced with that graph's T."""
    args, axes = _example(op, dtype)
    names = [p.name for p in _parameters(op, "inputs")]
    outputs = [p.name for p in _parameters(op, "outputs")]
    fn_attrs = {"k": attrs["k"]} if op == "TopKTokenSelect" else {}
    if op == "TokenRecycle":
        fn_attrs = {"candidate_percent": attrs.get("candidate_percent", token_ops.CANDIDATE_PERCENT),
                    "cluster_divisor": attrs.get("cluster_divisor", token_ops.CLUSTER_DIVISOR)}
    if op == "TopKTokenSelect" and fn_attrs["k"] > args[0].shape[1]:
        args = tuple(a.repeat(1, -(-fn_attrs["k"] // a.shape[1]), *([1] * (a.dim() - 2))) for a in args)
    buffer = io.BytesIO()
    torch.onnx.export(_Reference(op, **fn_attrs), args, buffer, dynamo=False,
                      opset_version=FUNCTION_OPSET, input_names=names, output_names=outputs,
                      dynamic_axes={**axes, **{o: {0: "B"} for o in outputs}}, do_constant_folding=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    nodes = [helper.make_node("Constant", [], [init.name], value=init) for init in graph.initializer]
    nodes += list(graph.node)
    return helper.make_function(DOMAIN, op, [i.name for i in graph.input], [o.name for o in graph.output],
                                nodes, [helper.make_opsetid("", FUNCTION_OPSET)])


def attach_functions(model: onnx.ModelProto, dtype: torch.dtype) -> list[str]:
    """Give every `sparsevlm` node of `model` its local-function body for float type `dtype`
    (the graph's T: the exporter passes the model's dtype, since a graph traced without its
    weights has no initializers to read it from); returns the op types."""
    register_schemas()
    if dtype not in EXPORT_DTYPES.values():
        raise ValueError(f"dtype: the op bodies support {sorted(EXPORT_DTYPES)}, got {dtype}")
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
