"""With pruning disabled, the sparsified model is plain LLaVA: the last-position logits equal
`LlavaForConditionalGeneration.forward` and greedy decoding equals `transformers`' generate."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from sparsevlm.methods import SparseLlava, SparseVLMConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NEW_TOKENS = 12
NO_PRUNING = {
    "none": SparseVLMConfig(method="none"),
    "fastervlm_k576": SparseVLMConfig(method="fastervlm", budget=576),
    "fastv_R0": SparseVLMConfig(method="fastv", K=2, R=0.0),
}


@pytest.fixture(scope="module")
def hf_reference(hf_model, encoded):
    """Per prompt: plain forward logits at the last prompt position and HF greedy tokens."""
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=hf_model.config.pad_token_id)
    refs = []
    with torch.no_grad():
        for ids, pixels in encoded[:2]:
            logits = hf_model(input_ids=ids, pixel_values=pixels).logits[0, -1].float()
            generated = hf_model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                          generation_config=config)
            tokens = generated[0, ids.shape[1]:].tolist()
            assert len(tokens) == NEW_TOKENS
            refs.append((logits, tokens))
    return refs


@pytest.mark.parametrize("name", list(NO_PRUNING))
def test_no_pruning_matches_transformers(name, make_vlm, encoded, hf_reference):
    vlm = make_vlm(NO_PRUNING[name])
    for (ids, pixels), (ref_logits, ref_tokens) in zip(encoded, hf_reference):
        out = vlm.generate(ids, pixels, max_new_tokens=NEW_TOKENS)
        logits = torch.tensor(out.trace["logits_last"][0])
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        assert out.sequences[0].tolist() == ref_tokens
        assert out.trace["greedy_tokens"][0] == ref_tokens
        # nothing was removed: every layer sees all 576 visual tokens
        assert out.accounting["rows"][0]["visual_per_layer_input"] == [576] * 22
        assert out.accounting["rows"][0]["flops_ratio"] == pytest.approx(1.0)
        for layer in out.trace["layers"]:
            assert layer["kept_indices"][0] == list(range(576))


def test_batched_no_pruning_matches_transformers_rows(make_vlm, encoded, hf_model):
    """B=3 prompts of different lengths, method none: each row equals HF on that row alone.

    The padded batch runs attention over wider, masked rows, a different float32 summation
    order than the unpadded single run; HF's own eager and SDPA paths differ by 1.6e-5 on
    these logits, so this cross-implementation check allows 3e-5 (batched vs single runs of
    the method itself are held to 1e-5 in test_methods_batching.py)."""
    vlm = make_vlm(NO_PRUNING["none"])
    ids = [row[0][0].tolist() for row in encoded]
    pixels = torch.cat([row[1] for row in encoded])
    out = vlm.generate(ids, pixels, max_new_tokens=4)
    with torch.no_grad():
        for row, (ids_row, pixels_row) in enumerate(encoded):
            ref = hf_model(input_ids=ids_row, pixel_values=pixels_row).logits[0, -1].float()
            torch.testing.assert_close(torch.tensor(out.trace["logits_last"][row]), ref, rtol=0, atol=3e-5)


def test_from_pretrained_user_path(demo_dir, images, hf_model):
    """The documented entry point (from_pretrained + prepare with the chat template) runs
    method none to the same logits as plain transformers on the processor's inputs."""
    vlm = SparseLlava.from_pretrained(str(demo_dir), SparseVLMConfig(method="none"))
    inp = vlm.prepare([images[0]], ["What is in the image?"])
    out = vlm.generate(**inp, max_new_tokens=2)
    prompt = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True)
    enc = vlm.processor(images=[images[0]], text=[prompt], return_tensors="pt")
    assert inp["input_ids"][0] == enc["input_ids"][0].tolist()
    with torch.no_grad():
        ref = hf_model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"]).logits[0, -1]
    torch.testing.assert_close(torch.tensor(out.trace["logits_last"][0]), ref, rtol=0, atol=1e-5)
