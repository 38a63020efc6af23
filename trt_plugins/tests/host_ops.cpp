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
