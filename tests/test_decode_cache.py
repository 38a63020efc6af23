"""Decoding without copying the KV cache per token.

- The exported decode graph never concatenates a cache: no Concat-like node reads a `past.*`
  input (only matrix products do, through views), and its `present.*` outputs hold the new
  token's entries only (one position).
- The generation loop hands every decode step the same preallocated buffers (same storage,
  same shapes: each segment's own prefill width + the tokens to come), with exactly the
  written columns marked valid.
- Once copied, the prefill's own cache tensors are freed: the decode holds the cache once.
- The attention over [past buffer, new token] equals a softmax over the concatenated keys.
- ONNX Runtime binds the buffers in place (I/O binding) and gives the torch method's logits
  for the same step; long decodes (twice the other tests' 32 tokens) give the tokens of
  plain transformers (method none, which recomputes nothing differently) and the same
  tokens on both backends for a pruned method.
"""

from __future__ import annotations

import gc
import weakref

import onnx
import pytest
import torch
import torch.nn.functional as F

from export_helpers import (PROMPTS, artifact_root, artifacts, inputs_images, pipelines)  # noqa: F401
from sparsevlm.methods import SparseVLMConfig, generation

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LONG_DECODE = 64  # twice the 32 tokens of the backend parity tests

# Nodes that build a longer tensor out of their inputs (what appending to a cache needs).
CONCAT_LIKE = {"Concat", "ConcatFromSequence", "SequenceConstruct", "SequenceInsert", "Pad", "Tile",
               "Scatter", "ScatterND", "ScatterElements", "Resize", "Expand"}
# Nodes that only look at a tensor through another shape or type.
VIEWS = {"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast"}


def cache_readers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    """The nodes that read graph input `name`, directly or through view nodes (the views
    themselves excluded)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    readers, frontier = [], [name]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in VIEWS:
                frontier.extend(node.output)
            else:
                readers.append(node)
    return readers


@pytest.mark.parametrize("name", ["sparsevlm_v15_b192", "fastv_R0.5"])
def test_decode_graph_reads_the_cache_in_place_and_returns_only_the_new_entries(name, artifacts, pipelines,
                                                                                inputs_images):
    path = artifacts(name)
    graph = onnx.load(str(path / "decode.onnx"), load_external_data=False).graph
    pasts = [v.name for v in graph.input if v.name.startswith("past.")]
    assert pasts
    for past in pasts:
        readers = cache_readers(graph, past)
        concats = [f"{n.op_type} {n.name}" for n in readers if n.op_type in CONCAT_LIKE]
        assert not concats, f"{past} is copied into a longer tensor by {concats}"
        # the cache is only multiplied (scores against the keys, weights times the values)
        assert {n.op_type for n in readers} <= {"MatMul", "Shape"}, (past, {n.op_type for n in readers})
    outputs = {v.name: v for v in graph.output}
    assert set(outputs) == {"logits"} | {p.replace("past.", "present.") for p in pasts}
    for output in outputs.values():  # no output is as long as a cache
        dims = [d.dim_param for d in output.type.tensor_type.shape.dim]
        assert not any(d.startswith("past_len_") for d in dims), (output.name, dims)

    # one position, the new token's: one step of a real run, through the session's plain run call
    pipe = pipelines(path, "onnxruntime")
    recorder = _DecodeInputs(pipe.executor)
    prepared = pipe.prepare(inputs_images[:2], PROMPTS[:2], 2)
    generation.generate(recorder, pipe.artifact.plan, prepared["input_ids"], prepared["pixel_values"],
                        spec=pipe.spec, params=generation.SamplingParams(max_new_tokens=2))
    out = recorder.inner._run("decode", recorder.calls[0])
    for past in pasts:
        batch, heads, _, head_dim = recorder.calls[0][past].shape
        assert tuple(out[past.replace("past.", "present.")].shape) == (batch, heads, 1, head_dim)


class _DecodeInputs:
    """Forwards to `inner` and keeps a copy of every decode call's inputs, plus the storage
    address of each input as it was passed."""

    def __init__(self, inner):
        self.inner, self.calls, self.addresses, self.segment_outputs = inner, [], [], []

    def vision(self, pixel_values):
        return self.inner.vision(pixel_values)

    def segment(self, index, inputs):
        out = self.inner.segment(index, inputs)
        self.segment_outputs.append(out)
        return out

    def decode(self, inputs):
        self.calls.append({k: v.clone() for k, v in inputs.items()})
        self.addresses.append({k: v.data_ptr() for k, v in inputs.items()})
        return self.inner.decode(inputs)


def test_every_decode_step_gets_the_same_preallocated_buffers(make_vlm, encoded):
    """SparseVLM v1.5 budget 64 (four segments, each caching its own visual width), two
    prompts of different lengths: every decode call sees the same tensors at the same
    addresses, each segment at its prefill width + (new tokens - 1) columns, with the
    prefill's valid columns plus one more per step marked valid."""
    vlm = make_vlm(SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=64))
    new_tokens = 6
    ids = [row[0][0].tolist() for row in encoded[:2]]
    pixels = torch.cat([row[1] for row in encoded[:2]])
    recorder = _DecodeInputs(vlm.executor)
    generation.generate(recorder, vlm.plan, ids, pixels, spec=vlm.spec,
                        params=generation.SamplingParams(max_new_tokens=new_tokens))
    assert len(recorder.calls) == new_tokens - 1
    prefill_valid = [out["key_valid"] for out in recorder.segment_outputs]
    widths = [valid.shape[1] for valid in prefill_valid]
    assert len(set(widths)) > 1  # the segments' caches differ in width (pruned visual regions)
    first = recorder.calls[0]
    for step, (call, addresses) in enumerate(zip(recorder.calls, recorder.addresses)):
        for name, value in call.items():
            if name.startswith(("past.", "key_valid.")):
                assert addresses[name] == recorder.addresses[0][name], f"step {step}: {name} was reallocated"
                assert value.shape == first[name].shape, f"step {step}: {name}"
        for segment, (width, valid) in enumerate(zip(widths, prefill_valid)):
            got = call[f"key_valid.{segment}"]
            assert got.shape == (2, width + new_tokens - 1)
            want = torch.zeros_like(got)
            want[:, :width] = valid
            want[:, width:width + step] = True
            assert torch.equal(got, want), f"step {step}, segment {segment}"
            for layer in vlm.executor.specs[segment].layers:
                assert call[f"past.{layer}.key"].shape[2] == width + new_tokens - 1


