"""Executors: run the artifact's graphs. Each has `vision`, `segment(i, inputs)`, `decode`
with dicts of torch tensors by name (the interface of methods/generation.py).

- `torch`: the PyTorch method on the checkpoint the manifest names (the reference).
- `onnxruntime`: the exported ONNX graphs (CPU; CUDA provider where installed).
- `tensorrt`: engines built by sparsevlm-build, one execution context per optimization
  profile sharing one device memory block, the plugin library loaded through the plugin
  registry (`sparsevlm.trt_plugins.load_plugin_library`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsevlm.export.manifest import ArtifactError
from sparsevlm.methods.generation import InputError

from .artifact import Artifact
from sparsevlm.methods.profiles import ProfileError, profile_for_shapes
from sparsevlm.methods.segments import method_output_name

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def graph_names(artifact: Artifact) -> list[str]:
    return ["vision"] + [s["graph"] for s in artifact.manifest["segments"]] + ["decode"]


class GraphExecutor:
    """The executor interface over named graphs: subclasses implement `_run(graph, inputs)`
    (also Triton's BLS executor, sparsevlm.runtime.triton.bls)."""

    def _run(self, name: str, inputs: dict) -> dict:
        raise NotImplementedError

    def vision(self, pixel_values):
        """pixel_values: a tensor, or (anyres) the dict of named vision inputs."""
        return self._run("vision", pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values})

    def segment(self, index, inputs):
        return self._run(f"segment_{index}", inputs)

    def decode(self, inputs):
        return self._run("decode", inputs)


class OnnxRuntimeExecutor(GraphExecutor):
    """One ONNX Runtime session per graph, each with its own intra-op thread pool
    (`threads` threads; 0: ONNX Runtime's default, one per core)."""

    def __init__(self, artifact: Artifact, providers: list[str] | None = None, threads: int = 0,
                 graphs: list[str] | None = None):
        """`graphs`: the graphs to load (default: all; e.g. without "decode" for a prefill-only
        benchmark, whose sessions would otherwise hold a second copy of the weights)."""
        import onnxruntime as ort
        self.artifact, self.threads = artifact, threads
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.sessions = {}
        for name in graph_names(artifact) if graphs is None else graphs:
            try:
                self.sessions[name] = ort.InferenceSession(str(artifact.graph_path(name)), self.session_options(name),
                                                           providers=providers)
            except Exception as error:  # onnxruntime raises its own exception types
                raise ArtifactError(f"artifact: cannot load {artifact.graph_path(name)}: {str(error).splitlines()[0]}") from None
        self.refresh_bindings()

    def session_options(self, graph: str):
        """The options graph `graph`'s session is created with.

        The vision and prefill graphs run back to back, one session after the other, and
        each session has its own thread pool. With ONNX Runtime's default spinning, the pool
        of the graph that just finished keeps its threads busy-waiting on the cores the next
        graph's pool needs: the more segments (the more pruning layers), the more time lost,
        and far more when other processes share the cores. So their workers block instead of
        spinning. The decode graph runs alone, one call after the other on the same pool, and
        keeps the default."""
        import onnxruntime as ort
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        if graph != "decode":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        return options

    def refresh_bindings(self) -> None:
        """Read each session's input and output names and input types (again, after a
        session in `self.sessions` was replaced, e.g. by a profiling one)."""
        self._inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}
        # Feeds are cast to each input's declared type (e.g. float32 pixels into a float16 graph).
        self._types = {n: {i.name: _NUMPY_TYPES[i.type] for i in s.get_inputs()} for n, s in self.sessions.items()}
        self._outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}

    def _run(self, name: str, inputs: dict) -> dict:
        types = self._types[name]
        feed = {k: inputs[k].detach().cpu().numpy().astype(types[k], copy=False) for k in self._inputs[name]}
        values = self.sessions[name].run(self._outputs[name], feed)
        return {method_output_name(o): torch.from_numpy(np.ascontiguousarray(v)) for o, v in zip(self._outputs[name], values)}

    def decode(self, inputs: dict) -> dict:
        """The decode graph through I/O binding: every input, the cache buffers included, is
        bound where its torch tensor lies (no copy when it already has the graph's type and is
        contiguous, as the loop's buffers are), and the outputs (logits and the new token's
        entries, small) are written into torch tensors allocated here."""
        session = self.sessions["decode"]
        binding = session.io_binding()
        types = self._types["decode"]
        bound = []  # the bound tensors must live until the run is over
        for name in self._inputs["decode"]:
            value = _bindable(inputs[name], types[name])
            binding.bind_input(name, value.device.type, value.device.index or 0, types[name], tuple(value.shape),
                               value.data_ptr())
            bound.append(value)
        device = inputs["token_ids"].device
        outputs = {}
        for output in session.get_outputs():
            shape = _decode_output_shape(output.name, output.shape, inputs)
            value = torch.empty(shape, dtype=_TORCH_OF_NUMPY[_NUMPY_TYPES[output.type]], device=device)
            binding.bind_output(output.name, value.device.type, value.device.index or 0, _NUMPY_TYPES[output.type],
                                shape, value.data_ptr())
            outputs[method_output_name(output.name)] = value
        binding.synchronize_inputs()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
