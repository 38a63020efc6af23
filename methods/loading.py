"""Resolving `--model` (local directory, hub id, alias, or the demo) and loading it.

Weights load from safetensors only and `trust_remote_code` stays off. Offline without a
local copy, the error names the repository and how to download it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .modeling import check_architecture

ALIASES = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
}
DEMO_ALIASES = ("demo", "sparsevlm-demo")
# The published llava-hf configs (config.json of each repository; Llama fields not listed
# are LlamaConfig's defaults, which are Vicuna-7B's), so `--random-weights` builds the real
# architecture offline.
_LLAVA_15 = {"model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
             "tie_word_embeddings": False, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
             "image_seq_length": 576,
             "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                               "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                               "patch_size": 14, "projection_dim": 768}}
KNOWN_CONFIGS = {
    "llava-hf/llava-1.5-7b-hf": {**_LLAVA_15, "text_config": {
        "model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05}},
    "llava-hf/llava-1.5-13b-hf": {**_LLAVA_15, "text_config": {
        "model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
        "num_key_value_heads": 40}},
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found locally or downloaded."""


def resolve_model(name: str) -> tuple[str, bool]:
    """(local path or hub id, is_local). The demo alias builds the demo checkpoint once."""
    if name in DEMO_ALIASES:
        from .demo_model import build_demo_model
        return str(build_demo_model()), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model: {path} is not a Hugging Face checkpoint directory (no config.json)")
        return str(path), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model: local path {name} does not exist")
    if name in ALIASES:
        return ALIASES[name], False
    if "/" in name:
        return name, False
    known = ", ".join(sorted(ALIASES) + list(DEMO_ALIASES))
    raise ModelNotFoundError(f"model: unknown alias {name!r}; use a local directory, a hub id "
                             f"(owner/name) or one of: {known}")


def download_hint(repo_id: str) -> str:
    return (f"model {repo_id!r} is not in the local Hugging Face cache and cannot be downloaded here. "
            f"Pre-download it on a connected machine with `huggingface-cli download {repo_id}` "
            f"(or `hf download {repo_id}`) and copy the cache, or pass the local directory to --model")


def load_config(name: str, random_weights: bool = False):
    from transformers import AutoConfig, LlavaConfig
    location, local = resolve_model(name)
    if random_weights and not local and location in KNOWN_CONFIGS:
        return LlavaConfig(**KNOWN_CONFIGS[location]), location
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=False), location
    except OSError as error:
        if local:
            raise
        raise ModelNotFoundError(download_hint(location)) from error


def load_model(name: str, dtype: str = "float32", device: str = "cpu", random_weights: bool = False):
    """(LlavaForConditionalGeneration in eval mode, its local path or hub id).

    random_weights: build the architecture from the config alone (no weight download)."""
    from transformers import LlavaForConditionalGeneration
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    config, location = load_config(name, random_weights)
    if config.model_type != "llava":
        from .modeling import UnsupportedModelError
        raise UnsupportedModelError(f"model: {name} is a {config.model_type!r} checkpoint; "
                                    "expected a LLaVA (model_type 'llava') checkpoint")
    if random_weights:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=DTYPES[dtype])
    else:
        try:
            model = LlavaForConditionalGeneration.from_pretrained(
                location, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False).to(device)
        except OSError as error:
            if Path(location).exists():
                raise ModelNotFoundError(f"model: {location}: {error}") from error
            raise ModelNotFoundError(download_hint(location)) from error
    model.eval()
    check_architecture(model)
    return model, location


def load_processor(location: str):
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(location, trust_remote_code=False)
    except OSError as error:
        raise ModelNotFoundError(download_hint(location)) from error
