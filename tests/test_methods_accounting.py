"""FLOPs accounting: 4*n*d^2 + 2*n^2*d + 3*n*d*m per decoder layer (docs/accounting.md), with
n the full sequence length at the layer's input, checked by hand on small cases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sparsevlm.methods import SparseVLMConfig
from sparsevlm.methods.accounting import layer_flops, run_accounting
from sparsevlm.methods.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_layer_flops_by_hand():
    # n=3, d=2, m=5: 4*3*4 + 2*9*2 + 3*3*2*5 = 48 + 36 + 90
    assert layer_flops(3, 2, 5) == 174
    # n=5: 80 + 100 + 150; n=4: 64 + 64 + 120
    assert layer_flops(5, 2, 5) == 330 and layer_flops(4, 2, 5) == 248
    # LLaVA-1.5-7B shape (d=4096, m=11008) at n=690: the baseline's ~4.62 T (docs/accounting.md)
    assert 32 * layer_flops(690, 4096, 11008) == pytest.approx(4.62e12, rel=0.01)


def _spec(num_layers: int, hidden: int, intermediate: int, num_visual: int) -> ModelSpec:
    return ModelSpec(num_layers=num_layers, hidden_size=hidden, intermediate_size=intermediate, vocab_size=10,
                     num_visual=num_visual, image_token_id=9, image_size=28, pad_token_id=0)


def test_run_accounting_by_hand():
    """4 layers, 4 visual + 1 text token; layer 1 keeps 2 and recycles 1 (3 after it)."""
    decision = SimpleNamespace(layer=1, keep_count=[2], recycled=[1])
    row = run_accounting(_spec(4, 2, 5, 4), [1], [decision], "sparsevlm")["rows"][0]
    assert row["visual_per_layer_input"] == [4, 4, 3, 3]
    assert row["flops"] == 2 * 330 + 2 * 248 == 1156
    assert row["flops_unpruned"] == 4 * 330
    assert row["flops_ratio"] == pytest.approx(1156 / 1320)
    assert row["equal_tokens"] == pytest.approx((4 + 3 + 3 + 3) / 4)  # charged after pruning
    assert row["mean_layer_input_tokens"] == pytest.approx((4 + 4 + 3 + 3) / 4)
    # FasterVLM: layer -1 prunes before the LLM
    pre = SimpleNamespace(layer=-1, keep_count=[2], recycled=[0])
    row = run_accounting(_spec(4, 2, 5, 4), [1], [pre], "fastervlm")["rows"][0]
    assert row["visual_per_layer_input"] == [2, 2, 2, 2]
    assert row["flops"] == 4 * layer_flops(3, 2, 5)


def test_run_accounting_of_a_demo_run(make_vlm, encoded):
    """The demo's 22 layers (hidden 64, FFN 128): FLOPs recomputed from the trace by hand."""
    ids, pixels = encoded[1]
    out = make_vlm(SparseVLMConfig(method="sparsevlm", budget=64)).generate(ids, pixels, max_new_tokens=1)
    text = ids.shape[1] - 576
    after = {e["layer"]: e["keep_count"][0] + e["recycled"][0] for e in out.trace["layers"]}
    visual, total = 576, 0
    for layer in range(22):
        n = text + visual
        total += 4 * n * 64 * 64 + 2 * n * n * 64 + 3 * n * 64 * 128
        visual = after.get(layer, visual)
    row = out.accounting["rows"][0]
    assert row["flops"] == total
    assert row["flops_unpruned"] == 22 * (4 * (text + 576) * 64 * 64 + 2 * (text + 576) ** 2 * 64
                                          + 3 * (text + 576) * 64 * 128)
    assert out.accounting["method"] == "sparsevlm"


def test_model_spec_from_the_checkpoint(hf_model, processor, encoded):
    """ModelSpec.from_hf_config reads what the loaded modules really are (the independent
    expectation: the weights' shapes, the vision tower's output, the tokenizer), and the
    manifest form reads back unchanged."""
    spec = ModelSpec.from_hf_config(hf_model.config, processor)
    lm = hf_model.model.language_model
    assert spec.num_layers == len(lm.layers) == 22
    assert (spec.vocab_size, spec.hidden_size) == tuple(lm.embed_tokens.weight.shape)
    assert spec.intermediate_size == lm.layers[0].mlp.up_proj.out_features
    ids, pixels = encoded[0]
    assert spec.image_size == pixels.shape[-1]
    assert spec.num_visual == int((ids == spec.image_token_id).sum())  # the processor's expanded image tokens
    assert spec.pad_token_id == processor.tokenizer.pad_token_id
    assert spec.max_position_embeddings == 2048
    manifest_model = {"source": "elsewhere", "config_sha256": "0" * 64, "processor": None, **spec.to_json()}
    assert ModelSpec.from_json(manifest_model) == spec
