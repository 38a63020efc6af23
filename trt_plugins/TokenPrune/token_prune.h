// TokenPrune, per-element work shared by the CUDA kernels and the CPU test path.
// Contract: export/OPS.md and README.md next to this file.
//
// Stages (one thread per element on the device):
//   1. kept[b, i] = visual slot i is valid and among the keep_count[b] first of row b in the
//      order of host_device.h (NaN largest, invalid slots scored -inf, lower index on ties)
//   2. for every input slot s (0..V-1 visual, V..V+C-1 merged) its output position:
//      kept visual slots first in slot order, then the valid merged slots; slots that land
//      at or beyond W are dropped (OPS.md: a smaller W truncates)
//   3. every output slot j: copy the vector of source_index[b, j], or zeros for padding
// source_index starts as -1 everywhere (a 0xFF byte fill), so stage 2 only writes hits.
// Masks are int32 (visual_valid, merged_valid read as nonzero = valid; pruned_valid written 0/1).
#pragma once

#include "../common/host_device.h"

namespace sparsevlm
{
namespace prune
{

// Workspace: one "kept" flag per (row, visual slot), from stage 1 to stage 2.
SPARSEVLM_HD inline int64_t workspaceSize(int64_t batch, int64_t numVisual)
{
    return alignWorkspace(batch * numVisual * static_cast<int64_t>(sizeof(bool)));
}

// Stage 1, for visual slot i of one row.
template <typename T>
SPARSEVLM_HD inline bool isKeptSlot(
    T const* rowScores, int32_t const* rowVisualValid, int64_t numVisual, int64_t keepCount, int64_t i)
{
    return isKept(rowScores, rowVisualValid, numVisual, keepCount, i);
}

// Stage 2, for input slot s of one row: its output position, or -1 when it is not selected.
SPARSEVLM_HD inline int64_t outputPosition(
    bool const* rowKept, int32_t const* rowMergedValid, int64_t numVisual, int64_t s)
{
    if (s < numVisual)
    {
        return rowKept[s] ? countSetBefore(rowKept, s) : -1;
    }
    int64_t const m = s - numVisual;
    if (!isSet(rowMergedValid[m]))
    {
        return -1;
    }
    return countSetBefore(rowKept, numVisual) + countSetBefore(rowMergedValid, m);
}

// Stage 2 write: record slot s at its position when that position fits in the W outputs.
SPARSEVLM_HD inline void scatterSource(
    bool const* rowKept, int32_t const* rowMergedValid, int64_t* rowSourceIndex, int64_t numVisual, int64_t width, int64_t s)
{
    int64_t const position = outputPosition(rowKept, rowMergedValid, numVisual, s);
    if (position >= 0 && position < width)
    {
        rowSourceIndex[position] = s;
    }
}

// Stage 3, for element (j, d) of one row's output; d == 0 also writes pruned_valid[j].
template <typename T>
SPARSEVLM_HD inline void gatherElement(T const* rowVisual, T const* rowMerged, int64_t const* rowSourceIndex,
    T* rowPruned, int32_t* rowPrunedValid, int64_t numVisual, int64_t dim, int64_t j, int64_t d)
{
    int64_t const source = rowSourceIndex[j];
    T value = fromFloat<T>(0.0F);
    if (source >= 0)
    {
        value = source < numVisual ? rowVisual[source * dim + d] : rowMerged[(source - numVisual) * dim + d];
    }
    rowPruned[j * dim + d] = value;
    if (d == 0)
    {
        rowPrunedValid[j] = source >= 0 ? 1 : 0;
    }
}

// Shapes of one call: visual [B, V, D], merged [B, C, D], outputs [B, W, ...].
struct Shape
{
    int64_t batch;
    int64_t numVisual;
    int64_t numMerged;
    int64_t dim;
    int64_t width;
};

// The CPU path: the same stages, run serially. `workspace` holds workspaceSize() bytes.
template <typename T>
inline void runOnHost(T const* visual, T const* scores, int32_t const* visualValid, int64_t const* keepCount,
    T const* merged, int32_t const* mergedValid, T* pruned, int32_t* prunedValid, int64_t* sourceIndex, Shape const& s,
    void* workspace)
{
    bool* kept = static_cast<bool*>(workspace);
    for (int64_t b = 0; b < s.batch; ++b)
    {
        bool* rowKept = kept + b * s.numVisual;
        int64_t* rowSource = sourceIndex + b * s.width;
        for (int64_t i = 0; i < s.numVisual; ++i)
        {
            rowKept[i] = isKeptSlot(scores + b * s.numVisual, visualValid + b * s.numVisual, s.numVisual, keepCount[b], i);
        }
        for (int64_t j = 0; j < s.width; ++j)
        {
            rowSource[j] = -1;
        }
        for (int64_t slot = 0; slot < s.numVisual + s.numMerged; ++slot)
        {
            scatterSource(rowKept, mergedValid + b * s.numMerged, rowSource, s.numVisual, s.width, slot);
        }
        for (int64_t j = 0; j < s.width; ++j)
        {
            for (int64_t d = 0; d < s.dim; ++d)
            {
                gatherElement(visual + b * s.numVisual * s.dim, merged + b * s.numMerged * s.dim, rowSource,
                    pruned + b * s.width * s.dim, prunedValid + b * s.width, s.numVisual, s.dim, j, d);
            }
        }
    }
}

} // namespace prune
} // namespace sparsevlm
