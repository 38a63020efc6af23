"""Resolving `--model` (local directory, hub id, alias, or the demo) and loading it.

Weights load from safetensors only and `trust_remote_code` stays off. Offline without a
local copy, the error names the repository and how to download it. A checkpoint is taken
only whole: a bad config.json, an unreadable safetensors file, a tensor of the wrong shape,
or tensors missing from (or extra to) the architecture are refused with their names, never
replaced by random initialisation (tied weights, e.g. `tie_word_embeddings`, are not missing).
"""

from __future__ import annotations

from pathlib import Path

import hashlib
import json

import torch

from .modeling import check_architecture

ALIASES = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-v1.6-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-v1.6-vicuna-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
    "llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
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
# LLaVA-NeXT (v1.6): the same CLIP tower, anyres tiles on these grid pinpoints (height, width).
_LLAVA_16 = {**{k: v for k, v in _LLAVA_15.items() if k not in ("pad_token_id", "image_seq_length")},
             "model_type": "llava_next", "use_image_newline_parameter": True,
             "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}
KNOWN_CONFIGS = {
    "llava-hf/llava-1.5-7b-hf": {**_LLAVA_15, "text_config": {
        "model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05}},
    "llava-hf/llava-1.5-13b-hf": {**_LLAVA_15, "text_config": {
        "model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
        "num_key_value_heads": 40}},
    "llava-hf/llava-v1.6-vicuna-7b-hf": {**_LLAVA_16, "text_config": {
        "model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "pad_token_id": 0}},
    "llava-hf/llava-v1.6-vicuna-13b-hf": {**_LLAVA_16, "text_config": {
        "model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
        "num_key_value_heads": 40, "pad_token_id": 0}},
    "llava-hf/llava-v1.6-mistral-7b-hf": {**_LLAVA_16, "text_config": {
        "model_type": "mistral", "vocab_size": 32064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
        "intermediate_size": 14336, "num_key_value_heads": 8, "rope_theta": 1000000.0, "sliding_window": None}},
}
# The published Qwen2.5-VL-Instruct configs (config.json of each repository, flat as shipped;
# Qwen2_5_VLConfig moves the text fields into its text_config).
_QWEN2_5_VL = {"model_type": "qwen2_5_vl", "bos_token_id": 151643, "eos_token_id": 151645,
               "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
               "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "attention_dropout": 0.0,
               "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
               "sliding_window": 32768, "use_sliding_window": False,
               "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
_QWEN2_5_VL_VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2, "temporal_patch_size": 2}
KNOWN_CONFIGS.update({
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        **_QWEN2_5_VL, "hidden_size": 2048, "intermediate_size": 11008, "max_window_layers": 70,
        "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "vocab_size": 151936, "vision_config": {**_QWEN2_5_VL_VISION, "out_hidden_size": 2048}},
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        **_QWEN2_5_VL, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
        "vocab_size": 152064, "vision_config": {**_QWEN2_5_VL_VISION, "out_hidden_size": 3584}},
})
# model_type -> (config class, model class) names in transformers
MODEL_CLASSES = {"llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
                 "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
                 "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found locally or downloaded."""


class CheckpointError(ValueError):
    """The checkpoint exists but is not a usable LLaVA checkpoint (the message says why)."""


class DeviceError(ValueError):
    """The requested torch device does not exist on this machine."""


# Pad positions are always masked (left-padded prefix, right-padded text, finished rows), so
# the pad id only has to be a valid embedding row; 0 is one when no config or tokenizer names one.
FALLBACK_PAD_TOKEN_ID = 0


def resolve_pad_token_id(config, tokenizer=None) -> int:
    """The pad token id, wherever the checkpoint keeps it: the top-level config (transformers
    4), the text config (transformers 5), the tokenizer (`tokenizer` may be a tokenizer, a
    processor or a checkpoint location, consulted only when the configs have none), else
    FALLBACK_PAD_TOKEN_ID. The one place every stage takes the pad id from."""
    for source in (config, getattr(config, "text_config", None)):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int) and pad >= 0:
            return pad
    if isinstance(tokenizer, (str, Path)):
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False)
        except (OSError, ValueError):
            tokenizer = None
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if isinstance(pad, int) and pad >= 0 else FALLBACK_PAD_TOKEN_ID


def config_sha256(model) -> str:
    """Identity of a model's architecture and token ids (its full config, dtype aside: a
    calibration recorded in float32 holds for a float16 export of the same checkpoint)."""
    config = model.config.to_dict()
    for entry in (config, config.get("text_config") or {}, config.get("vision_config") or {}):
        for key in ("dtype", "torch_dtype", "_name_or_path", "transformers_version"):
            entry.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_device(device: str) -> str:
    """`device` names a torch device that exists here (fail before loading anything)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device: {device!r} is not a torch device (expected cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device: {device!r} needs a CUDA GPU, and torch sees none here "
                                  f"(torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(f"device: {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise DeviceError(f"device: {device!r} is not supported (expected cpu or cuda)")
    return device


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


def model_class(model_type: str):
    """transformers' model class for a supported model_type (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL)."""
    import transformers
    return getattr(transformers, MODEL_CLASSES[model_type][1])


def load_config(name: str, random_weights: bool = False):
    import transformers
    from transformers import AutoConfig
    location, local = resolve_model(name)
    if random_weights and not local and location in KNOWN_CONFIGS:
        known = KNOWN_CONFIGS[location]
        return getattr(transformers, MODEL_CLASSES[known["model_type"]][0])(**known), location
    if local:
        _check_config_json(Path(location) / "config.json")
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=False), location
    except (OSError, ValueError, KeyError, TypeError) as error:
        if local:
            raise CheckpointError(f"model: {location}/config.json is not a valid configuration "
                                  f"({type(error).__name__}: {error})") from error
        raise ModelNotFoundError(download_hint(location)) from error


def _check_config_json(path: Path) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"model: {path} is not UTF-8 text (expected a JSON configuration)") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"model: {path} is not valid JSON ({error.msg} at line {error.lineno} "
                              f"column {error.colno})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"model: {path} has no 'model_type'; expected a Hugging Face LLaVA configuration")


def _check_weight_files(location: Path) -> None:
    """Every safetensors file has a readable header that covers the file (fails fast on a
    truncated or foreign file, naming it)."""
    from safetensors import safe_open
    files = sorted(location.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model: {location} has no *.safetensors weights (only safetensors are loaded)")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise CheckpointError(f"model: {file} is not a readable safetensors file, truncated or corrupted "
                                  f"({error})") from None


def _check_loading_info(location: str, info: dict) -> None:
    problems = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected (not in the architecture)"),
                       ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{len(names)} tensor(s) {label}: {shown}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(m) for m in info["error_msgs"]))
    if problems:
        raise CheckpointError(f"model: {location} does not match its config.json: {'; '.join(problems)} "
                              "(refusing to fill them with random weights)")


