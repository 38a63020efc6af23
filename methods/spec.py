"""`ModelSpec`: the facts of a LLaVA checkpoint that the generation loop, the accounting and
the runtime need, read from the transformers config in one place (`from_hf_config`),
written into an artifact's manifest (`to_json`, the manifest's `model` object) and read
back from it (`from_json`), so an exported artifact runs without its checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .loading import resolve_pad_token_id
from .modeling import visual_tokens_per_image

ANYRES_MODEL_TYPES = ("llava_next",)
MROPE_MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(frozen=True)
class ModelSpec:
    """LLaVA-1.5 (`model_type` "llava"): every image is one CLIP tile of `num_visual` tokens.
    LLaVA-NeXT ("llava_next", anyres): an image is the base tile plus a grid of tiles chosen
    from `image_grid_pinpoints`, and its visual count depends on its size (methods/anyres.py):
    `num_visual` is then the largest count over the pinpoints and `min_visual` a lower bound."""

    num_layers: int  # decoder layers of the language model
    hidden_size: int
    intermediate_size: int  # the MLP's width (the accounting's m)
    vocab_size: int
    num_visual: int  # visual tokens per image (anyres: the most an image can have)
    image_token_id: int  # the prompt's image placeholder
    image_size: int  # pixels per side the vision tower takes (anyres: per tile)
    pad_token_id: int  # resolve_pad_token_id's answer (pad positions are always masked)
    max_position_embeddings: int | None = None  # None: the config names no limit
    model_type: str = "llava"
    patch_size: int | None = None  # CLIP's patch (pixels per side)
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # anyres: grid resolutions (height, width)
    min_visual: int | None = None  # anyres: a lower bound of an image's visual count (else num_visual)
    # Qwen2.5-VL's vision layout (methods/qwen2_5_vl.py: the host prepares its window index).
    spatial_merge_size: int | None = None  # patches per visual token side
    window_size: int | None = None  # window attention's side in pixels
    temporal_patch_size: int | None = None  # frames per patch (an image is repeated)

    def __post_init__(self):
        if self.image_grid_pinpoints is not None:  # JSON lists -> tuples, so specs compare equal
            object.__setattr__(self, "image_grid_pinpoints", tuple(tuple(int(v) for v in p)
                                                                    for p in self.image_grid_pinpoints))
        if self.min_visual is None:
            object.__setattr__(self, "min_visual", self.num_visual)

    @property
    def anyres(self) -> bool:
        """The visual count depends on each image's size (LLaVA-NeXT)."""
        return self.model_type in ANYRES_MODEL_TYPES

    @property
    def mrope(self) -> bool:
        """Qwen2.5-VL: native-resolution images (their own visual counts) and mRoPE positions."""
        return self.model_type in MROPE_MODEL_TYPES

    @property
    def tile_tokens(self) -> int:
        """Visual tokens of one CLIP tile: (image_size // patch_size) ** 2 (576 for CLIP 336/14)."""
        if self.patch_size is None:  # a manifest written before the field existed: LLaVA-1.5
            return self.num_visual
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_tiles(self) -> int:
        """CLIP tiles per image: 1, or anyres's base image plus the largest grid."""
        if not self.anyres:
            return 1
        from .anyres import max_tiles
        return max_tiles(self.image_grid_pinpoints, self.image_size)

    @classmethod
    def from_hf_config(cls, config, tokenizer=None) -> "ModelSpec":
        """From a transformers LlavaConfig; `tokenizer` (a tokenizer, processor or checkpoint
        location) is consulted for the pad id only when the configs name none."""
        text, vision = config.text_config, config.vision_config
        if config.model_type in MROPE_MODEL_TYPES:
            return cls._from_qwen_config(config, tokenizer)
        num_visual, min_visual, pinpoints = visual_tokens_per_image(vision), None, None
        if config.model_type in ANYRES_MODEL_TYPES:
            from .anyres import visual_count_range
            pinpoints = config.image_grid_pinpoints
            min_visual, num_visual = visual_count_range(pinpoints, vision.image_size, vision.patch_size)
        return cls(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                   intermediate_size=text.intermediate_size, vocab_size=text.vocab_size,
                   num_visual=num_visual,
                   image_token_id=config.image_token_id, image_size=vision.image_size,
                   pad_token_id=resolve_pad_token_id(config, tokenizer),
                   max_position_embeddings=getattr(text, "max_position_embeddings", None),
                   model_type=config.model_type, patch_size=vision.patch_size, image_grid_pinpoints=pinpoints,
                   min_visual=min_visual)

    @classmethod
    def _from_qwen_config(cls, config, processor=None) -> "ModelSpec":
        """Qwen2.5-VL: the visual count ranges over what the image processor's min/max pixels
        allow (the public checkpoints' values without a processor); `image_size` is the
        pixels per visual token side (patch * merge)."""
        from .qwen2_5_vl import processor_pixel_range, visual_count_range
        text, vision = config.text_config, config.vision_config
        if isinstance(processor, (str, Path)):
            from .qwen_processor import QwenImageTextProcessor
            try:
                processor = QwenImageTextProcessor.from_pretrained(processor)
            except (OSError, ValueError):
                processor = None
        min_visual, num_visual = visual_count_range(*processor_pixel_range(processor), vision.patch_size,
                                                    vision.spatial_merge_size)
        return cls(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                   intermediate_size=text.intermediate_size, vocab_size=text.vocab_size, num_visual=num_visual,
                   image_token_id=config.image_token_id, image_size=vision.patch_size * vision.spatial_merge_size,
                   pad_token_id=resolve_pad_token_id(config, processor),
                   max_position_embeddings=getattr(text, "max_position_embeddings", None),
                   model_type=config.model_type, patch_size=vision.patch_size, min_visual=min_visual,
                   spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size,
                   temporal_patch_size=vision.temporal_patch_size)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelSpec":
        """From a manifest's `model` object (which also holds the source, config hash and
        processor location: fields other than the spec's are ignored). The manifest's shape
        is checked first (sparsevlm.export.manifest.check_shape). Fields a manifest written
        before they existed lacks take their defaults (LLaVA-1.5)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
