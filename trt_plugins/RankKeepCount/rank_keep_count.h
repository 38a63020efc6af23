// RankKeepCount, per-row work shared by the CUDA kernels and the CPU test path.
// Contract: export/OPS.md and README.md next to this file.
//
// Per row: P = rater rows x valid visual columns (m x n; the masks are int32, nonzero = set).
// Stages: 1. exclusive prefix sums of the rater mask and of the visual mask (a block scan in
// chunks of kThreads, Hillis-Steele steps) give each selected rater its row and each valid
// token its column in P, and m, n; 2. P is copied into the float64 block, one element per
// thread over many blocks per row; 3. the Jacobi sweeps (below, one block per row: each step
// reads what the previous one rotated); 4. each singular value is a block reduction over its
// vector (a block per vector); 5. rank (a block max) and the keep rule.
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
#include "../common/launch.h"

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

// One row's scratch space inside the workspace; every section is 256-byte aligned.
struct RowScratch
{
    double* block;           // [min(T, V) x max(T, V)]: the compacted block, the largest it can be
    int32_t* raterPosition;  // [T]: exclusive prefix sum of the rater mask (the rater's row in P)
    int32_t* visualPosition; // [V]: exclusive prefix sum of visual_valid (the token's column in P)
    int32_t* counts;         // [2]: m (selected raters), n (valid visual tokens)
    double* singular;        // [min(T, V)]: the singular values
};

SPARSEVLM_HD inline int64_t smallerSide(Shape const& s)
{
    return s.numRaters <= s.numVisual ? s.numRaters : s.numVisual;
}

SPARSEVLM_HD inline int64_t rowScratchBytes(Shape const& s)
{
    return alignWorkspace(s.numRaters * s.numVisual * static_cast<int64_t>(sizeof(double)))
        + alignWorkspace(s.numRaters * 4) + alignWorkspace(s.numVisual * 4) + alignWorkspace(2 * 4)
        + alignWorkspace(smallerSide(s) * static_cast<int64_t>(sizeof(double)));
}

SPARSEVLM_HD inline int64_t workspaceSize(Shape const& s)
{
    return s.batch * rowScratchBytes(s);
}

SPARSEVLM_HD inline RowScratch rowScratch(void* workspace, Shape const& s, int64_t b)
{
    char* at = static_cast<char*>(workspace) + b * rowScratchBytes(s);
    RowScratch r;
    r.block = reinterpret_cast<double*>(at);
    at += alignWorkspace(s.numRaters * s.numVisual * static_cast<int64_t>(sizeof(double)));
    r.raterPosition = reinterpret_cast<int32_t*>(at);
    at += alignWorkspace(s.numRaters * 4);
    r.visualPosition = reinterpret_cast<int32_t*>(at);
    at += alignWorkspace(s.numVisual * 4);
    r.counts = reinterpret_cast<int32_t*>(at);
    at += alignWorkspace(2 * 4);
    r.singular = reinterpret_cast<double*>(at);
    return r;
}

// Stage 1: the exclusive prefix sum of one mask of n flags, by kThreads lanes, a chunk of
// kThreads flags at a time. Each chunk: lane l loads flag l (loadScanChunk), then log2(kThreads)
// Hillis-Steele steps turn the chunk into inclusive sums (scanStep, from one buffer into the
// other), then each lane writes carry + inclusive - its own flag (writeScanChunk); the carry
// grows by the chunk's total. Integers: any order gives the same positions.
SPARSEVLM_HD inline void loadScanChunk(int32_t const* mask, int64_t n, int64_t chunkStart, int lane, int32_t* sums)
{
    int64_t const i = chunkStart + lane;
    sums[lane] = i < n && isSet(mask[i]) ? 1 : 0;
}

SPARSEVLM_HD inline void scanStep(int32_t const* in, int32_t* out, int offset, int lane)
{
    out[lane] = in[lane] + (lane >= offset ? in[lane - offset] : 0);
}

