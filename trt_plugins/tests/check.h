// The check counter shared by the test programs (harness.cpp, gpu_check.cu): each failed
// check prints one line; the program ends with `report(name)`, "name: N checks, F failed",
// and exits 0 iff nothing failed.
#pragma once

#include <cstdio>
#include <string>

namespace sparsevlm_tests
{

inline int gChecks = 0;
inline int gFailures = 0;

inline void check(bool ok, std::string const& what)
{
    ++gChecks;
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

inline int report(char const* program)
{
    std::printf("%s: %d checks, %d failed\n", program, gChecks, gFailures);
    return gFailures == 0 ? 0 : 1;
}

} // namespace sparsevlm_tests
