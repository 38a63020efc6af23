// TokenRecycle, per-element work shared by the CUDA kernels and the CPU test path.
// Contract: export/OPS.md and README.md next to this file. Arithmetic is float32.
//
// Per row (P = pool size, c = cluster count, both from the number of deleted tokens):
//   1. deleted[i]: valid slot i is not among the keep_count best valid slots
//   2. candidateSlot[r] = i for the slot i of rank r < P when the row is sorted by descending
//      score with the non-deleted slots scored -inf (the reference's order: NaN largest, lower
//      index on ties); the ranks are a permutation, so every candidate slot is written
//      (r < P <= number of deleted slots: in practice they are the deleted ones)
//   3. dist[i][j] = sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 0)) / sqrt(D)
//   4. density[i] = exp(-mean of the c smallest dist[i][.]^2, self included)
//   5. centreScore[i] = density[i] * (min dist to a strictly denser candidate, else the row's
//      max dist); centres[rank] = i for the c best centre scores (tie rule)
//   6. assignment[r] = own cluster for a centre, else the nearest centre (lower index on ties)
//   7. merged[j][d] = sum of member vectors / (size_j + 1e-6); merged_valid[j] = j < c
// Masks are int32: visual_valid is read as nonzero = valid, merged_valid is written 0 or 1.
#pragma once

#include "../common/host_device.h"

#include <math.h>

namespace sparsevlm
{
namespace recycle
{

constexpr float kMergeEps = 1e-6F; // as the authors' code: sum / (size + 1e-6)

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
    float* dist;            // [P, P]
    float* density;         // [P]
    float* centreScore;     // [P]
    int32_t* centres;       // [clusterBound]
    int32_t* assignment;    // [P]
};

SPARSEVLM_HD inline int64_t rowScratchBytes(Shape const& s)
{
    int64_t const p = s.poolBound();
    return alignWorkspace(s.numVisual) + alignWorkspace(3 * 4) + alignWorkspace(p * 4) + alignWorkspace(p * p * 4)
        + 2 * alignWorkspace(p * 4) + alignWorkspace(s.clusterBound() * 4) + alignWorkspace(p * 4);
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

// Stage 3, for candidate pair (i, j). The Gram form (as torch.cdist's) gives exactly 0 on the
// diagonal and a symmetric matrix, because dot(i, i) == |x_i|^2 term by term.
template <typename T>
SPARSEVLM_HD inline float candidateDistance(T const* rowVisual, RowScratch const& r, int64_t dim, int64_t i, int64_t j)
{
    T const* x = rowVisual + static_cast<int64_t>(r.candidateSlot[i]) * dim;
    T const* y = rowVisual + static_cast<int64_t>(r.candidateSlot[j]) * dim;
    float squareX = 0.0F;
    float squareY = 0.0F;
    float dot = 0.0F;
    for (int64_t d = 0; d < dim; ++d)
    {
        float const a = toFloat(x[d]);
        float const b = toFloat(y[d]);
        squareX += a * a;
        squareY += b * b;
        dot += a * b;
    }
    float const dist2 = fmaxf(squareX + squareY - 2.0F * dot, 0.0F);
    return sqrtf(dist2) / sqrtf(static_cast<float>(dim));
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

// Before stage 5 (one thread): the largest distance between two candidates of the row.
SPARSEVLM_HD inline float maxDistance(RowScratch const& r, int64_t poolBound)
{
    int64_t const pool = r.counts[1];
    float largest = 0.0F;
    for (int64_t i = 0; i < pool; ++i)
    {
        for (int64_t j = 0; j < pool; ++j)
        {
            largest = fmaxf(largest, r.dist[i * poolBound + j]);
        }
    }
    return largest;
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
        for (int64_t i = 0; i < pool; ++i)
        {
            for (int64_t j = 0; j < pool; ++j)
            {
                r.dist[i * poolBound + j] = candidateDistance(rowVisual, r, s.dim, i, j);
            }
        }
        for (int64_t i = 0; i < pool; ++i)
        {
            r.density[i] = knnDensity(r, poolBound, i);
        }
        float const rowMaxDistance = maxDistance(r, poolBound);
        for (int64_t i = 0; i < pool; ++i)
        {
            r.centreScore[i] = centreScore(r, poolBound, rowMaxDistance, i);
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