SPARSEVLM_HD inline void writeScanChunk(int32_t const* mask, int64_t n, int64_t chunkStart, int32_t carry,
    int32_t const* inclusive, int lane, int32_t* position)
{
    int64_t const i = chunkStart + lane;
    if (i < n)
    {
        position[i] = carry + inclusive[lane] - (isSet(mask[i]) ? 1 : 0);
    }
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

// After stage 1: m and n from the scans' totals.
SPARSEVLM_HD inline Block makeBlock(RowScratch const& r)
{
    Block k;
    k.data = r.block;
    k.rows = r.counts[0];
    k.cols = r.counts[1];
    k.count = k.rows <= k.cols ? k.rows : k.cols;
    k.length = k.rows <= k.cols ? k.cols : k.rows;
    return k;
}

// Stage 2, element (t, v) of the attention row: copied into the block when both are selected,
// at the row and column the prefix sums give (the block is stored transposed when m > n).
template <typename T>
SPARSEVLM_HD inline void copyElement(T const* rowAttention, int32_t const* rowRaters, int32_t const* rowVisualValid,
    RowScratch const& r, Block const& k, int64_t numVisual, int64_t t, int64_t v)
{
    if (!isSet(rowRaters[t]) || !isSet(rowVisualValid[v]))
    {
        return;
    }
    int64_t const row = r.raterPosition[t];
    int64_t const col = r.visualPosition[v];
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

// Stage 4, lane `lane` of `lanes`: the sum of squares of its strided share of vector p; a tree
// of sumReduceStep then adds the lanes' shares (the singular value is the root's sqrt).
SPARSEVLM_HD inline double squaresShare(Block const& k, int64_t p, int64_t lane, int64_t lanes)
{
    double sum = 0.0;
    for (int64_t e = lane; e < k.length; e += lanes)
    {
        double const x = k.data[p * k.length + e];
        sum += x * x;
    }
    return sum;
}

// One step of a tree reduction: lanes [0, width) absorb lanes [width, 2 width).
SPARSEVLM_HD inline void sumReduceStep(double* shares, int64_t width, int64_t lane)
{
    shares[lane] += shares[lane + width];
}
SPARSEVLM_HD inline void maxReduceStep(double* shares, int64_t width, int64_t lane)
{
    shares[lane] = fmax(shares[lane], shares[lane + width]);
}

// Stage 5, lane `lane` of `lanes`: the largest singular value of its strided share (a max
// tree follows), then the count of its share above the tolerance (a sum tree follows).
// rank = #{sigma > eps_f32 * max(m, n) * sigma_max}.
SPARSEVLM_HD inline double largestShare(RowScratch const& r, Block const& k, int64_t lane, int64_t lanes)
{
    double largest = 0.0;
    for (int64_t p = lane; p < k.count; p += lanes)
    {
        largest = fmax(largest, r.singular[p]);
    }
    return largest;
}

SPARSEVLM_HD inline double rankTolerance(Block const& k, double largest)
{
    return static_cast<double>(FLT_EPSILON) * static_cast<double>(k.length) * largest;
}

SPARSEVLM_HD inline double aboveShare(
    RowScratch const& r, Block const& k, double tolerance, int64_t lane, int64_t lanes)
{
    double count = 0.0; // exact: at most min(T, V) ones
    for (int64_t p = lane; p < k.count; p += lanes)
    {
        count += r.singular[p] > tolerance ? 1.0 : 0.0;
    }
    return count;
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

// Stage 1 on the CPU: the kernel's chunks, lanes and Hillis-Steele steps, run serially.
inline int32_t scanOnHost(int32_t const* mask, int64_t n, int32_t* position)
{
    int32_t buffers[2][kThreads];
    int32_t carry = 0;
    for (int64_t chunkStart = 0; chunkStart < n; chunkStart += kThreads)
    {
        int current = 0;
        for (int lane = 0; lane < kThreads; ++lane)
        {
            loadScanChunk(mask, n, chunkStart, lane, buffers[current]);
        }
        for (int offset = 1; offset < kThreads; offset *= 2)
        {
            for (int lane = 0; lane < kThreads; ++lane)
            {
                scanStep(buffers[current], buffers[1 - current], offset, lane);
            }
            current = 1 - current;
        }
        for (int lane = 0; lane < kThreads; ++lane)
        {
            writeScanChunk(mask, n, chunkStart, carry, buffers[current], lane, position);
        }
        carry += buffers[current][kThreads - 1];
    }
    return carry;
}

// A tree reduction over kThreads lane shares, as a block runs it; returns lane 0.
template <typename Step>
inline double reduceOnHost(double* shares, Step step)
{
    for (int width = kThreads / 2; width > 0; width /= 2)
    {
        for (int lane = 0; lane < width; ++lane)
        {
            step(shares, width, lane);
        }
    }
    return shares[0];
}

// The floating-point operations the CPU path did, summed over the rows (the GPU check's FLOP
// counts): per Jacobi pair visited 6 L (three dot products of L = max(m, n) elements), per pair
// rotated 6 L more (4 multiplies and 2 adds per element), and 2 c L for the c singular values.
struct JacobiWork
{
    double flops = 0.0;
};

// The CPU path: the same functions, scans, reductions and sweep order (the pair sums of a
// Jacobi step accumulated serially where a warp adds 32 lanes). `work`, when given, counts the
// sweeps' pairs.
template <typename T>
inline void runOnHost(T const* attention, int32_t const* raters, int32_t const* visualValid, int64_t* rank,
    int64_t* keep, Shape const& s, RuleParams const& params, void* workspace, JacobiWork* work = nullptr)
{
    double shares[kThreads];
    for (int64_t b = 0; b < s.batch; ++b)
    {
        int32_t const* rowRaters = raters + b * s.numRaters;
        int32_t const* rowValid = visualValid + b * s.numVisual;
        RowScratch const r = rowScratch(workspace, s, b);
        r.counts[0] = scanOnHost(rowRaters, s.numRaters, r.raterPosition);
        r.counts[1] = scanOnHost(rowValid, s.numVisual, r.visualPosition);
        Block const k = makeBlock(r);
        for (int64_t t = 0; t < s.numRaters; ++t)
        {
            for (int64_t v = 0; v < s.numVisual; ++v)
            {
                copyElement(attention + b * s.numRaters * s.numVisual, rowRaters, rowValid, r, k, s.numVisual, t, v);
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
                    bool const rotates = jacobiRotation(sums[0], sums[1], sums[2], c, sn);
                    if (work != nullptr)
                    {
                        work->flops += (rotates ? 12.0 : 6.0) * static_cast<double>(k.length);
                    }
                    if (rotates)
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
        if (work != nullptr)
        {
            work->flops += 2.0 * static_cast<double>(k.count) * static_cast<double>(k.length);
        }
        for (int64_t p = 0; p < k.count; ++p)
        {
            for (int lane = 0; lane < kThreads; ++lane)
            {
                shares[lane] = squaresShare(k, p, lane, kThreads);
            }
            r.singular[p] = sqrt(reduceOnHost(shares, sumReduceStep));
        }
        for (int lane = 0; lane < kThreads; ++lane)
        {
            shares[lane] = largestShare(r, k, lane, kThreads);
        }
        double const tolerance = rankTolerance(k, reduceOnHost(shares, maxReduceStep));
        for (int lane = 0; lane < kThreads; ++lane)
        {
            shares[lane] = aboveShare(r, k, tolerance, lane, kThreads);
        }
        rank[b] = static_cast<int64_t>(reduceOnHost(shares, sumReduceStep));
        keep[b] = keepCount(params, rank[b], k.cols);
    }
}

} // namespace rankkeep
} // namespace sparsevlm
