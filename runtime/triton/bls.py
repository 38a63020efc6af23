"""`TritonBLSExecutor`: the runtime's GraphExecutor with every graph run as a BLS request to
its model in the same repository (the TensorRT flavour's orchestrator, generate_model.py).
Runs inside Triton only (it sends requests through the stub's `triton_python_backend_utils`)."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from sparsevlm.methods.segments import method_output_name
from sparsevlm.runtime.backends import GraphExecutor


class TritonBLSExecutor(GraphExecutor):
    """`vision` / `segment(i)` / `decode` (GraphExecutor's) as BLS requests to the graph models
    named by `graph_models` ({graph: model}; `tensorrt_plan` engines in the TensorRT flavour).

    No profile is selected here: the runtime's profile rule chooses each segment's profile
    from the keep counts and pads `visual_width` up to it, so the request's shapes lie inside
    exactly that profile, and the TensorRT backend runs a request on the execution context of
    the profile that contains its shapes (every instance lists every profile). CUDA tensors
    travel by DLPack, CPU ones as numpy."""

    def __init__(self, artifact, graph_models: dict):
        graphs = artifact.manifest["graphs"]
        missing = [name for name in graphs if name not in graph_models]
        if missing:
            raise ValueError(f"graph_models: no model for graph(s) {missing}")
        self.artifact, self.models = artifact, graph_models
        self.inputs = {name: [i["name"] for i in graphs[name]["inputs"]] for name in graphs}
        self.outputs = {name: [o["name"] for o in graphs[name]["outputs"]] for name in graphs}

    def _run(self, name: str, inputs: dict) -> dict:
        tensors = []
        for key in self.inputs[name]:
            value = inputs[key]
            if value.is_cuda:
                tensors.append(pb_utils.Tensor.from_dlpack(key, dlpack.to_dlpack(value.contiguous())))
            else:
                tensors.append(pb_utils.Tensor(key, np.ascontiguousarray(value.detach().numpy())))
        response = pb_utils.InferenceRequest(model_name=self.models[name], inputs=tensors,
                                             requested_output_names=self.outputs[name]).exec()
        if response.has_error():
            raise RuntimeError(f"BLS {self.models[name]}: {response.error().message()}")
        outputs = {}
        for key in self.outputs[name]:
            tensor = pb_utils.get_output_tensor_by_name(response, key)
            if tensor.is_cpu():
                outputs[method_output_name(key)] = torch.from_numpy(np.array(tensor.as_numpy()))
            else:
                outputs[method_output_name(key)] = dlpack.from_dlpack(tensor.to_dlpack())
        return outputs
