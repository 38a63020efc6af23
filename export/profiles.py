"""Default optimization-profile ranges per graph, written into the manifest.

Every dynamic dimension of every graph has a name (`batch`, `prefix_len`, `text_len`,
`visual_in`, `visual_width`, `seq_in`, `past_len_<s>`, ...). A profile maps each name to
[min, opt, max]. Segments that start by pruning get one profile per bucket of their
`visual_width` (from calibration, or defaults derived from the method); the other
dimensions share the ranges below.
"""

from __future__ import annotations

from sparsevlm.methods import token_ops
from sparsevlm.methods.config import PrunePlan

SHARED_RANGES = {"batch": [1, 1, 8], "prefix_len": [0, 8, 128], "text_len": [1, 32, 512]}
MAX_NEW_TOKENS = 1024
DEFAULT_RANK_BUCKETS = 4


def static_widths(plan: PrunePlan) -> list[int] | None:
    """Visual width after each pruning layer when it does not depend on the input."""
    if plan.method == "fastv":
        return [plan.fastv_keep]
    if plan.method == "sparsevlm" and plan.variant == "v1.5":
        widths, v = [], plan.num_visual
        for position in range(len(plan.prune_layers)):
            k = plan.keep_count(position, v, None)
            v = k + (token_ops.recycled_count(v - k) if plan.recycles else 0)
            widths.append(v)
        return widths
    return None


def default_buckets(plan: PrunePlan) -> list[list[list[int]]]:
    """Per pruning segment (1..n): buckets [min, opt, max] of its visual width."""
    widths = static_widths(plan)
    if widths is not None:
        return [[[w, w, w]] for w in widths]
    top, size = plan.num_visual, -(-plan.num_visual // DEFAULT_RANK_BUCKETS)
    buckets = [[lo, (lo + min(lo + size - 1, top)) // 2, min(lo + size - 1, top)] for lo in range(1, top + 1, size)]
    return [buckets for _ in plan.prune_layers]


def _span(buckets: list[list[int]]) -> list[int]:
    return [min(b[0] for b in buckets), buckets[0][1], max(b[2] for b in buckets)]


def graph_profiles(plan: PrunePlan, num_segments: int, vision_width: int, buckets: list[list[list[int]]]) -> dict:
    """{graph name: [profile, ...]} for the vision, segment and decode graphs."""
    prefix, text = SHARED_RANGES["prefix_len"], SHARED_RANGES["text_len"]
    shared = {"batch": SHARED_RANGES["batch"], "prefix_len": prefix, "text_len": text}
    profiles = {"vision": [{"batch": SHARED_RANGES["batch"]}]}
    widths_in = [[vision_width] * 3]  # visual width entering each segment
    for index in range(num_segments):
        visual_in = widths_in[index]
        seq_in = [prefix[i] + visual_in[i] + text[i] for i in range(3)]
        if index == 0:
            profiles["segment_0"] = [{**shared, "visual_len": visual_in, "seq_in": seq_in}]
        else:
            profiles[f"segment_{index}"] = [{**shared, "visual_in": visual_in, "seq_in": seq_in, "visual_width": b}
                                            for b in buckets[index - 1]]
        if index < len(buckets):
            widths_in.append(_span(buckets[index]))
    decode = {"batch": SHARED_RANGES["batch"]}
    for index in range(num_segments):
        width = widths_in[index + 1] if index + 1 < len(widths_in) else widths_in[index]
        visual = widths_in[index] if index == 0 else width
        decode[f"past_len_{index}"] = [1, prefix[1] + visual[1] + text[1],
                                       prefix[2] + max(visual[2], width[2]) + text[2] + MAX_NEW_TOKENS]
    profiles["decode"] = [decode]
    return profiles
