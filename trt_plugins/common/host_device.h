// Shared by every op's per-row header: the host/device qualifier, float conversions and the
// tie rule. Includes no TensorRT header, so kernels and the CPU test path compile without one.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define SPARSEVLM_HD __host__ __device__
#else
// Compiled by a plain C++ compiler (the CPU test path): the same functions, host only.
#define SPARSEVLM_HD
#endif

namespace sparsevlm
{

// Element types the kernels are instantiated for. Our own enum, not nvinfer1::DataType, so
// that the kernel sources stay independent of the TensorRT headers.
enum class ElementType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
};

// Scores, distances and ranks are computed in float32 whatever the tensor type (OPS.md).
SPARSEVLM_HD inline float toFloat(float x)
{
    return x;
}
template <typename T>
SPARSEVLM_HD inline T fromFloat(float x);
template <>
SPARSEVLM_HD inline float fromFloat<float>(float x)
{
    return x;
}

#ifdef __CUDACC__
SPARSEVLM_HD inline float toFloat(__half x)
{
    return __half2float(x);
}
template <>
SPARSEVLM_HD inline __half fromFloat<__half>(float x)
{
    return __float2half(x);
}
#endif

// The tie rule of every op (the ONNX TopK rule): slot a ranks before slot b when its score is
// larger, or the scores are equal and its index is lower.
SPARSEVLM_HD inline bool ranksBefore(float scoreA, int64_t indexA, float scoreB, int64_t indexB)
{
    return scoreA > scoreB || (scoreA == scoreB && indexA < indexB);
}

// Position of slot i when the slots of one row with eligible[j] set are sorted by descending
// score (tie rule above). Only meaningful for an eligible slot i. O(n): one thread per slot.
template <typename T>
SPARSEVLM_HD inline int64_t descendingRank(
    T const* scores, bool const* eligible, int64_t n, int64_t i)
{
    float const score = toFloat(scores[i]);
    int64_t rank = 0;
    for (int64_t j = 0; j < n; ++j)
    {
        bool const isEligible = eligible == nullptr || eligible[j];
        if (isEligible && ranksBefore(toFloat(scores[j]), j, score, i))
        {
            ++rank;
        }
    }
    return rank;
}

// True when slot i is one of the `keep` best eligible slots of its row (eligible == nullptr
// means every slot is eligible).
template <typename T>
SPARSEVLM_HD inline bool isKept(T const* scores, bool const* eligible, int64_t n, int64_t keep, int64_t i)
{
    bool const isEligible = eligible == nullptr || eligible[i];
    return isEligible && descendingRank(scores, eligible, n, i) < keep;
}

} // namespace sparsevlm

namespace sparsevlm
{

// Number of set flags among flags[0..i): where the i-th set flag lands in a compacted list.
SPARSEVLM_HD inline int64_t countSetBefore(bool const* flags, int64_t i)
{
    int64_t count = 0;
    for (int64_t j = 0; j < i; ++j)
    {
        count += flags[j] ? 1 : 0;
    }
    return count;
}

// Workspace sections are 256-byte aligned, like TensorRT's own workspace pointer.
SPARSEVLM_HD inline int64_t alignWorkspace(int64_t bytes)
{
    return (bytes + 255) / 256 * 256;
}

} // namespace sparsevlm
