"""The TensorRT plugins' kernel logic, run on the CPU, against the PyTorch reference.

Every plugin kernel does its per-element work in `__host__ __device__` functions
(`trt_plugins/<Op>/<op>.h`); `trt_plugins/tests/host_ops.cpp` runs those same functions
serially behind a C ABI. This file compiles it with the system C++ compiler and compares it
with `sparsevlm.methods.token_ops` in float32, including the edge cases of the contract
(k = 0, k = N, tied scores, NaN and +-inf scores, rank-deficient blocks, rows with different
keep counts) and the edges of the kernels' tiling (TokenRecycle's Gram tiles and hidden-size
slices, RankKeepCount's scan chunks), whose sizes the library reports. Masks cross the plugin
boundary as int32: they go in as int32 (any nonzero value is true) and must come out as
exactly 0 or 1. Every output buffer is followed by guard elements that must stay untouched (a
kernel that writes past its output fails here).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsevlm.methods import token_ops

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "trt_plugins"


# Compiled once per session: tests/test_trt_plugin_parity.py imports the fixture too (pytest
# makes one instance of an imported module-scoped fixture per module).
_HOST_OPS: list[ctypes.CDLL] = []


@pytest.fixture(scope="module")
def host_ops(tmp_path_factory) -> ctypes.CDLL:
    if _HOST_OPS:
        return _HOST_OPS[0]
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH to build trt_plugins/tests/host_ops.cpp")
    library = tmp_path_factory.mktemp("host_ops") / "libsparsevlm_host_ops.so"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    str(PLUGIN_DIR / "tests" / "host_ops.cpp"), "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.sparsevlm_token_recycle.restype = ctypes.c_int64
    _HOST_OPS.append(lib)
    return lib


def _ptr(array: np.ndarray) -> ctypes.c_void_p:
    assert array.flags.c_contiguous
    return ctypes.c_void_p(array.ctypes.data)


def _i64(*values: int) -> list[ctypes.c_int64]:
    return [ctypes.c_int64(v) for v in values]


GUARD = 64  # elements after every output buffer that the host path must leave alone


class Output:
    """An output buffer of `shape` filled with `fill`, followed by GUARD elements of `fill`."""

    def __init__(self, shape, dtype, fill):
        self.shape, self.fill = tuple(shape), fill
        self.buffer = np.full(int(np.prod(self.shape)) + GUARD, fill, dtype=dtype)

    @property
    def ptr(self) -> ctypes.c_void_p:
        return _ptr(self.buffer)

    def tensor(self) -> torch.Tensor:
        guard = self.buffer[self.buffer.size - GUARD:]
        assert (np.isnan(guard) if np.isnan(self.fill) else guard == self.fill).all(), "wrote past the output"
        return torch.from_numpy(self.buffer[:self.buffer.size - GUARD].reshape(self.shape).copy())


def _mask_in(mask: torch.Tensor, true_value: int = 1) -> np.ndarray:
    """A mask (bool, or int32 0/1) as the plugins take it: int32, nonzero = true (`true_value`)."""
    return np.ascontiguousarray(mask.numpy().astype(np.int32) * np.int32(true_value))


def _mask_out(values: torch.Tensor) -> torch.Tensor:
    """An int32 mask the plugins wrote: exactly 0 or 1, returned as bool."""
    assert values.dtype == torch.int32 and bool(((values == 0) | (values == 1)).all()), values
    return values.bool()


# ---------------------------------------------------------------------------------------------
# TopKTokenSelect


def run_topk(lib, tokens: torch.Tensor, scores: torch.Tensor, k: int):
    batch, num_tokens, dim = tokens.shape
    tokens_np, scores_np = tokens.numpy().copy(), scores.numpy().copy()
    selected = Output((batch, k, dim), np.float32, np.nan)
    indices = Output((batch, k), np.int64, -7)
    status = lib.sparsevlm_topk_token_select(_ptr(tokens_np), _ptr(scores_np), selected.ptr, indices.ptr,
                                             *_i64(batch, num_tokens, dim, k))
    assert status == 0
    return selected.tensor(), indices.tensor()


@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_topk_token_select_matches_reference(host_ops, k):
    generator = torch.Generator().manual_seed(k)
    tokens = torch.randn(3, 20, 5, generator=generator)
    scores = torch.randn(3, 20, generator=generator)
    selected, indices = run_topk(host_ops, tokens, scores, k)
    want_selected, want_indices = token_ops.topk_token_select(tokens, scores, k)
    assert torch.equal(indices, want_indices)
    assert torch.equal(selected, want_selected)


def test_topk_token_select_ties_keep_the_lower_index(host_ops):
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0]])
    tokens = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    # Hand-computed: the 3s at slots 1, 2, 4, then the first 2 (slot 3) beats slot 5.
    _, indices = run_topk(host_ops, tokens, scores, 4)
    assert indices.tolist() == [[1, 2, 3, 4]]
    many_ties = torch.randint(0, 3, (4, 30), generator=torch.Generator().manual_seed(1)).float()
    tokens = torch.randn(4, 30, 3)
    for k in (5, 17, 29):
        selected, indices = run_topk(host_ops, tokens, many_ties, k)
        want_selected, want_indices = token_ops.topk_token_select(tokens, many_ties, k)
        assert torch.equal(indices, want_indices)
        assert torch.equal(selected, want_selected)


def special_scores(batch: int, num: int, seed: int) -> torch.Tensor:
    """Scores with many ties, NaN, +inf and -inf mixed in; row 0 all NaN, row 1 all -inf."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (batch, num), generator=generator).float()
    pick = torch.rand(batch, num, generator=generator)
    scores = torch.where(pick < 0.2, float("nan"), scores)
    scores = torch.where((pick >= 0.2) & (pick < 0.3), float("inf"), scores)
    scores = torch.where((pick >= 0.3) & (pick < 0.4), float("-inf"), scores)
    scores[0] = float("nan")
    scores[1] = float("-inf")
    return scores


