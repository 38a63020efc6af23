"""What to prune, where and how much: the one configuration every stage shares.

`SparseVLMConfig` names a method and its parameters; `resolve()` checks it against a model
(depth, visual token count) and turns it into the concrete per-layer plan the method runs.
Errors name the field and the expected values; nothing is silently clamped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import token_ops

METHODS = ("none", "sparsevlm", "fastervlm", "fastv")
SPARSEVLM_VARIANTS = ("v1.5", "v1.0", "paper")

# SparseVLM v1.5 (ICML code): visual tokens kept by top-k at layers 2 / 6 / 15.
V15_PRUNE_LAYERS = (2, 6, 15)
V15_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
# The visual count the v1.5 schedules are written for (LLaVA-1.5's 576); on an image of N
# visual tokens a schedule keeps round(keep * N / 576) (PrunePlan.keep_count).
V15_SCHEDULE_TOKENS = 576
# SparseVLM v1.0 (rank rule, arXiv v1 code): layers and the scripts' (scale, bias) per budget.
V10_PRUNE_LAYERS = (2, 6, 15, 19)
V10_PRESETS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
# FasterVLM reduction ratios -> kept tokens for 576 patches (144 / 58 / 29).
FASTERVLM_REDUCTIONS = (0.75, 0.90, 0.95)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is expected."""


@dataclass(frozen=True)
class SparseVLMConfig:
    """A pruning method and its parameters.

    method: "none" | "sparsevlm" | "fastervlm" | "fastv".
    budget: the method's token budget. SparseVLM v1.5: the schedule (192/128/96/64);
        v1.0: picks the scripts' (scale, bias) preset when those are not given; FasterVLM:
        visual tokens kept; FastV: visual tokens kept after layer K-1 (alternative to R).
    variant: SparseVLM only: "v1.5" (fixed schedule), "v1.0" (code rank rule
        keep = min(int(rank*scale + bias), v - 1)) or "paper" (deleted = int(lam*(v - rank))).
    reduction: FasterVLM only, instead of budget: 0.75 / 0.90 / 0.95 of 576 tokens removed.
    K, R: FastV only: prune after layer K-1, removing the share R of the visual tokens.
    prune_layers: SparseVLM only, override the variant's default layers.
    recycle: SparseVLM token recycling (on in v1.0 / v1.5 / paper, as the authors' code).
    """

    method: str = "sparsevlm"
    budget: int | None = None
    variant: str | None = None
    scale: float | None = None
    bias: float | None = None
    lam: float | None = None
    reduction: float | None = None
    K: int = 2
    R: float | None = None
    prune_layers: tuple[int, ...] | None = None
    recycle: bool = True

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "SparseVLMConfig":
        data = dict(data)
        if data.get("prune_layers") is not None:
            data["prune_layers"] = tuple(data["prune_layers"])
        return cls(**data)


