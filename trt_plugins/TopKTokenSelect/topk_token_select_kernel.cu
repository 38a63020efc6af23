// CUDA kernels of TopKTokenSelect: one thread per element for each stage of
// topk_token_select.h, so the device runs exactly the code the CPU tests check.
#include "topk_token_select_kernel.h"

#include "../common/launch.h"

namespace sparsevlm
{
namespace
{

template <typename T>
__global__ void selectKernel(T const* scores, bool* selected, int64_t batch, int64_t numTokens, int64_t k)
{
    int64_t const element = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (element < batch * numTokens)
    {
        int64_t const b = element / numTokens;
        selected[element] = topk::isSelected(scores + b * numTokens, numTokens, k, element % numTokens);
    }
}

__global__ void indexKernel(bool const* selected, int64_t* indices, int64_t batch, int64_t numTokens, int64_t k)
{
    int64_t const element = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (element < batch * numTokens)
    {
        int64_t const b = element / numTokens;
        topk::writeIndex(selected + b * numTokens, indices + b * k, k, element % numTokens);
    }
}

template <typename T>
__global__ void gatherKernel(
    T const* tokens, int64_t const* indices, T* selectedTokens, int64_t batch, int64_t numTokens, int64_t dim, int64_t k)
{
    int64_t const element = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (element < batch * k * dim)
    {
        int64_t const b = element / (k * dim);
        int64_t const j = element / dim % k;
        topk::gatherElement(tokens + b * numTokens * dim, indices + b * k, selectedTokens + b * k * dim, dim, j,
            element % dim);
    }
}

template <typename T>
cudaError_t launch(T const* tokens, T const* scores, T* selectedTokens, int64_t* indices, int64_t batch,
    int64_t numTokens, int64_t dim, int64_t k, void* workspace, cudaStream_t stream)
{
    if (k < 0 || k > numTokens)
    {
        return cudaErrorInvalidValue; // the outputs need k of the N slots
    }
    if (batch * k == 0)
    {
        return cudaSuccess; // empty outputs: nothing to write
    }
    bool* selected = static_cast<bool*>(workspace);
    selectKernel<<<blocksFor(batch * numTokens), kThreads, 0, stream>>>(scores, selected, batch, numTokens, k);
    indexKernel<<<blocksFor(batch * numTokens), kThreads, 0, stream>>>(selected, indices, batch, numTokens, k);
    if (dim > 0)
    {
        gatherKernel<<<blocksFor(batch * k * dim), kThreads, 0, stream>>>(
            tokens, indices, selectedTokens, batch, numTokens, dim, k);
    }
    return cudaGetLastError();
}

} // namespace

cudaError_t launchTopKTokenSelect(ElementType type, void const* tokens, void const* scores, void* selected,
    int64_t* indices, int64_t batch, int64_t numTokens, int64_t dim, int64_t k, void* workspace, cudaStream_t stream)
{
    if (type == ElementType::kFLOAT16)
    {
        return launch(static_cast<__half const*>(tokens), static_cast<__half const*>(scores),
            static_cast<__half*>(selected), indices, batch, numTokens, dim, k, workspace, stream);
    }
    return launch(static_cast<float const*>(tokens), static_cast<float const*>(scores), static_cast<float*>(selected),
        indices, batch, numTokens, dim, k, workspace, stream);
}

} // namespace sparsevlm