_TORCH_OF_NUMPY = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64,
                   np.int32: torch.int32, np.bool_: torch.bool}


def _decode_output_shape(name: str, declared: list, inputs: dict) -> tuple:
    """The shape of a decode graph output, known before the run (so it can be bound):
    `present.<l>.<key|value>` is the new token's entry, `past.<l>.<...>`'s shape with one
    column; the others (logits [batch, vocab]) have fixed sizes but for `batch`."""
    parts = name.split(".")
    if parts[0] == "present":
        past = inputs[f"past.{parts[1]}.{parts[2]}"].shape
        return (past[0], past[1], 1, past[3])
    batch = inputs["token_ids"].shape[0]
    shape = tuple(batch if d == "batch" else d for d in declared)
    if not all(isinstance(d, int) for d in shape):
        raise ArtifactError(f"onnxruntime backend: decode output {name!r} has shape {declared}; expected fixed "
                            "sizes but for 'batch'")
    return shape


def _bindable(tensor: torch.Tensor, numpy_type) -> torch.Tensor:
    """`tensor` as ONNX Runtime can read it in place: the graph input's type, contiguous
    (the tensor itself when it already is; a cast or a strided view is copied)."""
    return tensor.detach().to(_TORCH_OF_NUMPY[numpy_type]).contiguous()


def torch_executor(artifact: Artifact, model: str | None = None, device: str = "cpu"):
    """The PyTorch reference on the manifest's checkpoint (or `model`), same plan. On the CPU
    in float32 its linear layers run on oneDNN-packed weights (`methods/cpu_linear.py`)."""
    from sparsevlm.export.exporter import config_sha256
    from sparsevlm.methods.cpu_linear import with_packed_linears
    from sparsevlm.methods.generation import TorchExecutor
    from sparsevlm.methods.loading import load_model
    torch_model, _ = load_model(model or artifact.manifest["model"]["source"], dtype=artifact.manifest["dtype"],
                                device=device)
    if config_sha256(torch_model) != artifact.manifest["model"]["config_sha256"]:
        raise ArtifactError("model: the checkpoint's config differs from the one the artifact was exported from")
    return TorchExecutor(with_packed_linears(torch_model), artifact.plan)  # the unpacked weights go with torch_model


# ---------------------------------------------------------------------------------------------
# TensorRT. The decisions (dtypes, alignment, profile ranges, which runtime loads a plan) are
# small functions without CUDA; TensorRTExecutor wires them to the TensorRT API and CudaStreamOrder
# is the only part that needs a GPU (tests/test_trt_executor.py drives the rest with fakes).

