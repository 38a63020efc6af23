// TokenRecycle, per-element work shared by the CUDA kernels and the CPU test path.
// Contract: export/OPS.md and README.md next to this file. Arithmetic is float32.
//
// Per row (P = pool size, c = cluster count, both from the number of deleted tokens):
//   1. deleted[i]: valid slot i is not among the keep_count best valid slots
//   2. candidateSlot[r] = i for the slot i of rank r < P when the row is sorted by descending
//      score with the non-deleted slots scored -inf (the reference's order: NaN largest, lower
//      index on ties); the ranks are a permutation, so every candidate slot is written
//      (r < P <= number of deleted slots: in practice they are the deleted ones)
//   3. the Gram matrix G = X X^T of the P candidate rows (hidden size D), as a tiled matrix
//      product: each kGramTile x kGramTile tile of G (one thread block) accumulates over D in
//      slices of kGramSlice dimensions staged as float32 (float16 inputs are widened, never
//      summed in half precision); only tiles on or above the diagonal are computed and each
//      writes G[i][j] and G[j][i], |x_i|^2 = G[i][i]. Then, in place,
//      dist[i][j] = sqrt(max(|x_i|^2 + |x_j|^2 - 2 G[i][j], 0)) / sqrt(D)
//   4. density[i] = exp(-mean of the c smallest dist[i][.]^2, self included)
//   5. centreScore[i] = density[i] * (min dist to a strictly denser candidate, else the row's
//      max dist, a block reduction); centres[rank] = i for the c best centre scores (tie rule)
//   6. assignment[r] = own cluster for a centre, else the nearest centre (lower index on ties)
//   7. merged[j][d] = sum of member vectors / (size_j + 1e-6); merged_valid[j] = j < c
// Each G element is summed over d = 0, 1, ..., D-1 in order (slice after slice, the padding
// past D or past the pool adds exact zeros), so G is exactly symmetric and the diagonal of dist
// exactly 0, as the reference makes them; the CPU path runs the same tiles, slices and thread
// assignment serially, so it proves the tiling.
// Masks are int32: visual_valid is read as nonzero = valid, merged_valid is written 0 or 1.
#pragma once

#include "../common/host_device.h"
#include "../common/launch.h"

#include <math.h>

namespace sparsevlm
{
namespace recycle
{

constexpr float kMergeEps = 1e-6F; // as the authors' code: sum / (size + 1e-6)

// Stage 3's tiling: one thread block computes a kGramTile x kGramTile tile of the Gram matrix
// with kThreads threads, kGramRowsPerThread elements each (rows tiRow, tiRow + kGramRowStep,
// ... of one column tj), staging kGramSlice hidden dimensions of both candidate blocks at a time.
constexpr int kGramTile = 32;
constexpr int kGramSlice = 32;
constexpr int kGramSliceStride = kGramSlice + 1; // one float of padding: no shared-memory bank conflicts
constexpr int kGramRowStep = kThreads / kGramTile;
constexpr int kGramRowsPerThread = kGramTile / kGramRowStep;
constexpr int kGramLoadsPerThread = kGramTile * kGramSlice / kThreads; // slice elements each thread stages
static_assert(kThreads % kGramTile == 0 && kGramTile % kGramRowStep == 0, "Gram tile and block size do not fit");
static_assert(kGramTile * kGramSlice % kThreads == 0, "a Gram slice is not a whole number of loads per thread");

// pool(d) = (candidate_percent * d) // 100 + 1 deleted tokens become candidates (0 if d = 0).
SPARSEVLM_HD inline int64_t poolSize(int64_t deleted, int64_t candidatePercent)
{
    return deleted <= 0 ? 0 : (candidatePercent * deleted) / 100 + 1;
}

// c = pool // cluster_divisor + 1 clusters (0 if the pool is empty).
SPARSEVLM_HD inline int64_t clusterCount(int64_t pool, int64_t clusterDivisor)
{
    return pool <= 0 ? 0 : pool / clusterDivisor + 1;
}

// Static sizes of one call: poolBound = (candidate_percent * V) // 100 + 1 bounds the pool for
// every d <= V, clusterBound = poolBound // cluster_divisor + 1 the clusters, and C (the merged
// output width) equals clusterBound. The formula of OPS.md's shape rule, the one the plugin's
// getOutputShapes states, for every V: also V = 0 (C = 1, one zero slot with merged_valid 0).
struct Shape
{
    int64_t batch;
    int64_t numVisual;
    int64_t dim;
    int64_t candidatePercent;
    int64_t clusterDivisor;

