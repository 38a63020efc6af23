"""The TensorRT executor (runtime/backends.py) on the CPU: its decisions are small functions,
and the executor itself runs against a fake TensorRT module that implements the documented
Python API it uses (Runtime, ICudaEngine, IExecutionContext, IPluginRegistry) and records the
calls. The fake context really reads its inputs from the addresses it is given, as the dtype
the engine declares, and writes its outputs there, so a wrong dtype or address shows up as
wrong numbers. Loading the real plugin library twice into the real lean runtime's registry is
in tests/test_trt_plugin_library.py; engines on a GPU are in test_trt_build.py and
test_runtime.py (skipped without one)."""

from __future__ import annotations

import ctypes
import enum
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsevlm.export.manifest import ArtifactError
from sparsevlm.export import trt_build
from sparsevlm.methods.generation import InputError
from sparsevlm.runtime import backends
from sparsevlm.runtime.artifact import Artifact
from sparsevlm.runtime.backends import (TENSOR_ALIGNMENT, PlanLoading, TensorRTExecutor, aligned, empty_aligned,
                                        find_lean_runtime, plan_loading, profile_shape_error, torch_dtype)
from sparsevlm.methods.profiles import ProfileError, profile_for_shapes, select_profile
from sparsevlm.trt_plugins import PLUGIN_NAMESPACE, PluginLibraryError

# ---------------------------------------------------------------------------------------------
# A fake `tensorrt` module


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    BF16 = 2
    INT8 = 3
    INT32 = 4
    INT64 = 5
    BOOL = 6
    UINT8 = 7
    FP8 = 8


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class TensorLocation(enum.Enum):
    DEVICE = 0
    HOST = 1


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


# Written out by hand, independently of the executor's table.
FAKE_TORCH_TYPES = {DataType.FLOAT: torch.float32, DataType.HALF: torch.float16, DataType.INT32: torch.int32,
                    DataType.INT64: torch.int64, DataType.BOOL: torch.bool}


def read_memory(address: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """What a kernel would read: the bytes at `address`, taken as `dtype`."""
    count = 1
    for d in shape:
        count *= d
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(ctypes.string_at(address, nbytes)), dtype=dtype).reshape(tuple(shape))


class FakeRegistry:
    """IPluginRegistry as measured with the lean runtime: load_library returns a handle the
    first time and None for a library it already holds (or cannot load)."""

    def __init__(self):
        self.loaded, self.calls = set(), []

    def load_library(self, path):
        self.calls.append(path)
        if path in self.loaded or not Path(path).read_bytes().startswith(b"plugin"):
            return None
        self.loaded.add(path)
        return object()

    def get_creator(self, name, version, namespace=""):
        return object() if self.loaded and namespace == PLUGIN_NAMESPACE else None