def _sorted_nan_last(values: torch.Tensor) -> list[str]:
    """The values in ascending order, NaN last, as text (NaN != NaN, but 'nan' == 'nan')."""
    return [repr(v) for v in sorted(values.tolist(), key=lambda v: (v != v, v if v == v else 0.0))]


@pytest.mark.parametrize("k", [0, 1, 6, 19, 20])
def test_topk_token_select_nan_counts_as_largest(host_ops, k):
    # torch.topk orders NaN above every number (+inf too): the host path must select the same
    # k scores, exactly k indices, and never write past its outputs (the old comparison let
    # every NaN rank first, flagged more than k slots and wrote indices past the row).
    scores = special_scores(4, 20, seed=k)
    tokens = torch.randn(4, 20, 3, generator=torch.Generator().manual_seed(100 + k))
    selected, indices = run_topk(host_ops, tokens, scores, k)
    want_selected, want_indices = token_ops.topk_token_select(tokens, scores, k)
    assert torch.equal(indices, want_indices)
    assert torch.equal(selected, want_selected)
    for row in range(4):
        assert len(set(indices[row].tolist())) == k
        assert _sorted_nan_last(scores[row, indices[row]]) == _sorted_nan_last(torch.topk(scores[row], k).values)


def test_topk_token_select_refuses_k_above_n(host_ops):
    tokens, scores = torch.randn(2, 3, 4), torch.randn(2, 3)
    selected = Output((2, 5, 4), np.float32, np.nan)
    indices = Output((2, 5), np.int64, -7)
    status = host_ops.sparsevlm_topk_token_select(_ptr(tokens.numpy().copy()), _ptr(scores.numpy().copy()),
                                                  selected.ptr, indices.ptr, *_i64(2, 3, 4, 5))
    assert status == -1
    assert (indices.tensor() == -7).all() and selected.tensor().isnan().all()


# ---------------------------------------------------------------------------------------------
# TokenPrune


def run_prune(lib, visual, scores, visual_valid, keep_count, merged, merged_valid, width, true_value=1):
    """The host path on torch inputs (bool masks, converted to int32); bool masks back."""
    batch, num_visual, dim = visual.shape
    num_merged = merged.shape[1]
    arrays = [visual.numpy().copy(), scores.numpy().copy(), _mask_in(visual_valid, true_value),
              keep_count.numpy().copy(), merged.numpy().copy(), _mask_in(merged_valid, true_value)]
    pruned = Output((batch, width, dim), np.float32, np.nan)
    pruned_valid = Output((batch, width), np.int32, 7)
    source_index = Output((batch, width), np.int64, 99)
    lib.sparsevlm_token_prune(*[_ptr(a) for a in arrays], pruned.ptr, pruned_valid.ptr, source_index.ptr,
                              *_i64(batch, num_visual, num_merged, dim, width))
    return pruned.tensor(), _mask_out(pruned_valid.tensor()), source_index.tensor()


