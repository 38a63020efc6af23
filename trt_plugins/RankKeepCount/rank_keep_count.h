// RankKeepCount, per-row work shared by the CUDA kernel and the CPU test path.
// Contract: export/OPS.md and README.md next to this file.
//
// Per row: P = rater rows x valid visual columns (m x n; the masks are int32, nonzero = set).
// Its singular values come from a one-sided Jacobi SVD (Hestenes) in float64: the min(m, n)
// "vectors" (rows of P when m <= n, else its columns) are rotated pairwise, in round-robin
// sweeps, until mutually orthogonal; their norms are then the singular values.
// rank = #{sigma > eps_f32 * max(m, n) * sigma_max}, torch.linalg.matrix_rank's default
// tolerance for float32. Float64 keeps the rounding noise of a rank-deficient block
// (~1e-16 * sigma_max) far below that tolerance, where a float32 SVD's noise sits within a
// small factor of it; this is the exact rank of the float32 input, which torch agrees with
// except on blocks whose smallest singular value lies within float32 noise of the tolerance.
#pragma once

#include "../common/host_device.h"

#include <float.h>
#include <math.h>

namespace sparsevlm
{
namespace rankkeep
{

enum class Rule : int32_t
{
    kV10 = 0,  // "v1.0": keep = v if v == rank else min(max(int(rank * scale + bias), 0), v - 1)
    kPAPER = 1 // "paper": N = int(lam * (v - rank)); keep = v if N == 0 else max(v - N, 0)
};

// Double, as the reference holds them (Python floats): `int(rank * scale + bias)` can land on
// the other side of an integer when scale is rounded to float32 first (0.7 * 10 is 7.000...01
// in double, 6.99999988 with 0.7f).
struct RuleParams
{
    Rule rule;
    double scale;
    double bias;
    double lam;
};

constexpr int32_t kMaxSweeps = 60;            // Jacobi converges quadratically; 60 is never reached in practice
constexpr double kOrthogonalityTol = 1e-15;   // |a_p . a_q| <= tol * |a_p| |a_q| counts as orthogonal

struct Shape
{
    int64_t batch;
    int64_t numRaters;  // T
    int64_t numVisual;  // V
};

// Workspace per row: the compacted block as float64 [min(T, V), max(T, V)], the largest it can be.
SPARSEVLM_HD inline int64_t rowScratchBytes(Shape const& s)
{
    return alignWorkspace(s.numRaters * s.numVisual * static_cast<int64_t>(sizeof(double)));
}

SPARSEVLM_HD inline int64_t workspaceSize(Shape const& s)
{
    return s.batch * rowScratchBytes(s);
}

// Where the compacted block lives for one row: `count` vectors of `length` elements.
struct Block
{
    double* data;
    int64_t count;  // min(m, n)
    int64_t length; // max(m, n)
    int64_t rows;   // m
    int64_t cols;   // n
};

SPARSEVLM_HD inline Block makeBlock(
    double* data, int32_t const* rowRaters, int32_t const* rowVisualValid, Shape const& s)
{
    Block k;
    k.data = data;
    k.rows = countSetBefore(rowRaters, s.numRaters);
    k.cols = countSetBefore(rowVisualValid, s.numVisual);
    k.count = k.rows <= k.cols ? k.rows : k.cols;
    k.length = k.rows <= k.cols ? k.cols : k.rows;
    return k;
}

// Copy element (t, v) of the attention row into the block when both are selected. The
// compacted positions come from countSetBefore, so one thread per element works.
template <typename T>
SPARSEVLM_HD inline void copyElement(T const* rowAttention, int32_t const* rowRaters,
    int32_t const* rowVisualValid, Block const& k, int64_t numVisual, int64_t t, int64_t v)
{
    if (!isSet(rowRaters[t]) || !isSet(rowVisualValid[v]))
    {
        return;
    }
    int64_t const row = countSetBefore(rowRaters, t);
    int64_t const col = countSetBefore(rowVisualValid, v);
    double const value = static_cast<double>(toFloat(rowAttention[t * numVisual + v]));
    if (k.rows <= k.cols)
    {
        k.data[row * k.length + col] = value;
    }
    else
    {
        k.data[col * k.length + row] = value;
    }
}

// The rotation (c, s) that makes vectors p and q orthogonal, given alpha = |a_p|^2,
// beta = |a_q|^2, gamma = a_p . a_q; false when they already are (then nothing to do).
SPARSEVLM_HD inline bool jacobiRotation(double alpha, double beta, double gamma, double& c, double& s)
{
    if (alpha == 0.0 || beta == 0.0 || fabs(gamma) <= kOrthogonalityTol * sqrt(alpha * beta))
    {
        return false;
    }
    double const zeta = (beta - alpha) / (2.0 * gamma);
    double const t = (zeta >= 0.0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
    c = 1.0 / sqrt(1.0 + t * t);
    s = c * t;
    return true;
}

// Sweep order: the round-robin ("circle") schedule. The vectors, padded to an even number of
// "players", meet in players - 1 steps of players / 2 disjoint pairs each, every pair (p, q)
// exactly once per sweep. Pairs of one step touch different vectors, so the device rotates
// them all at once (one warp per pair); the CPU path visits them in the same order.
SPARSEVLM_HD inline int64_t roundRobinPlayers(int64_t count)
{
    return count < 2 ? 0 : count + (count & 1);
}

// Pair k of `step`: false when it involves the padding vector (odd count).
SPARSEVLM_HD inline bool roundRobinPair(int64_t count, int64_t step, int64_t k, int64_t& p, int64_t& q)
{
    int64_t const ring = roundRobinPlayers(count) - 1; // player `ring` stays put, the others rotate
    int64_t const a = k == 0 ? step : (step + k) % ring;
    int64_t const b = k == 0 ? ring : (step - k + ring) % ring;
    p = a < b ? a : b;
    q = a < b ? b : a;
    return q < count;
}

// Apply the rotation to element e of vectors p and q: a_p' = c a_p - s a_q, a_q' = s a_p + c a_q.
SPARSEVLM_HD inline void rotateElement(Block const& k, int64_t p, int64_t q, double c, double s, int64_t e)
{
    double const x = k.data[p * k.length + e];
    double const y = k.data[q * k.length + e];
    k.data[p * k.length + e] = c * x - s * y;
    k.data[q * k.length + e] = s * x + c * y;
}

// Products of vectors p and q, element e: |a_p|^2, |a_q|^2, a_p . a_q terms (for a reduction).
SPARSEVLM_HD inline void pairTerms(Block const& k, int64_t p, int64_t q, int64_t e, double terms[3])
{
    double const x = k.data[p * k.length + e];
    double const y = k.data[q * k.length + e];
    terms[0] = x * x;
    terms[1] = y * y;
    terms[2] = x * y;
}

// After convergence: singular value of vector p.
SPARSEVLM_HD inline double vectorNorm(Block const& k, int64_t p)
{
    double sum = 0.0;
    for (int64_t e = 0; e < k.length; ++e)
    {
        sum += k.data[p * k.length + e] * k.data[p * k.length + e];
    }
    return sqrt(sum);
}

// rank = #{sigma > eps_f32 * max(m, n) * sigma_max}, sigma given by vectorNorm.
SPARSEVLM_HD inline int64_t countRank(Block const& k)
{
    double largest = 0.0;
    for (int64_t p = 0; p < k.count; ++p)
    {
        largest = fmax(largest, vectorNorm(k, p));
    }
    double const tolerance = static_cast<double>(FLT_EPSILON) * static_cast<double>(k.length) * largest;
    int64_t rank = 0;
    for (int64_t p = 0; p < k.count; ++p)
    {
        rank += vectorNorm(k, p) > tolerance ? 1 : 0;
    }
    return rank;
}

// a * b + c rounded twice, as Python computes it: nvcc would otherwise contract it into one
// fused multiply-add on the device, which can cross an integer that int() then truncates to.
SPARSEVLM_HD inline double productPlus(double a, double b, double c)
{
#ifdef __CUDA_ARCH__
    return __dadd_rn(__dmul_rn(a, b), c);
#else
    return a * b + c;
#endif
}

// The keep rule (methods/config.py, OPS.md); Python's int() truncates toward zero, like trunc.
SPARSEVLM_HD inline int64_t keepCount(RuleParams const& params, int64_t rank, int64_t visualCount)
{
    if (params.rule == Rule::kV10)
    {
        if (visualCount == rank)
        {
            return visualCount;
        }
        double const keep = trunc(productPlus(static_cast<double>(rank), params.scale, params.bias));
        double const upper = static_cast<double>(visualCount - 1);
        return static_cast<int64_t>(keep < 0.0 ? 0.0 : (keep > upper ? upper : keep));
    }
    double const deleted = trunc(params.lam * static_cast<double>(visualCount - rank));
    if (deleted == 0.0)
    {
        return visualCount;
    }
    double const keep = static_cast<double>(visualCount) - deleted;
    return keep < 0.0 ? 0 : static_cast<int64_t>(keep);
}

// The CPU path: the same functions and sweep order, the pair sums accumulated serially.
template <typename T>
inline void runOnHost(T const* attention, int32_t const* raters, int32_t const* visualValid, int64_t* rank,
    int64_t* keep, Shape const& s, RuleParams const& params, void* workspace)
{
    for (int64_t b = 0; b < s.batch; ++b)
    {
        int32_t const* rowRaters = raters + b * s.numRaters;
        int32_t const* rowValid = visualValid + b * s.numVisual;
        double* data = reinterpret_cast<double*>(static_cast<char*>(workspace) + b * rowScratchBytes(s));
        Block const k = makeBlock(data, rowRaters, rowValid, s);
        for (int64_t t = 0; t < s.numRaters; ++t)
        {
            for (int64_t v = 0; v < s.numVisual; ++v)
            {
                copyElement(attention + b * s.numRaters * s.numVisual, rowRaters, rowValid, k, s.numVisual, t, v);
            }
        }
        int64_t const players = roundRobinPlayers(k.count);
        for (int32_t sweep = 0; sweep < kMaxSweeps && players > 0; ++sweep)
        {
            bool rotated = false;
            for (int64_t step = 0; step < players - 1; ++step)
            {
                for (int64_t pair = 0; pair < players / 2; ++pair)
                {
                    int64_t p = 0;
                    int64_t q = 0;
                    if (!roundRobinPair(k.count, step, pair, p, q))
                    {
                        continue;
                    }
                    double sums[3] = {0.0, 0.0, 0.0};
                    for (int64_t e = 0; e < k.length; ++e)
                    {
                        double terms[3];
                        pairTerms(k, p, q, e, terms);
                        sums[0] += terms[0];
                        sums[1] += terms[1];
                        sums[2] += terms[2];
                    }
                    double c = 1.0;
                    double sn = 0.0;
                    if (jacobiRotation(sums[0], sums[1], sums[2], c, sn))
                    {
                        rotated = true;
                        for (int64_t e = 0; e < k.length; ++e)
                        {
                            rotateElement(k, p, q, c, sn, e);
                        }
                    }
                }
            }
            if (!rotated)
            {
                break;
            }
        }
        rank[b] = countRank(k);
        keep[b] = keepCount(params, rank[b], k.cols);
    }
}

} // namespace rankkeep
} // namespace sparsevlm
