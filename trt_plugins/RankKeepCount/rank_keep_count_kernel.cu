// CUDA kernel of RankKeepCount: one block per batch row runs the one-sided Jacobi SVD of
// rank_keep_count.h. Sweeps follow the round-robin schedule: within a step the pairs are
// disjoint, so each warp takes pairs on its own (three dot products reduced with shuffles,
// then the rotation of both vectors) and the block synchronizes once per step. The sweep
// repeats until no pair needed a rotation.
#include "rank_keep_count_kernel.h"

#include "../common/launch.h"

namespace sparsevlm
{
namespace
{

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFU;

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

template <typename T>
__global__ void rankKernel(T const* attention, int32_t const* raters, int32_t const* visualValid, int64_t* rank,
    int64_t* keep, rankkeep::Shape s, rankkeep::RuleParams params, void* workspace)
{
    __shared__ bool rotatedInSweep;

    int64_t const b = blockIdx.x;
    int const lane = threadIdx.x % kWarp;
    int const warp = threadIdx.x / kWarp;
    int const numWarps = blockDim.x / kWarp;
    int32_t const* rowRaters = raters + b * s.numRaters;
    int32_t const* rowValid = visualValid + b * s.numVisual;
    double* data = reinterpret_cast<double*>(static_cast<char*>(workspace) + b * rankkeep::rowScratchBytes(s));
    rankkeep::Block const k = rankkeep::makeBlock(data, rowRaters, rowValid, s);

    for (int64_t element = threadIdx.x; element < s.numRaters * s.numVisual; element += blockDim.x)
    {
        rankkeep::copyElement(attention + b * s.numRaters * s.numVisual, rowRaters, rowValid, k, s.numVisual,
            element / s.numVisual, element % s.numVisual);
    }

    int64_t const players = rankkeep::roundRobinPlayers(k.count);
    for (int32_t sweep = 0; sweep < rankkeep::kMaxSweeps && players > 0; ++sweep)
    {
        if (threadIdx.x == 0)
        {
            rotatedInSweep = false;
        }
        __syncthreads(); // the block is copied and the flag reset before the first step
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
    __syncthreads();

    if (threadIdx.x == 0)
    {
        rank[b] = rankkeep::countRank(k);
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
    rankKernel<<<static_cast<unsigned>(s.batch), kThreads, 0, stream>>>(
        attention, raters, visualValid, rank, keep, s, params, workspace);
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
