"""A tiny random LLaVA-NeXT (anyres) checkpoint, the NeXT twin of `demo_model.py`.

CLIP tiles of 84 px with 14 px patches (36 tokens per tile), grid pinpoints 84x168, 168x84
and 168x168 (so an image takes 3 or 5 tiles, and its visual count, 36 + the unpadded grid
with one newline per row, changes with its size and aspect ratio: 36 + 6..156), a 22-layer
Llama (SparseVLM's pruning layers exist), the demo's tokenizer and chat template, and
transformers' LLaVA-NeXT processor. Saved as a standard Hugging Face directory that
`LlavaNextForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .demo_model import CHAT_TEMPLATE, build_tokenizer, default_demo_dir, save_demo_checkpoint, separate_decisions

DEMO_NEXT_NAME = "sparsevlm-demo-next"
TILE_SIZE, PATCH_SIZE = 84, 14
PINPOINTS = [[84, 168], [168, 84], [168, 168]]


def demo_next_config(vocab_size: int, image_token_id: int, pad_token_id: int, num_layers: int = 22,
                     hidden_size: int = 64, vision_hidden: int = 32):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(image_size=TILE_SIZE, patch_size=PATCH_SIZE, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=3, num_attention_heads=2,
                              projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                           image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu",
                           image_seq_length=(TILE_SIZE // PATCH_SIZE) ** 2, tie_word_embeddings=False)


def build_demo_next_model(out_dir: str | Path | None = None, seed: int = 0, num_layers: int = 22,
                          hidden_size: int = 64, overwrite: bool = False) -> Path:
    """Write the tiny LLaVA-NeXT checkpoint to `out_dir` (default: next to the demo's);
    reuse it when already complete. Weights as the demo's (well-separated attention)."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    out = Path(out_dir) if out_dir is not None else default_demo_dir().parent / DEMO_NEXT_NAME
    if (out / "model.safetensors").exists() and (out / "processor_config.json").exists() and not overwrite:
        return out
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = demo_next_config(len(tokenizer), image_token_id, tokenizer.pad_token_id, num_layers, hidden_size)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    separate_decisions(model, seed)
    with torch.no_grad():  # a vector, not a norm: unit-scale like the embeddings
        newline = model.model.image_newline
        newline.copy_(torch.randn(newline.shape, generator=torch.Generator().manual_seed(seed + 1)))
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": TILE_SIZE},
                                              crop_size={"height": TILE_SIZE, "width": TILE_SIZE},
                                              image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                   num_additional_image_tokens=1)
    return save_demo_checkpoint(out, model, processor)
