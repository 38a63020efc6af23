"""The four custom ops' reference (`token_ops`) against brute force written here with plain
per-row loops from the method rules in `docs/trace.md`, and the rank rules of the plan
(`PrunePlan.keep_count`) against hand-computed counts on blocks of known rank."""

from __future__ import annotations

import math

import pytest
import torch

from sparsevlm.methods import SparseVLMConfig, resolve
from sparsevlm.methods import token_ops

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# --------------------------------------------------------------------------------------
# Brute force (lists and loops, float64)
# --------------------------------------------------------------------------------------


def bf_topk(scores: list[float], valid: list[bool], k: int) -> list[int]:
    """Indices of the k best valid scores (ties: lower index), ascending."""
    ranked = sorted((i for i in range(len(scores)) if valid[i]), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


def bf_recycle(tokens: list[list[float]], scores: list[float], valid: list[bool], keep: int,
               with_centres: bool = False):
    """SparseVLM recycling for one row: list of merged tokens (descending density*delta);
    with_centres: also the token index of each merged token's cluster centre."""
    kept = set(bf_topk(scores, valid, keep))
    deleted = [i for i in range(len(scores)) if valid[i] and i not in kept]
    d = len(deleted)
    if d == 0:
        return ([], []) if with_centres else []
    pool = int(0.3 * d) + 1
    c = int(pool / 10) + 1
    cand = sorted(deleted, key=lambda i: (-scores[i], i))[:pool]
    dim = len(tokens[0])

    def dist(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(tokens[a], tokens[b]))) / math.sqrt(dim)

    n = len(cand)
    D = [[dist(cand[i], cand[j]) for j in range(n)] for i in range(n)]
    density = []
    for i in range(n):
        nearest = sorted(D[i])[:c]  # self (0) included
        density.append(math.exp(-sum(x * x for x in nearest) / c))
    dmax = max(max(row) for row in D)
    delta = []
    for i in range(n):
        denser = [D[i][j] for j in range(n) if density[j] > density[i]]
        delta.append(min(denser) if denser else dmax)
    centres = sorted(range(n), key=lambda i: (-(density[i] * delta[i]), i))[:c]
    clusters = [[] for _ in range(c)]
    for i in range(n):
        if i in centres:
            clusters[centres.index(i)].append(i)
            continue
        best = min(range(c), key=lambda j: (D[centres[j]][i], j))
        clusters[best].append(i)
    merged = []
    for members in clusters:
        total = [sum(tokens[cand[i]][x] for i in members) for x in range(dim)]
        merged.append([t / (len(members) + 1e-6) for t in total])
    return (merged, [cand[i] for i in centres]) if with_centres else merged


