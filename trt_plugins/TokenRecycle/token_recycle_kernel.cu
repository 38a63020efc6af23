// CUDA kernels of TokenRecycle: the stages of token_recycle.h. The small per-row stages run in
// one block per row, separated by __syncthreads(); the two heavy ones get many blocks per row:
// the candidates' Gram matrix as a tiled matrix product (a block per tile on or above the
// diagonal, both operand slices staged in shared memory, float32 sums), and the merge over D
// (a block per (row, cluster)). The row's max distance is a block reduction.
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

// Stage 3: block (tile column, tile row, batch row), kThreads threads, computes one
// kGramTile x kGramTile tile of the candidates' Gram matrix, tile row <= tile column (the other
// half is its transpose). The next slice is fetched into registers while the staged one is
// multiplied (the loads' latency hides behind the arithmetic).
template <typename T>
__global__ void gramKernel(T const* visual, recycle::Shape s, void* workspace)
{
    __shared__ float sliceRows[recycle::kGramTile * recycle::kGramSliceStride];
    __shared__ float sliceColumns[recycle::kGramTile * recycle::kGramSliceStride];
    int64_t const tileColumn = blockIdx.x;
    int64_t const tileRow = blockIdx.y;
    int64_t const b = blockIdx.z;
    recycle::RowScratch const r = recycle::rowScratch(workspace, s, b);
    if (tileRow > tileColumn || tileColumn * recycle::kGramTile >= r.counts[1])
    {
        return; // the transpose of another tile, or past this row's pool
    }
    T const* rowVisual = visual + b * s.numVisual * s.dim;
    bool const diagonal = tileRow == tileColumn; // both operands are the same candidates
    int const thread = threadIdx.x;
    int64_t const firstRow = tileRow * recycle::kGramTile;
    int64_t const firstColumn = tileColumn * recycle::kGramTile;
    float sums[recycle::kGramRowsPerThread] = {};
    float nextRows[recycle::kGramLoadsPerThread];
    float nextColumns[recycle::kGramLoadsPerThread];
    recycle::fetchGramSlice(rowVisual, r, s.dim, firstRow, 0, thread, nextRows);
    if (!diagonal)
    {
        recycle::fetchGramSlice(rowVisual, r, s.dim, firstColumn, 0, thread, nextColumns);
    }
    for (int64_t d0 = 0; d0 < s.dim; d0 += recycle::kGramSlice)
    {
        recycle::storeGramSlice(nextRows, thread, sliceRows);
        if (!diagonal)
        {
            recycle::storeGramSlice(nextColumns, thread, sliceColumns);
        }
        __syncthreads(); // the slices are staged
        // The next slice's loads are in flight while this one is multiplied.
        if (d0 + recycle::kGramSlice < s.dim)
        {
            recycle::fetchGramSlice(rowVisual, r, s.dim, firstRow, d0 + recycle::kGramSlice, thread, nextRows);
            if (!diagonal)
            {
                recycle::fetchGramSlice(
                    rowVisual, r, s.dim, firstColumn, d0 + recycle::kGramSlice, thread, nextColumns);
            }
        }
        recycle::accumulateGramSlice(sliceRows, diagonal ? sliceRows : sliceColumns, thread, sums);
        __syncthreads(); // everyone is done with the slices before the next ones are stored
    }
    recycle::storeGramSums(r, s.poolBound(), tileRow, tileColumn, thread, sums);
}

// Stages 3d-6: distances from the Gram matrix, density, the row's max distance, centre scores,
// centres, assignment. One block per row.
__global__ void clusterKernel(recycle::Shape s, void* workspace)
{
    __shared__ float maxShares[kThreads];
    int64_t const b = blockIdx.x;
    recycle::RowScratch const r = recycle::rowScratch(workspace, s, b);
    int64_t const pool = r.counts[1];
    int64_t const poolBound = s.poolBound();
    for (int64_t e = threadIdx.x; e < pool * pool; e += blockDim.x)
    {
        recycle::gramToDistance(r, poolBound, s.dim, e / pool, e % pool);
    }
    __syncthreads(); // every distance is written
    for (int64_t i = threadIdx.x; i < pool; i += blockDim.x)
    {
        r.density[i] = recycle::knnDensity(r, poolBound, i);
    }
    maxShares[threadIdx.x] = recycle::maxDistanceShare(r, poolBound, threadIdx.x, blockDim.x);
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2)
    {
        if (threadIdx.x < width)
        {
            recycle::maxReduceStep(maxShares, width, threadIdx.x);
        }
        __syncthreads();
    }
    float const rowMaxDistance = maxShares[0];
    if (threadIdx.x == 0)
    {
        r.rowMax[0] = rowMaxDistance;
    }
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
    auto const tiles = static_cast<unsigned>(recycle::gramTiles(s.poolBound()));
    gramKernel<<<dim3(tiles, tiles, static_cast<unsigned>(s.batch)), kThreads, 0, stream>>>(visual, s, workspace);
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
