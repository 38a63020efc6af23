"""PyTorch reference of the `sparsevlm` custom ops (domain `sparsevlm`, version 1).

These functions are the single source of truth for the op semantics documented in
`export/OPS.md`: the eager method calls them, the ONNX export traces them into the
local-function bodies that ONNX Runtime executes, and the TensorRT plugin kernels are
tested against them.

Every function is batched and written with static shapes plus validity masks, so a trace
of it is valid for any batch size and any per-row keep count. Ties are broken the way
ONNX `TopK` breaks them: among equal scores the lower index wins.

Integer rules (kept exact, no floating point): with d deleted tokens the recycling pool is
`(candidate_percent * d) // 100 + 1` tokens (the authors' `int(0.3 * d) + 1`, identical for
every d) and the number of clusters is `pool // cluster_divisor + 1` (`int(pool / 10) + 1`).
"""

from __future__ import annotations

import torch

CANDIDATE_PERCENT = 30  # SparseVLM's tau = 0.3: share of deleted tokens that are recycled
CLUSTER_DIVISOR = 10  # one merged token per 10 recycling candidates (plus one)
MERGE_EPS = 1e-6  # merged token = sum(members) / (size + MERGE_EPS), as the authors' code


def recycle_pool_size(deleted: int, candidate_percent: int = CANDIDATE_PERCENT) -> int:
    """Number of deleted tokens that become recycling candidates (0 when none deleted)."""
    return 0 if deleted <= 0 else (candidate_percent * deleted) // 100 + 1


def recycled_count(deleted: int, candidate_percent: int = CANDIDATE_PERCENT,
                   cluster_divisor: int = CLUSTER_DIVISOR) -> int:
    """Number of merged tokens inserted when `deleted` visual tokens are pruned."""
    pool = recycle_pool_size(deleted, candidate_percent)
    return 0 if pool == 0 else pool // cluster_divisor + 1


def max_recycled_slots(num_visual: int, candidate_percent: int = CANDIDATE_PERCENT,
                       cluster_divisor: int = CLUSTER_DIVISOR) -> int:
    """Static upper bound C of merged tokens for a visual region of width `num_visual`."""
    return recycled_count(num_visual, candidate_percent, cluster_divisor)


