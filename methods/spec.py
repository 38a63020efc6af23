"""`ModelSpec`: the facts of a LLaVA checkpoint that the generation loop, the accounting and
the runtime need, read from the transformers config in one place (`from_hf_config`),
written into an artifact's manifest (`to_json`, the manifest's `model` object) and read
back from it (`from_json`), so an exported artifact runs without its checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .loading import resolve_pad_token_id
from .modeling import visual_tokens_per_image


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int  # decoder layers of the language model
    hidden_size: int
    intermediate_size: int  # the MLP's width (the accounting's m)
    vocab_size: int
    num_visual: int  # visual tokens per image: (image_size // patch_size) ** 2
    image_token_id: int  # the prompt's image placeholder
    image_size: int  # pixels per side the vision tower takes
    pad_token_id: int  # resolve_pad_token_id's answer (pad positions are always masked)
    max_position_embeddings: int | None = None  # None: the config names no limit

    @classmethod
    def from_hf_config(cls, config, tokenizer=None) -> "ModelSpec":
        """From a transformers LlavaConfig; `tokenizer` (a tokenizer, processor or checkpoint
        location) is consulted for the pad id only when the configs name none."""
        text, vision = config.text_config, config.vision_config
        return cls(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                   intermediate_size=text.intermediate_size, vocab_size=text.vocab_size,
                   num_visual=visual_tokens_per_image(vision),
                   image_token_id=config.image_token_id, image_size=vision.image_size,
                   pad_token_id=resolve_pad_token_id(config, tokenizer),
                   max_position_embeddings=getattr(text, "max_position_embeddings", None))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelSpec":
        """From a manifest's `model` object (which also holds the source, config hash and
        processor location: fields other than the spec's are ignored). The manifest's shape
        is checked first (sparsevlm.export.manifest.check_shape)."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})