class FakeEngine:
    """Inputs {name: (DataType, [(min, opt, max) per profile])}; outputs {name: (DataType,
    input)}: each output is its input * 2 + 1, computed in the output's type."""

    def __init__(self, inputs: dict, outputs: dict, memory: list[int], log: list, reject_shapes: bool = False):
        self.inputs, self.outputs, self.memory, self.log = inputs, outputs, memory, log
        self.reject_shapes = reject_shapes
        self.names = list(inputs) + list(outputs)
        self.contexts = []

    num_io_tensors = property(lambda self: len(self.names))
    num_optimization_profiles = property(lambda self: len(self.memory))

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return (self.inputs.get(name) or self.outputs[name])[0]

    def get_tensor_location(self, name):
        return TensorLocation.DEVICE

    def get_tensor_profile_shape(self, name, profile_index):
        return [list(bound) for bound in self.inputs[name][1][profile_index]]

    def get_device_memory_size_for_profile_v2(self, profile_index):
        return self.memory[profile_index]

    @property
    def device_memory_size_v2(self):
        return max(self.memory)

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        context = FakeContext(self, strategy)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.strategy = engine, strategy
        self.memory, self.profile, self.shapes, self.addresses = None, 0, {}, {}
        self.calls = []

    def set_device_memory(self, memory, size):
        self.calls.append("set_device_memory")
        self.memory = (memory, size)

    def set_optimization_profile_async(self, profile_index, stream_handle):
        self.calls.append("set_optimization_profile_async")
        self.profile = profile_index
        return True

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.inputs[name][1][self.profile]
        inside = len(shape) == len(low) and all(lo <= d <= hi for lo, d, hi in zip(low, shape, high))
        if not inside or self.engine.reject_shapes:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        source = self.engine.outputs[name][1]
        return self.shapes.get(source, (-1,))

    def set_tensor_address(self, name, memory):
        if memory % 256:  # "The pointer must have at least 256-byte alignment."
            return False
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        self.engine.log.append(("execute", stream_handle))
        if any(not self.addresses.get(name) for name in self.engine.names):
            return False  # "each input must have a non-null address and each output [...]"
        need = self.engine.memory[self.profile]
        if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED and (
                self.memory is None or self.memory[1] < need):
            return False
        for name, (dtype, source) in self.engine.outputs.items():
            value = read_memory(self.addresses[source], self.shapes[source],
                                FAKE_TORCH_TYPES[self.engine.inputs[source][0]])
            result = value.to(FAKE_TORCH_TYPES[dtype]) * 2 + 1
            ctypes.memmove(self.addresses[name], result.contiguous().data_ptr(), result.numel() * result.element_size())
        return True


class FakeRuntime:
    """Plans are JSON: {"graph", "version_compatible", "exclude_lean_runtime"}. Like TensorRT,
    a version-compatible plan needs engine host code allowed, and one without the lean runtime
    needs a loaded lean runtime."""

    def __init__(self, module, lean_library=None):
        self.module, self.lean_library = module, lean_library
        self.engine_host_code_allowed = False
        self.registry = FakeRegistry()  # a loaded lean runtime has its own plugin registry

    def get_plugin_registry(self):
        return self.registry

    def load_runtime(self, path):
        self.module.log.append(("load_runtime", path))
        runtime = FakeRuntime(self.module, lean_library=path)
        self.module.loaded_runtimes.append(runtime)
        return runtime

    def deserialize_cuda_engine(self, serialized_engine):
        try:
            plan = json.loads(serialized_engine)
        except ValueError:
            return None
        if plan["version_compatible"] and not self.engine_host_code_allowed:
            return None
        if plan["exclude_lean_runtime"] and self.lean_library is None:
            return None
        self.module.log.append(("deserialize", plan["graph"], self.lean_library, self.engine_host_code_allowed))
        return self.module.engines[plan["graph"]]


def fake_tensorrt(engines: dict, registry=None, log=None) -> SimpleNamespace:
    module = SimpleNamespace(__version__="11.4.0", engines=engines, log=log if log is not None else [],
                             loaded_runtimes=[], DataType=DataType, TensorIOMode=TensorIOMode,
                             TensorLocation=TensorLocation,
                             ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy)
    registry = registry if registry is not None else FakeRegistry()
    module.get_plugin_registry = lambda: registry
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    module.Runtime = lambda logger: FakeRuntime(module)
    return module


class RecordingOrder:
    """Stands in for CudaStreamOrder and records where the ordering calls fall."""

    handle = 4242

    def __init__(self, log):
        self.log = log

    def engine_waits_for_producer(self):
        self.log.append("engine waits for producer")

    def consumer_waits_for_engine(self):
        self.log.append("consumer waits for engine")

    def synchronize(self):
        self.log.append("synchronize")


