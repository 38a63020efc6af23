// CUDA kernel of RankKeepCount: one block per batch row runs the one-sided Jacobi SVD of
// rank_keep_count.h. Each pair (p, q) needs three dot products (a block reduction), then
// every thread rotates its elements; the sweep repeats until no pair needed a rotation.
// The blocks are small (raters x visual, a few hundred KB), so one block per row suffices.
#include "rank_keep_count_kernel.h"

namespace sparsevlm
{
namespace
{

constexpr int kThreads = 256;

template <typename T>
__global__ void rankKernel(T const* attention, bool const* raters, bool const* visualValid, int64_t* rank,
    int64_t* keep, rankkeep::Shape s, rankkeep::RuleParams params, void* workspace)
{
    __shared__ double partial[3][kThreads];
    __shared__ double rotation[2];
    __shared__ bool doRotate;
    __shared__ bool rotatedInSweep;

    int64_t const b = blockIdx.x;
    bool const* rowRaters = raters + b * s.numRaters;
    bool const* rowValid = visualValid + b * s.numVisual;
    double* data = reinterpret_cast<double*>(static_cast<char*>(workspace) + b * rankkeep::rowScratchBytes(s));
    rankkeep::Block const k = rankkeep::makeBlock(data, rowRaters, rowValid, s);

    for (int64_t element = threadIdx.x; element < s.numRaters * s.numVisual; element += blockDim.x)
    {
        rankkeep::copyElement(attention + b * s.numRaters * s.numVisual, rowRaters, rowValid, k, s.numVisual,
            element / s.numVisual, element % s.numVisual);
    }
    __syncthreads();

    for (int32_t sweep = 0; sweep < rankkeep::kMaxSweeps; ++sweep)
    {
        if (threadIdx.x == 0)
        {
            rotatedInSweep = false;
        }
        for (int64_t p = 0; p < k.count; ++p)
        {
            for (int64_t q = p + 1; q < k.count; ++q)
            {
                double sums[3] = {0.0, 0.0, 0.0};
                for (int64_t e = threadIdx.x; e < k.length; e += blockDim.x)
                {
                    double terms[3];
                    rankkeep::pairTerms(k, p, q, e, terms);
                    sums[0] += terms[0];
                    sums[1] += terms[1];
                    sums[2] += terms[2];
                }
                for (int i = 0; i < 3; ++i)
                {
                    partial[i][threadIdx.x] = sums[i];
                }
                __syncthreads();
                for (int stride = kThreads / 2; stride > 0; stride /= 2)
                {
                    if (threadIdx.x < stride)
                    {
                        for (int i = 0; i < 3; ++i)
                        {
                            partial[i][threadIdx.x] += partial[i][threadIdx.x + stride];
                        }
                    }
                    __syncthreads();
                }
                if (threadIdx.x == 0)
                {
                    doRotate = rankkeep::jacobiRotation(partial[0][0], partial[1][0], partial[2][0], rotation[0],
                        rotation[1]);
                    rotatedInSweep = rotatedInSweep || doRotate;
                }
                __syncthreads();
                if (doRotate)
                {
                    for (int64_t e = threadIdx.x; e < k.length; e += blockDim.x)
                    {
                        rankkeep::rotateElement(k, p, q, rotation[0], rotation[1], e);
                    }
                }
                __syncthreads();
            }
        }
        __syncthreads();
        if (!rotatedInSweep)
        {
            break;
        }
        __syncthreads(); // everyone has read the flag before thread 0 resets it
    }

    if (threadIdx.x == 0)
    {
        rank[b] = rankkeep::countRank(k);
        keep[b] = rankkeep::keepCount(params, rank[b], k.cols);
    }
}

template <typename T>
cudaError_t launch(T const* attention, bool const* raters, bool const* visualValid, int64_t* rank, int64_t* keep,
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

cudaError_t launchRankKeepCount(ElementType type, void const* attention, bool const* raters,
    bool const* visualValid, int64_t* rank, int64_t* keep, rankkeep::Shape const& shape,
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
