"""oneDNN-packed linear layers (methods/cpu_linear.py): the same products as nn.Linear, the
caller's model left as it was, and the torch backend on a packed model deciding and generating
what it does on the plain one (LLaVA-1.5 and Qwen2.5-VL)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwen_helpers import make_images, qwen_dir, qwen_model, qwen_processor  # noqa: F401
from sparsevlm.methods import SparseLlava, SparseVLMConfig
from sparsevlm.methods.cpu_linear import PackedLinear, packing_supported, with_packed_linears
from sparsevlm.methods.generation import build_batch, prefill

pytestmark = [pytest.mark.usefixtures("torch_single_thread"),
              pytest.mark.skipif(not packing_supported(nn.Linear(2, 2)), reason="this torch build has no oneDNN")]


@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_packed_linear_equals_nn_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias)
    packed = PackedLinear(linear)
    rows = torch.randn(3, 37, 96)
    for x in (rows, rows[0], rows[:, :1], rows.transpose(0, 1)):  # 3-D, 2-D, one row, strided
        want = linear(x)
        got = packed(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packing_leaves_the_model_as_it_was(hf_model):
    before = {name: type(module) for name, module in hf_model.named_modules()}
    weights = dict(hf_model.named_parameters())
    packed = with_packed_linears(hf_model)
    assert {name: type(module) for name, module in hf_model.named_modules()} == before
    assert dict(hf_model.named_parameters()).keys() == weights.keys()
    assert all(tensor is weights[name] for name, tensor in hf_model.named_parameters())
    linears = [name for name, kind in before.items() if kind is nn.Linear]
    packed_modules = dict(packed.named_modules())
    assert linears and all(isinstance(packed_modules[name], PackedLinear) for name in linears)
    # everything else is shared, not copied
    embed = packed.model.language_model.embed_tokens.weight
    assert embed is hf_model.model.language_model.embed_tokens.weight
    norm = packed.model.language_model.layers[0].input_layernorm.weight
    assert norm is hf_model.model.language_model.layers[0].input_layernorm.weight


def test_packing_applies_to_float32_on_the_cpu_only():
    model = nn.Sequential(nn.Linear(4, 4))
    assert with_packed_linears(model.to(torch.bfloat16)) is model
    assert with_packed_linears(model.to(torch.float64)) is model
    assert isinstance(with_packed_linears(model.to(torch.float32))[0], PackedLinear)
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16))
    packed = with_packed_linears(mixed)
    assert isinstance(packed[0], PackedLinear) and type(packed[1]) is nn.Linear


def _llava_prefill(vlm, encoded_rows):
    ids = [row[0][0].tolist() for row in encoded_rows]
    pixel_values = torch.cat([row[1] for row in encoded_rows])
    vision_in, _, batch = build_batch(vlm.spec, ids, pixel_values, None)
    return prefill(vlm.executor, vlm.plan, batch, vision_in)


CONFIGS = {
    "sparsevlm_v15": SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=64),
    "sparsevlm_v10": SparseVLMConfig(method="sparsevlm", variant="v1.0", budget=64),
    "fastervlm": SparseVLMConfig(method="fastervlm", budget=64),
    "fastv": SparseVLMConfig(method="fastv", K=2, R=0.5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.inference_mode()
def test_torch_backend_on_packed_weights_llava(name, hf_model, processor, encoded):
    """Batch 3, different prompt lengths: the same kept tokens at every pruning layer, the last
    logits within 1e-4, the same greedy tokens."""
    plain = SparseLlava(hf_model, CONFIGS[name], processor)
    packed = SparseLlava(with_packed_linears(hf_model), CONFIGS[name], processor)
    want, got = _llava_prefill(plain, encoded), _llava_prefill(packed, encoded)
    assert [d.kept_indices for d in got.decisions] == [d.kept_indices for d in want.decisions]
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    ids = [row[0][0].tolist() for row in encoded]
    pixel_values = torch.cat([row[1] for row in encoded])
    sequences = [vlm.generate(ids, pixel_values, max_new_tokens=6, eos_token_id=[]).sequences
                 for vlm in (plain, packed)]
    assert torch.equal(sequences[0], sequences[1])


@pytest.mark.parametrize("name", ["sparsevlm_v15", "fastv"])
@torch.inference_mode()
def test_torch_backend_on_packed_weights_qwen(name, qwen_model, qwen_processor):
    """Qwen2.5-VL (its vision tower's linears packed too): same kept tokens and greedy tokens."""
    config = SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=192) if name == "sparsevlm_v15" \
        else SparseVLMConfig(method="fastv", K=2, R=0.5)
    outputs = []
    for model in (qwen_model, with_packed_linears(qwen_model)):
        vlm = SparseLlava(model, config, qwen_processor)
        inputs = vlm.prepare(make_images()[:2], ["What is in the image?", "How many objects are there?"])
        outputs.append(vlm.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=6,
                                    image_sizes=inputs["image_grid_thw"], eos_token_id=[]))
    want, got = outputs
    assert [layer["kept_indices"] for layer in got.trace["layers"]] == \
        [layer["kept_indices"] for layer in want.trace["layers"]]
    assert torch.equal(got.sequences, want.sequences)