def fake_engines(log, vision_dtype=DataType.FLOAT, reject_shapes=False) -> dict:
    batch = [((1,), (1,), (8,))]
    return {
        "vision": FakeEngine({"pixel_values": (vision_dtype, [((1, 3, 4), (1, 3, 4), (8, 3, 4))])},
                             {"image_features": (vision_dtype, "pixel_values")}, [1000], log),
        "segment_0": FakeEngine({"hidden": (DataType.FLOAT, [((1, 2, 3), (1, 4, 3), (2, 8, 3)),
                                                              ((1, 9, 3), (1, 12, 3), (2, 16, 3))]),
                                 "keep_count": (DataType.INT32, batch + [((1,), (1,), (2,))])},
                                {"hidden_out": (DataType.FLOAT, "hidden"), "keep_count_out": (DataType.INT64, "keep_count")},
                                [5000, 20000], log, reject_shapes=reject_shapes),
        "decode": FakeEngine({"ids": (DataType.INT64, [((1,), (1,), (8,))])},
                             {"logits": (DataType.FLOAT, "ids")}, [3000], log),
    }


def fake_artifact(root: Path, version_compatible=False, exclude_lean_runtime=False, graphs_flags=None,
                  corrupt: str | None = None) -> Artifact:
    """An artifact whose engines are fake plans; `graphs_flags` overrides (vc, exclude) per graph."""
    (root / "engines").mkdir(parents=True, exist_ok=True)
    entries = {}
    for graph in ("vision", "segment_0", "decode"):
        compatible, excluded = (graphs_flags or {}).get(graph, (version_compatible, exclude_lean_runtime))
        plan = {"graph": graph, "version_compatible": compatible, "exclude_lean_runtime": excluded}
        data = b"not a plan" if graph == corrupt else json.dumps(plan).encode()
        (root / "engines" / f"{graph}.plan").write_bytes(data)
        entries[graph] = {"file": f"engines/{graph}.plan", "tensorrt_version": "11.4.0",
                          "version_compatible": compatible, "exclude_lean_runtime": excluded,
                          "embeds_lean_runtime": compatible and not excluded}
    manifest = {"segments": [{"graph": "segment_0"}],
                "graphs": {g: {} for g in entries}, "engines": entries}
    return Artifact(root, manifest, plan=None)


@pytest.fixture
def plugin_library(tmp_path) -> Path:
    library = tmp_path / "libsparsevlm_plugins.so"
    library.write_bytes(b"plugin library (the fake registry only reads this marker)")
    return library


def make_executor(tmp_path, plugin_library, log=None, engines=None, registry=None, **artifact_options):
    log = log if log is not None else []
    trt = fake_tensorrt(engines if engines is not None else fake_engines(log), registry, log)
    artifact = fake_artifact(tmp_path / "artifact", **artifact_options)
    executor = TensorRTExecutor(artifact, plugin_library, tensorrt=trt, device="cpu", stream_order=RecordingOrder(log))
    return executor, trt


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_torch_dtype_by_tensorrt_type_name():
    assert [torch_dtype(t) for t in (DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.INT8, DataType.INT32,
                                     DataType.INT64, DataType.BOOL, DataType.UINT8)] == [
        torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8]
    with pytest.raises(ArtifactError, match="engine tensor type FP8 has no torch equivalent"):
        torch_dtype(DataType.FP8)


def test_aligned_copies_only_what_is_not_aligned():
    base = empty_aligned((64,), torch.float32, "cpu")
    base.copy_(torch.arange(64, dtype=torch.float32))
    assert base.data_ptr() % TENSOR_ALIGNMENT == 0
    assert aligned(base) is base
    view = base[1:]  # 4 bytes past the boundary
    assert view.data_ptr() % TENSOR_ALIGNMENT == 4
    copy = aligned(view)
    assert copy.data_ptr() % TENSOR_ALIGNMENT == 0 and torch.equal(copy, torch.arange(1, 64, dtype=torch.float32))
    transposed = base.view(8, 8).t()
    copy = aligned(transposed)
    assert copy.is_contiguous() and copy.data_ptr() % TENSOR_ALIGNMENT == 0 and torch.equal(copy, transposed)
    for dtype in (torch.float16, torch.bool, torch.int64):
        for shape in ((3, 5), (0, 4), ()):
            tensor = empty_aligned(shape, dtype, "cpu")
            assert tensor.shape == shape and tensor.dtype == dtype and tensor.data_ptr() % TENSOR_ALIGNMENT == 0


