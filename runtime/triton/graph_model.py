"""Triton Python-backend model: one exported graph on onnxruntime (written by sparsevlm-triton).

Used by `sparsevlm-triton --flavour tensorrt --graph-backend onnxruntime`: the TensorRT
flavour's topology (BLS orchestrator + one model per graph, same names and tensors) with
each graph served from its ONNX file instead of a `tensorrt_plan` engine, so the
orchestrator runs on a CPU-only server. Config parameters: `artifact`, `graph`,
`sparsevlm_site_dirs` (see generate_model.py), `threads` (onnxruntime intra-op threads).
"""

import json
import os
import site
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        for directory in params.get("sparsevlm_site_dirs", "").split(os.pathsep):
            if directory and directory not in sys.path:
                site.addsitedir(directory)
        import onnxruntime as ort

        from sparsevlm.runtime.artifact import Artifact

        artifact = Path(params["artifact"])
        if not artifact.is_absolute():
            artifact = Path(args["model_repository"]).resolve().parent / artifact
        loaded = Artifact.load(str(artifact), verify_files=False)
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
