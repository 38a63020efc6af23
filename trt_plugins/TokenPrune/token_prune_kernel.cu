// CUDA kernels of TokenPrune: one thread per element for each stage of token_prune.h, so the
// device runs exactly the code the CPU tests check.
#include "token_prune_kernel.h"

#include "../common/launch.h"

namespace sparsevlm
{
namespace
{

template <typename T>
__global__ void keptKernel(
    T const* scores, int32_t const* visualValid, int64_t const* keepCount, bool* kept, prune::Shape s)
{
    int64_t const element = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (element < s.batch * s.numVisual)
    {
        int64_t const b = element / s.numVisual;
        kept[element] = prune::isKeptSlot(scores + b * s.numVisual, visualValid + b * s.numVisual, s.numVisual,
            keepCount[b], element % s.numVisual);
    }
}

__global__ void scatterKernel(bool const* kept, int32_t const* mergedValid, int64_t* sourceIndex, prune::Shape s)
{
    int64_t const slots = s.numVisual + s.numMerged;
    int64_t const element = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (element < s.batch * slots)
    {
        int64_t const b = element / slots;
        prune::scatterSource(kept + b * s.numVisual, mergedValid + b * s.numMerged, sourceIndex + b * s.width,
            s.numVisual, s.width, element % slots);
    }
}

template <typename T>
__global__ void gatherKernel(
    T const* visual, T const* merged, int64_t const* sourceIndex, T* pruned, int32_t* prunedValid, prune::Shape s)
{
    int64_t const element = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (element < s.batch * s.width * s.dim)
    {
        int64_t const b = element / (s.width * s.dim);
        int64_t const j = element / s.dim % s.width;
        prune::gatherElement(visual + b * s.numVisual * s.dim, merged + b * s.numMerged * s.dim,
            sourceIndex + b * s.width, pruned + b * s.width * s.dim, prunedValid + b * s.width, s.numVisual, s.dim, j,
            element % s.dim);
    }
}

template <typename T>
cudaError_t launch(T const* visual, T const* scores, int32_t const* visualValid, int64_t const* keepCount,
    T const* merged, int32_t const* mergedValid, T* pruned, int32_t* prunedValid, int64_t* sourceIndex,
    prune::Shape const& s, void* workspace, cudaStream_t stream)
{
    if (s.batch * s.width == 0)
    {
        return cudaSuccess; // empty outputs: nothing to write
    }
    if (s.dim < 1)
    {
        return cudaErrorInvalidValue; // stage 3 writes pruned_valid from its d = 0 thread
    }
    // All bytes 0xFF is -1 in int64: every output slot starts as padding.
    cudaError_t status = cudaMemsetAsync(sourceIndex, 0xFF, s.batch * s.width * sizeof(int64_t), stream);
    if (status != cudaSuccess)
    {
        return status;
    }
    bool* kept = static_cast<bool*>(workspace);
    if (s.numVisual > 0)
    {
        keptKernel<<<blocksFor(s.batch * s.numVisual), kThreads, 0, stream>>>(scores, visualValid, keepCount, kept, s);
    }
    if (s.numVisual + s.numMerged > 0)
    {
        scatterKernel<<<blocksFor(s.batch * (s.numVisual + s.numMerged)), kThreads, 0, stream>>>(
            kept, mergedValid, sourceIndex, s);
    }
    gatherKernel<<<blocksFor(s.batch * s.width * s.dim), kThreads, 0, stream>>>(
        visual, merged, sourceIndex, pruned, prunedValid, s);
    return cudaGetLastError();
}

} // namespace

cudaError_t launchTokenPrune(ElementType type, void const* visual, void const* scores, int32_t const* visualValid,
    int64_t const* keepCount, void const* merged, int32_t const* mergedValid, void* pruned, int32_t* prunedValid,
    int64_t* sourceIndex, prune::Shape const& shape, void* workspace, cudaStream_t stream)
{
    if (type == ElementType::kFLOAT16)
    {
        return launch(static_cast<__half const*>(visual), static_cast<__half const*>(scores), visualValid, keepCount,
            static_cast<__half const*>(merged), mergedValid, static_cast<__half*>(pruned), prunedValid, sourceIndex,
            shape, workspace, stream);
    }
    return launch(static_cast<float const*>(visual), static_cast<float const*>(scores), visualValid, keepCount,
        static_cast<float const*>(merged), mergedValid, static_cast<float*>(pruned), prunedValid, sourceIndex, shape,
        workspace, stream);
}

} // namespace sparsevlm
