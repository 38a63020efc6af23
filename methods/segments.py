"""The sparsified LLaVA as the modules that run (eager) and get exported (ONNX): the vision
graph, the prefill split into segments at the pruning layers, and one decode step.

Batch layout. Every row is laid out in three regions of fixed width across the batch:

    [ prefix (left-padded) | visual region | text (right-padded) ]

so the visual span sits at the same columns in every row, whatever the prompt lengths. A
pruning step rebuilds only the visual region, per row, as [kept | merged | padding]; masks
mark the padding. Padding keys are never attended to, so each row computes exactly what a
batch-1 run computes.

Segment i runs decoder layers `first_layer..last_layer`. Segment 0 embeds the prompt;
segment i > 0 starts by pruning the visual region with the keep counts the caller chose
after segment i-1 (SparseVLM: TokenRecycle + TokenPrune; FastV: TopKTokenSelect). A segment
that ends at a pruning layer outputs the visual scores (and the rater attention block for
the rank rules); the last segment outputs the logits at each row's last prompt token.
Tensors go in and out by name (`*_names` below), which become the ONNX graph's names, each
with its named dynamic axes (`graph_signature`, the one declaration the exporter traces with
and the runtime reads graph outputs by).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import modeling, qwen2_5_vl, token_ops
from .config import PrunePlan


@dataclass(frozen=True)
class SegmentSpec:
    index: int
    first_layer: int
    last_layer: int  # inclusive
    ends_at_prune_layer: bool

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)


def plan_segments(plan: PrunePlan) -> list[SegmentSpec]:
    """Split the decoder at the plan's pruning layers (each closes a segment)."""
    specs, start = [], 0
    for index, layer in enumerate(plan.prune_layers):
        specs.append(SegmentSpec(index, start, layer, True))
        start = layer + 1
    specs.append(SegmentSpec(len(specs), start, plan.num_layers - 1, False))
    return specs


def segment_input_names(plan: PrunePlan, spec: SegmentSpec) -> list[str]:
    if spec.index == 0:
        names = ["prefix_ids", "prefix_valid", "visual", "text_ids", "text_valid"]
        # anyres: rows have their own visual counts, so the region's padding is marked
        names = names + ["image_valid"] if plan.anyres else names
        return names + ["positions"] if plan.mrope else names  # mRoPE ids come from the host
    names = ["hidden", "prefix_valid", "visual_valid", "text_valid", "scores"]
    if plan.method == "sparsevlm":
        names += ["rater_mask", "keep_count", "visual_width"]
        return names + ["positions"] if plan.mrope else names
    if not plan.fixed_topk:  # anyres FastV: per-row keep counts through TokenPrune
        return names + ["positions", "keep_count", "visual_width"]
    return names + ["positions"]  # fastv keeps the original positions