@dataclass(frozen=True)
class PrunePlan:
    """The resolved method: which layers prune and by which rule. Model-specific."""

    config: SparseVLMConfig
    num_layers: int
    num_visual: int
    prune_layers: tuple[int, ...] = ()  # decoder layers whose output is pruned
    schedule: tuple[int, ...] | None = None  # v1.5 top-k per prune layer
    scale: float | None = None
    bias: float | None = None
    lam: float | None = None
    fastervlm_keep: int | None = None  # FasterVLM visual tokens kept before the LLM
    fastv_keep: int | None = None  # FastV visual tokens kept after layer K-1
    extras: dict = field(default_factory=dict)
    # Anyres (LLaVA-NeXT): each row has its own visual count N (num_visual is then the most
    # an image can have). Keep counts are scaled to N per row (`keep_count`), FasterVLM keeps
    # `fastervlm_keep` per CLIP tile, and FastV prunes through the keep-count path.
    anyres: bool = False
    tile_tokens: int | None = None  # visual tokens of one CLIP tile (FasterVLM's per-tile top-k)
    min_visual: int | None = None  # anyres: a lower bound of a row's visual count
    max_tiles: int = 1  # CLIP tiles one image can take
    # Qwen2.5-VL (also `anyres`: visual counts per row): mRoPE positions [B, S, 3] travel
    # through every segment and pruning keeps each token's own (docs/qwen2_5_vl.md).
    mrope: bool = False

    @property
    def vision_width(self) -> int:
        """The widest visual region segment 0 receives: FasterVLM's k on LLaVA-1.5, else the
        most visual tokens an image has (anyres FasterVLM rows keep data-dependent counts)."""
        return self.fastervlm_keep if self.method == "fastervlm" and not self.anyres else self.num_visual

    @property
    def carries_positions(self) -> bool:
        """Segments take and give the position ids (FastV keeps the original ones; mRoPE
        models keep them for every method) instead of renumbering the tokens."""
        return self.method == "fastv" or self.mrope

    @property
    def fixed_topk(self) -> bool:
        """FastV prunes with TopKTokenSelect's static k (every row keeps the same count);
        anyres rows keep different counts, so FastV there takes the keep-count path."""
        return self.method == "fastv" and not self.anyres

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def variant(self) -> str | None:
        return self.config.variant if self.method == "sparsevlm" else None

    @property
    def uses_rank(self) -> bool:
        return self.method == "sparsevlm" and self.variant in ("v1.0", "paper")

    @property
    def recycles(self) -> bool:
        return self.method == "sparsevlm" and self.config.recycle

    def keep_count(self, layer_position: int, visual_count: int, rank: int | None,
                   image_tokens: int | None = None) -> int:
        """Visual tokens the top-k keeps at the `layer_position`-th prune layer (SparseVLM, FastV),
        of `visual_count` entering it, for a row whose image has `image_tokens` visual tokens
        (default: num_visual, LLaVA-1.5's fixed 576).

        The fixed counts are written for `reference_tokens` (576) and scale with the image:
        FastV keeps round(N * (1 - R)); the SparseVLM v1.5 schedule keeps
        round(schedule_l * N / 576) (this toolkit's definition for N != 576, e.g. budget 128 on
        a 2880-token image keeps 640, 220, 72). With N = 576 both are the published counts."""
        image_tokens = self.num_visual if image_tokens is None else image_tokens
        if self.method == "fastv":
            R = self.config.R
            target = self.fastv_keep if R is None else round(image_tokens * (1.0 - R))
            return min(target, visual_count)
        if self.variant == "v1.5":
            scaled = round(self.schedule[layer_position] * image_tokens / V15_SCHEDULE_TOKENS)
            return min(scaled, visual_count - 1)
        if self.variant == "v1.0":
            if visual_count == rank:  # the authors skip the layer: nothing pruned or recycled
                return visual_count
            return min(max(int(rank * self.scale + self.bias), 0), visual_count - 1)
        deleted = int(self.lam * (visual_count - rank))  # paper
        return visual_count if deleted == 0 else max(visual_count - deleted, 0)

    def region_width(self, visual_count: int, keep: int) -> int:
        """The width rule: visual region width, for one row, of the segment after a pruning
        layer that keeps `keep` of `visual_count` tokens: the kept tokens plus the merged
        (recycled) ones SparseVLM inserts; FastV's TopKTokenSelect has the static width k.
        A batch runs at the max over its rows; export's static widths, calibration's
        per-sample widths and the generation loop all call this."""
        if self.fixed_topk:
            return self.fastv_keep
        return keep + self.recycled_count(visual_count, keep)

    def recycled_count(self, visual_count: int, keep: int) -> int:
        """Merged tokens inserted after keeping `keep` of `visual_count` (0 without recycling)."""
        return token_ops.recycled_count(visual_count - keep) if self.recycles else 0

    def trace_method(self) -> dict:
        """The `method` object of the trace JSON."""
        c = self.config
        out = {"name": c.method}
        if c.method == "sparsevlm":
            out.update(variant=c.variant, budget=c.budget)
            if self.uses_rank:
                out.update(scale=self.scale, bias=self.bias, lam=self.lam)
        elif c.method == "fastervlm":
            out.update(budget=self.fastervlm_keep, k=self.fastervlm_keep)
            if self.anyres:
                out["per_tile"] = True  # k per CLIP tile; image newlines are always kept
        elif c.method == "fastv":
            out.update(budget=self.fastv_keep, K=c.K, R=self.extras["R"])
        return out


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def resolve_for_spec(config: SparseVLMConfig, spec) -> PrunePlan:
    """`resolve` for the model a ModelSpec describes (LLaVA-1.5, anyres LLaVA-NeXT or
    Qwen2.5-VL, whose images also have their own visual counts)."""
    if spec.mrope:
        from .qwen2_5_vl import check_method
        check_method(config)
        plan = resolve(config, spec.num_layers, spec.num_visual, anyres=True, tile_tokens=spec.num_visual,
                       min_visual=spec.min_visual, mrope=True)
        plan.extras["patches_per_token"] = spec.spatial_merge_size ** 2  # the vision graph's patches
        return plan
    if not spec.anyres:
        return resolve(config, spec.num_layers, spec.num_visual)
    return resolve(config, spec.num_layers, spec.num_visual, anyres=True, tile_tokens=spec.tile_tokens,
                   min_visual=spec.min_visual, max_tiles=spec.max_tiles)