def test_profile_shape_error_names_graph_input_shape_and_range():
    bounds = [[1, 2, 3], [1, 4, 3], [2, 8, 3]]
    assert profile_shape_error("segment_0", "hidden", (2, 8, 3), 1, bounds) is None
    assert profile_shape_error("segment_0", "hidden", (1, 2, 3), 1, bounds) is None
    message = profile_shape_error("segment_0", "hidden", (1, 9, 3), 1, bounds)
    assert message == ("tensorrt backend: graph 'segment_0', input 'hidden': shape [1, 9, 3] is outside "
                       "optimization profile 1 (min [1, 2, 3], max [2, 8, 3])")
    assert profile_shape_error("segment_0", "hidden", (1, 2), 0, bounds) is not None  # rank
    assert profile_shape_error("segment_0", "hidden", (3, 4, 3), 0, bounds) is not None  # batch above max


@pytest.mark.parametrize("entry,want", [
    ({}, PlanLoading(host_code_allowed=False, lean_runtime=False)),
    ({"version_compatible": False, "exclude_lean_runtime": False, "embeds_lean_runtime": False},
     PlanLoading(host_code_allowed=False, lean_runtime=False)),
    ({"version_compatible": True, "exclude_lean_runtime": False, "embeds_lean_runtime": True},
     PlanLoading(host_code_allowed=True, lean_runtime=False)),
    ({"version_compatible": True, "exclude_lean_runtime": True, "embeds_lean_runtime": False},
     PlanLoading(host_code_allowed=True, lean_runtime=True)),
    ({"version_compatible": True}, PlanLoading(host_code_allowed=True, lean_runtime=False)),  # older manifest
])
def test_plan_loading_follows_the_manifest_entry(entry, want):
    assert plan_loading("vision", entry) == want


@pytest.mark.parametrize("entry,message", [
    ({"version_compatible": False, "exclude_lean_runtime": True}, r"excludes the lean runtime but is not version"),
    ({"version_compatible": True, "exclude_lean_runtime": False, "embeds_lean_runtime": False},
     r"\['embeds_lean_runtime'\] is False, but version_compatible=True"),
    ({"version_compatible": "yes"}, r"engines\['vision'\]\['version_compatible'\] must be true or false"),
])
def test_plan_loading_rejects_inconsistent_entries(entry, message):
    with pytest.raises(ArtifactError, match=message):
        plan_loading("vision", entry)


def test_find_lean_runtime_argument_environment_then_wheel(tmp_path, monkeypatch):
    library = tmp_path / "libnvinfer_lean.so.11"
    library.write_bytes(b"")
    other = tmp_path / "other.so"
    other.write_bytes(b"")
    monkeypatch.setenv(backends.LEAN_RUNTIME_ENV, str(other))
    assert find_lean_runtime(library) == library.resolve()
    assert find_lean_runtime() == other.resolve()
    monkeypatch.setenv(backends.LEAN_RUNTIME_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match=r"missing.so \(\$SPARSEVLM_LEAN_RUNTIME\)"):
        find_lean_runtime()
    monkeypatch.delenv(backends.LEAN_RUNTIME_ENV)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"--exclude-lean-runtime.*set SPARSEVLM_LEAN_RUNTIME"):
        find_lean_runtime()


def test_find_lean_runtime_in_the_lean_libs_wheel(monkeypatch):
    pytest.importorskip("tensorrt_lean_libs", reason="the tensorrt-lean-*-libs wheel is not installed")
    monkeypatch.delenv(backends.LEAN_RUNTIME_ENV, raising=False)
    found = find_lean_runtime()
    assert found.name.startswith("libnvinfer_lean.so") and found.parent.name == "tensorrt_lean_libs"


# ---------------------------------------------------------------------------------------------
# The executor against the fake module


