"""Shared by tests/test_export.py and tests/test_runtime.py: the exported artifacts of the demo
checkpoint (each exported at most once per session, lazily) and cached runs of them, so the
export parity tests and the runtime parity tests reuse the same graphs and
the same ONNX Runtime / torch runs.

Import the fixtures into a test module with
    from export_helpers import artifacts, runs, ...  # noqa: F401
"""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np
import pytest
import torch

from sparsevlm.methods import SparseVLMConfig

# One configuration per method (budget 192 where the method has budgets), plus the other
# SparseVLM v1.5 schedules. Values: keyword arguments of sparsevlm.export.export.
METHODS = {
    "sparsevlm_v15_b192": dict(method="sparsevlm", variant="v1.5", budgets=[192]),
    "sparsevlm_v15_b128": dict(method="sparsevlm", variant="v1.5", budgets=[128]),
    "sparsevlm_v15_b64": dict(method="sparsevlm", variant="v1.5", budgets=[64]),
    "sparsevlm_v10_b192": dict(method="sparsevlm", variant="v1.0", budgets=[192]),
    "fastv_R0.5": dict(method="fastv", budgets=None, K=2, R=0.5),
    "fastervlm_b64": dict(method="fastervlm", budgets=[64]),
}
PRIMARY = ["sparsevlm_v15_b192", "sparsevlm_v10_b192", "fastv_R0.5", "fastervlm_b64"]
EXTRA_BUDGETS = ["sparsevlm_v15_b128", "sparsevlm_v15_b64"]

# Questions of clearly different lengths (the chat template adds the image placeholder).
PROMPTS = [
    "What is in the image?",
    "Look at this picture carefully. How many objects are there? Answer the question using a single word "
    "or phrase.",
    "Is there a red circle?",
]
NEW_TOKENS = 32
LOGITS_ATOL = 1e-4


def method_config(name: str) -> SparseVLMConfig:
    kwargs = dict(METHODS[name])
    budgets = kwargs.pop("budgets")
    return SparseVLMConfig(budget=budgets[0] if budgets else None, **kwargs)


def make_images(count: int = 3):
    """Blocky deterministic images (structured, not white noise), as tests/conftest.py."""
    from PIL import Image
    rng = np.random.RandomState(4321)
    out = []
    for _ in range(count):
        base = rng.rand(8, 8, 3)
        pixels = np.kron(base, np.ones((42, 42, 1))) * 0.7 + rng.rand(336, 336, 3) * 0.3
        out.append(Image.fromarray((pixels * 255).astype("uint8")))
    return out


# Fixtures imported into two test modules get one FixtureDef per module (pytest keys them by
# where they are visible), so "session" scope alone would export and run everything twice;
# the caches therefore live here, at module level, shared by both test modules.
_ARTIFACTS: dict = {}
_PIPELINES: dict = {}
_RUNS: dict = {}
_ROOT: list = []


@pytest.fixture(scope="session")
def artifact_root(tmp_path_factory):
    if not _ROOT:
        _ROOT.append(tmp_path_factory.mktemp("artifacts"))
    return _ROOT[0]


@pytest.fixture(scope="session")
def artifacts(demo_dir, artifact_root):
    """artifacts(name) -> the exported artifact directory for METHODS[name] (exported once)."""
    from sparsevlm.export import export
    cache = _ARTIFACTS

    def get(name: str):
        if name not in cache:
            kwargs = dict(METHODS[name])
            out = artifact_root / name
            manifests = export(str(demo_dir), out, progress=False, **kwargs)
            assert len(manifests) == 1 and manifests[0]["path"] == str(out)
            cache[name] = out
        return cache[name]
    return get


@pytest.fixture(scope="session")
def inputs_images():
    return make_images(3)


@pytest.fixture(scope="session")
def pipelines():
    """pipelines(artifact_dir, backend) -> a cached Pipeline."""
    from sparsevlm.runtime import Pipeline
    cache = _PIPELINES

    def get(path, backend: str):
        key = (str(path), backend)
        if key not in cache:
            cache[key] = Pipeline.load(path, backend=backend, threads=2 if backend == "onnxruntime" else 0)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def runs(artifacts, pipelines, inputs_images):
    """runs(name, backend, batch) -> RunOutput of greedy generation for NEW_TOKENS steps with no
    stop tokens, batch 1 (prompt 0) or batch 3 (all prompts, different lengths). Cached."""
    cache = _RUNS

    def get(name: str, backend: str, batch: int):
        key = (name, backend, batch)
        if key not in cache:
            pipe = pipelines(artifacts(name), backend)
            cache[key] = pipe.generate(inputs_images[:batch], PROMPTS[:batch], max_new_tokens=NEW_TOKENS,
                                       temperature=0.0, stop_token_ids=())
        return cache[key]
    return get


