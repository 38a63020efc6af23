"""Qwen2.5-VL building blocks the methods run on, written over transformers' own modules
(as `modeling.py` is for LLaVA).

Vision tower. Qwen2.5-VL takes each image at its own resolution (a grid of 14x14 patches,
`image_grid_thw`), attends inside windows in most blocks and over the whole image in the
`fullatt_block_indexes` blocks, and merges 2x2 patches into one LLM token. The parts that
depend on the grid (the window permutation, which patches share a window or an image, the
rotary (h, w) of each patch, the permutation back to raster order) are prepared on the
host by `vision_layout` as plain index tensors; `encode_images` takes them with the
flattened patches, so one traced graph serves every grid. Attention inside windows and
images is a dense boolean mask built in the graph from per-patch window / image ids
(equality), where transformers splits at `cu_seqlens`: the same softmax, since masked keys
get exactly zero weight.

Language model. The decoder layer is Llama's with q/k/v biases and a multimodal rotary
embedding: position ids are [3, B, S] (temporal, height, width) and the rotary table
takes its frequency bands from the three axes by `mrope_section`. Because the rotary module
folds the three axes into one [B, S, head_dim] cos/sin table, `modeling.rotary` (given
[3, B, S] ids, or [B, S] for text-only steps: all three axes equal) and
`modeling.decoder_layer` (the LLaVA layer: explicit mask, scored rows, SDPA) run these
layers unchanged.

Positions (`prompt_positions`, `region_positions`, `pruned_positions`; docs/qwen2_5_vl.md;
the graphs carry them as [B, S, 3]): text tokens count
one by one; the visual tokens of an image starting at position p get (p, p + row, p + col)
on its merged grid; the text after it continues at p + max(rows, cols), and decoding at
each row's max position + 1 (transformers' `get_rope_index` and `mrope_position_deltas`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from .config import ConfigError, SparseVLMConfig
from .modeling import UnsupportedModelError

MODEL_TYPE = "qwen2_5_vl"


def is_qwen2_5_vl(config) -> bool:
    return getattr(config, "model_type", None) == MODEL_TYPE


def check_config(cfg) -> None:
    if not is_qwen2_5_vl(cfg):
        raise UnsupportedModelError(f"model: expected a Qwen2.5-VL checkpoint (model_type {MODEL_TYPE!r}), "
                                    f"got {cfg.model_type!r}")
    if getattr(cfg.text_config, "use_sliding_window", False):
        raise UnsupportedModelError("model: Qwen2.5-VL with use_sliding_window=True is not supported "
                                    "(the published checkpoints attend over the full context)")


def check_method(config: SparseVLMConfig) -> None:
    """Refuse what a method cannot do on Qwen2.5-VL (ConfigError naming why)."""
    if config.method == "fastervlm":
        raise ConfigError("method: fastervlm ranks visual tokens by the vision tower's [CLS] attention, and "
                          "Qwen2.5-VL's vision tower has no [CLS] token; use sparsevlm or fastv")


# --------------------------------------------------------------------------------------
# Vision tower: host-side layout from the grid
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionLayout:
    """Index tensors of one vision call (any number of images, concatenated), from the grids.

    N patches, M = N / merge**2 merged tokens. All int64.
    window_order [N]: patch (processor order) at each position of the window-ordered sequence.
    patch_positions [N, 2]: rotary (h, w) of each patch, processor order.
    window_ids [N], image_ids [N]: window / image of each position of the window-ordered
        sequence (attention stays inside equal ids: windows in window blocks, images in
        full-attention blocks).
    merged_order [M]: merged token (window order) at each raster position (the inverse
        permutation), so the output is in the processor's raster order, image after image.
    tokens_per_image: merged tokens of each image (t * h * w / merge**2).
    llm_grids: (t, h / merge, w / merge) of each image."""

    window_order: torch.Tensor
    patch_positions: torch.Tensor
    window_ids: torch.Tensor
    image_ids: torch.Tensor
    merged_order: torch.Tensor
    tokens_per_image: tuple[int, ...]
    llm_grids: tuple[tuple[int, int, int], ...]

    def tensors(self) -> dict:
        return {"window_order": self.window_order, "patch_positions": self.patch_positions,
                "window_ids": self.window_ids, "image_ids": self.image_ids, "merged_order": self.merged_order}


def vision_layout(grid_thw, vision_config) -> VisionLayout:
    """The `VisionLayout` of images with grids `grid_thw` ([n, 3] (t, h, w) in patches), by
    transformers' rules (`get_vision_window_index`, `get_vision_position_ids`, one attention
    segment per frame)."""
    merge = vision_config.spatial_merge_size
    unit = merge * merge
    window = vision_config.window_size // merge // vision_config.patch_size  # merged tokens per window side
    grids = [tuple(int(v) for v in g) for g in torch.as_tensor(grid_thw).tolist()]
    window_index, window_of_unit, image_of_unit, positions = [], [], [], []
    unit_offset = window_offset = frame_offset = 0
    for t, h, w in grids:
        if h % merge or w % merge:
            raise ValueError(f"image_grid_thw: grid {t}x{h}x{w} is not a multiple of spatial_merge_size {merge}")
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = (-gh) % window, (-gw) % window
        nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, window * window)
        window_id = torch.arange(t * nh * nw).reshape(t, nh * nw, 1).expand_as(padded)
        frame_id = torch.arange(t).reshape(t, 1, 1).expand_as(padded)
        keep = padded >= 0
        window_index.append(padded[keep] + unit_offset)
        window_of_unit.append(window_id[keep] + window_offset)
        image_of_unit.append(frame_id[keep] + frame_offset)
        # Rotary (h, w) per patch in processor order: 2x2 merge blocks are contiguous.
        hpos = torch.arange(h)[:, None].expand(h, w).reshape(gh, merge, gw, merge).transpose(1, 2).flatten()
        wpos = torch.arange(w)[None, :].expand(h, w).reshape(gh, merge, gw, merge).transpose(1, 2).flatten()
        positions.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
        unit_offset += t * gh * gw
        window_offset += t * nh * nw
        frame_offset += t
    window_index = torch.cat(window_index)
    per_patch = lambda units: (units[:, None] * unit + torch.arange(unit)[None, :]).flatten()
    return VisionLayout(
        window_order=per_patch(window_index),
        patch_positions=torch.cat(positions),
        window_ids=torch.cat(window_of_unit).repeat_interleave(unit),
        image_ids=torch.cat(image_of_unit).repeat_interleave(unit),
        merged_order=torch.argsort(window_index),
        tokens_per_image=tuple(t * h * w // unit for t, h, w in grids),
        llm_grids=tuple((t, h // merge, w // merge) for t, h, w in grids))


# --------------------------------------------------------------------------------------
# Vision tower: the traced part
# --------------------------------------------------------------------------------------

def vision_tower(model):
    return model.model.visual


def vision_block(block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor):
    """One Qwen2_5_VLVisionBlock over [N, C] with a dense bool attention mask [N, N]."""
    attn = block.attn
    seq = hidden.shape[0]
    q, k, v = attn.qkv(block.norm1(hidden)).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, N, hd]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=attn.scaling)
    hidden = hidden + attn.proj(out[0].transpose(0, 1).reshape(seq, -1))
    return hidden + block.mlp(block.norm2(hidden))


def merged_features(model, patches: torch.Tensor, window_order: torch.Tensor, patch_positions: torch.Tensor,
                    window_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """The vision tower over every image of the call: merged features [M, D_text] in window
    order (`VisionLayout.merged_order` puts them back in raster order). `patches`
    [N, C*T*P*P] is the image processor's `pixel_values`; the rest a `VisionLayout`'s."""
    tower = vision_tower(model)
    hidden = tower.patch_embed(patches)  # per patch, so it commutes with the window permutation
    hidden = hidden[window_order]
    cos, sin = tower.rotary_pos_emb(hidden, patch_positions[window_order])
    window_mask = window_ids[:, None] == window_ids[None, :]
    image_mask = image_ids[:, None] == image_ids[None, :]
    full = set(tower.fullatt_block_indexes)
    for index, block in enumerate(tower.blocks):
        hidden = vision_block(block, hidden, cos, sin, image_mask if index in full else window_mask)
    return tower.merger(hidden)


def encode_images(model, patches: torch.Tensor, window_order: torch.Tensor, patch_positions: torch.Tensor,
                  window_ids: torch.Tensor, image_ids: torch.Tensor, merged_order: torch.Tensor) -> torch.Tensor:
    """Merged visual features [M, D_text] in raster order, image after image, as
    Qwen2_5_VLModel.get_image_features computes them."""
    return merged_features(model, patches, window_order, patch_positions, window_ids, image_ids)[merged_order]


def encode_rows(model, x: dict) -> torch.Tensor:
    """The vision graph: `features` [B, V, D_text], row b its image's visual tokens in raster
    order and zeros past its count, from the inputs `vision_inputs` prepares."""
    features = merged_features(model, x["patches"], x["window_order"], x["patch_positions"], x["window_ids"],
                               x["image_ids"])
    valid = x["image_valid"]
    return features[x["image_index"]] * valid[:, :, None].to(features.dtype)


VISION_INPUT_NAMES = ("patches", "window_order", "patch_positions", "window_ids", "image_ids", "image_index",
                      "image_valid")


def vision_inputs(pixel_values: torch.Tensor, image_grid_thw, vision_config) -> tuple[dict, VisionLayout]:
    """The vision graph's inputs for one image per batch row (`VISION_INPUT_NAMES`: the
    processor's patches with the layout of their grids, and per row the gather index
    `image_index` [B, V] into the merged features with its validity `image_valid`, V the
    largest visual count of the batch), and the layout (visual counts, merged grids)."""
    from .generation import InputError

    grids = torch.as_tensor(image_grid_thw)
    if grids.dim() != 2 or grids.shape[1] != 3 or grids.shape[0] < 1:
        raise InputError(f"image_grid_thw: expected [images, 3] (t, h, w per image), got {tuple(grids.shape)}")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise InputError(f"pixel_values: expected the processor's flattened patches [patches, features], got {got}")
    merge, patch = vision_config.spatial_merge_size, vision_config.patch_size
    per_patch = vision_config.in_channels * vision_config.temporal_patch_size * patch * patch
    patches = int(grids.prod(dim=1).sum())
    bad = [tuple(g) for g in grids.tolist() if g[0] != 1 or g[1] % merge or g[2] % merge or min(g) < 1]
    if bad:
        raise InputError(f"image_grid_thw: grid {bad[0]} is not an image grid (t = 1, h and w multiples of {merge})")
    if tuple(pixel_values.shape) != (patches, per_patch):
        raise InputError(f"pixel_values: expected shape {(patches, per_patch)} for image_grid_thw "
                         f"{grids.tolist()}, got {tuple(pixel_values.shape)}")
    layout = vision_layout(grids, vision_config)
    counts = layout.tokens_per_image
    width = max(counts)
    image_index = torch.zeros(len(counts), width, dtype=torch.long)
    image_valid = torch.zeros(len(counts), width, dtype=torch.bool)
    start = 0
    for row, count in enumerate(counts):
        image_index[row, :count] = layout.merged_order[start:start + count]
        image_valid[row, :count] = True
        start += count
    inputs = {"patches": pixel_values, "window_order": layout.window_order,
              "patch_positions": layout.patch_positions, "window_ids": layout.window_ids,
              "image_ids": layout.image_ids, "image_index": image_index, "image_valid": image_valid}
    return inputs, layout


# --------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------

def image_positions(start: int, llm_grid: tuple[int, int, int]) -> torch.Tensor:
    """[3, t*h*w] (t, h, w) ids of an image's merged tokens in raster order, from `start`."""
    t, h, w = llm_grid
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def image_extent(llm_grid: tuple[int, int, int]) -> int:
    """Positions an image advances the text after it: max(h, w) of its merged grid (the
    text after an image starting at p continues at p + this)."""
    return max(llm_grid[1], llm_grid[2])