def sort_order(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """Indices that sort `values` along dim 1; ties keep the lower index first.

    Eagerly a stable sort; inside an ONNX export a full-width TopK, whose ONNX definition
    breaks ties the same way (the legacy exporter cannot translate stable sorts)."""
    if torch.onnx.is_in_onnx_export():
        return torch.topk(values, values.shape[1], dim=1, largest=descending, sorted=True).indices
    return torch.sort(values, dim=1, descending=descending, stable=True).indices


def _descending_rank(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """rank[b, i] = position of slot i when row b's valid slots are sorted by descending
    score (ties: lower index first); invalid slots rank after every valid one."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = sort_order(masked, descending=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter(1, order, positions)


def topk_keep_mask(scores: torch.Tensor, valid: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Boolean [B, V]: the `keep_count[b]` best-scoring valid slots of each row."""
    rank = _descending_rank(scores, valid)
    return (rank < keep_count.to(rank.dtype)[:, None]) & valid


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [R, N]: the k best-scoring slots of every row (FasterVLM's per-tile top-k on
    LLaVA-NeXT; ties: lower index first, as TopKTokenSelect)."""
    return _descending_rank(scores, torch.ones_like(scores, dtype=torch.bool)) < k


def topk_token_select(tokens: torch.Tensor, scores: torch.Tensor, k: int):
    """TopKTokenSelect: keep the k best-scoring tokens of every row, in original order.

    tokens [B, N, D], scores [B, N] -> selected [B, k, D], indices int64 [B, k] (ascending).
    """
    if not 0 <= k <= tokens.shape[1]:
        raise ValueError(f"TopKTokenSelect: k must be in [0, {tokens.shape[1]}], got {k}")
    best = sort_order(scores.float(), descending=True)[:, :k]
    indices = torch.gather(best, 1, sort_order(best, descending=False))
    selected = torch.gather(tokens, 1, indices[:, :, None].expand(-1, -1, tokens.shape[2]))
    return selected, indices


def token_prune(visual: torch.Tensor, scores: torch.Tensor, visual_valid: torch.Tensor,
                keep_count: torch.Tensor, merged: torch.Tensor, merged_valid: torch.Tensor,
                out_width: int | torch.Tensor):
    """TokenPrune: rebuild the visual region as [kept (original order) | merged | padding].

    visual [B, V, D], scores [B, V], visual_valid bool [B, V], keep_count int64 [B],
    merged [B, C, D], merged_valid bool [B, C], out_width: W, or a tensor of length W (a shape
    input: the exported node reads only its length), W >= max kept + merged per row.
    Returns pruned [B, W, D] (padding slots are zero), pruned_valid bool [B, W] and
    source_index int64 [B, W]: the input slot (0..V-1 kept, V..V+C-1 merged, -1 padding).
    """
    num_visual, num_merged = visual.shape[1], merged.shape[1]
    width = out_width.shape[0] if isinstance(out_width, torch.Tensor) else out_width
    keep = topk_keep_mask(scores, visual_valid, keep_count)
    selected = torch.cat([keep, merged_valid], dim=1)  # [B, V + C]
    slots = torch.arange(num_visual + num_merged, device=visual.device).expand_as(selected)
    # Selected slots sort first (in slot order), unselected ones after them.
    sort_key = torch.where(selected, slots, slots + (num_visual + num_merged))
    source = sort_order(sort_key, descending=False)[:, :width]
    count = selected.sum(dim=1, keepdim=True)
    pruned_valid = torch.arange(source.shape[1], device=visual.device)[None, :] < count
    pool = torch.cat([visual, merged.to(visual.dtype)], dim=1)
    pruned = torch.gather(pool, 1, source[:, :, None].expand(-1, -1, visual.shape[2]))
    pruned = pruned * pruned_valid[:, :, None].to(pruned.dtype)
    source_index = torch.where(pruned_valid, source, torch.full_like(source, -1))
    return pruned, pruned_valid, source_index


def token_recycle(visual: torch.Tensor, scores: torch.Tensor, visual_valid: torch.Tensor,
                  keep_count: torch.Tensor, candidate_percent: int = CANDIDATE_PERCENT,
                  cluster_divisor: int = CLUSTER_DIVISOR):
    """TokenRecycle: merge the best deleted tokens into a few cluster means (DPC-kNN).

    visual [B, V, D] (the pruning layer's output states), scores [B, V], visual_valid
    bool [B, V], keep_count int64 [B]. Returns merged [B, C, D] and merged_valid bool
    [B, C] with C = max_recycled_slots(V); merged tokens are ordered by descending
    density * delta. Computed in float32 whatever the input type.
    """
    merged, merged_valid, _ = _recycle_clusters(visual, scores, visual_valid, keep_count, candidate_percent,
                                                cluster_divisor)
    return merged, merged_valid


def recycle_centre_slots(visual: torch.Tensor, scores: torch.Tensor, visual_valid: torch.Tensor,
                         keep_count: torch.Tensor, candidate_percent: int = CANDIDATE_PERCENT,
                         cluster_divisor: int = CLUSTER_DIVISOR) -> torch.Tensor:
    """The visual slot (0..V-1) of each merged token's cluster centre, int64 [B, C], -1 where
    `token_recycle` (same inputs) has no merged token. The same computation as TokenRecycle's
    (one definition, `_recycle_clusters`); not part of the op's contract: models whose
    positions follow the tokens (Qwen2.5-VL's mRoPE) trace it as plain ops beside the op."""
    _, merged_valid, centre_slots = _recycle_clusters(visual, scores, visual_valid, keep_count, candidate_percent,
                                                      cluster_divisor)
    return torch.where(merged_valid, centre_slots, torch.full_like(centre_slots, -1))


def _recycle_clusters(visual, scores, visual_valid, keep_count, candidate_percent, cluster_divisor):
    """TokenRecycle's DPC-kNN: (merged [B, C, D], merged_valid [B, C], centre slot [B, C])."""
    batch, num_visual, dim = visual.shape
    device = visual.device
    keep = topk_keep_mask(scores, visual_valid, keep_count)
    deleted = visual_valid & ~keep
    num_deleted = deleted.sum(dim=1)
    pool = torch.where(num_deleted > 0, (candidate_percent * num_deleted) // 100 + 1, 0)
    clusters = torch.where(pool > 0, pool // cluster_divisor + 1, 0)  # [B], also the kNN k
    # Static bounds from V (no Python branch, so a trace stays valid for every V >= 1).
    pool_bound = (candidate_percent * num_visual) // 100 + 1
    cluster_bound = pool_bound // cluster_divisor + 1

    # Candidates: the best-scoring deleted tokens, in descending score order.
    order = sort_order(scores.float().masked_fill(~deleted, float("-inf")), descending=True)[:, :pool_bound]
    cand = torch.gather(visual.float(), 1, order[:, :, None].expand(-1, -1, dim))
    cand_valid = torch.arange(pool_bound, device=device)[None, :] < pool[:, None]
    pair_valid = cand_valid[:, :, None] & cand_valid[:, None, :]

    # Euclidean distances scaled by 1/sqrt(D), through the Gram matrix (as cdist does).
    sq = (cand * cand).sum(dim=-1)
    dist2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * cand @ cand.transpose(1, 2)).clamp_min(0.0)
    # Exactly symmetric with a zero diagonal, as the true distance is: the matmul's rounding
    # differs between (i, j) and (j, i) and with the batch shape, and with k = c neighbours a
    # mutual-nearest pair has mathematically equal densities; without this the tie went by
    # rounding noise instead of by index, and a batch row could differ from its batch-1 run.
    # (An index comparison, not torch.eye: ONNX Runtime has no bool EyeLike kernel.)
    slots = torch.arange(pool_bound, device=device)
    diagonal = slots[:, None] == slots[None, :]
    dist2 = ((dist2 + dist2.transpose(1, 2)) * 0.5).masked_fill(diagonal, 0.0)
    dist = torch.sqrt(dist2) / dim ** 0.5
    inf = torch.tensor(float("inf"), device=device)

    # Local density from the `clusters` nearest neighbours (self included).
    candidate_dist = torch.where(pair_valid, dist, inf).flatten(0, 1)  # rows of [B * pool, pool]
    nearest = torch.gather(candidate_dist, 1, sort_order(candidate_dist, descending=False)).view_as(dist)
    in_knn = torch.arange(pool_bound, device=device)[None, None, :] < clusters[:, None, None]
    knn_sq = torch.where(in_knn & pair_valid, nearest * nearest, torch.zeros_like(nearest))
    density = torch.exp(-knn_sq.sum(-1) / clusters.clamp_min(1)[:, None].float())
    density = torch.where(cand_valid, density, torch.full_like(density, -1.0))

    # delta: distance to the nearest denser token; the densest gets the row's max distance.
    dist_max = torch.where(pair_valid, dist, torch.zeros_like(dist)).amax(dim=(1, 2))
    denser = (density[:, None, :] > density[:, :, None]) & pair_valid
    delta = torch.where(denser, dist, dist_max[:, None, None]).amin(dim=-1)
    centre_score = torch.where(cand_valid, delta * density, torch.full_like(delta, float("-inf")))
    centres = sort_order(centre_score, descending=True)[:, :cluster_bound]
    centre_valid = torch.arange(cluster_bound, device=device)[None, :] < clusters[:, None]

    # Assign each candidate to its nearest centre; each centre is forced into its own cluster.
    to_centre = torch.gather(dist, 1, centres[:, :, None].expand(-1, -1, pool_bound))
    to_centre = torch.where(centre_valid[:, :, None], to_centre, inf)
    assignment = to_centre.argmin(dim=1)  # [B, pool_bound]
    is_centre = (centres[:, None, :] == torch.arange(pool_bound, device=device)[None, :, None]) \
        & centre_valid[:, None, :]  # [B, pool_bound, cluster_bound]
    assignment = torch.where(is_centre.any(-1), is_centre.float().argmax(-1), assignment)

    members = (assignment[:, None, :] == torch.arange(cluster_bound, device=device)[None, :, None]) \
        & cand_valid[:, None, :] & centre_valid[:, :, None]
    members = members.float()
    merged = members @ cand / (members.sum(-1, keepdim=True) + MERGE_EPS)
    return merged.to(visual.dtype), centre_valid, torch.gather(order, 1, centres)


def matrix_rank(block: torch.Tensor) -> int:
    """Rank of one rater-by-visual block: torch.linalg.matrix_rank on float32, default tol."""
    return int(torch.linalg.matrix_rank(block.float()))


def rank_keep_count(rater_attention: torch.Tensor, rater_mask: torch.Tensor,
                    visual_valid: torch.Tensor, rule):
    """RankKeepCount: per row, rank of P = rater rows x valid visual columns and the keep
    count that `rule(rank, visual_count)` gives. Returns (rank [B], keep_count [B])."""
    ranks, keeps = [], []
    for attention, raters, valid in zip(rater_attention, rater_mask, visual_valid):
        block = attention[raters][:, valid]
        rank = matrix_rank(block)
        ranks.append(rank)
        keeps.append(rule(rank, int(valid.sum())))
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=rater_attention.device)
    return as_tensor(ranks), as_tensor(keeps)
