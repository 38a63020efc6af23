// TopKTokenSelect, per-element work shared by the CUDA kernels and the CPU test path.
// Contract: export/OPS.md and README.md next to this file.
//
// Three stages, each one thread per element on the device:
//   1. selected[b, i]  = slot i is among the k best of row b (NaN counts as largest; tie rule:
//      lower index wins). The order is total, so exactly min(k, N) slots are flagged.
//   2. indices[b, pos] = i, pos = number of selected slots before i (so indices ascend);
//      a position >= k is never written (cannot happen with the total order: belt and braces)
//   3. selected tokens[b, j, :] = tokens[b, indices[b, j], :]
#pragma once

#include "../common/host_device.h"

namespace sparsevlm
{
namespace topk
{

// Workspace: one flag per (row, slot), from stage 1 to stage 2.
SPARSEVLM_HD inline int64_t workspaceSize(int64_t batch, int64_t numTokens)
{
    return alignWorkspace(batch * numTokens * static_cast<int64_t>(sizeof(bool)));
}

// Stage 1, for slot i of one row.
template <typename T>
SPARSEVLM_HD inline bool isSelected(T const* rowScores, int64_t numTokens, int64_t k, int64_t i)
{
    return isKept(rowScores, static_cast<bool const*>(nullptr), numTokens, k, i);
}

// Stage 2, for slot i of one row: writes its output position when selected.
SPARSEVLM_HD inline void writeIndex(bool const* rowSelected, int64_t* rowIndices, int64_t k, int64_t i)
{
    if (rowSelected[i])
    {
        int64_t const position = countSetBefore(rowSelected, i);
        if (position < k)
        {
            rowIndices[position] = i;
        }
    }
}

// Stage 3, for element (j, d) of one row's output.
template <typename T>
SPARSEVLM_HD inline void gatherElement(
    T const* rowTokens, int64_t const* rowIndices, T* rowSelectedTokens, int64_t dim, int64_t j, int64_t d)
{
    rowSelectedTokens[j * dim + d] = rowTokens[rowIndices[j] * dim + d];
}

// The CPU path: the same stages, run serially. `workspace` holds workspaceSize() bytes.
// Needs k <= numTokens (the plugin checks it before every launch).
template <typename T>
inline void runOnHost(T const* tokens, T const* scores, T* selectedTokens, int64_t* indices, int64_t batch,
    int64_t numTokens, int64_t dim, int64_t k, void* workspace)
{
    bool* selected = static_cast<bool*>(workspace);
    for (int64_t b = 0; b < batch; ++b)
    {
        for (int64_t i = 0; i < numTokens; ++i)
        {
            selected[b * numTokens + i] = isSelected(scores + b * numTokens, numTokens, k, i);
        }
        for (int64_t i = 0; i < numTokens; ++i)
        {
            writeIndex(selected + b * numTokens, indices + b * k, k, i);
        }
        for (int64_t j = 0; j < k; ++j)
        {
            for (int64_t d = 0; d < dim; ++d)
            {
                gatherElement(tokens + b * numTokens * dim, indices + b * k, selectedTokens + b * k * dim, dim, j, d);
            }
        }
    }
}

} // namespace topk
} // namespace sparsevlm