@pytest.mark.parametrize("engine_type,given", [
    (DataType.HALF, torch.float32),   # a float16 artifact gets float32 pixel values
    (DataType.FLOAT, torch.float16),
    (DataType.INT32, torch.int64),
])
def test_inputs_are_cast_to_the_engine_tensor_type(tmp_path, plugin_library, engine_type, given):
    log = []
    engines = fake_engines(log, vision_dtype=engine_type)
    executor, _ = make_executor(tmp_path, plugin_library, log=log, engines=engines)
    values = torch.arange(24).reshape(2, 3, 4) - 7
    pixels = (values / 3).to(given) if given.is_floating_point else values.to(given)
    out = executor.vision(pixels)
    engine_dtype = FAKE_TORCH_TYPES[engine_type]
    want = pixels.to(engine_dtype) * 2 + 1
    assert out["image_features"].dtype == engine_dtype
    assert torch.equal(out["image_features"], want)


def test_every_address_is_aligned_even_for_slices(tmp_path, plugin_library):
    log = []
    executor, trt = make_executor(tmp_path, plugin_library, log=log)
    big = torch.arange(3 * 3 * 4 + 1, dtype=torch.float32)
    pixels = big[1:].view(3, 3, 4)  # a view 4 bytes past its buffer's start
    assert pixels.data_ptr() % TENSOR_ALIGNMENT != 0
    out = executor.vision(pixels)
    assert torch.equal(out["image_features"], pixels * 2 + 1)
    context = trt.engines["vision"].contexts[0]
    assert context.addresses and all(address % TENSOR_ALIGNMENT == 0 for address in context.addresses.values())


def test_empty_tensors_get_a_non_null_aligned_address(tmp_path, plugin_library):
    log = []
    engines = fake_engines(log)
    engines["vision"] = FakeEngine({"pixel_values": (DataType.FLOAT, [((0, 3, 4), (1, 3, 4), (8, 3, 4))])},
                                   {"image_features": (DataType.FLOAT, "pixel_values")}, [1000], log)
    executor, trt = make_executor(tmp_path, plugin_library, log=log, engines=engines)
    assert torch.empty(0, 3, 4).data_ptr() == 0  # what torch gives for an empty tensor
    out = executor.vision(torch.empty(0, 3, 4))
    assert out["image_features"].shape == (0, 3, 4)
    addresses = trt.engines["vision"].contexts[0].addresses
    assert all(address and address % TENSOR_ALIGNMENT == 0 for address in addresses.values())


def test_decode_binds_the_cache_buffers_by_their_own_address(tmp_path, plugin_library):
    """The decode caches (methods/decode_cache.py) are allocated by the executor's
    `cache_buffer`, aligned, so every decode step binds the buffer itself (no copy), at a
    capacity inside the decode profile's `past_len` range, and reads what the host wrote into
    it in place between steps."""
    log = []
    engines = fake_engines(log)
    engines["decode"] = FakeEngine({"token_ids": (DataType.INT64, [((1, 1), (1, 1), (8, 1))]),
                                    "past.0.key": (DataType.FLOAT, [((1, 2, 1, 4), (1, 2, 16, 4), (8, 2, 64, 4))])},
                                   {"logits": (DataType.FLOAT, "token_ids"),
                                    "past_read": (DataType.FLOAT, "past.0.key")}, [3000], log)
    executor, trt = make_executor(tmp_path, plugin_library, log=log, engines=engines)
    context = trt.engines["decode"].contexts[0]
    for shape in [(2, 2, 10, 4), (1, 2, 3, 4), (3, 2, 17, 4)]:
        assert executor.cache_buffer(shape, torch.float32, torch.device("cpu")).data_ptr() % TENSOR_ALIGNMENT == 0
    cache = executor.cache_buffer((2, 2, 10, 4), torch.float32, torch.device("cpu"))
    cache.zero_()
    for step in range(3):
        cache[:, :, step] = step + 1.0  # the host writes the new column in place
        out = executor.decode({"token_ids": torch.tensor([[5], [6]]), "past.0.key": cache})
        assert context.addresses["past.0.key"] == cache.data_ptr()
        assert torch.equal(out["past_read"], cache * 2 + 1)  # the engine read the buffer as it is now


