"""Prefill attention without an explicit mask where nothing is padded.

`modeling.prefill_attention_mask` hands `decoder_layer` None when every token is valid and
the model runs eagerly (SDPA then takes `is_causal`, which skips the masked half on the CPU
and allows FlashAttention on CUDA), and the explicit `prefill_mask` otherwise. Checked here:

- None exactly when nothing is padded; with padding the explicit mask;
- a decoder layer with None gives what it gives with the explicit all-valid mask: hidden
  states, keys and values, and the rater attention rows (`score_rows`);
- a traced graph keeps the explicit mask: exported from an all-valid example, its ONNX
  Runtime run on padded input gives `prefill_mask` of that input (a trace that had taken the
  None branch would have no mask to give);
- the causal answer is transformers' own: the layer with None equals transformers' decoder
  layer with its own causal mask.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sparsevlm.methods import modeling

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def layer_inputs(model, batch: int, seq: int):
    lm = modeling.language_model(model)
    generator = torch.Generator().manual_seed(seq)
    hidden = torch.randn(batch, seq, lm.config.hidden_size, generator=generator)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    cos, sin = modeling.rotary(model, hidden, modeling.positions_from_valid(valid))
    return hidden, cos, sin, valid


def test_none_only_when_nothing_is_padded():
    valid = torch.ones(2, 7, dtype=torch.bool)
    assert modeling.prefill_attention_mask(valid) is None
    valid[1, 5:] = False
    assert torch.equal(modeling.prefill_attention_mask(valid), modeling.prefill_mask(valid))


@pytest.mark.parametrize("batch,seq", [(1, 37), (3, 20)])
def test_layer_without_mask_equals_layer_with_the_all_valid_mask(hf_model, batch, seq):
    layer = modeling.language_model(hf_model).layers[1]
    hidden, cos, sin, valid = layer_inputs(hf_model, batch, seq)
    score_rows = (seq - 5, seq)
    with torch.inference_mode():
        masked = modeling.decoder_layer(layer, hidden, cos, sin, modeling.prefill_mask(valid), score_rows=score_rows)
        causal = modeling.decoder_layer(layer, hidden, cos, sin, None, score_rows=score_rows)
    torch.testing.assert_close(causal[0], masked[0], rtol=0, atol=1e-6)
    for got, want in zip(causal[1], masked[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # keys/values come before attention
    torch.testing.assert_close(causal[2], masked[2], rtol=0, atol=0)


def test_layer_without_mask_equals_transformers_causal_layer(hf_model):
    lm = modeling.language_model(hf_model)
    layer = lm.layers[0]
    hidden, cos, sin, _ = layer_inputs(hf_model, 1, 29)
    with torch.inference_mode():
        ours = modeling.decoder_layer(layer, hidden, cos, sin, None)[0]
        causal = torch.full((29, 29), float("-inf")).triu(1)[None, None]  # additive causal mask
        theirs = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin))
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


class _MaskOf(torch.nn.Module):
    def forward(self, valid):
        return modeling.prefill_attention_mask(valid)


def test_traced_graph_keeps_the_explicit_mask(tmp_path):
    path = tmp_path / "mask.onnx"
    example = torch.ones(1, 6, dtype=torch.bool)  # all valid: eagerly this gives None
    assert modeling.prefill_attention_mask(example) is None
    torch.onnx.export(_MaskOf(), (example,), str(path), dynamo=False, input_names=["valid"],
                      output_names=["mask"], dynamic_axes={"valid": {0: "batch", 1: "seq"}})
    padded = torch.ones(2, 9, dtype=torch.bool)
    padded[0, 6:] = False
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"valid": padded.numpy()})
    np.testing.assert_array_equal(got, modeling.prefill_mask(padded).numpy())
