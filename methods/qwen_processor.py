"""Qwen2.5-VL's processor for images and text, without torchvision.

transformers builds `Qwen2_5_VLProcessor` with a video processor, and the video processor
needs torchvision, which does not install beside this torch build. Images need only the
PIL image processor (`Qwen2VLImageProcessorPil`: smart resize within min/max pixels,
normalise, 14x14 patches with the temporal axis doubled) and the tokenizer with its chat
template, so `QwenImageTextProcessor` holds those two and does what `Qwen2_5_VLProcessor`
does for images: each `<|image_pad|>` of the text becomes one token per merged patch of
its image (t*h*w / merge**2). Video input is refused with a clear error.

It loads a checkpoint directory as the public repositories ship it
(`preprocessor_config.json`, the tokenizer files, `chat_template.json` or
`chat_template.jinja`, or a template inside `tokenizer_config.json`) and saves the same
layout (`save_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .generation import InputError
from .loading import CheckpointError

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class UnsupportedInputError(InputError):
    """An input kind this toolkit does not handle for the model (e.g. video)."""


def video_unsupported() -> UnsupportedInputError:
    return UnsupportedInputError("videos: video input is not supported for Qwen2.5-VL in this toolkit (its "
                                 "video processor needs torchvision, which this torch build cannot install "
                                 "beside it); pass images")


class QwenImageTextProcessor:
    """Images + text -> input_ids (image placeholders expanded), attention_mask,
    pixel_values [N, C*T*P*P] (every image's patches, concatenated), image_grid_thw [n, 3]
    and mm_token_type_ids, as Qwen2_5_VLProcessor returns them for images."""

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_size = image_processor.merge_size

    @classmethod
    def from_pretrained(cls, location: str | Path) -> "QwenImageTextProcessor":
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        location = Path(location)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(location))
        tokenizer = AutoTokenizer.from_pretrained(str(location), trust_remote_code=False)
        return cls(image_processor, tokenizer, read_chat_template(location) or tokenizer.chat_template)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.image_processor.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        if self.chat_template:
            (directory / "chat_template.json").write_text(
                json.dumps({"chat_template": self.chat_template}, indent=2) + "\n", encoding="utf-8")

    # ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        if self.chat_template is None:
            raise InputError("chat_template: this checkpoint has no chat template (chat_template.json); pass "
                             "complete prompts with the image placeholder instead")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def image_token_count(self, grid_thw) -> int:
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size ** 2

    def __call__(self, images=None, text=None, videos=None, return_tensors: str = "pt", padding: bool = True,
                 **kwargs):
        from transformers import BatchFeature

        if videos is not None:
            raise video_unsupported()
        texts = [text] if isinstance(text, str) else list(text or [])
        if not texts:
            raise InputError("text: expected at least one prompt")
        data = {}
        grids = []
        if images is not None:
            encoded = self.image_processor(images=images, return_tensors="pt")
            data["pixel_values"] = encoded["pixel_values"]
            data["image_grid_thw"] = encoded["image_grid_thw"]
            grids = encoded["image_grid_thw"].tolist()
        expanded, image = [], 0
        marker = "\0image\0"  # so an expansion is not expanded again
        for row, prompt in enumerate(texts):
            if VIDEO_TOKEN in prompt:
                raise video_unsupported()
            while self.image_token in prompt:
                if image >= len(grids):
                    raise InputError(f"prompt {row}: more image placeholders than images ({len(grids)})")
                prompt = prompt.replace(self.image_token, marker * self.image_token_count(grids[image]), 1)
                image += 1
            expanded.append(prompt.replace(marker, self.image_token))
        if image != len(grids):
            raise InputError(f"images: {len(grids)} images for {image} image placeholders in the prompts")
        tokens = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        data["input_ids"], data["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        data["mm_token_type_ids"] = (data["input_ids"] == self.image_token_id).to(torch.int32)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


def read_chat_template(location: Path) -> str | None:
    """The chat template a checkpoint ships beside its tokenizer: chat_template.jinja, or the
    `chat_template` of chat_template.json (None when neither exists)."""
    jinja = location / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    path = location / "chat_template.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"model: {path} is not a JSON object with a 'chat_template' string") from None
    if not isinstance(template, str):
        raise CheckpointError(f"model: {path} has no 'chat_template' string")
    return template
