// The kernels' per-element code, run on the CPU: a C ABI over each op's runOnHost, so
// tests/test_trt_plugin_kernels.py can drive it with ctypes and compare with the PyTorch
// reference. Built by a plain C++ compiler; float32 only (float16 needs the CUDA headers).
// Masks are int32 0/1, as at the plugin boundary.
#include "../RankKeepCount/rank_keep_count.h"
#include "../TokenPrune/token_prune.h"
#include "../TokenRecycle/token_recycle.h"
#include "../TopKTokenSelect/topk_token_select.h"

#include <vector>

using namespace sparsevlm;

namespace
{
// Workspace as the plugins size it; a vector of doubles keeps it 8-byte aligned.
std::vector<double> workspaceOf(int64_t bytes)
{
    return std::vector<double>(static_cast<size_t>(bytes / 8 + 1));
}
} // namespace

extern "C"
{

// Returns 0, or -1 (nothing written) when k is outside [0, N], which the plugin refuses.
int32_t sparsevlm_topk_token_select(float const* tokens, float const* scores, float* selected, int64_t* indices,
    int64_t batch, int64_t numTokens, int64_t dim, int64_t k)
{
    if (k < 0 || k > numTokens)
    {
        return -1;
    }
    std::vector<double> workspace = workspaceOf(topk::workspaceSize(batch, numTokens));
    topk::runOnHost(tokens, scores, selected, indices, batch, numTokens, dim, k, workspace.data());
    return 0;
}

void sparsevlm_token_prune(float const* visual, float const* scores, int32_t const* visualValid,
    int64_t const* keepCount, float const* merged, int32_t const* mergedValid, float* pruned, int32_t* prunedValid,
    int64_t* sourceIndex, int64_t batch, int64_t numVisual, int64_t numMerged, int64_t dim, int64_t width)
{
    prune::Shape const shape{batch, numVisual, numMerged, dim, width};
    std::vector<double> workspace = workspaceOf(prune::workspaceSize(batch, numVisual));
    prune::runOnHost(visual, scores, visualValid, keepCount, merged, mergedValid, pruned, prunedValid, sourceIndex,
        shape, workspace.data());
}

// Returns C, the merged width, so the caller can check its own allocation.
int64_t sparsevlm_token_recycle(float const* visual, float const* scores, int32_t const* visualValid,
    int64_t const* keepCount, float* merged, int32_t* mergedValid, int64_t batch, int64_t numVisual, int64_t dim,
    int64_t candidatePercent, int64_t clusterDivisor)
{
    recycle::Shape const shape{batch, numVisual, dim, candidatePercent, clusterDivisor};
    if (merged == nullptr)
    {
        return shape.clusterBound();
    }
    std::vector<double> workspace = workspaceOf(recycle::workspaceSize(shape));
    recycle::runOnHost(visual, scores, visualValid, keepCount, merged, mergedValid, shape, workspace.data());
    return shape.clusterBound();
}

// The tiling the kernels share with the CPU path, so tests can aim at its edges:
// [0] TokenRecycle's Gram tile (candidates per side), [1] its hidden-dimension slice,
// [2] the threads of a block (RankKeepCount's scan chunk, the reduction lanes).
void sparsevlm_tiling(int64_t* sizes)
{
    sizes[0] = recycle::kGramTile;
    sizes[1] = recycle::kGramSlice;
    sizes[2] = kThreads;
}

// TokenRecycle's stage 3 result: after the full CPU path, the rows' candidate distance
// matrices [B, P, P] (P = the pool bound; entries past a row's pool are left as they were),
// each row's pool size and its max distance (stage 5's reduction). The workspace holds them.
void sparsevlm_token_recycle_distances(float const* visual, float const* scores, int32_t const* visualValid,
    int64_t const* keepCount, float* distances, int64_t* pool, float* rowMax, int64_t batch, int64_t numVisual,
    int64_t dim,
    int64_t candidatePercent, int64_t clusterDivisor)
{
    recycle::Shape const shape{batch, numVisual, dim, candidatePercent, clusterDivisor};
    int64_t const bound = shape.poolBound();
    int64_t const clusters = shape.clusterBound();
    std::vector<float> merged(static_cast<size_t>(batch * clusters * dim));
    std::vector<int32_t> mergedValid(static_cast<size_t>(batch * clusters));
    std::vector<double> workspace = workspaceOf(recycle::workspaceSize(shape));
    recycle::runOnHost(visual, scores, visualValid, keepCount, merged.data(), mergedValid.data(), shape,
        workspace.data());
    for (int64_t b = 0; b < batch; ++b)
    {
        recycle::RowScratch const r = recycle::rowScratch(workspace.data(), shape, b);
        pool[b] = r.counts[1];
        rowMax[b] = r.rowMax[0];
        for (int64_t i = 0; i < pool[b]; ++i)
        {
            for (int64_t j = 0; j < pool[b]; ++j)
            {
                distances[(b * bound + i) * bound + j] = r.dist[i * bound + j];
            }
        }
    }
}

// RankKeepCount's stage 1: the exclusive prefix sum of an int32 mask (nonzero = set) as the
// kernel's block scan computes it; returns the number of set flags.
int32_t sparsevlm_mask_positions(int32_t const* mask, int64_t n, int32_t* position)
{
    return rankkeep::scanOnHost(mask, n, position);
}

// RankKeepCount's stage 4: after the full CPU path, each row's singular values [B, min(T, V)]
// in the Jacobi vectors' order (entries past min(m, n) left as they were).
void sparsevlm_rank_singular_values(float const* attention, int32_t const* raters, int32_t const* visualValid,
    double* singular, int64_t batch, int64_t numRaters, int64_t numVisual)
{
    rankkeep::Shape const shape{batch, numRaters, numVisual};
    rankkeep::RuleParams const params{rankkeep::Rule::kPAPER, 1.0, 0.0, 0.0};
    std::vector<int64_t> rank(static_cast<size_t>(batch));
    std::vector<int64_t> keep(static_cast<size_t>(batch));
    std::vector<double> workspace = workspaceOf(rankkeep::workspaceSize(shape));
    rankkeep::runOnHost(attention, raters, visualValid, rank.data(), keep.data(), shape, params, workspace.data());
    int64_t const width = rankkeep::smallerSide(shape);
    for (int64_t b = 0; b < batch; ++b)
    {
        rankkeep::RowScratch const r = rankkeep::rowScratch(workspace.data(), shape, b);
        rankkeep::Block const k = rankkeep::makeBlock(r);
        for (int64_t p = 0; p < k.count; ++p)
        {
            singular[b * width + p] = r.singular[p];
        }
    }
}

// rule: 0 = "v1.0", 1 = "paper".
void sparsevlm_rank_keep_count(float const* attention, int32_t const* raters, int32_t const* visualValid,
    int64_t* rank, int64_t* keep, int64_t batch, int64_t numRaters, int64_t numVisual, int32_t rule, double scale,
    double bias, double lam)
{
    rankkeep::Shape const shape{batch, numRaters, numVisual};
    rankkeep::RuleParams const params{static_cast<rankkeep::Rule>(rule), scale, bias, lam};
    std::vector<double> workspace = workspaceOf(rankkeep::workspaceSize(shape));
    rankkeep::runOnHost(attention, raters, visualValid, rank, keep, shape, params, workspace.data());
}

} // extern "C"
