// Launch geometry shared by the kernels: kThreads threads per block (RankKeepCount's Jacobi
// sweeps use a larger block of their own), one per element of an element-wise stage, or one
// lane of a tile, scan chunk or reduction tree. The CPU path includes it too, to run those
// lanes in the same order.
#pragma once

#include <cstdint>

namespace sparsevlm
{

constexpr int kThreads = 256;

inline int64_t blocksFor(int64_t elements)
{
    return (elements + kThreads - 1) / kThreads;
}

} // namespace sparsevlm
