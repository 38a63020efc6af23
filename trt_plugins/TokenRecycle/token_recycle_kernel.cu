// CUDA kernels of TokenRecycle: the stages of token_recycle.h, one thread per element. The
// small per-row stages run in one block per row, separated by __syncthreads(); the two heavy
// ones (pair distances and the merge over D) get a block per (row, candidate or cluster).
#include "token_recycle_kernel.h"

#include "../common/launch.h"

namespace sparsevlm
{
namespace
{

// Stages 1-2: deleted flags, counts, candidate slots. One block per row.
template <typename T>
__global__ void candidateKernel(
    T const* scores, int32_t const* visualValid, int64_t const* keepCount, recycle::Shape s, void* workspace)
{
    int64_t const b = blockIdx.x;
    T const* rowScores = scores + b * s.numVisual;
    recycle::RowScratch const r = recycle::rowScratch(workspace, s, b);
    for (int64_t i = threadIdx.x; i < s.numVisual; i += blockDim.x)
    {
        r.deleted[i] = recycle::isDeleted(rowScores, visualValid + b * s.numVisual, s.numVisual, keepCount[b], i);
    }
    __syncthreads();
    if (threadIdx.x == 0)
    {
        recycle::writeCounts(r, s);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < s.numVisual; i += blockDim.x)
    {
        recycle::writeCandidate(rowScores, r, s, i);
    }
}

// Stage 3: block (row b, candidate i) fills dist[i][.].
template <typename T>
__global__ void distanceKernel(T const* visual, recycle::Shape s, void* workspace)
{
    int64_t const b = blockIdx.x;
    int64_t const i = blockIdx.y;
    recycle::RowScratch const r = recycle::rowScratch(workspace, s, b);
    int64_t const pool = r.counts[1];
    if (i >= pool)
    {
        return;
    }
    int64_t const poolBound = s.poolBound();
    for (int64_t j = threadIdx.x; j < pool; j += blockDim.x)
    {
        r.dist[i * poolBound + j] = recycle::candidateDistance(visual + b * s.numVisual * s.dim, r, s.dim, i, j);
    }
}

// Stages 4-6: density, centre scores, centres, assignment. One block per row.
__global__ void clusterKernel(recycle::Shape s, void* workspace)
{
    __shared__ float rowMaxDistance;
    int64_t const b = blockIdx.x;
    recycle::RowScratch const r = recycle::rowScratch(workspace, s, b);
    int64_t const pool = r.counts[1];
    int64_t const poolBound = s.poolBound();
    for (int64_t i = threadIdx.x; i < pool; i += blockDim.x)
    {
        r.density[i] = recycle::knnDensity(r, poolBound, i);
    }
    if (threadIdx.x == 0)
    {
        rowMaxDistance = recycle::maxDistance(r, poolBound);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < pool; i += blockDim.x)
    {
        r.centreScore[i] = recycle::centreScore(r, poolBound, rowMaxDistance, i);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < pool; i += blockDim.x)
    {
        recycle::writeCentre(r, i);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < pool; i += blockDim.x)
    {
        r.assignment[i] = recycle::assignCluster(r, poolBound, i);
    }
}

// Stage 7: block (row b, cluster j) writes merged[b, j, :] and merged_valid[b, j].
template <typename T>
__global__ void mergeKernel(T const* visual, T* merged, int32_t* mergedValid, recycle::Shape s, void* workspace)
{
    int64_t const b = blockIdx.x;
    int64_t const j = blockIdx.y;
    int64_t const clusterBound = s.clusterBound();
    recycle::RowScratch const r = recycle::rowScratch(workspace, s, b);
    for (int64_t d = threadIdx.x; d < s.dim; d += blockDim.x)
    {
        merged[(b * clusterBound + j) * s.dim + d]
            = fromFloat<T>(recycle::mergedElement(visual + b * s.numVisual * s.dim, r, s.dim, j, d));
    }
    if (threadIdx.x == 0)
    {
        mergedValid[b * clusterBound + j] = j < r.counts[2] ? 1 : 0;
    }
}

template <typename T>
cudaError_t launch(T const* visual, T const* scores, int32_t const* visualValid, int64_t const* keepCount, T* merged,
    int32_t* mergedValid, recycle::Shape const& s, void* workspace, cudaStream_t stream)
{
    if (s.batch == 0)
    {
        return cudaSuccess; // empty outputs
    }
    // V = 0 runs as well: no slot is deleted, so the C = 1 merged slot is written as zeros with
    // merged_valid 0 (the per-slot loops are empty).
    dim3 const rows(static_cast<unsigned>(s.batch));
    candidateKernel<<<rows, kThreads, 0, stream>>>(scores, visualValid, keepCount, s, workspace);
    distanceKernel<<<dim3(static_cast<unsigned>(s.batch), static_cast<unsigned>(s.poolBound())), kThreads, 0,
        stream>>>(visual, s, workspace);
    clusterKernel<<<rows, kThreads, 0, stream>>>(s, workspace);
    mergeKernel<<<dim3(static_cast<unsigned>(s.batch), static_cast<unsigned>(s.clusterBound())), kThreads, 0,
        stream>>>(visual, merged, mergedValid, s, workspace);
    return cudaGetLastError();
}

} // namespace

cudaError_t launchTokenRecycle(ElementType type, void const* visual, void const* scores, int32_t const* visualValid,
    int64_t const* keepCount, void* merged, int32_t* mergedValid, recycle::Shape const& shape, void* workspace,
    cudaStream_t stream)
{
    if (type == ElementType::kFLOAT16)
    {
        return launch(static_cast<__half const*>(visual), static_cast<__half const*>(scores), visualValid, keepCount,
            static_cast<__half*>(merged), mergedValid, shape, workspace, stream);
    }
    return launch(static_cast<float const*>(visual), static_cast<float const*>(scores), visualValid, keepCount,
        static_cast<float*>(merged), mergedValid, shape, workspace, stream);
}

} // namespace sparsevlm