def prune_case(seed: int, tied_scores: bool = False):
    generator = torch.Generator().manual_seed(seed)
    batch, num_visual, num_merged, dim = 4, 24, 5, 6
    visual = torch.randn(batch, num_visual, dim, generator=generator)
    if tied_scores:
        scores = torch.randint(0, 4, (batch, num_visual), generator=generator).float()
    else:
        scores = torch.randn(batch, num_visual, generator=generator)
    visual_valid = torch.rand(batch, num_visual, generator=generator) > 0.25
    visual_valid[0] = True
    valid_counts = visual_valid.sum(1)
    # Different keep counts per row: none, all valid ones, and two in between.
    keep_count = torch.stack([torch.tensor(0), valid_counts[1], valid_counts[2] // 2, valid_counts[3] - 3])
    merged = torch.randn(batch, num_merged, dim, generator=generator)
    merged_valid = torch.tensor([[True] * 5, [False] * 5, [True, True, False, False, False], [True] * 3 + [False] * 2])
    return visual, scores, visual_valid, keep_count, merged, merged_valid


@pytest.mark.parametrize("tied_scores", [False, True])
@pytest.mark.parametrize("extra_width", [0, 4, -3])
def test_token_prune_matches_reference(host_ops, tied_scores, extra_width):
    case = prune_case(3, tied_scores)
    needed = int((token_ops.topk_keep_mask(case[1], case[2], case[3]).sum(1) + case[5].sum(1)).max())
    width = needed + extra_width  # exact, padded, truncated
    got = run_prune(host_ops, *case, width)
    want = token_ops.token_prune(*case, width)
    for name, g, w in zip(("pruned", "pruned_valid", "source_index"), got, want):
        assert torch.equal(g, w), name


def test_token_prune_hand_computed_row(host_ops):
    visual = torch.tensor([[[10.0], [11.0], [12.0], [13.0]]])
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1]])
    visual_valid = torch.tensor([[True, False, True, True]])
    merged = torch.tensor([[[20.0], [21.0]]])
    merged_valid = torch.tensor([[False, True]])
    pruned, valid, source = run_prune(host_ops, visual, scores, visual_valid, torch.tensor([2]), merged,
                                      merged_valid, 5)
    # Slot 1 is invalid, so the two best valid ones are 2 (0.9) and 0 (0.5); then merged slot 1.
    assert source.tolist() == [[0, 2, 5, -1, -1]]
    assert valid.tolist() == [[True, True, True, False, False]]
    assert pruned[0, :, 0].tolist() == [10.0, 12.0, 21.0, 0.0, 0.0]


@pytest.mark.parametrize("extra_width", [0, -3])
def test_token_prune_nan_and_inf_scores_match_reference(host_ops, extra_width):
    visual, _, visual_valid, keep_count, merged, merged_valid = prune_case(5)
    scores = special_scores(4, 24, seed=5)
    needed = int((token_ops.topk_keep_mask(scores, visual_valid, keep_count).sum(1) + merged_valid.sum(1)).max())
    width = needed + extra_width
    got = run_prune(host_ops, visual, scores, visual_valid, keep_count, merged, merged_valid, width)
    want = token_ops.token_prune(visual, scores, visual_valid, keep_count, merged, merged_valid, width)
    for name, g, w in zip(("pruned", "pruned_valid", "source_index"), got, want):
        assert torch.equal(g, w), name


def test_token_prune_keeps_exactly_keep_count_with_nan_scores(host_ops):
    # Every valid slot scored NaN, some +inf: NaN ranks first (lower index on ties), exactly 5 kept.
    visual = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1)
    scores = torch.tensor([[float("nan"), 1.0, float("inf"), float("nan"), 2.0, float("nan"), float("nan"),
                            float("nan"), float("inf"), float("nan")]])
    visual_valid = torch.tensor([[True, True, True, False, True, True, True, False, True, True]])
    merged, merged_valid = torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.bool)
    _, valid, source = run_prune(host_ops, visual, scores, visual_valid, torch.tensor([5]), merged, merged_valid, 8)
    # Valid NaNs: slots 0, 5, 6, 9 (3 and 7 are invalid); then +inf at 2 (before 8).
    assert source.tolist() == [[0, 2, 5, 6, 9, -1, -1, -1]]
    assert valid.sum().item() == 5