def test_segment_outputs_are_renamed_and_run_in_the_profile_their_shapes_select(tmp_path, plugin_library):
    executor, trt = make_executor(tmp_path, plugin_library)
    contexts = trt.engines["segment_0"].contexts
    hidden = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(0))
    out = executor.segment(0, {"hidden": hidden, "keep_count": torch.tensor([3, 5])})  # only profile 1 holds it
    assert set(out) == {"hidden", "keep_count"}
    assert torch.equal(out["hidden"], hidden * 2 + 1)
    assert torch.equal(out["keep_count"], torch.tensor([7, 11]))
    assert contexts[1].shapes["hidden"] == (2, 12, 3) and contexts[0].shapes == {}
    executor.segment(0, {"hidden": torch.zeros(1, 4, 3), "keep_count": torch.tensor([3])})  # only profile 0
    assert contexts[0].shapes["hidden"] == (1, 4, 3)
    # nothing is remembered between calls: profile 1 again, from the shapes alone
    executor.segment(0, {"hidden": torch.zeros(1, 9, 3), "keep_count": torch.tensor([3])})
    assert contexts[1].shapes["hidden"] == (1, 9, 3)


def test_profile_for_shapes_picks_the_cheapest_profile_holding_every_input():
    profiles = [{"hidden": ((1, 1, 3), (1, 50, 3), (2, 100, 3)), "ids": ((1,), (1,), (2,))},
                {"hidden": ((1, 1, 3), (1, 20, 3), (2, 40, 3)), "ids": ((1,), (1,), (2,))},
                {"hidden": ((1, 1, 3), (1, 20, 3), (2, 40, 3)), "ids": ((1,), (1,), (1,))}]
    assert profile_for_shapes(profiles, {"hidden": (1, 30, 3), "ids": (2,)}) == 1  # overlap: the smaller max
    assert profile_for_shapes(profiles, {"hidden": (1, 30, 3), "ids": (1,)}) == 2  # equal hidden: smaller ids max
    assert profile_for_shapes(profiles, {"hidden": (1, 41, 3), "ids": (1,)}) == 0
    assert profile_for_shapes(profiles, {"hidden": (1, 101, 3), "ids": (1,)}) is None
    assert profile_for_shapes(profiles, {"hidden": (1, 30), "ids": (1,)}) is None  # rank


@pytest.mark.parametrize("widths", [[(1, 50, 100), (1, 20, 40)], [(10, 15, 20), (30, 40, 50), (60, 60, 60)],
                                    [(60, 60, 60), (30, 40, 50), (10, 15, 20)], [(5, 9, 30), (5, 6, 30), (20, 25, 90)]])
def test_profile_for_shapes_agrees_with_the_runtime_rule_on_the_width_run(widths):
    """A pruning segment's engine profiles differ only in the visual_width bucket: the
    executor's choice from the shapes is the runtime's choice (select_profile) for every width."""
    shared = {"hidden": ((1, 1, 8), (1, 300, 8), (8, 600, 8))}
    profiles = [{**shared, "visual_width": ((low,), (opt,), (high,))} for low, opt, high in widths]
    for width in range(1, max(high for _, _, high in widths) + 1):
        choice = select_profile(widths, width)
        assert profile_for_shapes(profiles, {"hidden": (1, 300, 8), "visual_width": (choice.padded_width,)}) \
            == choice.profile, width


def test_shape_outside_every_profile_is_a_clear_error(tmp_path, plugin_library):
    executor, _ = make_executor(tmp_path, plugin_library)
    with pytest.raises(ProfileError) as info:
        executor.segment(0, {"hidden": torch.zeros(1, 17, 3), "keep_count": torch.tensor([3])})
    assert str(info.value) == ("tensorrt backend: graph 'segment_0': the input shapes fit none of its 2 optimization "
                               "profiles: graph 'segment_0', input 'hidden': shape [1, 17, 3] is outside optimization "
                               "profile 0 (min [1, 2, 3], max [2, 8, 3]); graph 'segment_0', input 'hidden': shape "
                               "[1, 17, 3] is outside optimization profile 1 (min [1, 9, 3], max [2, 16, 3])")
    with pytest.raises(ProfileError) as info:  # one profile: its own message
        executor.vision(torch.zeros(9, 3, 4))
    assert str(info.value) == ("tensorrt backend: graph 'vision', input 'pixel_values': shape [9, 3, 4] is outside "
                               "optimization profile 0 (min [1, 3, 4], max [8, 3, 4])")