TENSOR_ALIGNMENT = 256  # bytes; TensorRT requires every I/O tensor address to be a multiple of it
LEAN_RUNTIME_ENV = "SPARSEVLM_LEAN_RUNTIME"

# By trt.DataType name: the same in `tensorrt` and the lean modules, and bfloat16 has no numpy type.
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}


def torch_dtype(trt_dtype) -> torch.dtype:
    """The torch dtype of an engine tensor's trt.DataType."""
    name = getattr(trt_dtype, "name", str(trt_dtype))
    if name not in _TORCH_DTYPES:
        raise ArtifactError(f"tensorrt backend: engine tensor type {name} has no torch equivalent "
                            f"(supported: {', '.join(_TORCH_DTYPES)})")
    return _TORCH_DTYPES[name]


def empty_aligned(shape, dtype: torch.dtype, device, alignment: int = TENSOR_ALIGNMENT) -> torch.Tensor:
    """An uninitialised contiguous tensor whose data starts at a multiple of `alignment` bytes.
    (Fresh CUDA allocations already are; a CPU one or a reused block may not be.)"""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.data_ptr() % alignment == 0:
        return tensor
    nbytes = tensor.numel() * tensor.element_size()
    buffer = torch.empty(nbytes + alignment, dtype=torch.uint8, device=device)
    offset = -buffer.data_ptr() % alignment
    return buffer[offset:offset + nbytes].view(dtype).view(tensor.shape)


def aligned(tensor: torch.Tensor, alignment: int = TENSOR_ALIGNMENT) -> torch.Tensor:
    """`tensor` itself when it is contiguous and aligned, else an aligned contiguous copy (a
    slice or view of a bigger tensor starts wherever its first element is)."""
    if tensor.is_contiguous() and tensor.data_ptr() % alignment == 0:
        return tensor
    return empty_aligned(tensor.shape, tensor.dtype, tensor.device, alignment).copy_(tensor)


def profile_shape_error(graph: str, tensor: str, shape, profile: int, bounds) -> str | None:
    """None when `shape` lies within `bounds` = (min, opt, max) of `tensor` in optimization
    profile `profile` (engine.get_tensor_profile_shape), else the message saying why not."""
    low, _, high = (tuple(int(d) for d in bound) for bound in bounds)
    shape = tuple(int(d) for d in shape)
    if len(shape) == len(low) == len(high) and all(lo <= d <= hi for lo, d, hi in zip(low, shape, high)):
        return None
    return (f"tensorrt backend: graph {graph!r}, input {tensor!r}: shape {list(shape)} is outside optimization "
            f"profile {profile} (min {list(low)}, max {list(high)})")


@dataclass(frozen=True)
class PlanLoading:
    """How one engine plan is deserialized, read from its manifest entry (sparsevlm-build)."""

    host_code_allowed: bool  # version compatible: the plan carries host code (lean runtime, plugins)
    lean_runtime: bool  # built with --exclude-lean-runtime: a loaded lean runtime library reads it


def plan_loading(graph: str, entry: dict) -> PlanLoading:
    """PlanLoading from the entry's `version_compatible`, `exclude_lean_runtime` and
    `embeds_lean_runtime` (absent in manifests written before it existed: derived)."""
    flags = {}
    for key in ("version_compatible", "exclude_lean_runtime"):
        flags[key] = entry.get(key, False)
        if not isinstance(flags[key], bool):
            raise ArtifactError(f"manifest: engines[{graph!r}][{key!r}] must be true or false, got {flags[key]!r}")
    compatible, excluded = flags["version_compatible"], flags["exclude_lean_runtime"]
    if excluded and not compatible:
        raise ArtifactError(f"manifest: engines[{graph!r}] excludes the lean runtime but is not version compatible")
    embeds = compatible and not excluded
    if entry.get("embeds_lean_runtime", embeds) != embeds:
        raise ArtifactError(f"manifest: engines[{graph!r}]['embeds_lean_runtime'] is "
                            f"{entry['embeds_lean_runtime']!r}, but version_compatible={compatible} and "
                            f"exclude_lean_runtime={excluded} say {embeds}")
    # As trtexec does: every version-compatible plan needs host code allowed on its runtime.
    return PlanLoading(host_code_allowed=compatible, lean_runtime=excluded)


