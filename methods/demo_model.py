"""The built-in demo/test model: a deterministic tiny random LLaVA-1.5.

CLIP 336/14 (576 patches, as LLaVA-1.5) and a 22-layer Llama (so SparseVLM's pruning
layers 2, 6, 15, 19 exist), small widths, a byte-level BPE tokenizer trained here on a
fixed corpus, LLaVA-1.5's chat template and a CLIP image processor. It is saved as a
standard Hugging Face LLaVA directory that `LlavaForConditionalGeneration.from_pretrained`
and `AutoProcessor.from_pretrained` load, and every entry point loads it from disk the
same way as a real checkpoint.

Weights: transformers' 0.02 initialisation makes a tiny model's attention nearly uniform,
so every top-k decision would be a near-tie. We draw weights with unit-scale variance
(and sharper query/key projections) from a fixed seed so decisions are well separated.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .files import atomic_directory

DEMO_NAME = "sparsevlm-demo"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_CORPUS = [
    "USER: ASSISTANT: What is in the image? Describe the picture in detail.",
    "How many objects are there? What color is the large square? Is there a red circle?",
    "The image shows a small blue shape on a white background next to a green line.",
    "Answer the question using a single word or phrase. Yes. No. Two. Three. Left. Right.",
    "a an the of in on at to with and or is are was were this that these those it what where",
    "red green blue yellow black white gray orange purple pink brown dark light bright",
    "circle square triangle line dot stripe pattern shape object color texture edge corner",
    "0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" ( ) - + = / \\",
]


def default_demo_dir() -> Path:
    """Where the demo checkpoint is written (SPARSEVLM_CACHE, else ~/.cache/sparsevlm)."""
    root = Path(os.environ.get("SPARSEVLM_CACHE", Path.home() / ".cache" / "sparsevlm"))
    return root / DEMO_NAME


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left", chat_template=CHAT_TEMPLATE)


def demo_config(vocab_size: int, image_token_id: int, pad_token_id: int, num_layers: int = 22,
                hidden_size: int = 64, vision_hidden: int = 32):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=3, num_attention_heads=2,
                              projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                       projector_hidden_act="gelu", pad_token_id=pad_token_id)


@torch.no_grad()
def separate_decisions(model, seed: int) -> None:
    """Deterministic weights with well-separated attention (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        elif param.dim() == 1:  # norms
            param.fill_(1.0)
        elif "embed_tokens" in name or "position_embedding" in name or "class_embedding" in name:
            param.copy_(torch.randn(param.shape, generator=gen))
        else:
            fan_in = math.prod(param.shape[1:])
            sharpen = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            param.copy_(torch.randn(param.shape, generator=gen) * sharpen / math.sqrt(fan_in))


def build_demo_model(out_dir: str | Path | None = None, seed: int = 0, num_layers: int = 22,
                     hidden_size: int = 64, overwrite: bool = False) -> Path:
    """Write the demo checkpoint to `out_dir` (default: `default_demo_dir()`); reuse it when
    already complete. Written atomically (temporary directory, then rename)."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    if (out / "model.safetensors").exists() and (out / "processor_config.json").exists() and not overwrite:
        return out
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = demo_config(len(tokenizer), image_token_id, tokenizer.pad_token_id, num_layers, hidden_size)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    separate_decisions(model, seed)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    return save_demo_checkpoint(out, model, processor)


def save_demo_checkpoint(out: Path, model, processor) -> Path:
    """Write a built-in test checkpoint (safetensors weights + processor) to `out` atomically.
    wait: concurrent first uses share the cache; replaceable: only a checkpoint is rebuilt over."""
    with atomic_directory(out, wait=True, replaceable=lambda path: (path / "config.json").exists()
                          and (path / "model.safetensors").exists()) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out