    SPARSEVLM_HD int64_t poolBound() const
    {
        return (candidatePercent * numVisual) / 100 + 1;
    }
    SPARSEVLM_HD int64_t clusterBound() const
    {
        return clusterCount(poolBound(), clusterDivisor);
    }
};

// One row's scratch space inside the workspace; every section is 256-byte aligned.
struct RowScratch
{
    bool* deleted;          // [V]
    int32_t* counts;        // [3]: deleted, pool, clusters
    int32_t* candidateSlot; // [P]
    float* dist;            // [P, P]: the Gram matrix, then the distances (stage 3)
    float* squares;         // [P]: |x_i|^2, the Gram matrix's diagonal
    float* rowMax;          // [1]: the largest distance between two candidates (stage 5)
    float* density;         // [P]
    float* centreScore;     // [P]
    int32_t* centres;       // [clusterBound]
    int32_t* assignment;    // [P]
};

SPARSEVLM_HD inline int64_t rowScratchBytes(Shape const& s)
{
    int64_t const p = s.poolBound();
    return alignWorkspace(s.numVisual) + alignWorkspace(3 * 4) + alignWorkspace(p * 4) + alignWorkspace(p * p * 4)
        + 3 * alignWorkspace(p * 4) + alignWorkspace(4) + alignWorkspace(s.clusterBound() * 4)
        + alignWorkspace(p * 4);
}

SPARSEVLM_HD inline int64_t workspaceSize(Shape const& s)
{
    return s.batch * rowScratchBytes(s);
}

SPARSEVLM_HD inline RowScratch rowScratch(void* workspace, Shape const& s, int64_t b)
{
    int64_t const p = s.poolBound();
    char* at = static_cast<char*>(workspace) + b * rowScratchBytes(s);
    RowScratch r;
    r.deleted = reinterpret_cast<bool*>(at);
    at += alignWorkspace(s.numVisual);
    r.counts = reinterpret_cast<int32_t*>(at);
    at += alignWorkspace(3 * 4);
    r.candidateSlot = reinterpret_cast<int32_t*>(at);
    at += alignWorkspace(p * 4);
    r.dist = reinterpret_cast<float*>(at);
    at += alignWorkspace(p * p * 4);
    r.squares = reinterpret_cast<float*>(at);
    at += alignWorkspace(p * 4);
    r.rowMax = reinterpret_cast<float*>(at);
    at += alignWorkspace(4);
    r.density = reinterpret_cast<float*>(at);
    at += alignWorkspace(p * 4);
    r.centreScore = reinterpret_cast<float*>(at);
    at += alignWorkspace(p * 4);
    r.centres = reinterpret_cast<int32_t*>(at);
    at += alignWorkspace(s.clusterBound() * 4);
    r.assignment = reinterpret_cast<int32_t*>(at);
    return r;
}

// Stage 1, for visual slot i.
template <typename T>
SPARSEVLM_HD inline bool isDeleted(
    T const* rowScores, int32_t const* rowValid, int64_t numVisual, int64_t keep, int64_t i)
{
    return isSet(rowValid[i]) && !isKept(rowScores, rowValid, numVisual, keep, i);
}

// After stage 1 (one thread): the row's deleted / pool / cluster counts.
SPARSEVLM_HD inline void writeCounts(RowScratch const& r, Shape const& s)
{
    int64_t const deleted = countSetBefore(r.deleted, s.numVisual);
    int64_t const pool = poolSize(deleted, s.candidatePercent);
    r.counts[0] = static_cast<int32_t>(deleted);
    r.counts[1] = static_cast<int32_t>(pool);
    r.counts[2] = static_cast<int32_t>(clusterCount(pool, s.clusterDivisor));
}

// Stage 2, for visual slot i: deleted slots in descending score order fill the pool.
template <typename T>
SPARSEVLM_HD inline void writeCandidate(T const* rowScores, RowScratch const& r, Shape const& s, int64_t i)
{
    int64_t const rank = descendingRank(rowScores, r.deleted, s.numVisual, i);
    if (rank < r.counts[1])
    {
        r.candidateSlot[rank] = static_cast<int32_t>(i);
    }
}

// Stage 3: tiles of the Gram matrix along each side of the pool bound.
SPARSEVLM_HD inline int64_t gramTiles(int64_t poolBound)
{
    return (poolBound + kGramTile - 1) / kGramTile;
}

// Stage 3a, thread `thread` of the tile: fetch its kGramLoadsPerThread elements of the slice
// [d0, d0 + kGramSlice) of the kGramTile candidates from `firstCandidate`, as float32 (zeros
// past the pool or past D: they add exact zeros to the sums), then store them into `slice`
// [kGramTile][kGramSliceStride]. Two steps, so the kernel can fetch the next slice into
// registers while it multiplies the staged one. Consecutive threads read consecutive
// dimensions of one row.
template <typename T>
SPARSEVLM_HD inline void fetchGramSlice(T const* rowVisual, RowScratch const& r, int64_t dim, int64_t firstCandidate,
    int64_t d0, int thread, float values[kGramLoadsPerThread])
{
    int64_t const pool = r.counts[1];
    for (int m = 0; m < kGramLoadsPerThread; ++m)
    {
        int const e = thread + m * kThreads;
        int64_t const candidate = firstCandidate + e / kGramSlice;
        int64_t const d = d0 + e % kGramSlice;
        values[m] = candidate < pool && d < dim
            ? toFloat(rowVisual[static_cast<int64_t>(r.candidateSlot[candidate]) * dim + d])
            : 0.0F;
    }
}

SPARSEVLM_HD inline void storeGramSlice(float const values[kGramLoadsPerThread], int thread, float* slice)
{
    for (int m = 0; m < kGramLoadsPerThread; ++m)
    {
        int const e = thread + m * kThreads;
        slice[(e / kGramSlice) * kGramSliceStride + e % kGramSlice] = values[m];
    }
}

// Stage 3b, thread `thread` of the tile: adds the staged slice to its kGramRowsPerThread
// elements (tile rows thread / kGramTile + m * kGramRowStep, tile column thread % kGramTile),
// dimension by dimension. a * b == b * a, so G[i][j] and G[j][i] get the same sum.
SPARSEVLM_HD inline void accumulateGramSlice(
    float const* sliceRows, float const* sliceColumns, int thread, float sums[kGramRowsPerThread])
{
    int const firstRow = thread / kGramTile;
    int const column = thread % kGramTile;
    for (int k = 0; k < kGramSlice; ++k)
    {
        float const y = sliceColumns[column * kGramSliceStride + k];
        for (int m = 0; m < kGramRowsPerThread; ++m)
        {
            sums[m] += sliceRows[(firstRow + m * kGramRowStep) * kGramSliceStride + k] * y;
        }
    }
}

// Stage 3c, thread `thread` of tile (tileRow, tileColumn), tileRow <= tileColumn: writes its
// finished sums as G[i][j] and G[j][i] (on a diagonal tile only the element with i <= j
// writes, so each pair is written once) and |x_i|^2 = G[i][i]. Nothing past the pool.
SPARSEVLM_HD inline void storeGramSums(RowScratch const& r, int64_t poolBound, int64_t tileRow, int64_t tileColumn,
    int thread, float const sums[kGramRowsPerThread])
{
    int64_t const pool = r.counts[1];
    int64_t const j = tileColumn * kGramTile + thread % kGramTile;
    for (int m = 0; m < kGramRowsPerThread; ++m)
    {
        int64_t const i = tileRow * kGramTile + thread / kGramTile + m * kGramRowStep;
        if (i >= pool || j >= pool || (tileRow == tileColumn && i > j))
        {
            continue;
        }
        r.dist[i * poolBound + j] = sums[m];
        r.dist[j * poolBound + i] = sums[m];
        if (i == j)
        {
            r.squares[i] = sums[m];
        }
    }
}

// Stage 3d, for candidate pair (i, j), after the whole Gram matrix: its entry becomes the
// distance, in place (torch.cdist's Gram form). The diagonal is exactly 0: |x_i|^2 is G[i][i].
SPARSEVLM_HD inline void gramToDistance(RowScratch const& r, int64_t poolBound, int64_t dim, int64_t i, int64_t j)
{
    float* entry = r.dist + i * poolBound + j;
    float const dist2 = fmaxf(r.squares[i] + r.squares[j] - 2.0F * *entry, 0.0F);
    *entry = sqrtf(dist2) / sqrtf(static_cast<float>(dim));
}

// Stage 4, for candidate i: exp(-mean of the c smallest squared distances, self included).
// The c smallest are visited in ascending (distance, index) order, as a sort would list them.
SPARSEVLM_HD inline float knnDensity(RowScratch const& r, int64_t poolBound, int64_t i)
{
    int64_t const pool = r.counts[1];
    int64_t const clusters = r.counts[2];
    float const* row = r.dist + i * poolBound;
    float previous = -1.0F;
    int64_t previousIndex = -1;
    float sum = 0.0F;
    for (int64_t t = 0; t < clusters; ++t)
    {
        float best = INFINITY;
        int64_t bestIndex = -1;
        for (int64_t j = 0; j < pool; ++j)
        {
            bool const afterPrevious = row[j] > previous || (row[j] == previous && j > previousIndex);
            bool const beforeBest = row[j] < best || (row[j] == best && (bestIndex < 0 || j < bestIndex));
            if (afterPrevious && beforeBest)
            {
                best = row[j];
                bestIndex = j;
            }
        }
        sum += best * best;
        previous = best;
        previousIndex = bestIndex;
    }
    return expf(-sum / static_cast<float>(clusters));
}

// Before stage 5, the largest distance between two candidates of the row, as a block
// reduction: lane `lane` of `lanes` takes the max of its strided share of the P x P entries,
// then maxReduceStep halves the lanes until lane 0 holds the row's max. Starting from 0
// (distances are >= 0) and with fmaxf, which skips a NaN, the result does not depend on the
// order: the same value as one serial loop, whatever the number of lanes.
SPARSEVLM_HD inline float maxDistanceShare(RowScratch const& r, int64_t poolBound, int64_t lane, int64_t lanes)
{
    int64_t const pool = r.counts[1];
    float largest = 0.0F;
    for (int64_t e = lane; e < pool * pool; e += lanes)
    {
        largest = fmaxf(largest, r.dist[(e / pool) * poolBound + e % pool]);
    }
    return largest;
}

// One step of the tree: lanes [0, width) absorb lanes [width, 2 width).
SPARSEVLM_HD inline void maxReduceStep(float* shares, int64_t width, int64_t lane)
{
    shares[lane] = fmaxf(shares[lane], shares[lane + width]);
}

// Stage 5a, for candidate i: density * delta.
SPARSEVLM_HD inline float centreScore(RowScratch const& r, int64_t poolBound, float rowMaxDistance, int64_t i)
{
    int64_t const pool = r.counts[1];
    float delta = rowMaxDistance;
    for (int64_t j = 0; j < pool; ++j)
    {
        if (r.density[j] > r.density[i])
        {
            delta = fminf(delta, r.dist[i * poolBound + j]);
        }
    }
    return delta * r.density[i];
}

// Stage 5b, for candidate i: it is centre number `rank` when among the c best centre scores.
SPARSEVLM_HD inline void writeCentre(RowScratch const& r, int64_t i)
{
    int64_t const rank = descendingRank(r.centreScore, static_cast<bool const*>(nullptr), r.counts[1], i);
    if (rank < r.counts[2])
    {
        r.centres[rank] = static_cast<int32_t>(i);
    }
}

// Stage 6, for candidate i: its cluster (a centre always joins its own).
SPARSEVLM_HD inline int32_t assignCluster(RowScratch const& r, int64_t poolBound, int64_t i)
{
    int64_t const clusters = r.counts[2];
    for (int64_t j = 0; j < clusters; ++j)
    {
        if (r.centres[j] == i)
        {
            return static_cast<int32_t>(j);
        }
    }
    int32_t nearest = 0;
    float nearestDistance = INFINITY;
    for (int64_t j = 0; j < clusters; ++j)
    {
        float const d = r.dist[static_cast<int64_t>(r.centres[j]) * poolBound + i];
        if (d < nearestDistance)
        {
            nearestDistance = d;
            nearest = static_cast<int32_t>(j);
        }
    }
    return nearest;
}

// Stage 7, for element (j, d) of one row's merged output: the mean of cluster j (zero for
// j >= c, where no candidate is assigned).
template <typename T>
SPARSEVLM_HD inline float mergedElement(T const* rowVisual, RowScratch const& r, int64_t dim, int64_t j, int64_t d)
{
    int64_t const pool = r.counts[1];
    float sum = 0.0F;
    float size = 0.0F;
    for (int64_t i = 0; i < pool; ++i)
    {
        if (r.assignment[i] == j)
        {
            sum += toFloat(rowVisual[static_cast<int64_t>(r.candidateSlot[i]) * dim + d]);
            size += 1.0F;
        }
    }
    return sum / (size + kMergeEps);
}

// The CPU path: the same stages, run serially. `workspace` holds workspaceSize() bytes.
template <typename T>
inline void runOnHost(T const* visual, T const* scores, int32_t const* visualValid, int64_t const* keepCount,
    T* merged, int32_t* mergedValid, Shape const& s, void* workspace)
{
    int64_t const poolBound = s.poolBound();
    int64_t const clusterBound = s.clusterBound();
    float sliceRows[kGramTile * kGramSliceStride];    // the kernel's shared-memory slices
    float sliceColumns[kGramTile * kGramSliceStride];
    for (int64_t b = 0; b < s.batch; ++b)
    {
        T const* rowVisual = visual + b * s.numVisual * s.dim;
        T const* rowScores = scores + b * s.numVisual;
        RowScratch const r = rowScratch(workspace, s, b);
        for (int64_t i = 0; i < s.numVisual; ++i)
        {
            r.deleted[i] = isDeleted(rowScores, visualValid + b * s.numVisual, s.numVisual, keepCount[b], i);
        }
        writeCounts(r, s);
        int64_t const pool = r.counts[1];
        for (int64_t i = 0; i < s.numVisual; ++i)
        {
            writeCandidate(rowScores, r, s, i);
        }
        // Stage 3 as the kernel runs it: every tile on or above the diagonal, each "thread" of
        // the tile with its own sums, slice after slice.
        int64_t const tiles = gramTiles(poolBound);
        for (int64_t tileRow = 0; tileRow < tiles; ++tileRow)
        {
            for (int64_t tileColumn = tileRow; tileColumn < tiles && tileColumn * kGramTile < pool; ++tileColumn)
            {
                float sums[kThreads][kGramRowsPerThread] = {};
                for (int64_t d0 = 0; d0 < s.dim; d0 += kGramSlice)
                {
                    for (int thread = 0; thread < kThreads; ++thread)
                    {
                        float values[kGramLoadsPerThread];
                        fetchGramSlice(rowVisual, r, s.dim, tileRow * kGramTile, d0, thread, values);
                        storeGramSlice(values, thread, sliceRows);
                        fetchGramSlice(rowVisual, r, s.dim, tileColumn * kGramTile, d0, thread, values);
                        storeGramSlice(values, thread, sliceColumns);
                    }
                    for (int thread = 0; thread < kThreads; ++thread)
                    {
                        accumulateGramSlice(sliceRows, sliceColumns, thread, sums[thread]);
                    }
                }
                for (int thread = 0; thread < kThreads; ++thread)
                {
                    storeGramSums(r, poolBound, tileRow, tileColumn, thread, sums[thread]);
                }
            }
        }
        for (int64_t i = 0; i < pool; ++i)
        {
            for (int64_t j = 0; j < pool; ++j)
            {
                gramToDistance(r, poolBound, s.dim, i, j);
            }
        }
        for (int64_t i = 0; i < pool; ++i)
        {
            r.density[i] = knnDensity(r, poolBound, i);
        }
        float shares[kThreads];
        for (int lane = 0; lane < kThreads; ++lane)
        {
            shares[lane] = maxDistanceShare(r, poolBound, lane, kThreads);
        }
        for (int width = kThreads / 2; width > 0; width /= 2)
        {
            for (int lane = 0; lane < width; ++lane)
            {
                maxReduceStep(shares, width, lane);
            }
        }
        r.rowMax[0] = shares[0];
        for (int64_t i = 0; i < pool; ++i)
        {
            r.centreScore[i] = centreScore(r, poolBound, r.rowMax[0], i);
        }
        for (int64_t i = 0; i < pool; ++i)
        {
            writeCentre(r, i);
        }
        for (int64_t i = 0; i < pool; ++i)
        {
            r.assignment[i] = assignCluster(r, poolBound, i);
        }
        for (int64_t j = 0; j < clusterBound; ++j)
        {
            mergedValid[b * clusterBound + j] = j < r.counts[2] ? 1 : 0;
            for (int64_t d = 0; d < s.dim; ++d)
            {
                merged[(b * clusterBound + j) * s.dim + d] = fromFloat<T>(mergedElement(rowVisual, r, s.dim, j, d));
            }
        }
    }
}

} // namespace recycle
} // namespace sparsevlm