def find_lean_runtime(path: str | os.PathLike | None = None) -> Path:
    """The lean runtime library that runs plans built with --exclude-lean-runtime (it must be
    the TensorRT version that built them): `path`, else $SPARSEVLM_LEAN_RUNTIME, else
    libnvinfer_lean.so.* of the installed `tensorrt-lean-*-libs` wheel (`tensorrt_lean_libs`)."""
    if path is not None or os.environ.get(LEAN_RUNTIME_ENV):
        where = Path(path if path is not None else os.environ[LEAN_RUNTIME_ENV])
        if not where.is_file():
            source = "the given path" if path is not None else f"${LEAN_RUNTIME_ENV}"
            raise FileNotFoundError(f"tensorrt backend: lean runtime library not found at {where} ({source})")
        return where.resolve()
    spec = importlib.util.find_spec("tensorrt_lean_libs")
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(p for folder in folders for p in Path(folder).glob("libnvinfer_lean.so*"))
    if not found:
        raise FileNotFoundError(f"tensorrt backend: the engines were built with --exclude-lean-runtime and need a "
                                f"lean runtime library (libnvinfer_lean.so of the TensorRT version that built "
                                f"them): set {LEAN_RUNTIME_ENV} or install tensorrt-lean-cu13-libs")
    return found[0].resolve()