def segment_output_names(plan: PrunePlan, spec: SegmentSpec) -> list[str]:
    names = []
    if spec.index > 0:
        names.append("kept_source")
    if spec.ends_at_prune_layer:
        names += ["hidden", "visual_valid", "scores"]
        if plan.method == "sparsevlm" and spec.index == 0:
            names.append("rater_mask")
        if plan.uses_rank:
            names.append("rater_attention")
        if plan.carries_positions:
            names.append("positions")
    else:
        names.append("logits")
    names += ["key_valid", "next_position"]
    for layer in spec.layers:
        names += [f"present.{layer}.key", f"present.{layer}.value"]
    return names


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, H, W] -> visual [B, V, D] (FasterVLM: the kept V = k tokens and
    their patch indices `kept_indices` [B, k]).

    Anyres (LLaVA-NeXT): tiles [sum of the rows' tiles, 3, S, S] plus the host's layout
    (methods/anyres.py: `image_index` [B, N] into [all tiles' patch features ..., image_newline]
    and its validity `image_valid`) -> features [B, N, D], each row its image's packed tokens
    (base tile, unpadded grid with a newline per row) and zeros past its count. FasterVLM adds
    `kept_mask` [B, N]: the top-k of every tile's [CLS] scores, unpadded through the same
    index, newlines always kept; the host compacts the rows (their kept counts differ)."""

    def __init__(self, model, plan: PrunePlan, ops=token_ops):
        super().__init__()
        self.model, self.plan, self.ops = model, plan, ops
        fastervlm = plan.method == "fastervlm"
        if plan.mrope:  # Qwen2.5-VL: flattened patches and their grid's layout (qwen2_5_vl.vision_inputs)
            self.input_names, self.output_names = list(qwen2_5_vl.VISION_INPUT_NAMES), ["features"]
        elif plan.anyres:
            self.input_names = ["tiles", "image_index", "image_valid"]
            self.output_names = ["features", "kept_mask"] if fastervlm else ["features"]
        else:
            self.input_names = ["pixel_values"]
            self.output_names = ["visual", "kept_indices"] if fastervlm else ["visual"]

    def forward(self, x: dict) -> dict:
        fastervlm = self.plan.method == "fastervlm"
        if self.plan.mrope:
            return {"features": qwen2_5_vl.encode_rows(self.model, x)}
        if self.plan.anyres:
            return self._anyres(x, fastervlm)
        features, cls_scores = modeling.encode_image(self.model, x["pixel_values"], with_cls_scores=fastervlm)
        if not fastervlm:
            return {"visual": features}
        visual, kept = self.ops.topk_token_select(features, cls_scores.to(features.dtype), self.plan.fastervlm_keep)
        return {"visual": visual, "kept_indices": kept}

    def _anyres(self, x: dict, fastervlm: bool) -> dict:
        features, cls_scores = modeling.encode_image(self.model, x["tiles"], with_cls_scores=fastervlm)
        newline = self.model.model.image_newline.to(features.dtype)[None]
        table = torch.cat([features.flatten(0, 1), newline], dim=0)  # [tiles * P + 1, D]
        index, valid = x["image_index"], x["image_valid"]
        packed = table[index] * valid[:, :, None].to(features.dtype)
        if not fastervlm:
            return {"features": packed}
        # FasterVLM per tile: rank < k among the tile's patches (TopK's ties: lower index first)
        tile_keep = token_ops.topk_mask(cls_scores, self.plan.fastervlm_keep)
        keep_table = torch.cat([tile_keep.flatten(), torch.ones_like(tile_keep[0, :1])])  # newline: always
        return {"features": packed, "kept_mask": keep_table[index] & valid}


class PrefillSegment(nn.Module):
    """One prefill segment; `forward(inputs: dict) -> dict` with the names above."""

    def __init__(self, model, plan: PrunePlan, spec: SegmentSpec, ops=token_ops):
        super().__init__()
        self.model, self.plan, self.spec, self.ops = model, plan, spec, ops
        self.input_names = segment_input_names(plan, spec)
        self.output_names = segment_output_names(plan, spec)

    def _embed_prompt(self, x):
        embed = modeling.language_model(self.model).embed_tokens
        prefix, text = embed(x["prefix_ids"]), embed(x["text_ids"])
        visual = x["visual"].to(prefix.dtype)
        if self.plan.anyres:
            visual_valid = x["image_valid"]
        else:
            visual_valid = torch.ones_like(visual[:, :, 0], dtype=torch.bool)
        state = {"hidden": torch.cat([prefix, visual, text], dim=1), "visual_valid": visual_valid}
        if self.plan.mrope:
            state["positions"] = x["positions"]
        if self.plan.method == "sparsevlm":
            state["rater_mask"] = modeling.select_raters(visual, text, x["text_valid"],
                                                         visual_valid if self.plan.anyres else None)
        return state

    def _prune(self, x):
        """Rebuild the visual region of `x["hidden"]` with the caller's keep counts."""
        widths = [x["prefix_valid"].shape[1], x["visual_valid"].shape[1]]
        hidden = x["hidden"]
        prefix = hidden[:, :widths[0]]
        visual = hidden[:, widths[0]:widths[0] + widths[1]]
        text = hidden[:, widths[0] + widths[1]:]
        state = {}
        if self.plan.method == "fastv" and not self.plan.fixed_topk:
            # anyres FastV: each row keeps its own count, in original order, padding after
            visual, state["visual_valid"], kept = self.ops.token_prune(
                visual, x["scores"], x["visual_valid"], x["keep_count"], visual[:, :0], x["visual_valid"][:, :0],
                x["visual_width"])
            state["positions"] = _kept_positions(x["positions"], widths, kept, None)
        elif self.plan.method == "fastv":
            visual, kept = self.ops.topk_token_select(visual, x["scores"], self.plan.fastv_keep)
            positions = x["positions"]
            visual_positions = torch.gather(positions[:, widths[0]:widths[0] + widths[1]], 1, kept)
            state["positions"] = torch.cat(
                [positions[:, :widths[0]], visual_positions, positions[:, widths[0] + widths[1]:]], dim=1)
            state["visual_valid"] = torch.ones_like(kept, dtype=torch.bool)
        else:
            if self.plan.recycles:
                merged, merged_valid = self.ops.token_recycle(visual, x["scores"], x["visual_valid"], x["keep_count"])
            else:
                merged, merged_valid = visual[:, :0], x["visual_valid"][:, :0]
            pruned, state["visual_valid"], kept = self.ops.token_prune(
                visual, x["scores"], x["visual_valid"], x["keep_count"], merged, merged_valid, x["visual_width"])
            state["rater_mask"] = x["rater_mask"]
            if self.plan.mrope:  # kept tokens keep their ids, a merged token takes its centre's
                centres = token_ops.recycle_centre_slots(visual, x["scores"], x["visual_valid"], x["keep_count"]) \
                    if self.plan.recycles else None
                state["positions"] = _kept_positions(x["positions"], widths, kept, centres)
            visual = pruned
        state["hidden"] = torch.cat([prefix, visual, text], dim=1)
        state["kept_source"] = kept
        return state

    def forward(self, x: dict) -> dict:
        plan, spec, model = self.plan, self.spec, self.model
        state = self._embed_prompt(x) if spec.index == 0 else self._prune(x)
        prefix_width, text_width = x["prefix_valid"].shape[1], x["text_valid"].shape[1]
        visual_width = state["visual_valid"].shape[1]
        key_valid = torch.cat([x["prefix_valid"], state["visual_valid"], x["text_valid"]], dim=1)
        positions = state.get("positions")
        if positions is None:  # SparseVLM renumbers compactly; a fresh prompt counts from 0
            positions = modeling.positions_from_valid(key_valid)

        hidden = state["hidden"]
        cos, sin = modeling.rotary(model, hidden, qwen2_5_vl.as_rotary(positions) if plan.mrope else positions)
        mask = modeling.prefill_attention_mask(key_valid)
        text_start = prefix_width + visual_width
        out = {}
        probs = None
        for layer_index in spec.layers:
            score_rows = (text_start, text_start + text_width) \
                if spec.ends_at_prune_layer and layer_index == spec.last_layer else None
            layer = modeling.language_model(model).layers[layer_index]
            hidden, (key, value), layer_probs = modeling.decoder_layer(layer, hidden, cos, sin, mask, score_rows=score_rows)
            probs = layer_probs if layer_probs is not None else probs
            out[f"present.{layer_index}.key"], out[f"present.{layer_index}.value"] = key, value

        last_text = x["text_valid"].long().sum(dim=1) - 1  # each row's last prompt token
        if spec.ends_at_prune_layer:
            visual_attention = probs[:, :, prefix_width:text_start]  # [B, T, V] float32
            if plan.method == "sparsevlm":
                raters = state["rater_mask"]
                weights = raters.float()[:, :, None]
                scores = (visual_attention * weights).sum(1) / weights.sum(1).clamp_min(1.0)
                if spec.index == 0:
                    out["rater_mask"] = raters
                if plan.uses_rank:
                    out["rater_attention"] = visual_attention
            else:  # FastV: the last prompt token's row
                row = last_text[:, None, None].expand(-1, 1, visual_attention.shape[2])
                scores = torch.gather(visual_attention, 1, row)[:, 0]
            if plan.carries_positions:
                out["positions"] = positions
            out.update(hidden=hidden, visual_valid=state["visual_valid"], scores=scores.to(hidden.dtype))
        else:
            out["logits"] = modeling.last_logits(model, hidden, text_start + last_text)
        if spec.index > 0:
            out["kept_source"] = state["kept_source"]
        out["key_valid"] = key_valid
        # mRoPE: text ids are equal on the three axes and the last one is the largest
        flat = positions.amax(dim=2) if plan.mrope else positions
        out["next_position"] = flat.masked_fill(~key_valid, -1).amax(dim=1) + 1
        return out


def _kept_positions(positions: torch.Tensor, widths: list[int], kept: torch.Tensor, centres) -> torch.Tensor:
    """Positions after TokenPrune rebuilt the visual region (`kept`: its source slots, -1
    padding): a kept token keeps its ids, a merged one takes its cluster centre's (`centres`,
    the region slot of each merged token's centre; None without recycling). [B, S] ids or
    mRoPE's [B, S, 3]."""
    prefix, visual = widths
    region = positions[:, prefix:prefix + visual]
    if positions.dim() == 3:
        region = qwen2_5_vl.pruned_positions(region, kept, centres)
    else:
        region = torch.gather(region, 1, kept.clamp_min(0))
    return torch.cat([positions[:, :prefix], region, positions[:, prefix + visual:]], dim=1)


def decode_input_names(specs: list[SegmentSpec]) -> list[str]:
    names = ["token_ids"]
    for spec in specs:
        names += [f"key_valid.{spec.index}", f"position.{spec.index}"]
    for spec in specs:
        for layer in spec.layers:
            names += [f"past.{layer}.key", f"past.{layer}.value"]
    return names


def decode_output_names(specs: list[SegmentSpec]) -> list[str]:
    names = ["logits"]
    for spec in specs:
        for layer in spec.layers:
            names += [f"present.{layer}.key", f"present.{layer}.value"]
    return names


# --------------------------------------------------------------------------------------
# Graph names and dynamic axes
# --------------------------------------------------------------------------------------

# Named dynamic axes ({axis: name}) per tensor name; docs/export.md lists what each name is.
# Names not here (`past.*`, `present.*`, `key_valid.<s>`, `position.<s>`) follow `tensor_axes`.
INPUT_AXES = {
    "pixel_values": {0: "batch"},
    "tiles": {0: "tiles"}, "image_index": {0: "batch", 1: "visual_len"},
    "patches": {0: "patches"}, "window_order": {0: "patches"}, "patch_positions": {0: "patches"},
    "window_ids": {0: "patches"}, "image_ids": {0: "patches"},
    "image_valid": {0: "batch", 1: "visual_len"},
    "prefix_ids": {0: "batch", 1: "prefix_len"}, "prefix_valid": {0: "batch", 1: "prefix_len"},
    "text_ids": {0: "batch", 1: "text_len"}, "text_valid": {0: "batch", 1: "text_len"},
    "rater_mask": {0: "batch", 1: "text_len"},
    "visual": {0: "batch", 1: "visual_len"},
    "hidden": {0: "batch", 1: "seq_in"}, "positions": {0: "batch", 1: "seq_in"},
    "visual_valid": {0: "batch", 1: "visual_in"}, "scores": {0: "batch", 1: "visual_in"},
    "keep_count": {0: "batch"}, "visual_width": {0: "visual_width"},
    "token_ids": {0: "batch"},
}
OUTPUT_AXES = {
    "visual": {0: "batch"}, "kept_indices": {0: "batch"},
    "features": {0: "batch", 1: "visual_len"}, "kept_mask": {0: "batch", 1: "visual_len"},
    "hidden": {0: "batch", 1: "seq"}, "positions": {0: "batch", 1: "seq"}, "key_valid": {0: "batch", 1: "seq"},
    "visual_valid": {0: "batch", 1: "visual_out"}, "scores": {0: "batch", 1: "visual_out"},
    "kept_source": {0: "batch", 1: "visual_out"}, "rater_mask": {0: "batch", 1: "text_len"},
    "rater_attention": {0: "batch", 1: "text_len", 2: "visual_out"},
    "next_position": {0: "batch"}, "logits": {0: "batch"},
}

# An ONNX graph output may not reuse an input's name (every value has one producer), so an
# output that a segment also takes as input (`hidden`, `visual_valid`, ...) is named with
# this suffix in the graph (`hidden` -> `hidden_out`). No tensor of the method ends with it,
# so the rule reads back from an output's name alone (`method_output_name`): a fixed rule,
# not a map recorded in the manifest.
GRAPH_OUTPUT_SUFFIX = "_out"


def graph_output_name(name: str, input_names) -> str:
    """The graph's name for the method's output `name` of a graph with these inputs."""
    return f"{name}{GRAPH_OUTPUT_SUFFIX}" if name in input_names else name


def method_output_name(graph_output: str) -> str:
    """The method's name of a graph output (the inverse of `graph_output_name`)."""
    return graph_output.removesuffix(GRAPH_OUTPUT_SUFFIX)


def tensor_axes(name: str, output: bool, segment_of_layer: dict | None = None) -> dict[int, str]:
    """The named dynamic axes of the method's tensor `name`, as a graph input or output.
    `segment_of_layer` ({layer: segment}) is given for the decode graph only, whose cache
    capacity is per segment (`past_len_<s>`); a decode step's `present.*` holds one new position."""
    parts = name.split(".")
    decode = segment_of_layer is not None
    if parts[0] in ("past", "present"):
        if decode:
            return {0: "batch"} if output else {0: "batch", 2: f"past_len_{segment_of_layer[int(parts[1])]}"}
        return {0: "batch", 2: "seq"}
    if parts[0] == "key_valid" and len(parts) == 2:
        return {0: "batch", 1: f"past_len_{parts[1]}"}
    if parts[0] == "position" and len(parts) == 2:
        return {0: "batch"}
    return dict((OUTPUT_AXES if output else INPUT_AXES).get(name, {}))


@dataclass(frozen=True)
class GraphSignature:
    """A graph's inputs and outputs by their graph names, each with its named dynamic axes
    (in order), and the method's name of each output."""

    inputs: dict[str, dict[int, str]]
    outputs: dict[str, dict[int, str]]
    method_names: dict[str, str]  # graph output -> the module's output name

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's `dynamic_axes` (tensors with at least one dynamic axis)."""
        return {name: axes for name, axes in {**self.inputs, **self.outputs}.items() if axes}


def graph_signature(module: nn.Module) -> GraphSignature:
    """The ONNX names and dynamic axes of `module`'s graph (VisionEncoder, PrefillSegment or
    DecodeStep): the exporter traces with these, the runtime reads outputs by them."""
    segment_of_layer = None
    if isinstance(module, DecodeStep):
        segment_of_layer = {layer: spec.index for spec in module.specs for layer in spec.layers}
    inputs = {name: tensor_axes(name, False, segment_of_layer) for name in module.input_names}
    outputs, method_names = {}, {}
    for name in module.output_names:
        graph_name = graph_output_name(name, inputs)
        outputs[graph_name] = tensor_axes(name, True, segment_of_layer)
        method_names[graph_name] = name
    clashes = [name for name in [*module.input_names, *module.output_names] if name.endswith(GRAPH_OUTPUT_SUFFIX)]
    if clashes:
        raise ValueError(f"{type(module).__name__}: tensor name(s) {clashes} end with {GRAPH_OUTPUT_SUFFIX!r}, "
                         "which graph_output_name reserves")
    return GraphSignature(inputs, outputs, method_names)


class DecodeStep(nn.Module):
    """One generated token through every layer, each segment's layers with their own cache
    (its capacity, validity mask and the new token's position).

    Inputs: token_ids [B, 1]; per segment s: key_valid.s [B, C_s], position.s [B]; per layer
    past.l.key/value [B, H_kv, C_s, hd]. The caches are buffers preallocated at their capacity
    C_s (`decode_cache.DecodeCache`); key_valid.s marks the columns that hold a key. Outputs:
    logits [B, vocab] and this step's present.l.key/value [B, H_kv, 1, hd] only: the graph
    never concatenates the cache, the caller writes the new entries into the buffers."""

    def __init__(self, model, specs: list[SegmentSpec]):
        super().__init__()
        self.model, self.specs = model, specs
        self.input_names = decode_input_names(specs)
        self.output_names = decode_output_names(specs)

    def forward(self, x: dict) -> dict:
        lm = modeling.language_model(self.model)
        hidden = lm.embed_tokens(x["token_ids"])
        out = {}
        for spec in self.specs:
            cos, sin = modeling.rotary(self.model, hidden, x[f"position.{spec.index}"][:, None])
            mask = x[f"key_valid.{spec.index}"]
            for layer_index in spec.layers:
                past = (x[f"past.{layer_index}.key"], x[f"past.{layer_index}.value"])
                hidden, (key, value), _ = modeling.decoder_layer(lm.layers[layer_index], hidden, cos, sin, mask, past=past)
                out[f"present.{layer_index}.key"], out[f"present.{layer_index}.value"] = key, value
        out["logits"] = self.model.lm_head(lm.norm(hidden))[:, 0].float()
        return out
