"""LLaVA building blocks the methods run on, written over transformers' own modules.

We call the checkpoint's submodules (projections, norms, MLPs, rotary embedding) and do the
attention arithmetic here, so that (1) masks and position ids are explicit per batch row,
(2) the attention rows a method scores are computed alone (q_rows @ K^T), leaving every
attention call on SDPA, and (3) the same code traces to ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


class UnsupportedModelError(ValueError):
    """The checkpoint is not a LLaVA-1.5 or LLaVA-NeXT model (CLIP vision tower + Llama/Mistral LM)."""


# model_type -> the language models supported with it
SUPPORTED_MODELS = {"llava": ("llama",), "llava_next": ("llama", "mistral")}


def check_architecture(model) -> None:
    check_config(model.config)


def check_config(cfg) -> None:
    if cfg.model_type == "qwen2_5_vl":
        from .qwen2_5_vl import check_config as check_qwen
        return check_qwen(cfg)
    if cfg.model_type not in SUPPORTED_MODELS:
        raise UnsupportedModelError(f"model: expected a LLaVA-1.5 or LLaVA-NeXT checkpoint (model_type "
                                    f"{' or '.join(map(repr, SUPPORTED_MODELS))}), got {cfg.model_type!r}")
    if cfg.vision_config.model_type != "clip_vision_model":
        raise UnsupportedModelError(f"model: expected a CLIP vision tower, got {cfg.vision_config.model_type!r}")
    text_types = SUPPORTED_MODELS[cfg.model_type]
    if cfg.text_config.model_type not in text_types:
        raise UnsupportedModelError(f"model: expected a {' or '.join(t.capitalize() for t in text_types)} language "
                                    f"model for {cfg.model_type!r}, got {cfg.text_config.model_type!r}")
    if getattr(cfg.text_config, "sliding_window", None) is not None:
        raise UnsupportedModelError(f"model: the language model uses sliding-window attention (sliding_window="
                                    f"{cfg.text_config.sliding_window}), which is not supported (full attention only)")
    if cfg.vision_feature_select_strategy != "default" or not isinstance(cfg.vision_feature_layer, int):
        raise UnsupportedModelError("model: only vision_feature_select_strategy='default' with one "
                                    "vision_feature_layer (LLaVA-1.5 / LLaVA-NeXT) is supported")


def num_visual_tokens(model) -> int:
    return visual_tokens_per_image(model.config.vision_config)


def visual_tokens_per_image(vision_config) -> int:
    """One token per patch of the (square) input image: (image_size // patch_size) ** 2."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


# --------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------

def _cls_attention(layer, hidden: torch.Tensor) -> torch.Tensor:
    """Head-mean post-softmax attention of the [CLS] query in CLIP `layer`: [B, N] (patches)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    batch, tokens, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)  # [B, H, 1, N+1]
    return probs.mean(dim=1)[:, 0, 1:]


def encode_image(model, pixel_values: torch.Tensor, with_cls_scores: bool = False):
    """Projected patch features [B, N, D_text] as LLaVA computes them, and optionally
    FasterVLM's [CLS] scores [B, N] from the same vision layer (float32)."""
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)  # transformers 5 flattened CLIPVisionModel
    layers = vision.encoder.layers
    feature_layer = model.config.vision_feature_layer
    layers_run = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values.to(vision.embeddings.patch_embedding.weight.dtype)))
    cls_scores = None
    for index in range(layers_run):
        if with_cls_scores and index == layers_run - 1:
            cls_scores = _cls_attention(layers[index], hidden)
        hidden = layers[index](hidden, None)
    features = model.model.multi_modal_projector(hidden[:, 1:])  # 'default': drop [CLS]
    return features, cls_scores


# --------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------

def language_model(model):
    return model.model.language_model


def prefill_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool: causal attention over valid keys. A padding query also sees itself,
    so no softmax row is empty; padding rows are never read by valid ones."""
    seq = key_valid.shape[1]
    idx = torch.arange(seq, device=key_valid.device)
    causal = idx[None, :] <= idx[:, None]
    itself = idx[None, :] == idx[:, None]
    return ((causal[None] & key_valid[:, None, :]) | itself[None])[:, None]


def prefill_attention_mask(key_valid: torch.Tensor) -> torch.Tensor | None:
    """The mask `decoder_layer` gets in prefill: `prefill_mask(key_valid)`, or None when every
    token of every row is valid and the model runs eagerly. None makes SDPA take `is_causal`:
    the same result (the same kernel on the CPU, bit for bit there), but it skips the masked
    upper half (the decoder layers 5 % faster at 608 tokens on the 2-core CI machine, 8 % at
    2000) and lets CUDA use FlashAttention, which an explicit mask rules out. A traced graph
    always takes the explicit mask: its inputs may hold padding when it runs."""
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if not tracing and bool(key_valid.all()):
        return None
    return prefill_mask(key_valid)


def positions_from_valid(key_valid: torch.Tensor) -> torch.Tensor:
    """Contiguous positions 0..n-1 over each row's valid tokens (padding gets 0)."""
    return (torch.cumsum(key_valid.long(), dim=1) - 1).clamp_min(0)


def rotary(model, hidden: torch.Tensor, position_ids: torch.Tensor):
    return language_model(model).rotary_emb(hidden, position_ids)


