"""sparsevlm.runtime.triton: serving exported artifacts on Triton Inference Server (README.md).

Writing and checking a model repository (no server, no Triton package needed):
  config_text   config.pbtxt text of each kind of model, and the request contract
  repository    `write_repository`: the python and tensorrt flavours, README, start script
  validation    `validate_repository`: offline checks of a written repository
  cli           `sparsevlm-triton` (write | validate | serve)

Running it:
  server        `LocalTritonServer`: the tritonserver of the nvidia-pytriton wheel on 127.0.0.1
  client        `SparseVLMClient`: requests and token streams over HTTP or gRPC

Inside the server (imported by the Python backend stub, never by the modules above):
  model_shim      the `model.py` copied into each Python model: puts sparsevlm on sys.path
                  and hands every call to the serving model its config names
  generate_model  `GenerateModel`: Pipeline generation per request (batched, or streamed)
  bls             `TritonBLSExecutor`: the runtime's GraphExecutor over BLS calls
  graph_model     `GraphModel`: one exported graph on onnxruntime
"""


class RepoError(ValueError):
    """A repository that cannot be written or does not validate, or a server that cannot
    start on it: the message names the input and what was expected."""
