"""Default optimization-profile ranges per graph, written into the manifest.

Every dynamic dimension of every graph has a name (`batch`, `prefix_len`, `text_len`,
`visual_in`, `visual_width`, `seq_in`, `past_len_<s>`, ...). A profile maps each name to
[min, opt, max]. Segments that start by pruning get one profile per bucket of their
`visual_width` (from calibration, or defaults derived from the method); their inputs
(`visual_in`, `seq_in`) span what the previous segment outputs, and each decode cache
(`past_len_<s>`, the capacity of the buffer the runtime preallocates) what segment s's
layers hold plus room for up to MAX_NEW_TOKENS generated tokens. The prompt regions share
the ranges below.
"""

from __future__ import annotations

from sparsevlm.methods.config import PrunePlan

SHARED_RANGES = {"batch": [1, 1, 8], "prefix_len": [0, 8, 128], "text_len": [1, 32, 512]}
MAX_NEW_TOKENS = 1024
DEFAULT_RANK_BUCKETS = 4


def static_widths(plan: PrunePlan) -> list[int] | None:
    """Visual width after each pruning layer when it does not depend on the input (the
    plan's width rule applied to its fixed keep counts). Anyres rows keep counts scaled to
    their images, so their widths always depend on the input."""
    if plan.anyres:
        return None
    if plan.method == "fastv" or (plan.method == "sparsevlm" and plan.variant == "v1.5"):
        widths, v = [], plan.num_visual
        for position in range(len(plan.prune_layers)):
            v = plan.region_width(v, plan.keep_count(position, v, None))
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
    """{graph name: [profile, ...]} for the vision, segment and decode graphs.

    `region[s]` is the visual width segment s's layers run at: the vision width for s = 0,
    for s >= 1 the span of its buckets (the runtime runs a width inside one of them, padded
    up to a bucket's min at most). So segment s >= 1 receives `visual_in` and `seq_in` at
    segment s-1's region width, and its layers cache prefix + region[s] + text tokens; the
    decode buffers add room for the new tokens (n - 1 columns for n tokens, at most
    MAX_NEW_TOKENS): that bounds `past_len_<s>`, the capacity every decode step is run at.

    Anyres (LLaVA-NeXT): a batch's visual region is as wide as its widest image, so
    `visual_len` spans the counts the grid pinpoints allow (plan.min_visual..num_visual; from
    1 after FasterVLM's data-dependent compaction), and the vision graph takes up to
    `max_tiles` CLIP tiles per row (`tiles`).
    """
    prefix, text = SHARED_RANGES["prefix_len"], SHARED_RANGES["text_len"]
    batch = SHARED_RANGES["batch"]
    shared = {"batch": batch, "prefix_len": prefix, "text_len": text}
    region = [[vision_width] * 3] + [_span(b) for b in buckets]  # one per segment
    vision = {"batch": batch}
    if plan.anyres:
        image_len = [plan.min_visual, vision_width, vision_width]
        region[0] = [1, vision_width, vision_width] if plan.method == "fastervlm" else image_len
        vision = {"tiles": [1, plan.max_tiles, batch[2] * plan.max_tiles], "batch": batch, "visual_len": image_len}
    if plan.mrope:  # Qwen2.5-VL: every image's patches, `patches_per_token` per visual token
        unit = plan.extras["patches_per_token"]
        vision = {"patches": [plan.min_visual * unit, vision_width * unit, batch[2] * vision_width * unit],
                  "batch": batch, "visual_len": image_len}

    def sequence(visual: list[int]) -> list[int]:
        return [prefix[i] + visual[i] + text[i] for i in range(3)]

    profiles = {"vision": [vision]}
    profiles["segment_0"] = [{**shared, "visual_len": region[0], "seq_in": sequence(region[0])}]
    for index in range(1, num_segments):
        visual_in = region[index - 1]  # the previous segment's output
        profiles[f"segment_{index}"] = [{**shared, "visual_in": visual_in, "seq_in": sequence(visual_in),
                                         "visual_width": bucket} for bucket in buckets[index - 1]]
    decode = {"batch": SHARED_RANGES["batch"]}
    for index in range(num_segments):
        _, opt, high = sequence(region[index])
        decode[f"past_len_{index}"] = [1, opt, high + MAX_NEW_TOKENS]
    profiles["decode"] = [decode]
    return profiles
