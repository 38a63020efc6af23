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
from .config import SparseVLMConfig, resolve_for_spec
from .generation import GenerationOutput, SamplingParams, TorchExecutor
from .inputs import InputBounds, prepare_inputs  # noqa: F401 - prepare_inputs: its historic import path
from .loading import load_model, load_processor
from .spec import ModelSpec


class SparseLlava:
    """A LlavaForConditionalGeneration (LLaVA-1.5) or LlavaNextForConditionalGeneration
    (LLaVA-NeXT, anyres) running a pruning method (PyTorch, any device)."""

    def __init__(self, model, config: SparseVLMConfig | None = None, processor=None):
        modeling.check_architecture(model)
        self.model, self.processor = model, processor
        self.config = config or SparseVLMConfig(method="none")
        self.spec = ModelSpec.from_hf_config(model.config, processor)  # layers, visual tokens, pad id, ...
        self.plan = resolve_for_spec(self.config, self.spec)
        self.executor = TorchExecutor(model, self.plan)
        self.bounds = InputBounds.from_spec(self.spec, processor)  # vocabulary, positions, pixel range

    @classmethod
    def from_pretrained(cls, name: str, config: SparseVLMConfig | None = None, dtype: str = "float32",
                        device: str = "cpu") -> "SparseLlava":
        model, location = load_model(name, dtype=dtype, device=device)
        return cls(model, config, load_processor(location, model.config.model_type))

    @property
    def pad_id(self) -> int:
        return self.spec.pad_token_id

    def prepare(self, images, prompts: list[str], chat_template: bool = True) -> dict:
        """Processor inputs for one image per prompt (see `sparsevlm.methods.inputs.prepare_inputs`;
        the rules are in docs/inputs.md)."""
        if self.processor is None:
            raise ValueError("prepare: this SparseLlava has no processor; pass input_ids and pixel_values")
        return prepare_inputs(self.processor, images, prompts, chat_template, self.bounds)

    def generate(self, input_ids, pixel_values: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, on_token=None,
                 attention_mask: torch.Tensor | None = None, image_sizes=None,
                 image_grid_thw=None) -> GenerationOutput:
        """Generate for one image per prompt; mirrors `transformers`' generate arguments.

        input_ids: a list of token-id lists (no padding), or a [B, S] tensor; a padded tensor
        needs its `attention_mask` (0 at padding). LLaVA-NeXT also takes the processor's
        `image_sizes`, Qwen2.5-VL its `image_grid_thw` (prepare() returns them). Ids, pixel values and lengths are checked first
        (InputError naming the argument and row; docs/inputs.md)."""
        input_ids = self.bounds.check_ids(input_ids, attention_mask, self.pad_id)
        max_new_tokens = self.bounds.check_new_tokens(max_new_tokens)
        self.bounds.check_lengths(input_ids, max_new_tokens)
        self.bounds.check_pixel_values(pixel_values, len(input_ids), self.spec.image_size)
        stops = () if eos_token_id is None else tuple([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        params = SamplingParams(max_new_tokens, temperature if do_sample else 0.0, top_p, seed, stops)
        return generation.generate(self.executor, self.plan, input_ids, pixel_values, spec=self.spec,
                                   params=params, on_token=on_token,
                                   image_sizes=image_sizes if image_grid_thw is None else image_grid_thw)

    def decode(self, sequences: torch.Tensor) -> list[str]:
        return self.processor.batch_decode(sequences, skip_special_tokens=True)