def prompt_positions(input_ids, image_token_id: int, llm_grids) -> tuple[torch.Tensor, int]:
    """mRoPE ids [3, S] of one prompt whose image placeholders are expanded (each image one
    run of its t*h*w tokens), and the position decoding continues from (max + 1)."""
    ids = [int(t) for t in input_ids]
    pieces, cursor, index, grids = [], 0, 0, list(llm_grids)
    while index < len(ids):
        if ids[index] != image_token_id:
            stop = index
            while stop < len(ids) and ids[stop] != image_token_id:
                stop += 1
            pieces.append(torch.arange(cursor, cursor + stop - index)[None].expand(3, -1))
            cursor += stop - index
            index = stop
            continue
        if not grids:
            raise ValueError("input_ids: more image token runs than image grids")
        grid = grids.pop(0)
        count = grid[0] * grid[1] * grid[2]
        if ids[index:index + count] != [image_token_id] * count:
            raise ValueError(f"input_ids: an image run is not {count} tokens long (its grid {grid})")
        pieces.append(image_positions(cursor, grid))
        cursor += image_extent(grid)
        index += count
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1


def region_positions(prefix_valid: torch.Tensor, llm_grids, visual_width: int,
                     text_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mRoPE ids [B, P + V + T, 3] (the graphs' layout: batch first; `as_rotary` gives the
    rotary module's [3, B, S]) of a region batch `[prefix (left-padded) | visual (V slots,
    row b's image in its first t*h*w) | text (right-padded)]`, and each row's next position
    [B]. Padding slots get 0 (they are masked). Row b's ids equal `prompt_positions` of its
    unpadded prompt."""
    batch, prefix_width = prefix_valid.shape
    text_width = text_valid.shape[1]
    positions = torch.zeros(batch, prefix_width + visual_width + text_width, 3, dtype=torch.long)
    next_position = torch.zeros(batch, dtype=torch.long)
    for row, grid in enumerate(llm_grids):
        prefix = int(prefix_valid[row].sum())
        text = int(text_valid[row].sum())
        count = grid[0] * grid[1] * grid[2]
        if count > visual_width:
            raise ValueError(f"row {row}: {count} visual tokens do not fit a visual region of {visual_width}")
        positions[row, prefix_width - prefix:prefix_width] = torch.arange(prefix)[:, None]
        positions[row, prefix_width:prefix_width + count] = image_positions(prefix, grid).T
        start = prefix + image_extent(grid)
        text_start = prefix_width + visual_width
        positions[row, text_start:text_start + text] = torch.arange(start, start + text)[:, None]
        next_position[row] = start + text
    return positions, next_position


def as_rotary(positions: torch.Tensor) -> torch.Tensor:
    """[B, S, 3] ids -> the rotary module's [3, B, S]."""
    return positions.permute(2, 0, 1)


def pruned_positions(visual_positions: torch.Tensor, source_index: torch.Tensor,
                     merged_centre: torch.Tensor | None) -> torch.Tensor:
    """The toolkit's position rule after a pruning layer, for the visual region.

    visual_positions [B, V, 3]: ids of the region entering the layer; source_index [B, W]:
    TokenPrune's slot of each new position (0..V-1 kept, V..V+C-1 merged token c = s - V,
    -1 padding); merged_centre [B, C]: the region slot (0..V-1) of each merged token's cluster
    centre (`token_ops.recycle_centre_slots`; None: no merged tokens, e.g. FastV). A kept token
    keeps its ids, a merged token takes its centre's, padding gets 0. Returns [B, W, 3]."""
    num_visual = visual_positions.shape[1]
    if merged_centre is not None:
        merged = (source_index - num_visual).clamp(0, merged_centre.shape[1] - 1)
        slot = torch.where(source_index >= num_visual, torch.gather(merged_centre, 1, merged), source_index)
    else:
        slot = source_index
    gathered = torch.gather(visual_positions, 1, slot.clamp_min(0)[:, :, None].expand(-1, -1, 3))
    return gathered * (source_index >= 0)[:, :, None].to(gathered.dtype)


# --------------------------------------------------------------------------------------
# Visual counts
# --------------------------------------------------------------------------------------

# The public checkpoints' preprocessor_config.json (min_pixels, max_pixels), used when a
# model has no processor at hand (e.g. --random-weights from an alias).
PUBLIC_MIN_PIXELS = 3136
PUBLIC_MAX_PIXELS = 12845056


def visual_count_range(min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2) -> tuple[int, int]:
    """(fewest, most) visual tokens an image can give: the image processor's smart resize
    keeps the area within [min_pixels, max_pixels] in whole (patch * merge)-pixel tokens."""
    token_area = (patch_size * merge_size) ** 2
    return max(-(-min_pixels // token_area), 1), max(max_pixels // token_area, 1)


def processor_pixel_range(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen image processor (or a processor holding one)."""
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    low = get("shortest_edge") or getattr(image_processor, "min_pixels", None) or PUBLIC_MIN_PIXELS
    high = get("longest_edge") or getattr(image_processor, "max_pixels", None) or PUBLIC_MAX_PIXELS
    return int(low), int(high)


def example_images(vision_config, grids=((1, 8, 12), (1, 6, 8)), dtype=torch.float32, seed: int = 0):
    """(pixel_values, image_grid_thw) of random images with these patch grids, shaped as the
    image processor gives them (the exporter's tracing example: small, of different sizes)."""
    per_patch = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    patches = sum(t * h * w for t, h, w in grids)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(patches, per_patch, generator=generator).to(dtype), torch.tensor(grids, dtype=torch.long)


def layout_config(spec):
    """The vision-config fields `vision_layout` / `vision_inputs` read, from a ModelSpec (an
    exported artifact has no checkpoint config)."""
    from types import SimpleNamespace
    return SimpleNamespace(spatial_merge_size=spec.spatial_merge_size, window_size=spec.window_size,
                           patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size, in_channels=3)


def llm_grids(image_grid_thw, spatial_merge_size: int) -> list[tuple[int, int, int]]:
    """(t, h, w) of each image's merged token grid."""
    return [(int(t), int(h) // spatial_merge_size, int(w) // spatial_merge_size)
            for t, h, w in torch.as_tensor(image_grid_thw).tolist()]