def _random_case(seed: int, batch: int, width: int, dim: int, ties: bool = False):
    gen = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, width, dim, generator=gen)
    # clustered states, as real hidden states are: a few centres plus noise
    centres = torch.randn(batch, 4, dim, generator=gen) * 3
    visual = visual + centres[torch.arange(batch)[:, None], torch.randint(0, 4, (batch, width), generator=gen)]
    scores = torch.rand(batch, width, generator=gen)
    if ties:
        scores = torch.round(scores * 4) / 4  # many exact ties
    counts = torch.randint(width // 2, width + 1, (batch,), generator=gen)
    valid = torch.arange(width)[None, :] < counts[:, None]  # trailing padding slots
    keep = torch.stack([torch.randint(0, int(n) + 1, (1,), generator=gen)[0] for n in counts])
    return visual, scores, valid, keep


CASES = [(seed, batch, width, dim, ties)
         for seed, (batch, width, dim, ties) in enumerate([(3, 40, 8, False), (4, 96, 16, False), (2, 130, 5, True),
                                                          (3, 64, 12, True), (5, 25, 3, False)])]


@pytest.mark.parametrize("seed,batch,width,dim,ties", CASES)
def test_token_recycle_matches_brute_force(seed, batch, width, dim, ties):
    visual, scores, valid, keep = _random_case(seed, batch, width, dim, ties)
    keep[0] = int(valid[0].sum())  # a row that deletes nothing
    merged, merged_valid = token_ops.token_recycle(visual, scores, valid, keep)
    assert merged.shape[1] == token_ops.max_recycled_slots(width)
    for row in range(batch):
        expected = bf_recycle(visual[row].double().tolist(), scores[row].tolist(), valid[row].tolist(), int(keep[row]))
        got_valid = merged_valid[row].tolist()
        assert sum(got_valid) == len(expected)
        assert got_valid == [True] * len(expected) + [False] * (len(got_valid) - len(expected))
        if expected:
            torch.testing.assert_close(merged[row, :len(expected)].double(), torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,batch,width,dim,ties", CASES)
def test_recycle_centre_slots_match_brute_force(seed, batch, width, dim, ties):
    """The slot of each merged token's cluster centre (what Qwen2.5-VL's positions follow)."""
    visual, scores, valid, keep = _random_case(seed, batch, width, dim, ties)
    keep[0] = int(valid[0].sum())  # a row that deletes nothing
    centres = token_ops.recycle_centre_slots(visual, scores, valid, keep)
    assert centres.shape == (batch, token_ops.max_recycled_slots(width))
    for row in range(batch):
        _, expected = bf_recycle(visual[row].double().tolist(), scores[row].tolist(), valid[row].tolist(),
                                 int(keep[row]), with_centres=True)
        assert centres[row].tolist() == expected + [-1] * (centres.shape[1] - len(expected))


def test_recycle_counts_follow_the_authors_float_rule():
    for deleted in range(0, 700):
        pool = 0 if deleted == 0 else int(0.3 * deleted) + 1
        assert token_ops.recycle_pool_size(deleted) == pool
        assert token_ops.recycled_count(deleted) == (0 if deleted == 0 else int(pool / 10) + 1)
    # docs/accounting.md: v1.5 budget 192 on 576 tokens -> 9 / 4 / 3 merged tokens
    assert [token_ops.recycled_count(576 - 300), token_ops.recycled_count(309 - 200),
            token_ops.recycled_count(204 - 110)] == [9, 4, 3]


def test_token_recycle_single_candidate_is_the_token_itself():
    visual = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    merged, merged_valid = token_ops.token_recycle(visual, scores, valid, torch.tensor([3]))
    # d = 1 deleted (token 3): pool 1, one cluster = token 3 / (1 + 1e-6)
    assert merged_valid[0].tolist() == [True]  # slots: recycled_count(4) = 1
    torch.testing.assert_close(merged[0, 0], visual[0, 3] / (1 + 1e-6))


@pytest.mark.parametrize("seed,batch,width,dim,ties", CASES)
def test_token_prune_matches_brute_force(seed, batch, width, dim, ties):
    visual, scores, valid, keep = _random_case(seed + 100, batch, width, dim, ties)
    keep[-1] = 0  # a row that keeps nothing
    merged, merged_valid = token_ops.token_recycle(visual, scores, valid, keep)
    out_width = width + merged.shape[1]
    pruned, pruned_valid, source = token_ops.token_prune(visual, scores, valid, keep, merged, merged_valid, out_width)
    for row in range(batch):
        kept = bf_topk(scores[row].tolist(), valid[row].tolist(), int(keep[row]))
        merged_slots = [width + j for j in range(merged.shape[1]) if merged_valid[row, j]]
        expected_source = kept + merged_slots
        n = len(expected_source)
        assert source[row].tolist() == expected_source + [-1] * (out_width - n)
        assert pruned_valid[row].tolist() == [True] * n + [False] * (out_width - n)
        pool = torch.cat([visual[row], merged[row]])
        torch.testing.assert_close(pruned[row, :n], pool[expected_source])
        assert torch.all(pruned[row, n:] == 0)


def test_token_prune_shape_input_width():
    visual, scores, valid, keep = _random_case(7, 2, 30, 4)
    merged, merged_valid = token_ops.token_recycle(visual, scores, valid, keep)
    width = int((keep + merged_valid.sum(1)).max())
    a = token_ops.token_prune(visual, scores, valid, keep, merged, merged_valid, width)
    b = token_ops.token_prune(visual, scores, valid, keep, merged, merged_valid, torch.zeros(width, dtype=torch.long))
    assert a[0].shape[1] == width
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("k", [0, 1, 7, 19, 20])
def test_topk_token_select_matches_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    tokens = torch.randn(3, 20, 5, generator=gen)
    scores = torch.round(torch.rand(3, 20, generator=gen) * 3) / 3  # heavy ties
    scores[1] = 0.5  # a row of all-equal scores: the first k win
    selected, indices = token_ops.topk_token_select(tokens, scores, k)
    assert selected.shape == (3, k, 5) and indices.shape == (3, k)
    for row in range(3):
        expected = bf_topk(scores[row].tolist(), [True] * 20, k)
        assert indices[row].tolist() == expected
        torch.testing.assert_close(selected[row], tokens[row, expected])
    assert indices[1].tolist() == list(range(k))


@pytest.mark.parametrize("k", [-1, 21])
def test_topk_token_select_rejects_out_of_range_k(k):
    with pytest.raises(ValueError, match="k must be in"):
        token_ops.topk_token_select(torch.zeros(1, 20, 2), torch.zeros(1, 20), k)


# --------------------------------------------------------------------------------------
# Rank rules
# --------------------------------------------------------------------------------------


def _block(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    """A positive rows x cols matrix of exactly `rank` (product of positive factors)."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.rand(rows, rank, generator=gen, dtype=torch.float64) + 0.1
    right = torch.rand(rank, cols, generator=gen, dtype=torch.float64) + 0.1
    return (left @ right).float()


def _plan(**kw):
    return resolve(SparseVLMConfig(method="sparsevlm", **kw), num_layers=22)


@pytest.mark.parametrize("rows,cols,rank", [(6, 40, 3), (8, 30, 1), (5, 50, 5), (12, 12, 7), (4, 4, 4)])
def test_rank_of_constructed_blocks(rows, cols, rank):
    block = _block(rows, cols, rank, seed=rows * cols)
    assert token_ops.matrix_rank(block) == rank
    assert int(torch.linalg.matrix_rank(block)) == rank


def test_rank_keep_count_per_row_with_masks():
    """Two rows with different raters and visual widths; padding entries are garbage."""
    gen = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 9, 30, generator=gen) * 100  # full rank wherever it is used
    attention[0, :6, :20] = _block(6, 20, 2, seed=1)  # row 0: raters 0..5, 20 visual -> rank 2
    attention[1, 2:9, :25] = _block(7, 25, 4, seed=2)  # row 1: raters 2..8, 25 visual -> rank 4
    raters = torch.zeros(2, 9, dtype=torch.bool)
    raters[0, :6] = True
    raters[1, 2:] = True
    valid = torch.zeros(2, 30, dtype=torch.bool)
    valid[0, :20] = True
    valid[1, :25] = True

    v10 = _plan(variant="v1.0", scale=2.5, bias=1.0)
    ranks, keeps = token_ops.rank_keep_count(attention, raters, valid, lambda r, v: v10.keep_count(0, v, r))
    assert ranks.tolist() == [2, 4]
    assert keeps.tolist() == [int(2 * 2.5 + 1.0), int(4 * 2.5 + 1.0)]  # 6, 11

    paper = _plan(variant="paper", lam=0.5)
    _, keeps = token_ops.rank_keep_count(attention, raters, valid, lambda r, v: paper.keep_count(0, v, r))
    assert keeps.tolist() == [20 - int(0.5 * (20 - 2)), 25 - int(0.5 * (25 - 4))]  # 11, 15


def test_keep_count_rules_by_hand():
    v10 = _plan(variant="v1.0", budget=192)  # scripts' preset: scale 13.5, bias 0
    assert (v10.scale, v10.bias) == (13.5, 0.0)
    assert v10.keep_count(0, 576, 5) == 67  # int(67.5)
    assert v10.keep_count(1, 70, 5) == 67
    assert v10.keep_count(1, 60, 5) == 59  # capped at v - 1
    assert v10.keep_count(1, 5, 5) == 5  # v == rank: skip, nothing pruned
    v10b = _plan(variant="v1.0", budget=128)  # scale 9, bias 6
    assert v10b.keep_count(0, 576, 7) == 69
    paper = _plan(variant="paper", lam=0.3)
    assert paper.keep_count(0, 576, 6) == 576 - int(0.3 * 570)  # 405
    assert paper.keep_count(0, 10, 7) == 10  # int(0.3 * 3) = 0 deleted: skip
    assert paper.keep_count(0, 7, 7) == 7
    v15 = _plan(budget=64)
    assert [v15.keep_count(i, 576, None) for i in range(3)] == [66, 30, 17]
    assert v15.keep_count(2, 17, None) == 16  # min(schedule, v - 1)


def test_skip_layer_rank_equals_visual_count():
    """A block with as many independent rater rows as visual columns has rank v: v1.0 and
    paper keep all v tokens and nothing is recycled."""
    block = _block(9, 6, 6, seed=3)
    raters = torch.ones(1, 9, dtype=torch.bool)
    valid = torch.ones(1, 6, dtype=torch.bool)
    for plan in (_plan(variant="v1.0", scale=0.5, bias=0.0), _plan(variant="paper", lam=1.0)):
        ranks, keeps = token_ops.rank_keep_count(block[None], raters, valid, lambda r, v: plan.keep_count(0, v, r))
        assert ranks.tolist() == [6] and keeps.tolist() == [6]
        assert token_ops.recycled_count(6 - int(keeps[0])) == 0
        merged, merged_valid = token_ops.token_recycle(torch.randn(1, 6, 4), torch.rand(1, 6), valid, keeps)
        assert not merged_valid.any()