def test_set_input_shape_failure_is_a_clear_error(tmp_path, plugin_library):
    log = []
    executor, _ = make_executor(tmp_path, plugin_library, log=log, engines=fake_engines(log, reject_shapes=True))
    with pytest.raises(ProfileError, match=r"graph 'segment_0', input 'hidden': TensorRT rejected shape \[1, 4, 3\] "
                                           r"in optimization profile 0"):
        executor.segment(0, {"hidden": torch.zeros(1, 4, 3), "keep_count": torch.tensor([3])})
    assert not any(entry[0] == "execute" for entry in log if isinstance(entry, tuple))


def test_missing_input_is_named(tmp_path, plugin_library):
    executor, _ = make_executor(tmp_path, plugin_library)
    with pytest.raises(InputError, match=r"graph 'segment_0' needs input\(s\) \['keep_count'\]; got \['hidden'\]"):
        executor.segment(0, {"hidden": torch.zeros(1, 4, 3)})


def test_undeserializable_plan_is_an_artifact_error(tmp_path, plugin_library):
    with pytest.raises(ArtifactError, match=r"cannot deserialize .*segment_0.plan \(graph 'segment_0', built by "
                                            r"TensorRT 11.4.0"):
        make_executor(tmp_path, plugin_library, corrupt="segment_0")


def test_plain_plans_do_not_get_host_code_allowed(tmp_path, plugin_library):
    log = []
    make_executor(tmp_path, plugin_library, log=log)
    loads = [entry for entry in log if isinstance(entry, tuple) and entry[0] == "deserialize"]
    assert loads == [("deserialize", g, None, False) for g in ("vision", "segment_0", "decode")]


def test_version_compatible_plans_get_host_code_allowed(tmp_path, plugin_library):
    log = []
    make_executor(tmp_path, plugin_library, log=log, graphs_flags={"segment_0": (True, False)})
    loads = [entry for entry in log if isinstance(entry, tuple) and entry[0] == "deserialize"]
    assert loads == [("deserialize", "vision", None, False), ("deserialize", "segment_0", None, True),
                     ("deserialize", "decode", None, False)]


def test_plans_without_lean_runtime_load_through_load_runtime(tmp_path, plugin_library, monkeypatch):
    lean = tmp_path / "libnvinfer_lean.so.11"
    lean.write_bytes(b"")
    monkeypatch.setenv(backends.LEAN_RUNTIME_ENV, str(lean))
    log = []
    executor, trt = make_executor(tmp_path, plugin_library, log=log, version_compatible=True,
                                  exclude_lean_runtime=True)
    assert [entry for entry in log if isinstance(entry, tuple) and entry[0] == "load_runtime"] == [
        ("load_runtime", str(lean.resolve()))]  # one lean runtime for every plan
    loads = [entry for entry in log if isinstance(entry, tuple) and entry[0] == "deserialize"]
    assert loads == [("deserialize", g, str(lean.resolve()), True) for g in ("vision", "segment_0", "decode")]
    # The lean runtime has its own plugin registry: the plugin library is loaded there as well.
    assert trt.loaded_runtimes[0].registry.calls == [str(plugin_library.resolve())]
    assert torch.equal(executor.vision(torch.ones(1, 3, 4))["image_features"], torch.full((1, 3, 4), 3.0))


