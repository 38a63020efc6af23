"""The generation loop every backend shares: prompts -> region batch -> vision -> prefill
segments (choosing keep counts between them) -> decode, recording the trace.

A backend is an *executor* with three calls, each taking and returning dicts of torch
tensors by name (see `segments.py`): `vision(pixel_values)`, `segment(index, inputs)` and
`decode(inputs)`, and optionally `cache_buffer(shape, dtype, device)`, which allocates the
decode caches (`decode_cache.py`). `TorchExecutor` runs the PyTorch modules; the runtime
package provides ONNX Runtime and TensorRT executors. The decisions between segments (rank, keep counts,
the width of the next visual region) are made here, once, for every backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch

from . import token_ops
from .config import PrunePlan
from .decode_cache import DecodeCache, torch_buffer
from .profiles import ProfileChoice
from .segments import DecodeStep, PrefillSegment, SegmentSpec, VisionEncoder, plan_segments
from .spec import ModelSpec

TRACE_SCHEMA = "sparsevlm-trace/1"


class InputError(ValueError):
    """A prompt or image does not fit the model; the message names the input."""


@dataclass
class RegionBatch:
    """Prompts split around their image into the fixed-width regions of `segments.py`."""

    prefix_ids: torch.Tensor  # [B, P] left-padded
    prefix_valid: torch.Tensor
    text_ids: torch.Tensor  # [B, T] right-padded
    text_valid: torch.Tensor
    prompt_lengths: list[int]  # tokens per row with the image expanded to its visual tokens
    visual_counts: list[int] = field(default_factory=list)  # visual tokens per row (its image's)
    positions: torch.Tensor | None = None  # mRoPE models: [B, P + V + T, 3] ids (qwen2_5_vl.region_positions)


def _image_span(ids: list[int], image_token_id: int, num_visual: int, row: int) -> tuple[int, int]:
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if not positions:
        raise InputError(f"prompt {row}: no image token (id {image_token_id}); put the image "
                         "placeholder (e.g. '<image>') in the prompt")
    start, count = positions[0], len(positions)
    contiguous = positions[-1] - start + 1 == count
    if not contiguous or count not in (1, num_visual):
        images = "one placeholder" if contiguous else f"{count} placeholders in several places"
        raise InputError(f"prompt {row}: more image tokens than images ({images}; expected one image "
                         f"per prompt: a single placeholder or {num_visual} consecutive image tokens)")
    return start, start + count


def make_region_batch(input_ids: list[list[int]], image_token_id: int, num_visual: int | list[int],
                      pad_id: int = 0) -> RegionBatch:
    """Split each prompt at its image (one placeholder, or the processor's expanded run of
    `num_visual` image tokens: one count for every row, or one per row for anyres images)
    into a left-padded prefix and a right-padded text."""
    if not input_ids:
        raise InputError("input_ids: expected at least one prompt")
    counts = list(num_visual) if isinstance(num_visual, (list, tuple)) else [num_visual] * len(input_ids)
    prefixes, texts, lengths = [], [], []
    for row, ids in enumerate(input_ids):
        ids = [int(t) for t in ids]
        num_visual = counts[row]
        start, stop = _image_span(ids, image_token_id, num_visual, row)
        if stop == len(ids):
            raise InputError(f"prompt {row}: nothing follows the image; SparseVLM's raters and the "
                             "answer position need at least one text token after it")
        prefixes.append(ids[:start])
        texts.append(ids[stop:])
        lengths.append(start + num_visual + len(ids) - stop)
    prefix_width = max(len(p) for p in prefixes)
    text_width = max(len(t) for t in texts)
    batch = len(input_ids)
    prefix_ids = torch.full((batch, prefix_width), pad_id, dtype=torch.long)
    prefix_valid = torch.zeros((batch, prefix_width), dtype=torch.bool)
    text_ids = torch.full((batch, text_width), pad_id, dtype=torch.long)
    text_valid = torch.zeros((batch, text_width), dtype=torch.bool)
    for row, (prefix, text) in enumerate(zip(prefixes, texts)):
        if prefix:
            prefix_ids[row, prefix_width - len(prefix):] = torch.tensor(prefix)
            prefix_valid[row, prefix_width - len(prefix):] = True
        text_ids[row, :len(text)] = torch.tensor(text)
        text_valid[row, :len(text)] = True
    return RegionBatch(prefix_ids, prefix_valid, text_ids, text_valid, lengths, counts)


def check_pixel_values(pixel_values: torch.Tensor, image_size: int, batch: int) -> None:
    expected = (batch, 3, image_size, image_size)
    if not isinstance(pixel_values, torch.Tensor) or tuple(pixel_values.shape) != expected:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise InputError(f"pixel_values: expected shape {expected} (one image per prompt), got {got}")


# --------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------

class TorchExecutor:
    """Runs the PyTorch modules of `segments.py` (the reference backend)."""

    def __init__(self, model, plan: PrunePlan):
        self.model, self.plan = model, plan
        self.specs = plan_segments(plan)
        self.device = model.device
        self._vision = VisionEncoder(model, plan)
        self._segments = [PrefillSegment(model, plan, spec) for spec in self.specs]
        self._decode = DecodeStep(model, self.specs)

    def _to_device(self, x: dict) -> dict:
        return {k: v.to(self.device) for k, v in x.items()}

    @torch.inference_mode()
    def vision(self, pixel_values):
        """pixel_values: a tensor, or (anyres) the dict of named vision inputs."""
        inputs = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
        return self._vision(self._to_device(inputs))

    @torch.inference_mode()
    def segment(self, index: int, inputs: dict) -> dict:
        return self._segments[index](self._to_device(inputs))

    @torch.inference_mode()
    def decode(self, inputs: dict) -> dict:
        return self._decode(self._to_device(inputs))


# --------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------

@dataclass
class LayerDecision:
    """What one pruning layer decided, per batch row (the trace's `layers[]` entry)."""

    layer: int
    kept_indices: list[list[int]]
    keep_count: list[int]
    rank: list[int | None]
    recycled: list[int]
    visual_in: list[int]  # visual tokens entering the layer
    width: int = 0  # visual region width chosen for the next segment

    def to_json(self) -> dict:
        return {"layer": self.layer, "kept_indices": self.kept_indices, "keep_count": self.keep_count,
                "rank": self.rank, "recycled": self.recycled}


@dataclass
class SegmentCache:
    key_valid: torch.Tensor  # [B, S]
    next_position: torch.Tensor  # [B]
    kv: dict  # layer -> (key, value)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, vocab] at each row's last prompt token
    caches: list[SegmentCache]
    decisions: list[LayerDecision]
    segment_lengths: list[list[int]]  # per segment: valid tokens per row entering its layers
    segment_widths: list[int]  # per segment: padded sequence width
    timings: dict = field(default_factory=dict)
    profile_choices: list = field(default_factory=list)  # per pruned segment: what the width policy returned


def _keep_decisions(plan: PrunePlan, position: int, out: dict, rater_mask, image_tokens: list[int]):
    """Rank (rank rules) and keep count per row after the `position`-th pruning layer
    (`image_tokens`: each row's visual count before any pruning)."""
    visual_valid = out["visual_valid"]
    counts = visual_valid.sum(dim=1).tolist()
    if not plan.uses_rank:
        return counts, [None] * len(counts), [plan.keep_count(position, v, None, n)
                                              for v, n in zip(counts, image_tokens)]
    ranks, keeps = token_ops.rank_keep_count(out["rater_attention"].float().cpu(), rater_mask.cpu(), visual_valid.cpu(),
                                             lambda rank, v: plan.keep_count(position, v, rank))
    return counts, ranks.tolist(), keeps.tolist()


def _anyres_visual(plan: PrunePlan, vision: dict, image_valid: torch.Tensor, decisions: list):
    """The visual region of anyres rows from the vision graph's packed features: (visual
    [B, W, D], its validity, each row's token ids, each row's visual count N). FasterVLM's
    rows keep different counts, so they are compacted here with TokenPrune's reference (kept
    tokens first, in packed order; the decision is recorded as layer -1)."""
    features = vision["features"]
    # The exporter's short example keeps only the first tokens of each row.
    valid = image_valid[:, :features.shape[1]].to(features.device)
    counts = valid.sum(dim=1).tolist()
    if plan.method != "fastervlm":
        return features, valid, [list(range(n)) for n in counts], counts
    kept_mask = vision["kept_mask"].to(features.device).bool() & valid
    keeps = kept_mask.sum(dim=1)
    visual, valid, source = token_ops.token_prune(features, torch.zeros(kept_mask.shape, device=features.device),
                                                  kept_mask, keeps, features[:, :0], kept_mask[:, :0],
                                                  int(keeps.max()))
    kept = [[s for s in row if s >= 0] for row in source.cpu().tolist()]
    rows = len(counts)
    decisions.append(LayerDecision(-1, kept, [len(k) for k in kept], [None] * rows, [0] * rows, counts,
                                   visual.shape[1]))
    return visual, valid, [list(k) for k in kept], counts


def prefill(executor, plan: PrunePlan, batch: RegionBatch, pixel_values: torch.Tensor | dict,
            width_policy: Callable[[int, int], ProfileChoice] | None = None) -> PrefillResult:
    """Vision + prefill segments. Between segments, picks each row's keep count and the next
    visual width W = max over rows of `plan.region_width` (kept + recycled). The loop owns W:
    `width_policy(segment, W)` (a pure function, e.g. the runtime's profile rule) says the
    width to run (`padded_width` >= W, the padding masked); its answers come back in
    `PrefillResult.profile_choices`. Without a policy, W is run as is.

    pixel_values: [B, 3, H, W], or for anyres models the vision inputs
    `anyres.vision_inputs` prepares (tiles, image_index, image_valid)."""
    specs: list[SegmentSpec] = plan_segments(plan)
    timings = {}
    t0 = time.perf_counter()
    vision = executor.vision(pixel_values)
    timings["vision"] = time.perf_counter() - t0
    rows = batch.prefix_ids.shape[0]
    decisions: list[LayerDecision] = []
    if plan.anyres:
        visual, image_valid, visual_ids, image_tokens = _anyres_visual(plan, vision, pixel_values["image_valid"],
                                                                       decisions)
    elif plan.method == "fastervlm":
        visual = vision["visual"]
        kept = vision["kept_indices"].cpu().tolist()
        decisions.append(LayerDecision(-1, kept, [len(k) for k in kept], [None] * rows, [0] * rows,
                                       [plan.num_visual] * rows, len(kept[0])))
        visual_ids = [list(k) for k in kept]
        image_tokens = [plan.num_visual] * rows
    else:
        visual = vision["visual"]
        visual_ids = [list(range(visual.shape[1])) for _ in range(rows)]
        image_tokens = [plan.num_visual] * rows
    num_visual = visual.shape[1]
    # A row's visual tokens are 0..N-1 (N: its image's count, 576 for LLaVA-1.5); recycled
    # tokens take N, N+1, ... per row.
    next_id = list(image_tokens)

    inputs = {"prefix_ids": batch.prefix_ids, "prefix_valid": batch.prefix_valid, "visual": visual,
              "text_ids": batch.text_ids, "text_valid": batch.text_valid}
    if plan.anyres:
        inputs["image_valid"] = image_valid
    if plan.mrope:
        inputs["positions"] = batch.positions
    caches, lengths, widths = [], [], []
    rater_mask = None
    choices: list[ProfileChoice] = []
    out: dict = {}  # the previous segment's outputs
    t0 = time.perf_counter()
    for spec in specs:
        if spec.index > 0:
            prev, position = out, spec.index - 1
            inputs = {"hidden": prev["hidden"], "prefix_valid": batch.prefix_valid,
                      "visual_valid": prev["visual_valid"], "text_valid": batch.text_valid,
                      "scores": prev["scores"]}
            counts, ranks, keeps = _keep_decisions(plan, position, prev, rater_mask, image_tokens)
            recycled = [plan.recycled_count(v, k) for v, k in zip(counts, keeps)]
            width = max(plan.region_width(v, k) for v, k in zip(counts, keeps))
            if width_policy is not None:
                choice = width_policy(spec.index, width)
                choices.append(choice)
                width = choice.padded_width
            if plan.method == "sparsevlm":
                inputs.update(rater_mask=rater_mask, keep_count=torch.tensor(keeps, dtype=torch.long),
                              visual_width=torch.zeros(width, dtype=torch.long))
                if plan.mrope:
                    inputs["positions"] = prev["positions"]
            else:  # fastv: TopKTokenSelect's k is fixed in the graph (anyres: keep counts per row)
                inputs["positions"] = prev["positions"]
                if not plan.fixed_topk:
                    inputs.update(keep_count=torch.tensor(keeps, dtype=torch.long),
                                  visual_width=torch.zeros(width, dtype=torch.long))
            decision = LayerDecision(plan.prune_layers[position], [], keeps, ranks, recycled, counts, width)
        out = executor.segment(spec.index, inputs)
        if spec.index == 0 and "rater_mask" in out:
            rater_mask = out["rater_mask"]
        if spec.index > 0:
            visual_ids = _update_visual_ids(visual_ids, out["kept_source"].cpu().tolist(), num_visual, next_id, decision)
            decisions.append(decision)
            num_visual = out["kept_source"].shape[1]
        if spec.ends_at_prune_layer:
            num_visual = out["visual_valid"].shape[1]
        key_valid = out["key_valid"]
        kv = {layer: (out[f"present.{layer}.key"], out[f"present.{layer}.value"]) for layer in spec.layers}
        caches.append(SegmentCache(key_valid, out["next_position"], kv))
        lengths.append(key_valid.sum(dim=1).tolist())
        widths.append(key_valid.shape[1])
    timings["prefill"] = time.perf_counter() - t0
    return PrefillResult(out["logits"], caches, decisions, lengths, widths, timings, choices)


def _update_visual_ids(visual_ids, sources, num_visual, next_id, decision: LayerDecision):
    """Map each row's new visual slots to token ids; record kept ids in `decision`."""
    new_ids = []
    for row, (ids, slots) in enumerate(zip(visual_ids, sources)):
        kept = [ids[s] for s in slots if 0 <= s < num_visual]
        merged = [next_id[row] + (s - num_visual) for s in slots if s >= num_visual]
        next_id[row] += len(merged)
        decision.kept_indices.append(kept)
        new_ids.append(kept + merged)
    return new_ids


# --------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature: expected >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p: expected a value in (0, 1], got {self.top_p}")


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or temperature + top-p (nucleus) sampling with a seeded generator."""
    logits = logits.float().cpu()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p  # keep the first token always
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return torch.gather(order, 1, choice)[:, 0]


def decode_tokens(executor, specs: list[SegmentSpec], result: PrefillResult, params: SamplingParams,
                  pad_id: int = 0) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step (the first comes from the prefill
    logits). A finished row (it produced a stop token) keeps yielding `pad_id`.

    Before the first decode step each segment's cache is copied once into a buffer with room
    for every token still to come (`decode_cache.DecodeCache`; the executor's `cache_buffer`
    allocates it where it has one); each step then writes only the new entries in place.
    From then on this generator holds no reference to `result`: where the caller holds none
    either (`generate` drops its own), the prefill's cache tensors are freed for the decode."""
    generator = None
    if params.temperature > 0:
        generator = torch.Generator().manual_seed(0 if params.seed is None else params.seed)
    caches: list[DecodeCache] = []
    logits = result.logits
    finished = torch.zeros(logits.shape[0], dtype=torch.bool)
    for step in range(params.max_new_tokens):
        tokens = choose_tokens(logits, params, generator)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        yield tokens
        finished |= torch.isin(tokens, torch.tensor(params.stop_token_ids, dtype=tokens.dtype))
        if step == params.max_new_tokens - 1 or bool(finished.all()):
            return
        if not caches:  # step 0: room for the max_new_tokens - 1 tokens fed back
            allocate = getattr(executor, "cache_buffer", torch_buffer)
            caches = [DecodeCache.from_prefill(spec.index, cache.key_valid, cache.next_position, cache.kv,
                                               params.max_new_tokens - 1, allocate)
                      for spec, cache in zip(specs, result.caches)]
            result = None  # copied: the prefill's cache tensors are not needed any more
        inputs = {"token_ids": tokens[:, None]}
        for cache in caches:
            inputs.update(cache.graph_inputs())
        out = executor.decode(inputs)
        logits = out["logits"]
        for cache in caches:
            cache.append(out)


# --------------------------------------------------------------------------------------
# Trace
# --------------------------------------------------------------------------------------

def make_trace(plan: PrunePlan, result: PrefillResult, tokens: list[list[int]]) -> dict:
    """The trace JSON (`docs/trace.md`) for one run."""
    layers = [] if plan.method == "none" else [d.to_json() for d in result.decisions]
    return {"schema": TRACE_SCHEMA, "method": plan.trace_method(), "layers": layers,
            "greedy_tokens": tokens, "logits_last": result.logits.float().cpu().tolist()}


def validate_trace(trace: dict) -> None:
    """Raise ValueError unless `trace` follows the sparsevlm-trace/1 schema."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"trace: {what}")
    need(isinstance(trace, dict) and trace.get("schema") == TRACE_SCHEMA, f"schema must be {TRACE_SCHEMA!r}")
    need(set(trace) == {"schema", "method", "layers", "greedy_tokens", "logits_last"}, "unexpected or missing keys")
    method = trace["method"]
    need(isinstance(method, dict) and method.get("name") in ("none", "sparsevlm", "fastervlm", "fastv"),
         "method.name must be none/sparsevlm/fastervlm/fastv")
    rows = len(trace["greedy_tokens"])
    need(rows >= 1 and len(trace["logits_last"]) == rows, "greedy_tokens and logits_last need one entry per row")
    need(len({len(r) for r in trace["logits_last"]}) == 1, "logits_last rows must have the vocabulary size")
    for entry in trace["layers"]:
        need(set(entry) == {"layer", "kept_indices", "keep_count", "rank", "recycled"}, f"layer entry keys {sorted(entry)}")
        need(isinstance(entry["layer"], int), "layer must be an int")
        for key in ("kept_indices", "keep_count", "rank", "recycled"):
            need(len(entry[key]) == rows, f"layer {entry['layer']}: {key} needs one entry per row")
        for kept, count in zip(entry["kept_indices"], entry["keep_count"]):
            need(kept == sorted(kept) and len(set(kept)) == len(kept), "kept_indices must be ascending and unique")
            need(count == len(kept), "keep_count must equal len(kept_indices)")
        need(all(r is None or isinstance(r, int) for r in entry["rank"]), "rank entries must be int or null")
    need(all(isinstance(t, int) for row in trace["greedy_tokens"] for t in row), "greedy_tokens must be ints")
    np.asarray(trace["logits_last"], dtype=np.float64)  # numeric


# --------------------------------------------------------------------------------------
# One call: prompts + images -> tokens, trace, accounting
# --------------------------------------------------------------------------------------

@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, N] generated tokens (pad_id after a row stopped)
    trace: dict  # sparsevlm-trace/1
    accounting: dict  # token counts and FLOPs per row (accounting.py)
    timings: dict  # seconds: vision, prefill, decode
    profiles: list = field(default_factory=list)  # per pruned segment: the width policy's choice (to_json)


def visual_inputs(spec: ModelSpec, pixel_values: torch.Tensor, image_sizes, batch: int):
    """(what the vision graph takes, each row's visual count): the pixel values as they are
    with num_visual per row, or for anyres models the tiles and layout of `anyres.vision_inputs`."""
    if spec.mrope:  # Qwen2.5-VL: `image_sizes` holds the processor's image_grid_thw
        from .qwen2_5_vl import layout_config, vision_inputs
        if image_sizes is None or len(image_sizes) != batch:
            raise InputError(f"image_grid_thw: a Qwen2.5-VL model needs each image's patch grid (the processor's "
                             f"`image_grid_thw`, from prepare()), one per prompt ({batch})")
        inputs, layout = vision_inputs(pixel_values, image_sizes, layout_config(spec))
        return inputs, list(layout.tokens_per_image)
    if not spec.anyres:
        check_pixel_values(pixel_values, spec.image_size, batch)
        return pixel_values, [spec.num_visual] * batch
    from .anyres import vision_inputs
    return vision_inputs(spec, pixel_values, image_sizes)


def build_batch(spec: ModelSpec, input_ids: list[list[int]], pixel_values, image_sizes, pad_id: int | None = None):
    """(the vision graph's inputs, each row's visual count, the region batch) of one batch:
    what `prefill` takes. `image_sizes`: LLaVA-NeXT's (height, width) per image, Qwen2.5-VL's
    image_grid_thw (`inputs.image_layout` reads either from prepare()'s output)."""
    vision_in, counts = visual_inputs(spec, pixel_values, image_sizes, len(input_ids))
    batch = make_region_batch(input_ids, spec.image_token_id, counts, spec.pad_token_id if pad_id is None else pad_id)
    if spec.mrope:
        batch = mrope_region_batch(batch, spec, image_sizes)
    return vision_in, counts, batch


def mrope_region_batch(batch: RegionBatch, spec: ModelSpec, image_grid_thw) -> RegionBatch:
    """`batch` with the mRoPE ids of its regions (Qwen2.5-VL; docs/qwen2_5_vl.md)."""
    from .qwen2_5_vl import llm_grids, region_positions
    positions, _ = region_positions(batch.prefix_valid, llm_grids(image_grid_thw, spec.spatial_merge_size),
                                    max(batch.visual_counts), batch.text_valid)
    return replace(batch, positions=positions)


def generate(executor, plan: PrunePlan, input_ids: list[list[int]], pixel_values: torch.Tensor, *,
             spec: ModelSpec, params: SamplingParams, on_token: Callable[[int, torch.Tensor], None] | None = None,
             width_policy: Callable[[int, int], ProfileChoice] | None = None, image_sizes=None) -> GenerationOutput:
    """Run the method end to end on `executor` for the model `spec` describes (image token,
    image size, pad id; the accounting's layer shapes). `on_token(step, tokens[B])` streams
    tokens; `width_policy` as in `prefill` (its choices are returned in `profiles`). Keeps no
    state between calls, so concurrent calls on one executor are independent. Anyres
    (LLaVA-NeXT) models take pixel_values [B, tiles, 3, S, S] and each image's (height, width)
    in `image_sizes`, as the processor gives them; Qwen2.5-VL takes every image's patches
    [N, 3 * T * P * P] and its `image_grid_thw` in `image_sizes`."""
    from .accounting import run_accounting

    vision_in, counts, batch = build_batch(spec, input_ids, pixel_values, image_sizes)
    result = prefill(executor, plan, batch, vision_in, width_policy)
    decode = decode_tokens(executor, plan_segments(plan), result, params, spec.pad_token_id)
    # The decode loop copies the prefill caches into its buffers; without a reference here
    # they are freed then, instead of doubling the cache memory until this call returns.
    result = replace(result, caches=[])
    steps = []
    t0 = time.perf_counter()
    for step, tokens in enumerate(decode):
        steps.append(tokens)
        if on_token is not None:
            on_token(step, tokens)
    timings = dict(result.timings, decode=time.perf_counter() - t0, decode_steps=len(steps))
    sequences = torch.stack(steps, dim=1)
    trace = make_trace(plan, result, sequences.tolist())
    text_tokens = [length - count for length, count in zip(batch.prompt_lengths, counts)]
    accounting = run_accounting(spec, text_tokens, result.decisions, plan.method, counts)
    return GenerationOutput(sequences, trace, accounting, timings, [c.to_json() for c in result.profile_choices])