def test_token_prune_reads_any_nonzero_mask_value_as_true(host_ops):
    case = prune_case(3)
    width = 30
    ones = run_prune(host_ops, *case, width, true_value=1)
    for true_value in (-1, 7, 2 ** 31 - 1):
        other = run_prune(host_ops, *case, width, true_value=true_value)
        for a, b in zip(ones, other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# TokenRecycle


def run_recycle(lib, visual, scores, visual_valid, keep_count, candidate_percent, cluster_divisor, true_value=1):
    batch, num_visual, dim = visual.shape
    width = lib.sparsevlm_token_recycle(None, None, None, None, None, None, *_i64(batch, num_visual, dim,
                                                                                  candidate_percent, cluster_divisor))
    arrays = [visual.numpy().copy(), scores.numpy().copy(), _mask_in(visual_valid, true_value),
              keep_count.numpy().copy()]
    merged = Output((batch, width, dim), np.float32, np.nan)
    merged_valid = Output((batch, width), np.int32, 7)
    lib.sparsevlm_token_recycle(*[_ptr(a) for a in arrays], merged.ptr, merged_valid.ptr,
                                *_i64(batch, num_visual, dim, candidate_percent, cluster_divisor))
    return merged.tensor(), _mask_out(merged_valid.tensor())


@pytest.mark.parametrize("candidate_percent,cluster_divisor", [(30, 10), (50, 3), (99, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_token_recycle_matches_reference(host_ops, candidate_percent, cluster_divisor, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, num_visual, dim = 4, 40, 16
    visual = torch.randn(batch, num_visual, dim, generator=generator)
    scores = torch.randn(batch, num_visual, generator=generator)
    visual_valid = torch.rand(batch, num_visual, generator=generator) > 0.2
    valid_counts = visual_valid.sum(1)
    # Rows: everything kept (nothing to recycle), one deleted, about half, almost all deleted.
    keep_count = torch.stack([valid_counts[0], valid_counts[1] - 1, valid_counts[2] // 2, torch.tensor(2)])
    merged, merged_valid = run_recycle(host_ops, visual, scores, visual_valid, keep_count, candidate_percent,
                                       cluster_divisor)
    want_merged, want_valid = token_ops.token_recycle(visual, scores, visual_valid, keep_count, candidate_percent,
                                                      cluster_divisor)
    assert merged.shape == want_merged.shape == (batch, token_ops.max_recycled_slots(num_visual, candidate_percent,
                                                                                      cluster_divisor), dim)
    assert torch.equal(merged_valid, want_valid)
    # Distances and means are float32 but summed in another order than torch's BLAS: close, not equal.
    torch.testing.assert_close(merged, want_merged, rtol=1e-5, atol=1e-5)
    deleted = visual_valid.sum(1) - keep_count
    assert merged_valid.sum(1).tolist() == [token_ops.recycled_count(int(d), candidate_percent, cluster_divisor)
                                            for d in deleted]
    assert not merged_valid[0].any() and (merged[0] == 0).all()


def test_token_recycle_hand_computed_row(host_ops):
    # Four deleted tokens at 0, 0, 10, 10 (D = 1) and keep_count 0; candidate_percent 99 gives a
    # pool of all 4 and cluster_divisor 2 gives 3 clusters. Hand-computed: dist = |x_i - x_j|;
    # the 3 nearest of each token are {0, 0, 10}: rho = exp(-100 / 3) for all, so no token is
    # strictly denser and delta = 10 everywhere; the centre scores tie and the lower candidate
    # index wins: centres are candidates 0, 1, 2 (by descending score: slots 3, 0, 1 with scores
    # 4, 3, 2), and candidate 3 (slot 2, x = 10) joins its nearest centre, candidate 2 (slot 1,
    # x = 10). Means: 0 / (1 + eps), 0 / (1 + eps), 20 / (2 + eps).
    visual = torch.tensor([[[0.0], [10.0], [10.0], [0.0]]])
    scores = torch.tensor([[3.0, 2.0, 1.0, 4.0]])
    merged, valid = run_recycle(host_ops, visual, scores, torch.ones(1, 4, dtype=torch.bool), torch.tensor([0]), 99, 2)
    assert valid.tolist() == [[True, True, True]]
    assert merged[0, :, 0].tolist() == pytest.approx([0.0, 0.0, 20.0 / (2.0 + 1e-6)], rel=1e-6)
    want, _ = token_ops.token_recycle(visual, scores, torch.ones(1, 4, dtype=torch.bool), torch.tensor([0]), 99, 2)
    torch.testing.assert_close(merged, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_token_recycle_nan_and_inf_scores_match_reference(host_ops, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, num_visual, dim = 4, 40, 16
    visual = torch.randn(batch, num_visual, dim, generator=generator)
    scores = special_scores(batch, num_visual, seed=seed)
    visual_valid = torch.rand(batch, num_visual, generator=generator) > 0.2
    keep_count = torch.tensor([3, 10, int(visual_valid[2].sum()) // 2, 0])
    merged, merged_valid = run_recycle(host_ops, visual, scores, visual_valid, keep_count, 30, 10, true_value=-5)
    want_merged, want_valid = token_ops.token_recycle(visual, scores, visual_valid, keep_count)
    assert torch.equal(merged_valid, want_valid)
    torch.testing.assert_close(merged, want_merged, rtol=1e-5, atol=1e-5)


def test_token_recycle_is_safe_on_non_finite_tokens(host_ops):
    # NaN / inf in the tokens make distances and densities NaN: no reference to compare with, but
    # the host path must still pick exactly c centres, write every output element exactly once
    # and nothing past them (the guards), and mark exactly c slots valid.
    generator = torch.Generator().manual_seed(3)
    visual = torch.randn(3, 40, 8, generator=generator)
    visual[0, ::3] = float("nan")
    visual[1] = float("inf")
    visual[2, :, 0] = float("-inf")
    scores = torch.randn(3, 40, generator=generator)
    visual_valid = torch.ones(3, 40, dtype=torch.bool)
    keep_count = torch.tensor([5, 0, 20])
    _, merged_valid = run_recycle(host_ops, visual, scores, visual_valid, keep_count, 30, 10)
    assert merged_valid.sum(1).tolist() == [token_ops.recycled_count(40 - int(k)) for k in keep_count]


def test_token_recycle_zero_visual_tokens(host_ops):
    # V = 0: OPS.md's shape rule gives pool(0) = 1 and C = 1 (the width getOutputShapes states);
    # nothing can be deleted, so that one slot is written as zeros with merged_valid 0.
    merged, merged_valid = run_recycle(host_ops, torch.zeros(2, 0, 4), torch.zeros(2, 0),
                                       torch.zeros(2, 0, dtype=torch.bool), torch.tensor([0, 3]), 30, 10)
    assert merged.shape == (2, 1, 4) and merged_valid.shape == (2, 1)
    assert (merged == 0).all() and not merged_valid.any()


def tiling(lib) -> tuple[int, int, int]:
    """(Gram tile, hidden-size slice, threads per block = scan chunk) as the kernels use them."""
    sizes = np.zeros(3, np.int64)
    lib.sparsevlm_tiling(_ptr(sizes))
    return int(sizes[0]), int(sizes[1]), int(sizes[2])


def deleted_for_pool(pool: int, candidate_percent: int) -> int:
    """The smallest number of deleted tokens whose recycling pool has `pool` candidates."""
    return next(d for d in range(1, 1000) if token_ops.recycle_pool_size(d, candidate_percent) == pool)


def tile_edge_case(pools: list[int], dim: int, candidate_percent: int, seed: int):
    """One batch row per pool size, each with its own valid and deleted counts."""
    generator = torch.Generator().manual_seed(seed)
    deleted = [deleted_for_pool(p, candidate_percent) for p in pools]
    num_visual = max(deleted) + 9
    visual = torch.randn(len(pools), num_visual, dim, generator=generator)
    scores = torch.randn(len(pools), num_visual, generator=generator)
    visual_valid = torch.ones(len(pools), num_visual, dtype=torch.bool)
    for row in range(len(pools)):
        visual_valid[row, torch.randperm(num_visual, generator=generator)[:row % 4]] = False  # 0-3 invalid slots
    keep_count = visual_valid.sum(1) - torch.tensor(deleted)
    assert bool((keep_count >= 1).all())
    return visual, scores, visual_valid, keep_count


def run_recycle_distances(lib, visual, scores, visual_valid, keep_count, candidate_percent, cluster_divisor):
    batch, num_visual, dim = visual.shape
    bound = (candidate_percent * num_visual) // 100 + 1
    arrays = [visual.numpy().copy(), scores.numpy().copy(), _mask_in(visual_valid), keep_count.numpy().copy()]
    distances = np.full((batch, bound, bound), np.nan, np.float32)
    pool = np.full(batch, -1, np.int64)
    row_max = np.full(batch, np.nan, np.float32)
    lib.sparsevlm_token_recycle_distances(*[_ptr(a) for a in arrays], _ptr(distances), _ptr(pool), _ptr(row_max),
                                          *_i64(batch, num_visual, dim, candidate_percent, cluster_divisor))
    return torch.from_numpy(distances), pool.tolist(), row_max.tolist()


@pytest.mark.parametrize("dim_from_slice", [-1, 1, 35])
def test_token_recycle_gram_tiles_match_brute_force_distances(host_ops, dim_from_slice):
    # Pools of 1, tile - 1, tile, tile + 1 and 2 tiles + 1 candidates (one per batch row, each row
    # with its own valid and deleted counts), and a hidden size just under, just over and well
    # past a multiple of the slice: every edge of the tiled Gram product. The distance matrices
    # left by the CPU path must match float64 cdist of the reference's candidates, be exactly
    # symmetric with a zero diagonal, the row max (a reduction over lanes) must be their largest
    # entry, and the merged tokens must match the reference.
    tile, slice_, _ = tiling(host_ops)
    pools = [1, tile - 1, tile, tile + 1, 2 * tile + 1]
    dim = slice_ + dim_from_slice if dim_from_slice < slice_ else 2 * slice_ + 3
    case = tile_edge_case(pools, dim, 99, seed=dim)
    visual, scores, visual_valid, keep_count = case
    distances, pool, row_max = run_recycle_distances(host_ops, *case, 99, 3)
    assert pool == pools
    deleted = visual_valid & ~token_ops.topk_keep_mask(scores, visual_valid, keep_count)
    order = token_ops.sort_order(scores.masked_fill(~deleted, float("-inf")), descending=True)
    for row, p in enumerate(pools):
        candidates = visual[row, order[row, :p]].double()
        want = torch.cdist(candidates, candidates) / dim ** 0.5
        got = distances[row, :p, :p]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, got.T) and bool((got.diagonal() == 0).all())
        assert row_max[row] == got.max().item()
    merged, merged_valid = run_recycle(host_ops, *case, 99, 3)
    want_merged, want_valid = token_ops.token_recycle(*case, 99, 3)
    assert torch.equal(merged_valid, want_valid)
    torch.testing.assert_close(merged, want_merged, rtol=1e-5, atol=1e-5)


def test_token_recycle_row_max_is_reduced_over_every_lane(host_ops):
    # The row's max distance is a block reduction: lane l takes entries l, l + lanes, ... of the
    # P x P matrix, then a tree halves the lanes. Two candidates far from all others put the
    # unique max (both copies, (i, j) and (j, i)) in lanes of the upper half, one of them in the
    # last lane: a tree that drops lanes or a step loses it.
    _, _, lanes = tiling(host_ops)
    pool, pair = next((p, (i, j)) for p in range(lanes // 8, 101) for i in range(p) for j in range(i + 1, p)
                      if (i * p + j) % lanes == lanes - 1 and (j * p + i) % lanes >= lanes // 2)
    generator = torch.Generator().manual_seed(9)
    visual = torch.rand(1, pool, 8, generator=generator)
    visual[0, pair[0]] += 10.0
    visual[0, pair[1]] -= 10.0
    scores = -torch.arange(pool, dtype=torch.float32)[None]  # candidate r is slot r
    case = (visual, scores, torch.ones(1, pool, dtype=torch.bool), torch.tensor([0]))
    assert deleted_for_pool(pool, 99) == pool
    distances, got_pool, row_max = run_recycle_distances(host_ops, *case, 99, 3)
    want = torch.cdist(visual[0].double(), visual[0].double()) / 8 ** 0.5
    assert got_pool == [pool]
    assert row_max[0] == pytest.approx(float(want.max()), rel=1e-6) == distances[0, pair[0], pair[1]].item()


def test_token_recycle_tile_edges_at_the_default_pool(host_ops):
    # The default candidate share (30 %) over several tiles of candidates, rows of different
    # deleted counts (pools 1, tile + 1, 3 tiles - 1), hidden size not a multiple of the slice.
    tile, slice_, _ = tiling(host_ops)
    case = tile_edge_case([1, tile + 1, 3 * tile - 1], 3 * slice_ - 5, 30, seed=4)
    merged, merged_valid = run_recycle(host_ops, *case, 30, 10)
    want_merged, want_valid = token_ops.token_recycle(*case, 30, 10)
    assert torch.equal(merged_valid, want_valid)
    torch.testing.assert_close(merged, want_merged, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# RankKeepCount

RULES = {"v1.0": 0, "paper": 1}


def reference_keep(rule: str, rank: int, visual: int, scale: float, bias: float, lam: float) -> int:
    """The keep rules of export/OPS.md, written out independently of the C++ code."""
    if rule == "v1.0":
        return visual if visual == rank else min(max(int(rank * scale + bias), 0), visual - 1)
    deleted = int(lam * (visual - rank))
    return visual if deleted == 0 else max(visual - deleted, 0)


def run_rank(lib, attention, raters, visual_valid, rule, scale, bias, lam):
    batch, num_raters, num_visual = attention.shape
    arrays = [attention.numpy().copy(), _mask_in(raters), _mask_in(visual_valid)]
    rank = Output((batch,), np.int64, -9)
    keep = Output((batch,), np.int64, -9)
    lib.sparsevlm_rank_keep_count(*[_ptr(a) for a in arrays], rank.ptr, keep.ptr,
                                  *_i64(batch, num_raters, num_visual), ctypes.c_int32(RULES[rule]),
                                  ctypes.c_double(scale), ctypes.c_double(bias), ctypes.c_double(lam))
    return rank.tensor(), keep.tensor()


def rank_cases():
    """Attention blocks [B, T, V] with masks; rows of known, often deficient, rank."""
    generator = torch.Generator().manual_seed(5)
    batch, num_raters, num_visual = 6, 7, 12
    attention = torch.rand(batch, num_raters, num_visual, generator=generator).softmax(-1)
    raters = torch.ones(batch, num_raters, dtype=torch.bool)
    visual_valid = torch.ones(batch, num_visual, dtype=torch.bool)
    # Row 1: repeated rows -> rank 3. Row 2: a zero row and rank-1 rows.
    attention[1, 3:] = attention[1, :3].repeat(2, 1)[: num_raters - 3]
    u = torch.rand(num_raters, 1, generator=generator)
    attention[2] = u @ torch.rand(1, num_visual, generator=generator)
    attention[2, 4] = 0.0
    # Row 3: rank 2 from a product, some raters and columns masked out.
    attention[3] = torch.rand(num_raters, 2, generator=generator) @ torch.rand(2, num_visual, generator=generator)
    raters[3, [0, 5]] = False
    visual_valid[3, [1, 2, 8]] = False
    # Row 4: more raters than valid columns (m > n), full column rank 3.
    visual_valid[4, 3:] = False
    # Row 5: no raters at all -> rank 0.
    raters[5] = False
    return attention, raters, visual_valid


@pytest.mark.parametrize("rule,scale,bias,lam", [("v1.0", 13.5, 0.0, 0.0), ("v1.0", 0.5, 1.0, 0.0),
                                                  ("paper", 1.0, 0.0, 0.5), ("paper", 1.0, 0.0, 2.0)])
def test_rank_keep_count_matches_reference(host_ops, rule, scale, bias, lam):
    attention, raters, visual_valid = rank_cases()
    rank, keep = run_rank(host_ops, attention, raters, visual_valid, rule, scale, bias, lam)
    rule_fn = lambda r, v: reference_keep(rule, r, v, scale, bias, lam)  # noqa: E731
    want_rank, want_keep = token_ops.rank_keep_count(attention, raters, visual_valid, rule_fn)
    assert rank.tolist() == want_rank.tolist()
    assert rank.tolist() == [7, 3, 1, 2, 3, 0]  # by construction
    assert keep.tolist() == want_keep.tolist()


def test_rank_keep_count_random_blocks(host_ops):
    generator = torch.Generator().manual_seed(11)
    for true_rank in range(0, 6):
        left = torch.randn(4, 9, true_rank, generator=generator)
        right = torch.randn(4, true_rank, 15, generator=generator)
        attention = (left @ right).contiguous()
        raters = torch.ones(4, 9, dtype=torch.bool)
        visual_valid = torch.rand(4, 15, generator=generator) > 0.3
        rank, keep = run_rank(host_ops, attention, raters, visual_valid, "v1.0", 2.0, 1.0, 0.0)
        want_rank, want_keep = token_ops.rank_keep_count(
            attention, raters, visual_valid, lambda r, v: reference_keep("v1.0", r, v, 2.0, 1.0, 0.0))
        assert rank.tolist() == want_rank.tolist() == [true_rank] * 4
        assert keep.tolist() == want_keep.tolist()


def test_rank_keep_count_tolerance_keeps_small_genuine_singular_values(host_ops):
    # Singular values 1, 0.3, 1e-3, 1e-5 are all above eps_f32 * max(m, n) * sigma_max ~ 1.4e-6;
    # 1e-10 is below it (and below float32 rounding). Hand-computed rank: 4.
    generator = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(8, 5, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 5, generator=generator, dtype=torch.float64))
    singular = torch.tensor([1.0, 0.3, 1e-3, 1e-5, 1e-10], dtype=torch.float64)
    attention = ((u * singular) @ v.T).float()[None].contiguous()
    raters = torch.ones(1, 8, dtype=torch.bool)
    visual_valid = torch.ones(1, 12, dtype=torch.bool)
    rank, _ = run_rank(host_ops, attention, raters, visual_valid, "paper", 1.0, 0.0, 1.0)
    want_rank, _ = token_ops.rank_keep_count(attention, raters, visual_valid, lambda r, v: 0)
    assert rank.tolist() == want_rank.tolist() == [4]


@pytest.mark.parametrize("rule,scale,bias,lam,want_keep", [("v1.0", 0.7, 0.0, 0.0, 7), ("paper", 1.0, 0.0, 0.7, 13)])
def test_rank_keep_count_rule_numbers_are_double(host_ops, rule, scale, bias, lam, want_keep):
    # Rank 10 of 20 valid columns. Python (the reference) computes 10 * 0.7 = 7.000000000000001
    # and int() gives 7; with 0.7 rounded to float32 first (0.69999999) the product is 6.9999998
    # and the rule would keep 6 (v1.0) or delete 6 instead of 7 (paper).
    generator = torch.Generator().manual_seed(8)
    attention = (torch.randn(1, 12, 10, generator=generator) @ torch.randn(1, 10, 20, generator=generator)).contiguous()
    raters = torch.ones(1, 12, dtype=torch.bool)
    visual_valid = torch.ones(1, 20, dtype=torch.bool)
    rank, keep = run_rank(host_ops, attention, raters, visual_valid, rule, scale, bias, lam)
    assert rank.tolist() == [10]
    assert keep.tolist() == [reference_keep(rule, 10, 20, scale, bias, lam)] == [want_keep]


def test_rank_mask_positions_are_exclusive_prefix_sums(host_ops):
    # The block scan that places each rater row and valid column, at the edges of its chunks.
    _, _, chunk = tiling(host_ops)
    generator = np.random.default_rng(6)
    for n in (0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk + 3):
        mask = np.where(generator.random(n) < 0.6, generator.choice([1, -3, 7], n), 0).astype(np.int32)
        position = np.full(n + GUARD, -5, np.int32)
        total = host_ops.sparsevlm_mask_positions(_ptr(mask), ctypes.c_int64(n), _ptr(position))
        set_flags = (mask != 0).astype(np.int64)
        assert total == set_flags.sum()
        assert position[:n].tolist() == (np.cumsum(set_flags) - set_flags).tolist()
        assert (position[n:] == -5).all()


def run_singular_values(lib, attention, raters, visual_valid) -> np.ndarray:
    batch, num_raters, num_visual = attention.shape
    arrays = [attention.numpy().copy(), _mask_in(raters), _mask_in(visual_valid)]
    singular = np.full((batch, min(num_raters, num_visual)), np.nan)
    lib.sparsevlm_rank_singular_values(*[_ptr(a) for a in arrays], _ptr(singular),
                                       *_i64(batch, num_raters, num_visual))
    return singular


@pytest.mark.parametrize("num_raters,num_visual", [("chunk+1", 12), (9, "2*chunk+3")])
def test_rank_keep_count_across_scan_chunks(host_ops, num_raters, num_visual):
    # Masks longer than one scan chunk (more raters than valid columns, so the block is stored
    # transposed; or more visual tokens than a chunk), rows with different valid counts and
    # known ranks. A rater or column placed wrongly changes the block: its singular values (from
    # the stage-4 reductions) must be torch's, and rank and keep count the reference's.
    _, _, chunk = tiling(host_ops)
    sizes = {"chunk+1": chunk + 1, "2*chunk+3": 2 * chunk + 3}
    num_raters, num_visual = sizes.get(num_raters, num_raters), sizes.get(num_visual, num_visual)
    generator = torch.Generator().manual_seed(num_raters)
    batch = 3
    ranks = [1, 4, min(num_raters, num_visual) - 2]
    attention = torch.stack([torch.rand(num_raters, r, generator=generator)
                             @ torch.rand(r, num_visual, generator=generator) for r in ranks]).contiguous()
    raters = torch.ones(batch, num_raters, dtype=torch.bool)
    visual_valid = torch.ones(batch, num_visual, dtype=torch.bool)
    raters[1, 0] = raters[2, [1, -1]] = False  # different valid counts per row, across the chunks
    if num_visual > chunk:
        visual_valid[1, [0, chunk - 1, chunk]] = False
        visual_valid[2, chunk + 1:chunk + 40] = False
    rule = lambda r, v: reference_keep("v1.0", r, v, 13.5, 0.0, 0.0)  # noqa: E731
    rank, keep = run_rank(host_ops, attention, raters, visual_valid, "v1.0", 13.5, 0.0, 0.0)
    want_rank, want_keep = token_ops.rank_keep_count(attention, raters, visual_valid, rule)
    assert rank.tolist() == want_rank.tolist() == ranks
    assert keep.tolist() == want_keep.tolist()
    singular = run_singular_values(host_ops, attention, raters, visual_valid)
    for row in range(batch):
        block = attention[row][raters[row]][:, visual_valid[row]].double()
        want = torch.linalg.svdvals(block).numpy()
        got = np.sort(singular[row, :want.size])[::-1]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * want[0])
