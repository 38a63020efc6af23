"""`GraphModel`: the Triton Python-backend model serving one exported graph on onnxruntime.

Used by `sparsevlm-triton --flavour tensorrt --graph-backend onnxruntime`: the TensorRT
flavour's topology (BLS orchestrator + one model per graph, same names and tensors) with
each graph served from its ONNX file instead of a `tensorrt_plan` engine, so the
orchestrator runs on a CPU-only server. The model's `model.py` (model_shim.py) hands its
calls to this class. Config parameters: `artifact`, `graph`, `threads` (onnxruntime
intra-op threads).
"""

import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # the stub's module: this file runs inside Triton only

from sparsevlm.runtime.artifact import Artifact

from .generate_model import artifact_path, model_parameters


class GraphModel:
    def initialize(self, args):
        params = model_parameters(json.loads(args["model_config"]))
        loaded = Artifact.load(str(artifact_path(args, params)), verify_files=False)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if int(params.get("threads", "0") or 0):
            options.intra_op_num_threads = int(params["threads"])
        self.session = ort.InferenceSession(str(loaded.graph_path(params["graph"])), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                values = self.session.run(self.outputs, feed)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in zip(self.outputs, values)]))
            except Exception as error:  # noqa: BLE001 - one failing request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}")))
        return responses

    def finalize(self):
        self.session = None
