"""What a request may contain: the input rules every entry point shares.

The PyTorch API (`SparseLlava`), the runtime (`Pipeline`), `sparsevlm-run`, the Triton
models and the calibration set all take their images, prompts and lengths through this
module, so a bad input gets the same one-line `InputError` (naming the input, and the row)
wherever it arrives. The rules are written for users in docs/inputs.md; keep the two in step.

Images (`load_image`): a PIL image, a file path, encoded bytes or an HxW / HxWxC uint8 numpy
array. The size is checked from the file header before any pixel is decoded; EXIF
orientation of a file is applied; 16-bit, float, palette, alpha and CMYK images become 8-bit RGB by the
rules in `to_rgb`.

Prompts (`check_prompt`): text (str) that encodes as UTF-8, not empty, with no image
placeholder of its own (the chat template inserts the image), and not longer than the
cheap character bound that keeps a huge prompt from ever reaching the tokenizer.

Lengths (`InputBounds`): tokens before and after the image within the artifact's
optimization profiles (`prefix_len`, `text_len`), new tokens within the decode profile,
and prompt + new tokens within the model's positions.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .generation import InputError
from .spec import ModelSpec

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's image token text (the processor's `image_token`)

# Images: more pixels than this are refused before decoding (a 50 MP photo decodes to 150 MB of
# RGB; PIL's own bomb check only starts at 89 MP and raises a foreign error past 179 MP).
MAX_IMAGE_PIXELS = 50_000_000
# CLIP's processor scales the short side up to the crop size before it crops, so a 1x5000
# image became a 336x1,680,000 intermediate (5.9 GB). Beyond this ratio the image is refused.
MAX_ASPECT_RATIO = 20

# Prompts: a prompt with more than this many characters per allowed text token is refused
# before it is tokenized (a 98,000-character prompt grew sparsevlm-run to 24 GB). Natural text
# averages 3-5 characters per token, so this only stops prompts far over the token bound; the
# exact token bound is checked after tokenizing.
MAX_CHARS_PER_TOKEN = 32


# ======================================================================================
# Images
# ======================================================================================

def _describe(image) -> str:
    return type(image).__name__


def load_image(image, name: str = "image"):
    """A PIL RGB image (8 bits per channel) from a PIL image, a file path, encoded bytes or
    an HxW / HxWx1 / HxWx3 / HxWx4 uint8 numpy array; InputError (naming `name`) otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):  # the caller's pixels as they are (no EXIF rotation: it may be done)
        check_image_size(image.size, name)
        return to_rgb(image, name)
    if isinstance(image, np.ndarray):
        return to_rgb(_from_array(image, name), name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InputError(f"{name}: empty bytes (expected an encoded image: PNG, JPEG, ...)")
        source, what = io.BytesIO(data), f"{name} ({len(data)} image bytes)"
    elif isinstance(image, (str, os.PathLike)):
        source, what = Path(image), f"{name} file {image}"
        if not source.exists():
            raise InputError(f"{what} does not exist")
        if not source.is_file():
            raise InputError(f"{what} is not a file")
    else:
        raise InputError(f"{name}: expected a PIL image, an image file path, encoded image bytes or an HxWx3 "
                         f"uint8 numpy array, got {_describe(image)}")
    try:
        with warnings.catch_warnings():  # our own pixel limit is lower than PIL's warning threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
    except Image.DecompressionBombError:
        raise InputError(f"{what}: more than {MAX_IMAGE_PIXELS:,} pixels (at most {MAX_IMAGE_PIXELS:,} are "
                         "accepted; scale it down)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(f"{what}: not a decodable image ({type(error).__name__})") from None
    with opened:
        check_image_size(opened.size, what)  # from the header: nothing is decoded yet
        try:
            opened.load()
            return to_rgb(_upright(opened), what)
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - PIL raises many types for a damaged file
            raise InputError(f"{what}: not a decodable image ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:120]})") from None


def check_image_size(size: tuple[int, int], name: str = "image") -> None:
    """Refuse images with more than MAX_IMAGE_PIXELS pixels or an aspect ratio beyond MAX_ASPECT_RATIO."""
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise InputError(f"{name}: {width}x{height} pixels is empty")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{name}: {width}x{height} pixels is {width * height / 1e6:.1f} megapixels; at most "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are accepted (scale it down)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(f"{name}: {width}x{height} pixels has an aspect ratio of {ratio:.0f}:1; at most "
                         f"{MAX_ASPECT_RATIO}:1 is accepted (the model sees a centred square crop: crop it first)")


def _upright(image):
    """Apply the EXIF orientation tag, as image viewers do (a damaged tag is ignored)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF: show the pixels as stored
        return image


def _from_array(array: np.ndarray, name: str):
    from PIL import Image

    shape = array.shape
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and shape[2] not in (1, 3, 4)):
        raise InputError(f"{name}: a numpy image must be uint8 with shape HxW, HxWx1, HxWx3 (RGB) or HxWx4 "
                         f"(RGBA), got {array.dtype} {shape}")
    check_image_size((shape[1], shape[0]), name)
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))  # uint8: L, RGB or RGBA from the shape


INTEGER_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image, name: str = "image"):
    """8-bit RGB by these rules (docs/inputs.md):

    - 16/32-bit integer grey (modes I;16*, I): values clipped to [0, 65535] and divided by
      257 (rounded), so 65535 -> 255 and an 8-bit value v stored as v*257 comes back as v;
    - floating-point grey (mode F): NaN or infinity is refused; values all within [0, 1]
      are multiplied by 255, anything else is min-max scaled to [0, 255] (constant -> 0);
    - with transparency (RGBA, LA, PA, a palette with a transparent colour): composited on
      white, as viewers show it;
    - everything else (1, L, P, CMYK, YCbCr, ...): PIL's conversion to RGB.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image.convert("RGB")  # a copy: the caller may close the file it came from
    if mode in INTEGER_16BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((values + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise InputError(f"{name}: floating-point pixels include NaN or infinity")
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif high > low:
            scaled = (values - low) / (high - low) * 255.0
        else:
            scaled = np.zeros_like(values)
        return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")
    has_alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in image.info)
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            background.alpha_composite(rgba)
            return background.convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise InputError(f"{name}: cannot convert pixel mode {mode!r} to RGB ({error})") from None


# ======================================================================================
# Prompts
# ======================================================================================

def check_prompt(prompt, row: int = 0, *, chat_template: bool = True, max_chars: int | None = None,
                 placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """The prompt if it is usable text, InputError naming the row otherwise.

    chat_template: the prompt is the user's question (the template inserts the image, so a
    placeholder of its own would be a second image); without it, the prompt is complete
    text with exactly one placeholder where the image goes."""
    where = f"prompt {row}"
    if isinstance(prompt, (bytes, bytearray)):
        raise InputError(f"{where}: expected text (str), got bytes; decode it (UTF-8) first")
    if not isinstance(prompt, str):
        raise InputError(f"{where}: expected a non-empty string, got {_describe(prompt)}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates: bytes that were not UTF-8 (e.g. from argv)
        raise InputError(f"{where}: not valid UTF-8 text (undecodable byte at character {error.start}); "
                         "pass the prompt as UTF-8") from None
    if not prompt.strip():
        raise InputError(f"{where}: expected a non-empty string")
    if max_chars is not None and len(prompt) > max_chars:
        raise InputError(f"{where}: {len(prompt):,} characters; at most {max_chars:,} are accepted "
                         f"({MAX_CHARS_PER_TOKEN} per token the model can take)")
    count = prompt.count(placeholder)
    if chat_template and count:
        raise InputError(f"{where}: contains the image placeholder {placeholder!r}; the chat template inserts the "
                         "image itself (remove it, or pass a complete prompt with chat_template=False)")
    if not chat_template and count != 1:
        raise InputError(f"{where}: a complete (chat_template=False) prompt needs exactly one image placeholder "
                         f"{placeholder!r}, got {count}")
    return prompt


# ======================================================================================
# Lengths, token ids and pixel values
# ======================================================================================

# CLIP normalisation (LLaVA-1.5's processor), for pixel-value range checks without a processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIXEL_TOLERANCE = 0.05  # resampling overshoot and rounding around the normalised [0, 1] range


@dataclass(frozen=True)
class InputBounds:
    """The limits of one model (and artifact). None: no limit of that kind.

    max_prefix_tokens / max_text_tokens: tokens before / after the image (the artifact's
        `prefix_len` / `text_len` profile maxima);
    max_new_tokens: the decode profile's room for generated tokens;
    max_positions: the model's `max_position_embeddings` (prompt with the image expanded
        to its visual tokens, plus new tokens);
    vocab_size: token ids must lie in [0, vocab_size);
    pixel_range: per channel (low, high) of processor-normalised pixel values."""

    image_token_id: int
    num_visual: int  # anyres: the most visual tokens an image can have
    vocab_size: int | None = None
    max_positions: int | None = None
    max_prefix_tokens: int | None = None
    max_text_tokens: int | None = None
    max_new_tokens: int | None = None
    pixel_range: tuple[tuple[float, float], ...] | None = None
    anyres: bool = False  # LLaVA-NeXT: pixel values are [B, tiles, 3, S, S], visual counts per image
    flat_patches: bool = False  # Qwen2.5-VL: pixel values are every image's patches [N, 3 * T * P * P]

    @classmethod
    def from_spec(cls, spec, processor=None) -> "InputBounds":
        """Bounds of a PyTorch model from its ModelSpec: vocabulary and positions (no profiles)."""
        return cls(image_token_id=spec.image_token_id, num_visual=spec.num_visual, vocab_size=spec.vocab_size,
                   max_positions=spec.max_position_embeddings, pixel_range=pixel_range(processor),
                   anyres=spec.anyres, flat_patches=spec.mrope)

    @classmethod
    def from_manifest(cls, manifest: dict, processor=None) -> "InputBounds":
        """Bounds of an exported artifact: its profiles, vocabulary and (when recorded) positions."""
        graphs = manifest.get("graphs", {})
        first = graphs.get("segment_0", {}).get("profiles") or []
        prefix = max((p["prefix_len"][2] for p in first if "prefix_len" in p), default=None)
        text = max((p["text_len"][2] for p in first if "text_len" in p), default=None)
        new_tokens = None
        decode = graphs.get("decode", {}).get("profiles") or []
        seq_in = max((p["seq_in"][2] for p in first if "seq_in" in p), default=None)
        past = max((p["past_len_0"][2] for p in decode if "past_len_0" in p), default=None)
        if seq_in is not None and past is not None:
            # past_len_0's maximum is the longest prompt (seq_in) plus the room for new tokens
            # (export/profiles.py), so the difference is what the decode engine was built for.
            new_tokens = past - seq_in
        spec = ModelSpec.from_json(manifest["model"])
        return cls(image_token_id=spec.image_token_id, num_visual=spec.num_visual, vocab_size=spec.vocab_size,
                   max_positions=spec.max_position_embeddings, max_prefix_tokens=prefix, max_text_tokens=text,
                   max_new_tokens=new_tokens, pixel_range=pixel_range(processor), anyres=spec.anyres,
                   flat_patches=spec.mrope)

    # ----------------------------------------------------------------------------------
    @property
    def max_prompt_chars(self) -> int | None:
        """The cheap character bound checked before tokenizing (MAX_CHARS_PER_TOKEN per token)."""
        tokens = self.max_text_tokens
        if tokens is None and self.max_positions is not None:
            tokens = self.max_positions - self.num_visual
        return None if tokens is None else max(tokens, 1) * MAX_CHARS_PER_TOKEN

    def check_new_tokens(self, max_new_tokens) -> int:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise InputError(f"max_new_tokens: expected an integer, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        limit = self.max_new_tokens
        if max_new_tokens < 1 or (limit is not None and max_new_tokens > limit):
            bound = f"1..{limit} (the artifact's decode profile)" if limit is not None else ">= 1"
            raise InputError(f"max_new_tokens: expected {bound}, got {max_new_tokens}")
        return max_new_tokens

    def check_lengths(self, input_ids: list[list[int]], max_new_tokens: int) -> None:
        """Tokens before / after the image within the profiles; prompt + new tokens within the
        model's positions. `input_ids` rows hold one image placeholder or its expanded run."""
        for row, ids in enumerate(input_ids):
            image = [i for i, t in enumerate(ids) if t == self.image_token_id]
            if not image:
                continue  # the generation loop names a missing image token
            prefix, text = image[0], len(ids) - image[-1] - 1
            visual = len(image) if len(image) > 1 else self.num_visual  # an expanded run tells its count
            if self.max_prefix_tokens is not None and prefix > self.max_prefix_tokens:
                raise InputError(f"prompt {row}: {prefix} tokens before the image; the artifact's profiles allow at "
                                 f"most {self.max_prefix_tokens} (prefix_len)")
            if self.max_text_tokens is not None and text > self.max_text_tokens:
                raise InputError(f"prompt {row}: {text} tokens after the image (the question and the chat "
                                 f"template's tail); the artifact's profiles allow at most {self.max_text_tokens} "
                                 "(text_len): shorten the prompt")
            total = prefix + visual + text + max_new_tokens
            if self.max_positions is not None and total > self.max_positions:
                raise InputError(f"prompt {row}: {prefix + text} text tokens + {visual} visual tokens + "
                                 f"{max_new_tokens} new tokens = {total} positions; the model has "
                                 f"{self.max_positions} (shorten the prompt or lower max_new_tokens)")

    def check_ids(self, input_ids, attention_mask=None, pad_id: int | None = None) -> list[list[int]]:
        """Token-id lists from lists or a [B, S] integer tensor / array; InputError naming the
        row for an empty batch, a non-integer, an id outside the vocabulary, or (tensors) pad
        tokens with no attention_mask saying which positions are padding."""
        tensor_like = isinstance(input_ids, (torch.Tensor, np.ndarray))
        if tensor_like:
            array = input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else input_ids
            if array.ndim != 2:
                raise InputError(f"input_ids: expected a [batch, length] tensor or a list of id lists, got shape "
                                 f"{tuple(array.shape)}")
            if not np.issubdtype(array.dtype, np.integer):
                raise InputError(f"input_ids: expected integer token ids, got {array.dtype}")
            rows = [list(map(int, r)) for r in array]
            if attention_mask is not None:
                mask = attention_mask.detach().cpu().numpy() if isinstance(attention_mask, torch.Tensor) \
                    else np.asarray(attention_mask)
                if mask.shape != array.shape:
                    raise InputError(f"attention_mask: expected shape {tuple(array.shape)} (that of input_ids), got "
                                     f"{tuple(mask.shape)}")
                rows = [[t for t, m in zip(r, mrow) if m] for r, mrow in zip(rows, mask.astype(bool))]
            elif pad_id is not None:
                for row, ids in enumerate(rows):
                    if pad_id in ids:
                        raise InputError(f"input_ids: row {row} holds the pad token (id {pad_id}) at position "
                                         f"{ids.index(pad_id)}; pass attention_mask, or a list of unpadded id lists "
                                         "for prompts of different lengths")
        elif attention_mask is not None:
            raise InputError("attention_mask: only meaningful with a [batch, length] input_ids tensor")
        else:
            if not isinstance(input_ids, (list, tuple)):
                raise InputError(f"input_ids: expected a list of token-id lists or a [batch, length] tensor, got "
                                 f"{_describe(input_ids)}")
            rows = []
            for row, ids in enumerate(input_ids):
                if isinstance(ids, (torch.Tensor, np.ndarray)):
                    ids = ids.tolist()
                if not isinstance(ids, (list, tuple)) or not all(
                        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
                    raise InputError(f"input_ids: row {row} is not a list of integer token ids")
                rows.append([int(t) for t in ids])
        if not rows:
            raise InputError("input_ids: expected at least one prompt (batch of 0)")
        for row, ids in enumerate(rows):
            if not ids:
                raise InputError(f"input_ids: row {row} is empty")
            bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
            if bad:
                upper = f"< {self.vocab_size}" if self.vocab_size is not None else ""
                raise InputError(f"input_ids: row {row} has token id {bad[0]} at position {ids.index(bad[0])}; "
                                 f"expected 0 <= id {upper}".rstrip())
        return rows

    def check_pixel_values(self, pixel_values, batch: int, image_size: int) -> None:
        """A float tensor [batch, 3, size, size] (anyres: [batch, tiles, 3, size, size]) of
        finite, processor-normalised values."""
        expected = (batch, 3, image_size, image_size)
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(f"pixel_values: expected a torch tensor of shape {expected} (from prepare()), got "
                             f"{_describe(pixel_values)}")
        if self.flat_patches:  # the patch count follows from the grids (qwen2_5_vl.vision_inputs)
            if pixel_values.dim() != 2 or pixel_values.shape[1] % 3:
                raise InputError("pixel_values: expected every image's flattened patches [patches, 3 * frames * "
                                 f"patch * patch] (from prepare()), got {tuple(pixel_values.shape)}")
            pixel_values = pixel_values.reshape(pixel_values.shape[0], 3, -1)  # channel-major patches
        elif self.anyres:  # each row's tile count follows from its image size (anyres.check_tiles)
            if pixel_values.dim() != 5 or pixel_values.shape[0] != batch \
                    or tuple(pixel_values.shape[2:]) != (3, image_size, image_size):
                raise InputError(f"pixel_values: expected shape ({batch}, tiles, 3, {image_size}, {image_size}) "
                                 f"(each image's CLIP tiles, from prepare()), got {tuple(pixel_values.shape)}")
        elif tuple(pixel_values.shape) != expected:
            raise InputError(f"pixel_values: expected shape {expected} (one image per prompt), got "
                             f"{tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise InputError(f"pixel_values: expected processor-normalised floats (prepare() makes them), got "
                             f"{pixel_values.dtype}")
        values = pixel_values.detach().float()
        finite = torch.isfinite(values).flatten(1).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise InputError(f"pixel_values: row {row} holds NaN or infinite values")
        if self.pixel_range is None:
            return
        for channel, (low, high) in enumerate(self.pixel_range):
            plane = values[:, channel] if values.dim() in (3, 4) else values[:, :, channel]
            outside = ((plane < low - PIXEL_TOLERANCE) | (plane > high + PIXEL_TOLERANCE)).flatten(1).any(dim=1)
            if bool(outside.any()):
                row = int(outside.nonzero()[0])
                raise InputError(f"pixel_values: row {row} channel {channel} has values in "
                                 f"[{float(plane[row].min()):.3g}, {float(plane[row].max()):.3g}], outside the "
                                 f"normalised range [{low:.3f}, {high:.3f}]; pass the processor's output "
                                 "(prepare()), not raw 0..255 pixels")


def pixel_range(processor=None) -> tuple[tuple[float, float], ...]:
    """Per channel (low, high) of normalised pixel values: pixels 0..255 after the processor's
    rescale and normalisation (CLIP's constants when there is no processor)."""
    image_processor = getattr(processor, "image_processor", processor)
    mean = getattr(image_processor, "image_mean", None) or CLIP_MEAN
    std = getattr(image_processor, "image_std", None) or CLIP_STD
    if not getattr(image_processor, "do_normalize", True):
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    top = 255.0 * float(getattr(image_processor, "rescale_factor", 1 / 255)) \
        if getattr(image_processor, "do_rescale", True) else 255.0
    return tuple(((0.0 - m) / s, (top - m) / s) for m, s in zip(mean, std))


# ======================================================================================
# Images + prompts -> model inputs
# ======================================================================================

def prepare_inputs(processor, images, prompts: list[str], chat_template: bool = True,
                   bounds: InputBounds | None = None, max_new_tokens: int | None = None) -> dict:
    """{"input_ids": list of id lists, "pixel_values": [B, 3, H, W]} for one image per prompt
    (LLaVA-NeXT: pixel_values [B, tiles, 3, H, W] and "image_sizes" [B, 2], the processor's).

    With `chat_template`, each prompt is the user's question and the image goes first, as
    LLaVA-1.5's template puts it; without it, prompts must contain the image placeholder.
    Every image and prompt is checked (load_image, check_prompt) before anything is
    tokenized; with `bounds`, token counts are checked against them (and, with
    `max_new_tokens`, prompt + new tokens against the model's positions)."""
    images, prompts = _as_list(images, "images"), _as_list(prompts, "prompts")
    if not images or not prompts:
        raise InputError(f"images/prompts: expected at least one image and prompt, got {len(images)} images and "
                         f"{len(prompts)} prompts")
    if len(images) != len(prompts):
        raise InputError(f"images/prompts: expected one image per prompt, got {len(images)} images and "
                         f"{len(prompts)} prompts")
    placeholder = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    max_chars = bounds.max_prompt_chars if bounds is not None else None
    prompts = [check_prompt(p, row, chat_template=chat_template, max_chars=max_chars, placeholder=placeholder)
               for row, p in enumerate(prompts)]
    images = [load_image(image, f"image {row}") for row, image in enumerate(images)]
    if chat_template:
        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True) for p in prompts]
    encoded = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    ids = [row[mask.bool()].tolist() for row, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    if bounds is not None:
        bounds.check_lengths(ids, 1 if max_new_tokens is None else max_new_tokens)
    out = {"input_ids": ids, "pixel_values": encoded["pixel_values"]}
    if "image_sizes" in encoded:  # LLaVA-NeXT: each image's (height, width), for its tile layout
        out["image_sizes"] = encoded["image_sizes"]
    if "image_grid_thw" in encoded:  # Qwen2.5-VL: each image's patch grid
        out["image_grid_thw"] = encoded["image_grid_thw"]
    return out


def image_layout(inputs: dict):
    """What the generation loop needs besides the pixels to lay images out, from
    `prepare_inputs`' output: LLaVA-NeXT's `image_sizes`, Qwen2.5-VL's `image_grid_thw`, else None."""
    return inputs.get("image_sizes", inputs.get("image_grid_thw"))


def _as_list(values, name: str) -> list:
    if isinstance(values, (str, bytes)) or values is None or not hasattr(values, "__len__") \
            or isinstance(values, np.ndarray):
        raise InputError(f"{name}: expected a list (one entry per row), got {_describe(values)}")
    return list(values)
