"""The Python API: a LLaVA checkpoint wrapped with a pruning method.

    from sparsevlm.methods import SparseLlava, SparseVLMConfig
    vlm = SparseLlava.from_pretrained("llava-1.5-7b", SparseVLMConfig(method="sparsevlm", budget=192))
    inputs = vlm.prepare(images=[image], prompts=["What is in the image?"])
    out = vlm.generate(**inputs, max_new_tokens=32)
    print(vlm.decode(out.sequences), out.trace["layers"], out.accounting)
"""

from __future__ import annotations

import torch

from . import generation, modeling
from .config import SparseVLMConfig, resolve
from .generation import GenerationOutput, SamplingParams, TorchExecutor
from .loading import load_model, load_processor, resolve_pad_token_id


def prepare_inputs(processor, images, prompts: list[str], chat_template: bool = True) -> dict:
    """{"input_ids": list of id lists, "pixel_values": [B, 3, H, W]} for one image per prompt.
    With `chat_template`, each prompt is the user's question and the image goes first, as
    LLaVA-1.5's template puts it; without it, prompts must contain the image placeholder."""
    if len(images) != len(prompts):
        raise generation.InputError(f"images/prompts: expected one image per prompt, got {len(images)} "
                                    f"images and {len(prompts)} prompts")
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise generation.InputError(f"prompt {row}: expected a non-empty string")
    if chat_template:
        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True) for p in prompts]
    encoded = processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
    ids = [row[mask.bool()].tolist() for row, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    return {"input_ids": ids, "pixel_values": encoded["pixel_values"]}


class SparseLlava:
    """A LlavaForConditionalGeneration running a pruning method (PyTorch, any device)."""

    def __init__(self, model, config: SparseVLMConfig | None = None, processor=None):
        modeling.check_architecture(model)
        self.model, self.processor = model, processor
        self.config = config or SparseVLMConfig(method="none")
        self.plan = resolve(self.config, model.config.text_config.num_hidden_layers, modeling.num_visual_tokens(model))
        self.executor = TorchExecutor(model, self.plan)

    @classmethod
    def from_pretrained(cls, name: str, config: SparseVLMConfig | None = None, dtype: str = "float32",
                        device: str = "cpu") -> "SparseLlava":
        model, location = load_model(name, dtype=dtype, device=device)
        return cls(model, config, load_processor(location))

    @property
    def pad_id(self) -> int:
        return resolve_pad_token_id(self.model.config, self.processor)

    def prepare(self, images, prompts: list[str], chat_template: bool = True) -> dict:
        """Processor inputs for one image per prompt (see `prepare_inputs`)."""
        if self.processor is None:
            raise ValueError("prepare: this SparseLlava has no processor; pass input_ids and pixel_values")
        return prepare_inputs(self.processor, images, prompts, chat_template)

    def generate(self, input_ids, pixel_values: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, on_token=None) -> GenerationOutput:
        """Generate for one image per prompt; mirrors `transformers`' generate arguments.

        input_ids: a list of token-id lists (no padding), or a [B, S] tensor (then padding
        must be absent: pass lists for prompts of different lengths)."""
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.tolist()
        stops = () if eos_token_id is None else tuple([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        params = SamplingParams(max_new_tokens, temperature if do_sample else 0.0, top_p, seed, stops)
        return generation.generate(self.executor, self.plan, input_ids, pixel_values,
                                   image_token_id=self.model.config.image_token_id,
                                   image_size=self.model.config.vision_config.image_size,
                                   text_config=self.model.config.text_config, params=params,
                                   pad_id=self.pad_id, on_token=on_token)

    def decode(self, sequences: torch.Tensor) -> list[str]:
        return self.processor.batch_decode(sequences, skip_special_tokens=True)
