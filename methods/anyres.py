"""LLaVA-NeXT's "anyres" image layout, computed on the host from each image's size.

A LLaVA-NeXT image is cut into CLIP tiles: the base image (the whole picture at the tile
size) and a grid of tiles covering the image resized to the best of the checkpoint's grid
pinpoints (`select_best_resolution`, transformers' rule). The language model sees, per image,

    [ base tile's P patches | unpadded grid, row by row, each row followed by image_newline ]

where "unpadded" drops the patch rows (or columns) that only cover the letterbox padding the
processor added to reach the pinpoint's aspect ratio (transformers' `unpad_image`). So the
visual count N depends on the image's size and aspect ratio.

The vision graph takes every tile of the batch (flattened over the rows) and, from this
module, a gather index per row into [all tiles' patch features ..., image_newline] plus its
validity: the graph runs CLIP and the projector and gathers, so unpadding and the newline
insertion happen inside the graph with indices prepared here. One function
(`vision_inputs`) serves the PyTorch executor, the exporter's example and the runtime.

A row's visual tokens are numbered 0..N-1 in this packed order (the trace's token ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation import InputError


def select_best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) transformers' processor resizes an image of
    `image_size` (height, width) to: the most effective pixels, then the least waste."""
    from transformers.image_processing_utils import select_best_resolution as best
    return tuple(best(tuple(image_size), [list(p) for p in pinpoints]))


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's visual tokens come from (all sizes in patches)."""

    grid: tuple[int, int]  # tiles per column and per row of the grid (base tile not included)
    side: int  # patches per tile side (tile size // patch size)
    rows: tuple[int, int]  # unpadded patch rows [start, stop) of the grid's feature map
    cols: tuple[int, int]  # unpadded patch columns [start, stop)

    @property
    def tiles(self) -> int:
        """CLIP tiles of the image: the base image and the grid."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def count(self) -> int:
        """Visual tokens: the base tile's patches, the unpadded grid and one newline per row."""
        height, width = self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]
        return self.side * self.side + height * (width + 1)

    def token_sources(self, first_tile: int, newline: int) -> list[int]:
        """Per visual token in packed order, its row in [patch features of all tiles (tile t's
        patch q at t * side**2 + q) ..., image_newline at `newline`]; this image's tiles start
        at tile `first_tile` (the base tile, then the grid tiles in row-major order)."""
        per_tile = self.side * self.side
        sources = [first_tile * per_tile + q for q in range(per_tile)]
        grid_width = self.grid[1]
        for y in range(*self.rows):
            for x in range(*self.cols):
                tile = first_tile + 1 + (y // self.side) * grid_width + x // self.side
                sources.append(tile * per_tile + (y % self.side) * self.side + x % self.side)
            sources.append(newline)
        return sources


def image_layout(image_size: tuple[int, int], pinpoints, tile_size: int, patch_size: int) -> ImageLayout:
    """The layout of an image of `image_size` (height, width) in pixels: transformers'
    `get_anyres_image_grid_shape` and `unpad_image`, on sizes instead of tensors."""
    height, width = (int(v) for v in image_size)
    best_height, best_width = select_best_resolution((height, width), pinpoints)
    grid = (best_height // tile_size, best_width // tile_size)
    side = tile_size // patch_size
    current_height, current_width = grid[0] * side, grid[1] * side
    rows, cols = (0, current_height), (0, current_width)
    if width / height > current_width / current_height:
        new_height = int(round(height * (current_width / width), 7))
        padding = (current_height - new_height) // 2
        rows = (padding, current_height - padding)
    else:
        new_width = int(round(width * (current_height / height), 7))
        padding = (current_width - new_width) // 2
        cols = (padding, current_width - padding)
    return ImageLayout(grid, side, rows, cols)


def layout_for(spec, image_size) -> ImageLayout:
    """`image_layout` with the model's pinpoints, tile and patch size (a ModelSpec)."""
    return image_layout(image_size, spec.image_grid_pinpoints, spec.image_size, spec.patch_size)


def visual_count_range(pinpoints, tile_size: int, patch_size: int) -> tuple[int, int]:
    """(lower bound, maximum) of an image's visual count over the pinpoints. The maximum is a
    pinpoint's whole grid (nothing unpadded); the lower bound is the base tile plus one
    unpadded patch and its newline (a very wide or tall image unpads to few rows)."""
    side = tile_size // patch_size
    largest = max((h // tile_size * side) * (w // tile_size * side + 1) for h, w in pinpoints)
    return side * side + 2, side * side + largest


def max_tiles(pinpoints, tile_size: int) -> int:
    """The most CLIP tiles one image can take (the base image and the largest grid)."""
    return 1 + max((h // tile_size) * (w // tile_size) for h, w in pinpoints)


def check_image_sizes(image_sizes, batch: int) -> list[tuple[int, int]]:
    """`image_sizes` as (height, width) pairs, one per row; InputError otherwise."""
    if image_sizes is None:
        raise InputError("image_sizes: a LLaVA-NeXT model needs each image's (height, width) (the processor's "
                         "`image_sizes`, from prepare())")
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
    if len(sizes) != batch or not all(len(s) == 2 and all(int(v) >= 1 for v in s) for s in sizes):
        raise InputError(f"image_sizes: expected {batch} (height, width) pairs of positive integers, one per "
                         f"prompt, got {sizes!r}")
    return [(int(h), int(w)) for h, w in sizes]


def check_tiles(pixel_values, layouts: list[ImageLayout], tile_size: int) -> None:
    """pixel_values [B, max tiles, 3, tile, tile] (the processor's padded stack), holding
    at least each row's tiles."""
    batch, need = len(layouts), max(layout.tiles for layout in layouts)
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5 \
            or tuple(pixel_values.shape[2:]) != (3, tile_size, tile_size) or pixel_values.shape[0] != batch \
            or pixel_values.shape[1] < need:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise InputError(f"pixel_values: expected shape ({batch}, >= {need}, 3, {tile_size}, {tile_size}) (each "
                         f"image's CLIP tiles, from prepare()), got {got}")


def vision_inputs(spec, pixel_values: torch.Tensor, image_sizes) -> tuple[dict, list[int]]:
    """The vision graph's inputs for a batch and each row's visual count N.

    pixel_values: [B, T_max, 3, S, S] tiles per row as the processor pads them; image_sizes:
    (height, width) per row. Returns ({"tiles": [sum of the rows' tiles, 3, S, S],
    "image_index": int64 [B, max N] (rows of [tile features ..., newline]; padding points at
    the newline), "image_valid": bool [B, max N]}, [N per row])."""
    sizes = check_image_sizes(image_sizes, pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else -1)
    layouts = [layout_for(spec, size) for size in sizes]
    check_tiles(pixel_values, layouts, spec.image_size)
    total_tiles = sum(layout.tiles for layout in layouts)
    newline = total_tiles * spec.tile_tokens
    sources, first = [], 0
    for layout in layouts:
        sources.append(layout.token_sources(first, newline))
        first += layout.tiles
    counts = [len(s) for s in sources]
    width = max(counts)
    index = torch.full((len(sources), width), newline, dtype=torch.long)
    valid = torch.zeros((len(sources), width), dtype=torch.bool)
    for row, row_sources in enumerate(sources):
        index[row, :len(row_sources)] = torch.tensor(row_sources)
        valid[row, :len(row_sources)] = True
    tiles = torch.cat([pixel_values[row, :layout.tiles] for row, layout in enumerate(layouts)])
    return {"tiles": tiles, "image_index": index, "image_valid": valid}, counts


def stack_pixel_values(values: list[torch.Tensor]) -> torch.Tensor:
    """One [B, T_max, 3, S, S] stack from several requests' stacks (zero tiles pad rows with
    fewer tiles; the layout never reads them)."""
    most = max(v.shape[1] for v in values)
    return torch.cat([torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, most - v.shape[1])) for v in values])
