"""Shared by the Qwen2.5-VL tests: the tiny checkpoint (built once per session, loaded the
way users load it), its processor, images of different sizes and a reference generation
composed from the building blocks.

Import the fixtures into a test module with
    from qwen_helpers import qwen_dir, qwen_model, qwen_processor  # noqa: F401
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Non-square sizes (width, height) giving different grids: 10x16, 8x8 and 6x12 patches
# after the smart resize (40, 16 and 18 visual tokens), each with window attention over
# padded windows.
IMAGE_SIZES = [(230, 150), (112, 112), (170, 80)]


def make_image(width: int, height: int, seed: int):
    from PIL import Image
    rng = np.random.RandomState(seed)
    base = rng.rand(max(height // 14, 1), max(width // 14, 1), 3)
    pixels = np.kron(base, np.ones((14, 14, 1)))[:height, :width]
    pixels = np.pad(pixels, ((0, height - pixels.shape[0]), (0, width - pixels.shape[1]), (0, 0)), mode="edge")
    pixels = pixels * 0.7 + rng.rand(height, width, 3) * 0.3
    return Image.fromarray((pixels * 255).astype("uint8"))


def make_images():
    return [make_image(w, h, seed) for seed, (w, h) in enumerate(IMAGE_SIZES)]


_CACHE: dict = {}


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    if "dir" not in _CACHE:
        from sparsevlm.methods.qwen_demo import build_qwen_demo
        _CACHE["dir"] = build_qwen_demo(tmp_path_factory.mktemp("checkpoints") / "qwen-demo", seed=0)
    return _CACHE["dir"]


@pytest.fixture(scope="session")
def qwen_model(qwen_dir):
    """The tiny checkpoint as plain transformers loads it (float32, SDPA)."""
    if "model" not in _CACHE:
        from transformers import Qwen2_5_VLForConditionalGeneration
        _CACHE["model"] = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()
    return _CACHE["model"]


@pytest.fixture(scope="session")
def qwen_processor(qwen_dir):
    if "processor" not in _CACHE:
        from sparsevlm.methods.qwen_processor import QwenImageTextProcessor
        _CACHE["processor"] = QwenImageTextProcessor.from_pretrained(qwen_dir)
    return _CACHE["processor"]


def chat_prompt(processor, question: str) -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)


@torch.inference_mode()
def blocks_greedy(model, input_ids: list[int], pixel_values, grid_thw, steps: int):
    """Method none composed from the building blocks (no transformers forward): vision,
    prompt positions, decoder layers with explicit masks, then greedy decoding continuing
    from the next position. Returns (last prompt logits [vocab], greedy tokens)."""
    from sparsevlm.methods import modeling
    from sparsevlm.methods import qwen2_5_vl as qwen

    layout = qwen.vision_layout(grid_thw, model.config.vision_config)
    visual = qwen.encode_images(model, pixel_values, **layout.tensors())
    lm = modeling.language_model(model)
    ids = torch.tensor([input_ids])
    hidden = lm.embed_tokens(ids)
    hidden[ids == model.config.image_token_id] = visual.to(hidden.dtype)
    positions, next_position = qwen.prompt_positions(input_ids, model.config.image_token_id, layout.llm_grids)
    seq = len(input_ids)
    cos, sin = modeling.rotary(model, hidden, positions[:, None])
    mask = modeling.prefill_mask(torch.ones(1, seq, dtype=torch.bool))
    caches = []
    for layer in lm.layers:
        hidden, kv, _ = modeling.decoder_layer(layer, hidden, cos, sin, mask)
        caches.append(kv)
    logits = modeling.last_logits(model, hidden, torch.tensor([seq - 1]))
    first_logits, tokens = logits[0], []
    for step in range(steps):
        token = logits.argmax(-1)
        tokens.append(int(token))
        hidden = lm.embed_tokens(token[:, None])
        cos, sin = modeling.rotary(model, hidden, torch.tensor([[next_position + step]]))
        mask = torch.ones(1, seq + step, dtype=torch.bool)  # every cached column is valid
        for index, layer in enumerate(lm.layers):
            hidden, (key, value), _ = modeling.decoder_layer(layer, hidden, cos, sin, mask, past=caches[index])
            caches[index] = (torch.cat([caches[index][0], key], 2), torch.cat([caches[index][1], value], 2))
        logits = modeling.last_logits(model, hidden, torch.tensor([0]))
    return first_logits, tokens


# --------------------------------------------------------------------------------------
# Brute force: the methods on one prompt, layer by layer over the whole sequence
# --------------------------------------------------------------------------------------

def _bf_attention_rows(layer, hidden, cos, sin, rows: list[int]) -> torch.Tensor:
    """Head-mean softmax attention [len(rows), S] of the given query rows, causal, computed
    plainly (every query head; keys repeated per group)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    seq = x.shape[1]
    q = attn.q_proj(x).view(1, seq, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, seq, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (q[0] @ k[0].transpose(1, 2)).double() * attn.scaling  # [H, S, S]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).mean(dim=0)
    return probs[rows]


@torch.inference_mode()
def bf_forward(model, input_ids: list[int], pixel_values, grid_thw, method: dict, generated: list[int] = ()):
    """Logits [vocab] at the last position of prompt + `generated`, recomputing everything
    (no cache), and the decisions [(layer, kept visual ids, merged count)].

    method: {"name": "none"} | {"name": "sparsevlm", "layers": (...), "keep": fn(position,
    visual_count, image_tokens, rank) -> keep, "recycle": bool, "rank": bool} |
    {"name": "fastv", "layers": (K-1,), "keep": fn(...)}.
    Positions follow docs/qwen2_5_vl.md: kept tokens keep theirs, a merged token takes its
    cluster centre's, text and generated tokens keep theirs."""
    from sparsevlm.methods import modeling, token_ops
    from sparsevlm.methods import qwen2_5_vl as qwen

    image_token = model.config.image_token_id
    layout = qwen.vision_layout(grid_thw, model.config.vision_config)
    visual = torch.cat(model.model.get_image_features(pixel_values, grid_thw).pooler_output)  # transformers' own
    lm = modeling.language_model(model)
    ids = list(input_ids) + list(generated)
    hidden = lm.embed_tokens(torch.tensor([ids]))
    image = [i for i, t in enumerate(input_ids) if t == image_token]
    hidden[0, image] = visual.to(hidden.dtype)
    positions, next_position = qwen.prompt_positions(input_ids, image_token, layout.llm_grids)
    positions = torch.cat([positions, torch.arange(next_position, next_position + len(generated))[None].expand(3, -1)],
                          dim=1)
    start, count = image[0], len(image)
    text_rows = list(range(start + count, len(input_ids)))  # the prompt's text after the image
    visual_ids = list(range(count))
    if method["name"] == "sparsevlm":  # raters from the layer-0 inputs: r = mean_v softmax_t(H_v H_t^T)
        relevance = torch.softmax(hidden[0, start:start + count].double() @ hidden[0, text_rows].double().T, dim=1)
        relevance = relevance.mean(dim=0)
        raters = [r for r, value in zip(text_rows, relevance) if value > relevance.mean()] or text_rows
    decisions, next_id = [], count
    for index, layer in enumerate(lm.layers):
        cos, sin = modeling.rotary(model, hidden, positions[:, None])
        seq = hidden.shape[1]
        mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
        pruning = method["name"] != "none" and index in method["layers"]
        if pruning:
            rows = raters if method["name"] == "sparsevlm" else [text_rows[-1]]
            probs = _bf_attention_rows(layer, hidden, cos, sin, rows)
        hidden, _, _ = modeling.decoder_layer(layer, hidden, cos, sin, mask)
        if not pruning:
            continue
        columns = list(range(start, start + count))
        scores = probs[:, columns].mean(dim=0)
        rank = int(torch.linalg.matrix_rank(probs[:, columns].float())) if method.get("rank") else None
        keep = method["keep"](method["layers"].index(index), count, len(image), rank)
        order = sorted(range(count), key=lambda j: (-float(scores[j]), j))
        kept = sorted(order[:keep])
        region = hidden[:, start:start + count]
        merged = region[:, :0]
        merged_positions = positions[:, :0]
        if method.get("recycle") and keep < count:
            args = (region, scores[None].to(region.dtype), torch.ones(1, count, dtype=torch.bool), torch.tensor([keep]))
            merged, merged_valid = token_ops.token_recycle(*args)
            centres = token_ops.recycle_centre_slots(*args)[0][merged_valid[0]]
            merged = merged[:, merged_valid[0]]
            merged_positions = positions[:, start + centres]
        decisions.append((index, [visual_ids[j] for j in kept], merged.shape[1]))
        visual_ids = [visual_ids[j] for j in kept] + list(range(next_id, next_id + merged.shape[1]))
        next_id += merged.shape[1]
        keep_columns = [start + j for j in kept]
        hidden = torch.cat([hidden[:, :start], hidden[:, keep_columns], merged, hidden[:, start + count:]], dim=1)
        positions = torch.cat([positions[:, :start], positions[:, keep_columns], merged_positions,
                               positions[:, start + count:]], dim=1)
        shift = len(kept) + merged.shape[1] - count
        text_rows = [r + shift for r in text_rows]
        if method["name"] == "sparsevlm":
            raters = [r + shift for r in raters]
        count = len(kept) + merged.shape[1]
    return modeling.last_logits(model, hidden, torch.tensor([hidden.shape[1] - 1]))[0], decisions