def resolve(config: SparseVLMConfig, num_layers: int, num_visual: int = 576, *, anyres: bool = False,
            tile_tokens: int | None = None, min_visual: int | None = None, max_tiles: int = 1,
            mrope: bool = False) -> PrunePlan:
    """Check `config` against a model with `num_layers` decoder layers and `num_visual`
    visual tokens (anyres: the most an image can have, `tile_tokens` per CLIP tile), and
    return the concrete plan."""
    model = dict(anyres=anyres, tile_tokens=tile_tokens, min_visual=min_visual, max_tiles=max_tiles, mrope=mrope)
    c = config
    _require(c.method in METHODS, f"method: expected one of {METHODS}, got {c.method!r}")
    if c.budget is not None:
        # bool is an int subclass: budget=True would silently mean one token.
        _require(isinstance(c.budget, int) and not isinstance(c.budget, bool) and c.budget > 0,
                 f"budget: expected a positive integer, got {c.budget!r}")
        _require(c.budget <= num_visual,
                 f"budget: {c.budget} is larger than the model's {num_visual} visual tokens")

    if c.method == "none":
        return PrunePlan(c, num_layers, num_visual, **model)

    if c.method == "fastervlm":
        _require((c.budget is None) != (c.reduction is None),
                 "fastervlm: give exactly one of budget (tokens kept) or reduction (0.75/0.90/0.95)")
        # Anyres: the top-k runs per CLIP tile (the base image and each grid tile), so the
        # budget is per tile and the reduction applies to a tile's tokens.
        per_image = tile_tokens if anyres else num_visual
        if c.reduction is not None:
            _require(0.0 <= c.reduction < 1.0, f"reduction: expected a value in [0, 1), got {c.reduction!r}")
            keep = round(per_image * (1.0 - c.reduction))
        else:
            _require(c.budget <= per_image, f"budget: FasterVLM keeps at most the {per_image} tokens of a tile, "
                                            f"got {c.budget}")
            keep = c.budget
        return PrunePlan(c, num_layers, num_visual, **model, fastervlm_keep=keep)

    if c.method == "fastv":
        _require(isinstance(c.K, int) and 1 <= c.K < num_layers,
                 f"K: expected 1 <= K < {num_layers} (the model's depth), got {c.K!r}")
        _require((c.budget is None) != (c.R is None), "fastv: give exactly one of budget or R")
        if c.R is not None:
            _require(0.0 <= c.R < 1.0, f"R: expected a value in [0, 1), got {c.R!r}")
            keep, ratio = round(num_visual * (1.0 - c.R)), c.R
        else:
            keep, ratio = c.budget, 1.0 - c.budget / num_visual
        return PrunePlan(c, num_layers, num_visual, **model, prune_layers=(c.K - 1,), fastv_keep=keep,
                         extras={"R": ratio})

    # SparseVLM
    variant = c.variant or "v1.5"
    _require(variant in SPARSEVLM_VARIANTS,
             f"variant: expected one of {SPARSEVLM_VARIANTS} for sparsevlm, got {variant!r}")
    c = SparseVLMConfig(**{**c.to_dict(), "variant": variant,
                           "prune_layers": tuple(c.prune_layers) if c.prune_layers else None})
    default_layers = V15_PRUNE_LAYERS if variant == "v1.5" else V10_PRUNE_LAYERS
    layers = tuple(c.prune_layers) if c.prune_layers else default_layers
    _require(list(layers) == sorted(set(layers)) and layers[0] >= 0,
             f"prune_layers: expected increasing non-negative layer indices, got {layers}")
    _require(layers[-1] < num_layers - 1,
             f"prune_layers: layer {layers[-1]} is beyond the model depth "
             f"({num_layers} decoder layers; the last pruning layer must be < {num_layers - 1})")
    if variant == "v1.5":
        _require(c.budget in V15_SCHEDULES,
                 f"budget: SparseVLM v1.5 has schedules for {sorted(V15_SCHEDULES)}, got {c.budget!r}")
        schedule = V15_SCHEDULES[c.budget]
        _require(len(schedule) == len(layers),
                 f"prune_layers: the v1.5 schedule has {len(schedule)} layers, got {len(layers)}")
        return PrunePlan(c, num_layers, num_visual, **model, prune_layers=layers, schedule=schedule)
    if variant == "v1.0":
        scale, bias = c.scale, c.bias
        if scale is None or bias is None:
            _require(c.budget in V10_PRESETS,
                     f"sparsevlm v1.0: give scale and bias, or a budget with a preset {sorted(V10_PRESETS)}")
            scale, bias = V10_PRESETS[c.budget]
        return PrunePlan(c, num_layers, num_visual, **model, prune_layers=layers, scale=scale, bias=bias)
    _require(c.lam is not None and 0.0 < c.lam <= 1.0,
             f"lam: the paper rule needs 0 < lam <= 1, got {c.lam!r}")
    return PrunePlan(c, num_layers, num_visual, **model, prune_layers=layers, lam=c.lam)
