// Launch geometry shared by the element-wise kernels: one thread per element.
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