def attend_past_and_new(q, key, value, past_key, past_value, past_valid, scaling: float) -> torch.Tensor:
    """One new token's attention over [past cache, itself] without building that concatenation.

    q [B, H, 1, hd]; key, value [B, H_kv, 1, hd] (the new token's); past_key, past_value
    [B, H_kv, C, hd] (the cache buffer at its capacity C); past_valid [B, C] bool (which cache
    columns hold a key; the others are masked out). Scores against the past and against the
    new key are taken separately and normalised by one softmax over both (a joint max and
    sum), then the two weighted sums are added: the softmax over the concatenated keys,
    without copying the cache. Query heads are grouped onto their key/value head by a view
    (grouped-query attention without `repeat_kv`'s copy of the cache). Returns [B, H, 1, hd].
    """
    batch, heads, _, head_dim = q.shape
    kv_heads = past_key.shape[1]
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # float16 graphs: softmax in float32
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # [B, H_kv, G, hd]
    past_scores = (grouped @ past_key.transpose(-1, -2)).to(softmax_dtype) * scaling  # [B, H_kv, G, C]
    past_scores = past_scores.masked_fill(~past_valid[:, None, None, :], float("-inf"))
    new_score = (grouped * key).sum(-1, keepdim=True).to(softmax_dtype) * scaling  # [B, H_kv, G, 1]
    top = torch.maximum(past_scores.amax(-1, keepdim=True), new_score)  # finite, as the new score is
    past_weights = torch.exp(past_scores - top)
    new_weight = torch.exp(new_score - top)
    total = past_weights.sum(-1, keepdim=True) + new_weight
    out = (past_weights / total).to(past_value.dtype) @ past_value \
        + ((new_weight / total) * value.to(softmax_dtype)).to(value.dtype)
    return out.reshape(batch, heads, 1, head_dim)


def decoder_layer(layer, hidden, cos, sin, mask, past=None, score_rows: tuple[int, int] | None = None):
    """One Llama decoder layer with explicit mask and rotary tables.

    Prefill (past None): mask [B, 1, S, S] bool (`prefill_mask`), or None for plain causal
        attention over all tokens (`prefill_attention_mask`).
    Decode (one token): past is (key, value) [B, H_kv, C, hd], the cache buffers at their
        capacity, and mask [B, C] bool the valid cache columns (`attend_past_and_new`).
    score_rows: (start, stop) of query rows whose head-mean post-softmax attention
        [B, stop-start, S_keys] (float32) is also returned. Only those rows are computed (prefill).
    Returns (hidden, (key, value) of this call's tokens, probs or None).
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, seq, _ = x.shape
    shape = (batch, seq, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past is None:
        keys_r = repeat_kv(k, attn.num_key_value_groups)
        values_r = repeat_kv(v, attn.num_key_value_groups)
        out = F.scaled_dot_product_attention(q, keys_r, values_r, attn_mask=mask, is_causal=mask is None,
                                             scale=attn.scaling)
    else:  # decode: the cache is read in place, never concatenated with the new entries
        out = attend_past_and_new(q, k, v, past[0], past[1], mask, attn.scaling)

    probs = None
    if score_rows is not None:
        start, stop = score_rows
        if mask is None:
            mask = prefill_mask(torch.ones(batch, seq, dtype=torch.bool, device=x.device))
        logits = (q[:, :, start:stop] @ keys_r.transpose(-1, -2)).float() * attn.scaling
        logits = logits.masked_fill(~mask[:, :, start:stop], float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(dim=1)

    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, (k, v), probs


def select_raters(visual: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor,
                  visual_valid: torch.Tensor | None = None) -> torch.Tensor:
    """SparseVLM text raters from the layer-0 inputs: bool [B, T].

    M = H_v H_t^T (unscaled); softmax over the text axis; mean over visual rows; raters are
    the text tokens with r_j > mean(r) (strict, as the authors' code). A row whose scores are
    all equal (e.g. one text token) has no rater by that rule; it then uses all its text
    tokens, where the authors' code would average over an empty set (NaN). `visual_valid`
    (anyres: rows of different visual counts) restricts the mean to each row's visual tokens.
    """
    logits = (visual.float() @ text.float().transpose(1, 2)).masked_fill(~text_valid[:, None, :], float("-inf"))
    if visual_valid is None:
        relevance = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, T]
    else:
        weights = visual_valid.float()[:, :, None]
        relevance = (torch.softmax(logits, dim=-1) * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    count = text_valid.sum(dim=1, keepdim=True).clamp_min(1)
    mean = torch.where(text_valid, relevance, torch.zeros_like(relevance)).sum(1, keepdim=True) / count
    raters = (relevance > mean) & text_valid
    # Logical ops, not a bool `where` (ONNX Runtime's CPU Where has no bool kernel).
    return raters | (~raters.any(dim=1, keepdim=True) & text_valid)


def last_logits(model, hidden: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """LM-head logits [B, vocab] (float32) at each row's position `last_index[b]`."""
    rows = torch.gather(hidden, 1, last_index[:, None, None].expand(-1, 1, hidden.shape[2]))
    return model.lm_head(language_model(model).norm(rows))[:, 0].float()
