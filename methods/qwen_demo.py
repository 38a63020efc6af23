"""A deterministic tiny random Qwen2.5-VL, saved as the public repositories ship it.

Vision tower: 14x14 patches, 2x2 merge, windows of 112 pixels (4x4 merged tokens), four
blocks of which blocks 1 and 3 attend over the whole image (the others inside windows).
Language model: a 22-layer Qwen2 (q/k/v biases, grouped-query attention, mRoPE with
`mrope_section` (2, 3, 3) on 16-dimensional heads), so SparseVLM's pruning layers
2, 6, 15, 19 exist. A byte-level BPE tokenizer with Qwen's special tokens, Qwen2.5-VL's
chat template (the default system prompt, `<|vision_start|><|image_pad|><|vision_end|>` for
the image) and a PIL image processor whose pixel range keeps images small (at most 448x448
pixels: 256 merged tokens, so SparseVLM budgets up to 192 fit). The directory holds config.json, model.safetensors,
preprocessor_config.json, the tokenizer files and chat_template.json; it loads with
`Qwen2_5_VLForConditionalGeneration.from_pretrained` and `QwenImageTextProcessor.from_pretrained`.

Weights as the LLaVA demo's (`demo_model.separate_decisions`): unit-scale, so attention is
sharp and top-k decisions are well separated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .demo_model import separate_decisions
from .files import atomic_directory

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL-Instruct's chat template, for images and text (video entries render as its
# placeholder, which the processor then refuses).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "What is in the image? Describe the picture in detail. How many objects are there?",
    "The image shows a small blue shape on a white background next to a green line.",
    "red green blue yellow black white circle square triangle line dot left right yes no",
    "0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" ( ) - + = / \\ \n",
]
MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def tiny_config(tokenizer, num_layers: int = 22, hidden_size: int = 64):
    from transformers import Qwen2_5_VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, out_hidden_size=hidden_size, fullatt_block_indexes=[1, 3],
                  tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def preprocessor_config() -> dict:
    """preprocessor_config.json in the layout of the public Qwen2.5-VL repositories."""
    return {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"}


def build_qwen_demo(out_dir: str | Path, seed: int = 0, num_layers: int = 22, overwrite: bool = False) -> Path:
    """Write the tiny Qwen2.5-VL checkpoint to `out_dir` (reused when already complete)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    if (out / "model.safetensors").exists() and (out / "chat_template.json").exists() and not overwrite:
        return out
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, num_layers)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    separate_decisions(model, seed)
    with atomic_directory(out, wait=True, replaceable=lambda path: (path / "config.json").exists()
                          and (path / "model.safetensors").exists()) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
        (Path(tmp) / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return out
