// Shared by every op's per-row header: the host/device qualifier, float conversions and the
// tie rule. Includes no TensorRT header, so kernels and the CPU test path compile without one.
#pragma once

#include <cstdint>
#include <math.h>

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

// Masks cross the plugin boundary as int32 (TensorRT does not support bool on plugin I/O):
// read nonzero as true, write exactly 0 or 1. Flags inside a workspace are bool.
SPARSEVLM_HD inline bool isSet(int32_t flag)
{
    return flag != 0;
}
SPARSEVLM_HD inline bool isSet(bool flag)
{
    return flag;
}

// The order of every op: torch.topk / torch.sort order, where NaN counts as larger than any
// number (+inf included), and the tie rule of OPS.md (the ONNX TopK rule): among equal scores
// (two NaNs are equal here) the lower index wins. A strict total order on (score, index), so
// the ranks of a row are a permutation and "the k best" are exactly k slots whatever the scores.
SPARSEVLM_HD inline bool ranksBefore(float scoreA, int64_t indexA, float scoreB, int64_t indexB)
{
    bool const nanA = scoreA != scoreA;
    bool const nanB = scoreB != scoreB;
    if (nanA || nanB)
    {
        return nanA && (!nanB || indexA < indexB);
    }
    return scoreA > scoreB || (scoreA == scoreB && indexA < indexB);
}

// The score slot j sorts by: its score when eligible, else -inf. This is how the reference
// masks slots out (`scores.masked_fill(~valid, -inf)`, then a stable descending sort), so an
// eligible slot scored -inf ties with the masked ones and the lower index wins.
template <typename T, typename Flag>
SPARSEVLM_HD inline float maskedScore(T const* scores, Flag const* eligible, int64_t j)
{
    return eligible == nullptr || isSet(eligible[j]) ? toFloat(scores[j]) : -INFINITY;
}

// Position of slot i when all n slots of one row are sorted by descending masked score (order
// above). A permutation of 0..n-1 over the row. O(n): one thread per slot.
template <typename T, typename Flag>
SPARSEVLM_HD inline int64_t descendingRank(T const* scores, Flag const* eligible, int64_t n, int64_t i)
{
    float const score = maskedScore(scores, eligible, i);
    int64_t rank = 0;
    for (int64_t j = 0; j < n; ++j)
    {
        if (ranksBefore(maskedScore(scores, eligible, j), j, score, i))
        {
            ++rank;
        }
    }
    return rank;
}

// True when slot i is eligible and among the `keep` first of its row in that order
// (eligible == nullptr means every slot is eligible): the reference's topk_keep_mask.
template <typename T, typename Flag>
SPARSEVLM_HD inline bool isKept(T const* scores, Flag const* eligible, int64_t n, int64_t keep, int64_t i)
{
    bool const isEligible = eligible == nullptr || isSet(eligible[i]);
    return isEligible && descendingRank(scores, eligible, n, i) < keep;
}

} // namespace sparsevlm

namespace sparsevlm
{

// Number of set flags among flags[0..i): where the i-th set flag lands in a compacted list.
template <typename Flag>
SPARSEVLM_HD inline int64_t countSetBefore(Flag const* flags, int64_t i)
{
    int64_t count = 0;
    for (int64_t j = 0; j < i; ++j)
    {
        count += isSet(flags[j]) ? 1 : 0;
    }
    return count;
}

// Workspace sections are 256-byte aligned, like TensorRT's own workspace pointer.
SPARSEVLM_HD inline int64_t alignWorkspace(int64_t bytes)
{
    return (bytes + 255) / 256 * 256;
}

} // namespace sparsevlm
