"""config.pbtxt text for the models of a repository (protobuf text format of Triton's
ModelConfig), and the request contract the generate models share."""

from __future__ import annotations

import json

REPO_SCHEMA = "sparsevlm-triton-repo/1"

# The tensor types the exporter writes in the manifest (ONNX TensorProto names, lower case)
# -> Triton data types.
NAME_TO_TRITON = {"float": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "double": "TYPE_FP64",
                  "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                  "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
                  "bool": "TYPE_BOOL"}

# The request/response contract shared by the python-flavour models and the TensorRT-flavour
# orchestrator. Batch dimension first (max_batch_size > 0): a client sends [rows, 1].
GENERATE_INPUTS = [
    ("image", "TYPE_STRING", [1], False),          # encoded image bytes (PNG, JPEG, ...)
    ("prompt", "TYPE_STRING", [1], False),         # the user's question, UTF-8
    ("max_new_tokens", "TYPE_INT32", [1], True),   # default 32
    ("temperature", "TYPE_FP32", [1], True),       # default 0 (greedy)
    ("top_p", "TYPE_FP32", [1], True),             # default 1
    ("seed", "TYPE_INT64", [1], True),             # default none (0 when sampling)
]
GENERATE_OUTPUTS = [
    ("text", "TYPE_STRING", [1]),
    ("token_ids", "TYPE_INT64", [-1]),        # generated ids; rows of one request padded with -1
    ("kept_per_layer", "TYPE_INT64", [-1]),   # visual tokens kept at each pruning layer
]


def _q(text: str) -> str:
    return json.dumps(str(text))  # a protobuf text-format string literal (JSON escapes are valid)


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f'  {{ name: {_q(name)} data_type: {dtype} dims: [ {", ".join(str(int(d)) for d in dims)} ]{extra} }}'


def _parameters(params: dict) -> str:
    if not params:
        return ""
    rows = [f"  {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}" for k, v in params.items()]
    return "parameters [\n" + ",\n".join(rows) + "\n]\n"


def _config(name: str, body: str, inputs: list[tuple], outputs: list[tuple], params: dict | None = None) -> str:
    """inputs/outputs: (name, triton dtype, dims[, optional]) rows."""
    return (f"# Written by sparsevlm-triton ({REPO_SCHEMA}); see ../README.md.\n"
            f"name: {_q(name)}\n{body}"
            "input [\n" + ",\n".join(_tensor(*row) for row in inputs) + "\n]\n"
            "output [\n" + ",\n".join(_tensor(*row) for row in outputs) + "\n]\n" + _parameters(params or {}))


def generate_model_config(name: str, *, max_batch: int, instances: int, kind: str, decoupled: bool,
                          queue_delay_us: int, params: dict) -> str:
    body = f'backend: "python"\nmax_batch_size: {int(max_batch)}\n'
    body += f"instance_group [ {{ kind: {kind} count: {int(instances)} }} ]\n"
    if max_batch > 0:
        body += f"dynamic_batching {{ max_queue_delay_microseconds: {int(queue_delay_us)} }}\n"
    if decoupled:
        body += "model_transaction_policy { decoupled: true }\n"
    return _config(name, body, GENERATE_INPUTS, GENERATE_OUTPUTS, params)


def tensorrt_model_config(name: str, *, inputs: list[tuple], outputs: list[tuple], num_profiles: int,
                          instances: int) -> str:
    """A `tensorrt_plan` model. max_batch_size 0: the engines' batch dimension is an ordinary
    dynamic dimension of their profiles, and the orchestrator sends whole batches. Every
    instance lists every profile: Triton's scheduler hands a request to any free instance,
    so an instance that lacked the profile matching the request's shapes would fail it."""
    profiles = ", ".join(_q(str(i)) for i in range(num_profiles))
    body = ('platform: "tensorrt_plan"\nmax_batch_size: 0\ndefault_model_filename: "model.plan"\n'
            f"instance_group [ {{ kind: KIND_GPU count: {int(instances)} profile: [ {profiles} ] }} ]\n")
    return _config(name, body, inputs, outputs, {"execution_context_allocation_strategy": "STATIC"})


def onnx_graph_model_config(name: str, *, inputs: list[tuple], outputs: list[tuple], instances: int,
                            params: dict) -> str:
    """A Python-backend model serving one graph on onnxruntime (`--graph-backend onnxruntime`)."""
    body = f'backend: "python"\nmax_batch_size: 0\ninstance_group [ {{ kind: KIND_CPU count: {int(instances)} }} ]\n'
    return _config(name, body, inputs, outputs, params)
