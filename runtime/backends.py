"""Executors: run the artifact's graphs. Each has `vision`, `segment(i, inputs)`, `decode`
with dicts of torch tensors by name (the interface of methods/generation.py).

- `torch`: the PyTorch method on the checkpoint the manifest names (the reference).
- `onnxruntime`: the exported ONNX graphs (CPU; CUDA provider where installed).
- `tensorrt`: engines built by sparsevlm-build, one execution context per optimization
  profile, the plugin library loaded through the plugin registry.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from .artifact import Artifact

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def graph_names(artifact: Artifact) -> list[str]:
    return ["vision"] + [s["graph"] for s in artifact.manifest["segments"]] + ["decode"]


class GraphExecutor:
    """The executor interface over named graphs: subclasses implement `_run(graph, inputs)`.
    (Triton's BLS executor in triton_models/ has the same three calls; it cannot import this
    class, because the Triton stub loads it before `sparsevlm` is on its path.)"""

    def _run(self, name: str, inputs: dict) -> dict:
        raise NotImplementedError

    def vision(self, pixel_values):
        return self._run("vision", {"pixel_values": pixel_values})

    def segment(self, index, inputs):
        return self._run(f"segment_{index}", inputs)

    def decode(self, inputs):
        return self._run("decode", inputs)


class OnnxRuntimeExecutor(GraphExecutor):
    def __init__(self, artifact: Artifact, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort
        self.artifact = artifact
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.sessions = {}
        for name in graph_names(artifact):
            try:
                self.sessions[name] = ort.InferenceSession(str(artifact.graph_path(name)), options, providers=providers)
            except Exception as error:  # onnxruntime raises its own exception types
                from sparsevlm.export.manifest import ArtifactError
                raise ArtifactError(f"artifact: cannot load {artifact.graph_path(name)}: {str(error).splitlines()[0]}") from None
        self._inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}
        # Feeds are cast to each input's declared type (e.g. float32 pixels into a float16 graph).
        self._types = {n: {i.name: _NUMPY_TYPES[i.type] for i in s.get_inputs()} for n, s in self.sessions.items()}
        self._outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}

    def _run(self, name: str, inputs: dict) -> dict:
        types = self._types[name]
        feed = {k: inputs[k].detach().cpu().numpy().astype(types[k], copy=False) for k in self._inputs[name]}
        values = self.sessions[name].run(self._outputs[name], feed)
        rename = self.artifact.output_names(name)
        return {rename[o]: torch.from_numpy(np.ascontiguousarray(v)) for o, v in zip(self._outputs[name], values)}


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def torch_executor(artifact: Artifact, model: str | None = None, device: str = "cpu"):
    """The PyTorch reference on the manifest's checkpoint (or `model`), same plan."""
    from sparsevlm.export.exporter import config_sha256
    from sparsevlm.methods.generation import TorchExecutor
    from sparsevlm.methods.loading import load_model
    torch_model, _ = load_model(model or artifact.manifest["model"]["source"], dtype=artifact.manifest["dtype"],
                                device=device)
    if config_sha256(torch_model) != artifact.manifest["model"]["config_sha256"]:
        from sparsevlm.export.manifest import ArtifactError
        raise ArtifactError("model: the checkpoint's config differs from the one the artifact was exported from")
    return TorchExecutor(torch_model, artifact.plan)


class TensorRTExecutor(GraphExecutor):
    """Engines from `manifest["engines"]` (written by sparsevlm-build); one execution
    context per optimization profile; inputs and outputs as CUDA torch tensors.

    All output shapes here follow from input shapes (TokenPrune's width is a shape input),
    so outputs are allocated after `set_input_shape`, with no output allocator needed."""

    def __init__(self, artifact: Artifact, plugin_library: str | None = None, lean: bool = False):
        trt = _import_tensorrt(lean)
        if not torch.cuda.is_available():
            raise RuntimeError("tensorrt backend: no CUDA device is available")
        from sparsevlm.trt_plugins import find_plugin_library
        engines = artifact.manifest.get("engines")
        if not engines:
            raise RuntimeError(f"tensorrt backend: {artifact.root} has no engines; run sparsevlm-build first")
        self.trt, self.artifact = trt, artifact
        self.logger = trt.Logger(trt.Logger.WARNING)
        library = find_plugin_library(plugin_library)
        if trt.get_plugin_registry().load_library(str(library)) is None:
            raise RuntimeError(f"tensorrt backend: could not load the plugin library {library}")
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream()
        self.engines, self.contexts, self.profile = {}, {}, {}
        for name in graph_names(artifact):
            plan = (artifact.root / engines[name]["file"]).read_bytes()
            engine = self.runtime.deserialize_cuda_engine(plan)
            self.engines[name] = engine
            self.contexts[name] = []
            for index in range(engine.num_optimization_profiles):
                context = engine.create_execution_context()
                context.set_optimization_profile_async(index, self.stream.cuda_stream)
                self.contexts[name].append(context)
            self.profile[name] = 0

    def select_profile(self, graph: str, index: int) -> None:
        self.profile[graph] = index

    def _run(self, name: str, inputs: dict) -> dict:
        trt, engine = self.trt, self.engines[name]
        context = self.contexts[name][self.profile[name]]
        keep = []
        rename = self.artifact.output_names(name)
        outputs = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT:
                value = inputs[tensor].cuda().contiguous()
                keep.append(value)
                context.set_input_shape(tensor, tuple(value.shape))
                context.set_tensor_address(tensor, value.data_ptr())
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            if engine.get_tensor_mode(tensor) == trt.TensorIOMode.OUTPUT:
                dtype = _TORCH_DTYPES[trt.nptype(engine.get_tensor_dtype(tensor))]
                value = torch.empty(tuple(context.get_tensor_shape(tensor)), dtype=dtype, device="cuda")
                context.set_tensor_address(tensor, value.data_ptr())
                outputs[rename.get(tensor, tensor)] = value
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"tensorrt backend: {name} failed to execute")
        self.stream.synchronize()
        return outputs


_TORCH_DTYPES = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64,
                 np.int32: torch.int32, np.bool_: torch.bool}


def _import_tensorrt(lean: bool):
    # The lean runtime's module is `tensorrt_lean` in NVIDIA's packages and
    # `tensorrt_lean_bindings` in PyPI's tensorrt-lean-cu13-bindings wheel.
    names = ("tensorrt_lean", "tensorrt_lean_bindings") if lean else ("tensorrt",)
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise RuntimeError(f"tensorrt backend: the TensorRT Python package is not installed (tried {', '.join(names)}); "
                       "install `tensorrt` (or `tensorrt-lean` for version-compatible engines)")