def test_contexts_share_one_device_memory_block_sized_for_the_largest_profile(tmp_path, plugin_library):
    executor, trt = make_executor(tmp_path, plugin_library)
    contexts = [c for engine in trt.engines.values() for c in engine.contexts]
    assert len(contexts) == 4  # one per profile: vision 1, segment_0 2, decode 1
    assert {c.strategy for c in contexts} == {ExecutionContextAllocationStrategy.USER_MANAGED}
    assert {c.memory for c in contexts} == {(executor.device_memory.data_ptr(), 20000)}  # max over every profile
    assert executor.device_memory.numel() >= 20000 and executor.device_memory.data_ptr() % TENSOR_ALIGNMENT == 0
    assert all(c.calls == ["set_device_memory", "set_optimization_profile_async"] for c in contexts)
    assert [c.profile for c in trt.engines["segment_0"].contexts] == [0, 1]
    executor.segment(0, {"hidden": torch.zeros(2, 16, 3), "keep_count": torch.tensor([1, 2])})  # profile 1: 20000


def test_engine_stream_is_ordered_after_the_producer_and_before_the_consumer(tmp_path, plugin_library):
    log = []
    executor, _ = make_executor(tmp_path, plugin_library, log=log)
    assert log[-1] == "synchronize"  # the profile selections finished before the first call
    del log[:]
    executor.vision(torch.zeros(1, 3, 4))
    assert log == ["engine waits for producer", ("execute", RecordingOrder.handle), "consumer waits for engine"]


def test_two_executors_and_a_build_share_one_registry_load(tmp_path, plugin_library):
    """Build then run in one process, and two pipelines side by side: the registry returns None
    for the second load_library of a library, which must not count as a failure."""
    registry = FakeRegistry()
    log = []
    trt = fake_tensorrt(fake_engines(log), registry, log)
    assert trt_build.load_plugin_library(trt, plugin_library) == plugin_library.resolve()
    artifact = fake_artifact(tmp_path / "artifact")
    first = TensorRTExecutor(artifact, plugin_library, tensorrt=trt, device="cpu", stream_order=RecordingOrder(log))
    second = TensorRTExecutor(artifact, plugin_library, tensorrt=trt, device="cpu", stream_order=RecordingOrder(log))
    assert registry.calls == [str(plugin_library.resolve())]
    pixels = torch.ones(1, 3, 4)
    assert torch.equal(first.vision(pixels)["image_features"], second.vision(pixels)["image_features"])


def test_a_library_the_registry_already_holds_is_accepted(tmp_path, plugin_library):
    """Loaded by other code first: load_library returns None, but every creator is there."""
    from sparsevlm.trt_plugins import load_plugin_library
    registry = FakeRegistry()
    registry.load_library(str(plugin_library.resolve()))
    assert load_plugin_library(registry, plugin_library) == plugin_library.resolve()


def test_an_unloadable_library_still_fails_clearly(tmp_path):
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"\x7fELF but not a plugin library")
    with pytest.raises(PluginLibraryError, match=r"could not load the plugin library .*libbroken.so: the registry "
                                                  r"still lacks TopKTokenSelect"):
        make_executor(tmp_path, broken)
    with pytest.raises(trt_build.BuildError, match=r"could not load the plugin library .*libbroken.so"):
        trt_build.load_plugin_library(fake_tensorrt({}), broken)


# ---------------------------------------------------------------------------------------------
# The CUDA part (GPU only)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CudaStreamOrder orders CUDA streams; no CUDA GPU here")
def test_cuda_stream_order_runs_the_engine_stream_after_the_producer_and_before_the_consumer():
    order = backends.CudaStreamOrder()
    source = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(50_000_000)  # the producer (current stream) is still busy when the engine stream is queued
    source.fill_(1.0)
    order.engine_waits_for_producer()
    with torch.cuda.stream(order.stream):  # stands in for execute_async_v3 on order.handle
        torch.cuda._sleep(50_000_000)
        result = source * 2
    order.consumer_waits_for_engine()
    assert torch.equal(result + 0, torch.full_like(source, 2.0))  # `+ 0` runs on the consumer's stream
    view = torch.zeros(65, device="cuda")[1:]
    assert view.data_ptr() % TENSOR_ALIGNMENT != 0 and aligned(view).data_ptr() % TENSOR_ALIGNMENT == 0