def load_model(name: str, dtype: str = "float32", device: str = "cpu", random_weights: bool = False):
    """(LlavaForConditionalGeneration or LlavaNextForConditionalGeneration in eval mode, its
    local path or hub id).

    random_weights: build the architecture from the config alone (no weight download)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    check_device(device)
    config, location = load_config(name, random_weights)
    if config.model_type not in MODEL_CLASSES:
        from .modeling import UnsupportedModelError
        raise UnsupportedModelError(f"model: {name} is a {config.model_type!r} checkpoint; expected a LLaVA-1.5, "
                                    f"LLaVA-NeXT or Qwen2.5-VL (model_type {' or '.join(map(repr, MODEL_CLASSES))}) "
                                    "checkpoint")
    LlavaForConditionalGeneration = model_class(config.model_type)  # noqa: N806 - the class of this checkpoint
    if random_weights:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=DTYPES[dtype])
    else:
        local = Path(location).is_dir()
        if local:
            _check_weight_files(Path(location))
        try:
            model, info = LlavaForConditionalGeneration.from_pretrained(
                location, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False,
                ignore_mismatched_sizes=True, output_loading_info=True)  # mismatches are refused below, by name
        except OSError as error:
            if local:
                raise ModelNotFoundError(f"model: {location}: {error}") from error
            raise ModelNotFoundError(download_hint(location)) from error
        except Exception as error:  # noqa: BLE001 - safetensors/transformers raise many types for a bad file
            if not local:
                raise
            raise CheckpointError(f"model: {location}: cannot load the weights ({type(error).__name__}: "
                                  f"{' '.join(str(error).split())})") from error
        _check_loading_info(location, info)
        model = model.to(device)
    model.eval()
    check_architecture(model)
    return model, location


def load_processor(location: str, model_type: str | None = None):
    """The checkpoint's processor; Qwen2.5-VL's without its video half (methods/qwen_processor.py:
    transformers' needs torchvision)."""
    from transformers import AutoProcessor
    try:
        if model_type == "qwen2_5_vl":
            from .qwen_processor import QwenImageTextProcessor
            return QwenImageTextProcessor.from_pretrained(location)
        return AutoProcessor.from_pretrained(location, trust_remote_code=False)
    except OSError as error:
        raise ModelNotFoundError(download_hint(location)) from error