class _PresentWatcher(_DecodeInputs):
    """`_DecodeInputs` that keeps only a weak reference to every `present.*` tensor the prefill
    segments return (the prefill's own caches): a strong one would keep them alive."""

    def __init__(self, inner):
        super().__init__(inner)
        self.presents = []

    def segment(self, index, inputs):
        out = self.inner.segment(index, inputs)
        self.presents += [weakref.ref(value) for name, value in out.items() if name.startswith("present.")]
        return out


def test_prefill_caches_are_freed_once_copied_into_the_decode_buffers(make_vlm, encoded):
    """During the decode only the preallocated buffers hold the cache: by the second token
    every cache tensor the prefill returned is gone (generate and its decode loop drop them
    once copied), so the decode does not hold the cache twice."""
    vlm = make_vlm(SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=64))
    ids = [row[0][0].tolist() for row in encoded[:2]]
    pixels = torch.cat([row[1] for row in encoded[:2]])
    watcher = _PresentWatcher(vlm.executor)
    alive_at_step = {}

    def on_token(step, tokens):
        gc.collect()
        alive_at_step[step] = sum(ref() is not None for ref in watcher.presents)

    generation.generate(watcher, vlm.plan, ids, pixels, spec=vlm.spec, on_token=on_token,
                        params=generation.SamplingParams(max_new_tokens=4, stop_token_ids=()))
    layers = sum(len(spec.layers) for spec in vlm.executor.specs)
    assert len(watcher.presents) == 2 * layers
    assert alive_at_step[0] == 2 * layers  # token 0 comes from the prefill logits, before the copy
    assert alive_at_step[1] == alive_at_step[2] == alive_at_step[3] == 0


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_attention_over_buffer_and_new_token_equals_softmax_over_the_concatenation(dtype, atol):
    """Grouped-query shapes (4 query heads on 2 key/value heads), a cache buffer whose unwritten
    columns hold arbitrary finite values, rows with different valid columns."""
    from sparsevlm.methods.modeling import attend_past_and_new
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, capacity, head_dim = 3, 4, 2, 11, 8
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) * 3
    q, key, value = randn(batch, heads, 1, head_dim), randn(batch, kv_heads, 1, head_dim), randn(batch, kv_heads, 1, head_dim)
    past_key, past_value = randn(batch, kv_heads, capacity, head_dim), randn(batch, kv_heads, capacity, head_dim)
    valid = torch.zeros(batch, capacity, dtype=torch.bool)
    valid[0, :7] = True
    valid[1, 2:9] = True  # left padding, more written columns
    valid[2, [0, 3, 4]] = True
    got = attend_past_and_new(q, key, value, past_key, past_value, valid, 0.3)
    # the reference: SDPA over the concatenated keys, each key/value head repeated per query group
    keys = torch.cat([past_key, key], 2).repeat_interleave(heads // kv_heads, dim=1)
    values = torch.cat([past_value, value], 2).repeat_interleave(heads // kv_heads, dim=1)
    mask = torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool)], 1)[:, None, None, :]
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    # unwritten columns do not matter
    past_key[~valid[:, None, :, None].expand_as(past_key)] = 1e4
    torch.testing.assert_close(attend_past_and_new(q, key, value, past_key, past_value, valid, 0.3), got,
                               rtol=0, atol=0)


