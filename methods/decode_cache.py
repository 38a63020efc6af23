"""Decode caches allocated once at their capacity and written in place, one per segment.

After the prefill each segment's layers hold their own KV cache, as wide as the sequence the
segment ran (a pruned segment caches fewer visual tokens), with its own validity mask and
next position per row. Generating n tokens feeds n - 1 of them through the decode graph (the
first comes from the prefill logits, the last is never fed back), so each segment's cache
gets a buffer of capacity C = prefill width + n - 1 before the first decode step. The decode
graph reads the whole buffer with the validity mask (columns not written yet are masked out)
and returns only the new token's key and value; `append` writes them into the next column
(an O(one token) copy per layer) and sets that column valid. Nothing is concatenated or
reallocated per token, and every decode step sees the same shapes, so a backend can bind
the buffers once by address (ONNX Runtime I/O binding, TensorRT tensor addresses).

All rows write the same column at each step (a finished row keeps decoding pad tokens, as
the loop always did), so one column counter serves the batch; positions continue per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# (shape, dtype, device) -> an uninitialised tensor. Executors may provide their own as
# `cache_buffer` (TensorRT: aligned device memory); torch.empty otherwise.
Allocator = Callable[[tuple, torch.dtype, torch.device], torch.Tensor]


def torch_buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class DecodeCache:
    """Segment `segment`'s cache during decoding: buffers of `capacity` columns, `length` of them written."""

    segment: int
    key_valid: torch.Tensor  # [B, C] bool: which columns hold a key
    next_position: torch.Tensor  # [B]: the position of the next token of each row
    keys: dict  # layer -> [B, H_kv, C, hd]
    values: dict  # layer -> [B, H_kv, C, hd]
    length: int  # columns written so far (prefill width + tokens appended)

    @property
    def capacity(self) -> int:
        return self.key_valid.shape[1]

    @classmethod
    def from_prefill(cls, segment: int, key_valid: torch.Tensor, next_position: torch.Tensor, kv: dict,
                     extra: int, allocate: Allocator = torch_buffer) -> "DecodeCache":
        """Copy a prefill cache (`kv`: layer -> (key, value) [B, H_kv, W, hd]) into buffers with
        room for `extra` more columns (zeroed: a masked column must not hold NaN or inf,
        which a zero attention weight would still turn into NaN)."""
        width = key_valid.shape[1]
        capacity = width + extra
        valid = allocate((key_valid.shape[0], capacity), torch.bool, key_valid.device)
        valid.zero_()
        valid[:, :width] = key_valid
        keys, values = {}, {}
        for layer, (key, value) in kv.items():
            for source, target in ((key, keys), (value, values)):
                shape = (*source.shape[:2], capacity, source.shape[3])
                buffer = allocate(shape, source.dtype, source.device)
                buffer[:, :, :width] = source
                buffer[:, :, width:] = 0
                target[layer] = buffer
        return cls(segment, valid, next_position, keys, values, width)

    def graph_inputs(self) -> dict:
        """This segment's inputs of the decode graph (`segments.decode_input_names`)."""
        inputs = {f"key_valid.{self.segment}": self.key_valid, f"position.{self.segment}": self.next_position}
        for layer in self.keys:
            inputs[f"past.{layer}.key"], inputs[f"past.{layer}.value"] = self.keys[layer], self.values[layer]
        return inputs

    def append(self, out: dict) -> None:
        """Write the decode step's new entries (`present.<l>.key/value` [B, H_kv, 1, hd]) into
        the next column and mark it valid."""
        column = self.length
        if column >= self.capacity:
            raise RuntimeError(f"decode cache of segment {self.segment}: all {self.capacity} columns are written")
        for layer in self.keys:
            self.keys[layer][:, :, column] = out[f"present.{layer}.key"][:, :, 0]
            self.values[layer][:, :, column] = out[f"present.{layer}.value"][:, :, 0]
        self.key_valid[:, column] = True
        self.next_position = self.next_position + 1
        self.length = column + 1