class CudaStreamOrder:
    """The engines' own CUDA stream, ordered both ways against the caller's current torch
    stream: the engine starts after the work that produced its inputs, and the caller's later
    work (reading outputs, reusing the inputs' memory) starts after the engine. One stream for
    all engines also serialises their use of the shared device memory."""

    def __init__(self):
        self.stream = torch.cuda.Stream()

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    def engine_waits_for_producer(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())

    def consumer_waits_for_engine(self) -> None:
        torch.cuda.current_stream().wait_stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class TensorRTExecutor(GraphExecutor):
    """Engines from `manifest["engines"]` (written by sparsevlm-build); one execution
    context per optimization profile; inputs and outputs as CUDA torch tensors.

    - Inputs are cast to each engine tensor's dtype and copied to 256-byte aligned memory
      when they are not aligned. Each call runs on the context of the profile its input
      shapes select (`profile_for_shapes`, the runtime's profile rule: for a pruning segment
      the bucket of the visual width the loop runs at); no profile is remembered between
      calls, so concurrent callers cannot change each other's choice.
    - Version-compatible plans get engine host code allowed; plans built with
      --exclude-lean-runtime are read by a lean runtime library (`lean_runtime`, see
      `find_lean_runtime`) loaded with `Runtime.load_runtime`, with the plugin library
      loaded into its own registry.
    - The contexts are created without device memory and share one block, sized for the
      largest profile of any engine: the graphs run one at a time, in order, on one stream.
    - All output shapes follow from input shapes (TokenPrune's width is the length of an
      input), so outputs are allocated after `set_input_shape`, with no output allocator.

    `tensorrt`, `device` and `stream_order` exist for the tests, which run the executor's
    logic on the CPU with a fake TensorRT module; leave them at their defaults."""

    def __init__(self, artifact: Artifact, plugin_library: str | None = None, lean: bool = False,
                 lean_runtime: str | os.PathLike | None = None, *, tensorrt=None, device: str = "cuda",
                 stream_order=None):
        from sparsevlm.trt_plugins import load_plugin_library
        trt = tensorrt if tensorrt is not None else _import_tensorrt(lean)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("tensorrt backend: no CUDA device is available")
        engines = artifact.manifest.get("engines") or {}
        missing = [name for name in graph_names(artifact) if name not in engines]
        if missing:
            raise RuntimeError(f"tensorrt backend: {artifact.root} has no engine for {', '.join(missing)}; "
                               "run sparsevlm-build first")
        self.trt, self.artifact = trt, artifact
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.order = stream_order if stream_order is not None else CudaStreamOrder()
        load_plugin_library(trt.get_plugin_registry(), plugin_library)
        self._runtimes: dict[PlanLoading, tuple] = {}  # (runtime, parent runtime)
        self.engines, self._bounds_cache = {}, {}
        for name in graph_names(artifact):
            entry = engines[name]
            runtime = self._runtime(plan_loading(name, entry), plugin_library, lean_runtime)
            path = artifact.root / entry["file"]
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ArtifactError(f"tensorrt backend: TensorRT {getattr(trt, '__version__', '?')} cannot "
                                    f"deserialize {path} (graph {name!r}, built by TensorRT "
                                    f"{entry.get('tensorrt_version', '?')}, version_compatible="
                                    f"{entry.get('version_compatible', False)}); see the TensorRT log above")
            self.engines[name] = engine
        # One block for every context (ExecutionContextAllocationStrategy.USER_MANAGED) instead
        # of a static block per context: at most one context runs at a time.
        self.device_memory_size = max(engine.get_device_memory_size_for_profile_v2(index)
                                      for engine in self.engines.values()
                                      for index in range(engine.num_optimization_profiles))
        self.device_memory = empty_aligned((max(self.device_memory_size, 1),), torch.uint8, self.device)
        self._empty_placeholder = empty_aligned((TENSOR_ALIGNMENT,), torch.uint8, self.device)
        self.contexts = {}
        for name, engine in self.engines.items():
            self.contexts[name] = []
            for index in range(engine.num_optimization_profiles):
                context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if context is None:
                    raise RuntimeError(f"tensorrt backend: graph {name!r}: TensorRT could not create an execution "
                                       f"context for profile {index}; see the TensorRT log above")
                context.set_device_memory(self.device_memory.data_ptr(), self.device_memory_size)
                if not context.set_optimization_profile_async(index, self.order.handle):
                    raise RuntimeError(f"tensorrt backend: graph {name!r}: TensorRT could not select "
                                       f"optimization profile {index}; see the TensorRT log above")
                self.contexts[name].append(context)
        self.order.synchronize()
        self._lock = threading.Lock()  # a context's addresses and shapes belong to one call at a time

    def _runtime(self, loading: PlanLoading, plugin_library, lean_runtime):
        """The runtime that deserializes plans loaded the way `loading` says (one per way)."""
        if loading in self._runtimes:
            return self._runtimes[loading][0]
        from sparsevlm.trt_plugins import load_plugin_library
        runtime = parent = self.trt.Runtime(self.logger)
        if loading.lean_runtime:
            library = find_lean_runtime(lean_runtime)
            runtime = parent.load_runtime(str(library))
            if runtime is None:
                raise RuntimeError(f"tensorrt backend: TensorRT could not load the lean runtime {library}; "
                                   "see the TensorRT log above")
            # The loaded runtime has its own plugin registry.
            load_plugin_library(runtime.get_plugin_registry(), plugin_library)
        if loading.host_code_allowed:
            runtime.engine_host_code_allowed = True
        self._runtimes[loading] = (runtime, parent)  # the parent must outlive what it loaded
        return runtime

    def profile_for(self, name: str, shapes: dict[str, tuple]) -> int:
        """The optimization profile that runs graph `name` at these input shapes, or a
        ProfileError saying which input lies outside which profile."""
        bounds = self._profile_bounds(name)
        profile = profile_for_shapes(bounds, shapes)
        if profile is not None:
            return profile
        reasons = [next(error for tensor, shape in shapes.items()
                        if (error := profile_shape_error(name, tensor, shape, index, bounds[index][tensor])))
                   for index in range(len(bounds))]
        raise ProfileError(reasons[0] if len(reasons) == 1 else
                           f"tensorrt backend: graph {name!r}: the input shapes fit none of its {len(reasons)} "
                           "optimization profiles: " + "; ".join(r.split(": ", 1)[1] for r in reasons))

    def _profile_bounds(self, name: str) -> list[dict[str, tuple]]:
        """Per optimization profile of graph `name`, each input's (min, opt, max) shape. Read
        from the engine once per graph: the decode graph asks at every token."""
        bounds = self._bounds_cache.get(name)
        if bounds is None:
            engine = self.engines[name]
            inputs = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                      if engine.get_tensor_mode(engine.get_tensor_name(i)) == self.trt.TensorIOMode.INPUT]
            bounds = [{tensor: tuple(tuple(int(d) for d in bound)
                                     for bound in engine.get_tensor_profile_shape(tensor, index))
                       for tensor in inputs} for index in range(engine.num_optimization_profiles)]
            self._bounds_cache[name] = bounds  # a racing thread computes the same value
        return bounds

    def cache_buffer(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """The decode caches' buffers (methods/decode_cache.py): aligned device memory, so the
        decode graph binds them by their own address at every token (`aligned` copies nothing)."""
        return empty_aligned(shape, dtype, self.device)

    def _set_address(self, graph: str, context, tensor: str, value: torch.Tensor) -> None:
        # An empty tensor's data_ptr() is 0, and TensorRT wants a non-null address for every
        # input: empty tensors point at a small aligned placeholder (nothing reads it).
        address = value.data_ptr() if value.numel() else self._empty_placeholder.data_ptr()
        if not context.set_tensor_address(tensor, address):
            raise RuntimeError(f"tensorrt backend: graph {graph!r}: TensorRT refused the address of {tensor!r} "
                               f"({address % TENSOR_ALIGNMENT} bytes past a {TENSOR_ALIGNMENT}-byte boundary); "
                               "see the TensorRT log above")

    def _run(self, name: str, inputs: dict) -> dict:
        trt, engine = self.trt, self.engines[name]
        tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {t: engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT for t in tensors}
        absent = [t for t in tensors if is_input[t] and t not in inputs]
        if absent:
            raise InputError(f"tensorrt backend: graph {name!r} needs input(s) {absent}; got {sorted(inputs)}")
        profile = self.profile_for(name, {t: tuple(inputs[t].shape) for t in tensors if is_input[t]})
        context = self.contexts[name][profile]
        bound, outputs = [], {}
        with self._lock:
            for tensor in (t for t in tensors if is_input[t]):
                host = getattr(engine.get_tensor_location(tensor), "name", "") == "HOST"  # shape tensors
                value = aligned(inputs[tensor].to(device="cpu" if host else self.device,
                                                  dtype=torch_dtype(engine.get_tensor_dtype(tensor))))
                shape = tuple(value.shape)
                if not context.set_input_shape(tensor, shape):
                    raise ProfileError(f"tensorrt backend: graph {name!r}, input {tensor!r}: TensorRT rejected "
                                       f"shape {list(shape)} in optimization profile {profile}")
                self._set_address(name, context, tensor, value)
                bound.append(value)
            for tensor in (t for t in tensors if not is_input[t]):
                shape = tuple(context.get_tensor_shape(tensor))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"tensorrt backend: graph {name!r}: output {tensor!r} has shape {list(shape)} "
                                       "after every input shape is set (data-dependent outputs are not supported)")
                value = empty_aligned(shape, torch_dtype(engine.get_tensor_dtype(tensor)), self.device)
                self._set_address(name, context, tensor, value)
                outputs[method_output_name(tensor)] = value
            self.order.engine_waits_for_producer()
            executed = context.execute_async_v3(self.order.handle)
            self.order.consumer_waits_for_engine()
        if not executed:
            raise RuntimeError(f"tensorrt backend: graph {name!r} failed to execute; see the TensorRT log above")
        return outputs


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