def test_onnxruntime_binds_the_cache_buffers_in_place_and_matches_torch(artifacts, pipelines, inputs_images,
                                                                        monkeypatch):
    """One decode step of a batch-2 run: ONNX Runtime reads each `past.*` / `key_valid.*` buffer
    at its own address (bound, not copied), and its logits and new entries are the torch
    method's for the same inputs."""
    import onnxruntime as ort
    path = artifacts("sparsevlm_v15_b192")
    ort_pipe, torch_pipe = pipelines(path, "onnxruntime"), pipelines(path, "torch")
    recorder = _DecodeInputs(torch_pipe.executor)
    prepared = torch_pipe.prepare(inputs_images[:2], PROMPTS[:2], 2)
    generation.generate(recorder, torch_pipe.artifact.plan, prepared["input_ids"], prepared["pixel_values"],
                        spec=torch_pipe.spec, params=generation.SamplingParams(max_new_tokens=2))
    inputs = recorder.calls[0]
    bound = {}
    original = ort.IOBinding.bind_input

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        bound[name] = buffer_ptr
        return original(self, name, device_type, device_id, element_type, shape, buffer_ptr)
    monkeypatch.setattr(ort.IOBinding, "bind_input", bind_input)
    got = ort_pipe.executor.decode(inputs)
    caches = [name for name in inputs if name.startswith(("past.", "key_valid."))]
    assert caches and all(bound[name] == inputs[name].data_ptr() for name in caches)
    with torch.inference_mode():
        want = torch_pipe.executor.decode(inputs)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4, msg=name)


def test_long_decode_equals_transformers_generate(make_vlm, encoded, hf_model):
    """Method none, 64 greedy tokens for two prompts of different lengths run as one batch
    (per-row positions, padded cache columns): each row equals transformers' own generate
    on that prompt alone (it recomputes attention over its own growing cache)."""
    from transformers import GenerationConfig
    vlm = make_vlm(SparseVLMConfig(method="none"))
    ids = [row[0][0].tolist() for row in encoded[:2]]
    out = vlm.generate(ids, torch.cat([row[1] for row in encoded[:2]]), max_new_tokens=LONG_DECODE)
    config = GenerationConfig(max_new_tokens=LONG_DECODE, min_new_tokens=LONG_DECODE, do_sample=False,
                              eos_token_id=None, pad_token_id=hf_model.config.pad_token_id)
    for row, (row_ids, pixels) in enumerate(encoded[:2]):
        with torch.no_grad():
            generated = hf_model.generate(input_ids=row_ids, pixel_values=pixels,
                                          attention_mask=torch.ones_like(row_ids), generation_config=config)
        assert out.sequences[row].tolist() == generated[0, row_ids.shape[1]:].tolist(), f"row {row}"


def test_long_decode_same_tokens_on_torch_and_onnxruntime(artifacts, pipelines, inputs_images):
    """SparseVLM budget 64, batch 3, 64 greedy tokens: both backends give the same tokens."""
    path = artifacts("sparsevlm_v15_b64")
    runs = [pipelines(path, backend).generate(inputs_images, PROMPTS, max_new_tokens=LONG_DECODE,
                                              stop_token_ids=()) for backend in ("torch", "onnxruntime")]
    assert all(len(row) == LONG_DECODE for run in runs for row in run.token_ids)
    assert runs[0].token_ids == runs[1].token_ids