def assert_same_decisions(trace_a: dict, trace_b: dict, steps: int = NEW_TOKENS, atol: float = LOGITS_ATOL):
    """Same kept ids / counts / ranks / recycled per pruning layer and row, same greedy tokens
    for `steps` steps, last-prompt-position logits within `atol`."""
    assert [layer["layer"] for layer in trace_a["layers"]] == [layer["layer"] for layer in trace_b["layers"]]
    for a, b in zip(trace_a["layers"], trace_b["layers"]):
        for key in ("kept_indices", "keep_count", "rank", "recycled"):
            assert a[key] == b[key], f"layer {a['layer']}: {key} differs"
    tokens_a = [row[:steps] for row in trace_a["greedy_tokens"]]
    tokens_b = [row[:steps] for row in trace_b["greedy_tokens"]]
    assert all(len(row) == steps for row in tokens_a + tokens_b)
    assert tokens_a == tokens_b
    la, lb = np.asarray(trace_a["logits_last"]), np.asarray(trace_b["logits_last"])
    assert la.shape == lb.shape
    diff = float(np.abs(la - lb).max())
    assert diff <= atol, f"logits differ by {diff}"


class RecordingExecutor:
    """Forwards every graph call to `inner` and records, per calling thread, the graph and the
    shapes of the graph's own inputs (only those, as the ONNX Runtime and TensorRT executors
    feed them). `calls[thread id]` is a list of (graph, {input: shape})."""

    def __init__(self, inner, manifest: dict):
        self.inner = inner
        self.graph_inputs = {name: [spec["name"] for spec in graph["inputs"]]
                             for name, graph in manifest["graphs"].items()}
        self.calls: dict[int, list] = defaultdict(list)

    def _record(self, graph: str, inputs: dict) -> None:
        missing = [name for name in self.graph_inputs[graph] if name not in inputs]
        assert not missing, f"{graph}: the runtime did not pass the graph inputs {missing}"
        shapes = {name: tuple(inputs[name].shape) for name in self.graph_inputs[graph]}
        self.calls[threading.get_ident()].append((graph, shapes))

    def vision(self, pixel_values):  # a tensor, or (anyres) the dict of named vision inputs
        self._record("vision", pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values})
        return self.inner.vision(pixel_values)

    def segment(self, index, inputs):
        self._record(f"segment_{index}", inputs)
        return self.inner.segment(index, inputs)

    def decode(self, inputs):
        self._record("decode", inputs)
        return self.inner.decode(inputs)


def engine_profiles(manifest: dict) -> dict:
    """What TensorRTExecutor reads from the engines sparsevlm-build would build from `manifest`:
    per graph, per profile, each input's (min, opt, max) shape."""
    from sparsevlm.export.trt_build import plan_engines
    return {plan.name: [{spec.name: (spec.min, spec.opt, spec.max) for spec in profile}
                        for profile in plan.profiles] for plan in plan_engines(manifest)}


def fits(profile, shapes: dict) -> bool:
    """Every input of `shapes` lies within one build profile (plan_engines' specs)."""
    for spec in profile:
        shape = shapes[spec.name]
        if len(shape) != len(spec.min) or not all(lo <= d <= hi for lo, d, hi in zip(spec.min, shape, spec.max)):
            return False
    return True


def assert_calls_fit_profiles(pipe, images, prompts, new_tokens: int = 3):
    """Run `pipe` (greedy, no stop token) through a RecordingExecutor and check every graph
    call against the profiles sparsevlm-build builds: the profile the TensorRT executor finds
    from the shapes holds the call, a pruning segment's is the one the runtime chose, and the
    decode caches still fit at the MAX_NEW_TOKENS bound (every decode call sees the same cache
    buffers, of capacity prefill width + new tokens - 1, so a longer answer widens them by the
    difference in new tokens)."""
    from sparsevlm.export import profiles as profile_lib
    from sparsevlm.export.trt_build import plan_engines
    from sparsevlm.methods.profiles import profile_for_shapes
    from sparsevlm.runtime import Pipeline
    manifest = pipe.artifact.manifest
    plans = {p.name: p for p in plan_engines(manifest)}
    profiles = engine_profiles(manifest)
    pruning = {s["graph"] for s in manifest["segments"] if s["profile_dim"]}
    recorder = RecordingExecutor(pipe.executor, manifest)
    out = Pipeline(pipe.artifact, recorder, pipe.backend).generate(images, prompts, max_new_tokens=new_tokens,
                                                                   temperature=0.0, stop_token_ids=())
    calls = recorder.calls[threading.get_ident()]
    assert [graph for graph, _ in calls][0] == "vision"
    chosen = {}
    for graph, shapes in calls:
        profile = profile_for_shapes(profiles[graph], shapes)
        assert profile is not None, f"batch {len(images)}: {graph} {shapes} fits no profile"
        assert fits(plans[graph].profiles[profile], shapes)
        if graph in pruning:
            chosen[graph] = profile
    assert chosen == {f"segment_{c['segment']}": c["profile"] for c in out.profiles}
    decode = [shapes for graph, shapes in calls if graph == "decode"]
    cache_axes = {spec["name"]: [i for i, dim in enumerate(spec["shape"]) if str(dim).startswith("past")]
                  for spec in manifest["graphs"]["decode"]["inputs"]}
    for step, shapes in enumerate(decode):
        assert shapes == decode[0], f"decode step {step}: the cache shapes changed"
    grown = {tensor: tuple(d + profile_lib.MAX_NEW_TOKENS - new_tokens if i in cache_axes[tensor] else d
                           for i, d in enumerate(shape)) for tensor, shape in decode[0].items()}
    assert profile_for_shapes(profiles["decode"], grown) is not None
    return out
