// CUDA kernels of RankKeepCount, the stages of rank_keep_count.h:
//   scanKernel     one block per row: exclusive prefix sums of the rater and visual masks
//   copyKernel     a block per (column chunk, rater, row): the block P into the float64 scratch
//   jacobiKernel   one block per row (1024 threads): the one-sided Jacobi SVD. Sweeps follow
//                  the round-robin schedule: within a step the pairs are disjoint, so each warp
//                  takes pairs on its own (three dot products reduced with shuffles, then the
//                  rotation of both vectors) and the block synchronizes once per step; every
//                  step reads what the previous one rotated, so a sweep stays in one block. The
//                  sweep repeats until no pair needed a rotation.
//   normKernel     a block per (vector, row): its singular value, a block reduction
//   rankKernel     one block per row: sigma_max (block max), the count above the tolerance
//                  (block sum) and the keep rule
#include "rank_keep_count_kernel.h"

#include "../common/launch.h"

namespace sparsevlm
{
namespace
{

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFU;
constexpr int64_t kMaxGridY = 65535; // CUDA's limit on gridDim.y
// The Jacobi block: one warp per pair of a step for up to 64 vectors (T = 64 raters: 32 pairs),
// so a step is one round of dot products and rotations.
constexpr int kJacobiThreads = 1024;

__device__ double warpSum(double value)
{
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
    {
        value += __shfl_xor_sync(kFullMask, value, offset);
    }
    return value;
}

// One pair (p, q), by one warp: returns whether it rotated.
__device__ bool orthogonalizePair(rankkeep::Block const& k, int64_t p, int64_t q, int lane)
{
    double sums[3] = {0.0, 0.0, 0.0};
    for (int64_t e = lane; e < k.length; e += kWarp)
    {
        double terms[3];
        rankkeep::pairTerms(k, p, q, e, terms);
        sums[0] += terms[0];
        sums[1] += terms[1];
        sums[2] += terms[2];
    }
    for (double& sum : sums)
    {
        sum = warpSum(sum); // every lane ends with the full sums: all decide the same
    }
    double c = 1.0;
    double s = 0.0;
    if (!rankkeep::jacobiRotation(sums[0], sums[1], sums[2], c, s))
    {
        return false;
    }
    for (int64_t e = lane; e < k.length; e += kWarp)
    {
        rankkeep::rotateElement(k, p, q, c, s, e);
    }
    return true;
}

// Stage 1: one block per row scans both masks.
__device__ int32_t scanMask(int32_t const* mask, int64_t n, int32_t* position)
{
    __shared__ int32_t buffers[2][kThreads];
    int const lane = threadIdx.x;
    int32_t carry = 0;
    for (int64_t chunkStart = 0; chunkStart < n; chunkStart += kThreads)
    {
        int current = 0;
        rankkeep::loadScanChunk(mask, n, chunkStart, lane, buffers[current]);
        __syncthreads();
        for (int offset = 1; offset < kThreads; offset *= 2)
        {
            rankkeep::scanStep(buffers[current], buffers[1 - current], offset, lane);
            current = 1 - current;
            __syncthreads();
        }
        rankkeep::writeScanChunk(mask, n, chunkStart, carry, buffers[current], lane, position);
        carry += buffers[current][kThreads - 1];
        __syncthreads(); // everyone has read the chunk before the next one is loaded
    }
    return carry;
}

__global__ void scanKernel(int32_t const* raters, int32_t const* visualValid, rankkeep::Shape s, void* workspace)
{
    int64_t const b = blockIdx.x;
    rankkeep::RowScratch const r = rankkeep::rowScratch(workspace, s, b);
    int32_t const m = scanMask(raters + b * s.numRaters, s.numRaters, r.raterPosition);
    int32_t const n = scanMask(visualValid + b * s.numVisual, s.numVisual, r.visualPosition);
    if (threadIdx.x == 0)
    {
        r.counts[0] = m;
        r.counts[1] = n;
    }
}

// Stage 2: block (column chunk, rater t, row b) copies its kThreads elements of rater t (and
// of t + gridDim.y, ... when T exceeds the grid's y limit).
template <typename T>
__global__ void copyKernel(
    T const* attention, int32_t const* raters, int32_t const* visualValid, rankkeep::Shape s, void* workspace)
{
    int64_t const v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    int64_t const b = blockIdx.z;
    if (v >= s.numVisual)
    {
        return;
    }
    int32_t const* rowRaters = raters + b * s.numRaters;
    rankkeep::RowScratch const r = rankkeep::rowScratch(workspace, s, b);
    rankkeep::Block const k = rankkeep::makeBlock(r);
    for (int64_t t = blockIdx.y; t < s.numRaters; t += gridDim.y)
    {
        rankkeep::copyElement(attention + b * s.numRaters * s.numVisual, rowRaters, visualValid + b * s.numVisual, r,
            k, s.numVisual, t, v);
    }
}

// Stage 3: one block per row.
__global__ void __launch_bounds__(kJacobiThreads) jacobiKernel(rankkeep::Shape s, void* workspace)
{
    __shared__ bool rotatedInSweep;

    int64_t const b = blockIdx.x;
    int const lane = threadIdx.x % kWarp;
    int const warp = threadIdx.x / kWarp;
    int const numWarps = blockDim.x / kWarp;
    rankkeep::Block const k = rankkeep::makeBlock(rankkeep::rowScratch(workspace, s, b));

    int64_t const players = rankkeep::roundRobinPlayers(k.count);
    for (int32_t sweep = 0; sweep < rankkeep::kMaxSweeps && players > 0; ++sweep)
    {
        if (threadIdx.x == 0)
        {
            rotatedInSweep = false;
        }
        __syncthreads(); // the flag is reset before the first step
        for (int64_t step = 0; step < players - 1; ++step)
        {
            for (int64_t pair = warp; pair < players / 2; pair += numWarps)
            {
                int64_t p = 0;
                int64_t q = 0;
                if (rankkeep::roundRobinPair(k.count, step, pair, p, q) && orthogonalizePair(k, p, q, lane)
                    && lane == 0)
                {
                    rotatedInSweep = true;
                }
            }
            __syncthreads(); // the next step's pairs read vectors this step rotated
        }
        bool const again = rotatedInSweep;
        __syncthreads(); // everyone has read the flag before thread 0 resets it
        if (!again)
        {
            break;
        }
    }
}

// Block-wide tree over kThreads shares in shared memory; every thread gets lane 0's result.
template <typename Step>
__device__ double reduceShares(double* shares, Step step)
{
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2)
    {
        if (static_cast<int>(threadIdx.x) < width)
        {
            step(shares, width, threadIdx.x);
        }
        __syncthreads();
    }
    double const result = shares[0];
    __syncthreads(); // read before the shares are reused
    return result;
}

struct SumStep
{
    __device__ void operator()(double* shares, int64_t width, int64_t lane) const
    {
        rankkeep::sumReduceStep(shares, width, lane);
    }
};
struct MaxStep
{
    __device__ void operator()(double* shares, int64_t width, int64_t lane) const
    {
        rankkeep::maxReduceStep(shares, width, lane);
    }
};

// Stage 4: block (vector p, row b) writes singular value p.
__global__ void normKernel(rankkeep::Shape s, void* workspace)
{
    __shared__ double shares[kThreads];
    int64_t const p = blockIdx.x;
    int64_t const b = blockIdx.y;
    rankkeep::RowScratch const r = rankkeep::rowScratch(workspace, s, b);
    rankkeep::Block const k = rankkeep::makeBlock(r);
    if (p >= k.count)
    {
        return;
    }
    shares[threadIdx.x] = rankkeep::squaresShare(k, p, threadIdx.x, blockDim.x);
    double const sum = reduceShares(shares, SumStep{});
    if (threadIdx.x == 0)
    {
        r.singular[p] = sqrt(sum);
    }
}

// Stage 5: one block per row.
__global__ void rankKernel(int64_t* rank, int64_t* keep, rankkeep::Shape s, rankkeep::RuleParams params,
    void* workspace)
{
    __shared__ double shares[kThreads];
    int64_t const b = blockIdx.x;
    rankkeep::RowScratch const r = rankkeep::rowScratch(workspace, s, b);
    rankkeep::Block const k = rankkeep::makeBlock(r);
    shares[threadIdx.x] = rankkeep::largestShare(r, k, threadIdx.x, blockDim.x);
    double const tolerance = rankkeep::rankTolerance(k, reduceShares(shares, MaxStep{}));
    shares[threadIdx.x] = rankkeep::aboveShare(r, k, tolerance, threadIdx.x, blockDim.x);
    double const count = reduceShares(shares, SumStep{});
    if (threadIdx.x == 0)
    {
        rank[b] = static_cast<int64_t>(count);
        keep[b] = rankkeep::keepCount(params, rank[b], k.cols);
    }
}

template <typename T>
cudaError_t launch(T const* attention, int32_t const* raters, int32_t const* visualValid, int64_t* rank, int64_t* keep,
    rankkeep::Shape const& s, rankkeep::RuleParams const& params, void* workspace, cudaStream_t stream)
{
    if (s.batch == 0)
    {
        return cudaSuccess;
    }
    auto const rows = static_cast<unsigned>(s.batch);
    scanKernel<<<rows, kThreads, 0, stream>>>(raters, visualValid, s, workspace);
    if (s.numRaters > 0 && s.numVisual > 0)
    {
        int64_t const raterBlocks = s.numRaters < kMaxGridY ? s.numRaters : kMaxGridY;
        copyKernel<<<dim3(static_cast<unsigned>(blocksFor(s.numVisual)), static_cast<unsigned>(raterBlocks), rows),
            kThreads, 0, stream>>>(attention, raters, visualValid, s, workspace);
        jacobiKernel<<<rows, kJacobiThreads, 0, stream>>>(s, workspace);
        normKernel<<<dim3(static_cast<unsigned>(rankkeep::smallerSide(s)), rows), kThreads, 0, stream>>>(s, workspace);
    }
    rankKernel<<<rows, kThreads, 0, stream>>>(rank, keep, s, params, workspace);
    return cudaGetLastError();
}

} // namespace

cudaError_t launchRankKeepCount(ElementType type, void const* attention, int32_t const* raters,
    int32_t const* visualValid, int64_t* rank, int64_t* keep, rankkeep::Shape const& shape,
    rankkeep::RuleParams const& params, void* workspace, cudaStream_t stream)
{
    if (type == ElementType::kFLOAT16)
    {
        return launch(static_cast<__half const*>(attention), raters, visualValid, rank, keep, shape, params,
            workspace, stream);
    }
    return launch(static_cast<float const*>(attention), raters, visualValid, rank, keep, shape, params, workspace,
        stream);
}

} // namespace sparsevlm
