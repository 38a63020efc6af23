// Runs every kernel launcher on the GPU and compares it with the CPU path (runOnHost, the
// same per-element functions run serially), for float32 and float16. The CPU path itself is
// checked against the PyTorch reference by tests/test_trt_plugin_kernels.py, so together they
// check the real kernels against the reference. No TensorRT needed.
// Build: nvcc -std=c++17 -O2 -arch=sm_80 gpu_check.cu ../*/*_kernel.cu -o gpu_check
//
//   gpu_check                      small shapes, edge cases (k = 0, k = N, W below and above
//                                  the kept count, rank-deficient rows)
//   gpu_check --llava              LLaVA-1.5-7B shapes (llava_cases.h): every launcher against
//                                  the CPU path, timed (CUDA events), one table row per case
//   gpu_check --llava --dry-run    no device: the CPU path at those shapes, checked by brute
//                                  force, and the table with "n/a (dry run)" times
//   --warmup N / --runs N          timing (default 3 warm-up runs, median of 20)
// Prints one line per failed check and "gpu_check: N checks, F failed"; exits 0 iff F == 0,
// 77 when no CUDA device is present (except in --dry-run).
#include "../RankKeepCount/rank_keep_count_kernel.h"
#include "../TokenPrune/token_prune_kernel.h"
#include "../TokenRecycle/token_recycle_kernel.h"
#include "../TopKTokenSelect/topk_token_select_kernel.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "llava_cases.h"

using namespace sparsevlm;

namespace
{

using sparsevlm_tests::check;
using sparsevlm_tests::gChecks;
using sparsevlm_tests::gFailures;

// A device copy of a host vector, freed with the object.
template <typename T>
struct DeviceBuffer
{
    explicit DeviceBuffer(std::vector<T> const& host)
        : count(host.size())
    {
        cudaMalloc(&data, bytes());
        cudaMemcpy(data, host.data(), bytes(), cudaMemcpyHostToDevice);
    }
    explicit DeviceBuffer(size_t n)
        : count(n)
    {
        cudaMalloc(&data, bytes());
        cudaMemset(data, 0x7F, bytes()); // garbage: every output element must be written
    }
    ~DeviceBuffer()
    {
        cudaFree(data);
    }
    size_t bytes() const
    {
        return count * sizeof(T) + 1;
    }
    std::vector<T> toHost() const
    {
        std::vector<T> host(count);
        cudaMemcpy(host.data(), data, count * sizeof(T), cudaMemcpyDeviceToHost);
        return host;
    }
    T* data = nullptr;
    size_t count;
};

// Raw bytes, for workspaces.
struct Workspace
{
    explicit Workspace(int64_t bytes)
    {
        cudaMalloc(&data, static_cast<size_t>(bytes) + 256);
    }
    ~Workspace()
    {
        cudaFree(data);
    }
    void* data = nullptr;
};

std::mt19937 gRandom(1234);

template <typename T>
std::vector<T> randomValues(size_t n, int distinct = 0)
{
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int> small(0, distinct > 0 ? distinct - 1 : 0);
    std::vector<T> values(n);
    for (T& v : values)
    {
        v = fromFloat<T>(distinct > 0 ? static_cast<float>(small(gRandom)) : normal(gRandom));
    }
    return values;
}

std::vector<bool> randomMask(size_t n, double probability)
{
    std::bernoulli_distribution keep(probability);
    std::vector<bool> mask(n);
    for (size_t i = 0; i < n; ++i)
    {
        mask[i] = keep(gRandom);
    }
    return mask;
}

// std::vector<bool> is packed: masks travel as arrays of int32 0/1 (the plugins' mask type).
std::vector<int32_t> asBytes(std::vector<bool> const& mask)
{
    return std::vector<int32_t>(mask.begin(), mask.end());
}

template <typename T>
bool sameValues(std::vector<T> const& a, std::vector<T> const& b, float tolerance)
{
    if (a.size() != b.size())
    {
        return false;
    }
    for (size_t i = 0; i < a.size(); ++i)
    {
        float const x = toFloat(a[i]);
        float const y = toFloat(b[i]);
        if (!(std::fabs(x - y) <= tolerance * (1.0F + std::fabs(y))))
        {
            return false;
        }
    }
    return true;
}

template <typename T>
bool sameBits(std::vector<T> const& a, std::vector<T> const& b)
{
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <typename T>
ElementType typeOf();
template <>
ElementType typeOf<float>()
{
    return ElementType::kFLOAT32;
}
template <>
ElementType typeOf<__half>()
{
    return ElementType::kFLOAT16;
}

template <typename T>
void checkTopK(char const* typeName)
{
    int64_t const batch = 3, tokens = 576, dim = 64;
    for (int64_t k : {int64_t{0}, int64_t{1}, int64_t{144}, tokens})
    {
        std::vector<T> const x = randomValues<T>(batch * tokens * dim);
        std::vector<T> const scores = randomValues<T>(batch * tokens, 7); // many ties
        std::vector<T> wantSelected(batch * k * dim);
        std::vector<int64_t> wantIndices(batch * k);
        std::vector<char> hostWorkspace(topk::workspaceSize(batch, tokens) + 1);
        topk::runOnHost(x.data(), scores.data(), wantSelected.data(), wantIndices.data(), batch, tokens, dim, k,
            hostWorkspace.data());

        DeviceBuffer<T> dx(x), dScores(scores), dSelected(wantSelected.size());
        DeviceBuffer<int64_t> dIndices(wantIndices.size());
        Workspace workspace(topk::workspaceSize(batch, tokens));
        cudaError_t status = launchTopKTokenSelect(typeOf<T>(), dx.data, dScores.data, dSelected.data, dIndices.data,
            batch, tokens, dim, k, workspace.data, nullptr);
        status = status == cudaSuccess ? cudaDeviceSynchronize() : status;
        std::string const label = std::string("TopKTokenSelect ") + typeName + " k=" + std::to_string(k);
        check(status == cudaSuccess, label + ": launch (" + cudaGetErrorString(status) + ")");
        check(dIndices.toHost() == wantIndices, label + ": indices");
        check(sameBits(dSelected.toHost(), wantSelected), label + ": selected");
    }
}

template <typename T>
void checkPrune(char const* typeName)
{
    prune::Shape const s{4, 576, 18, 64, 0};
    std::vector<T> const visual = randomValues<T>(s.batch * s.numVisual * s.dim);
    std::vector<T> const merged = randomValues<T>(s.batch * s.numMerged * s.dim);
    std::vector<T> const scores = randomValues<T>(s.batch * s.numVisual, 11);
    std::vector<int32_t> const visualValid = asBytes(randomMask(s.batch * s.numVisual, 0.9));
    std::vector<int32_t> const mergedValid = asBytes(randomMask(s.batch * s.numMerged, 0.6));
    std::vector<int64_t> const keep{0, 100, 300, 576};
    for (int64_t width : {int64_t{100}, int64_t{320}, int64_t{600}})
    {
        prune::Shape shape = s;
        shape.width = width;
        std::vector<T> wantPruned(shape.batch * width * shape.dim);
        std::vector<int32_t> wantValid(shape.batch * width);
        std::vector<int64_t> wantSource(shape.batch * width);
        std::vector<char> hostWorkspace(prune::workspaceSize(shape.batch, shape.numVisual) + 1);
        prune::runOnHost(visual.data(), scores.data(), visualValid.data(), keep.data(),
            merged.data(), mergedValid.data(), wantPruned.data(),
            wantValid.data(), wantSource.data(), shape, hostWorkspace.data());

        DeviceBuffer<T> dVisual(visual), dScores(scores), dMerged(merged), dPruned(wantPruned.size());
        DeviceBuffer<int32_t> dVisualValid(visualValid), dMergedValid(mergedValid), dValid(wantValid.size());
        DeviceBuffer<int64_t> dKeep(keep), dSource(wantSource.size());
        Workspace workspace(prune::workspaceSize(shape.batch, shape.numVisual));
        cudaError_t status = launchTokenPrune(typeOf<T>(), dVisual.data, dScores.data,
            dVisualValid.data, dKeep.data, dMerged.data,
            dMergedValid.data, dPruned.data, dValid.data,
            dSource.data, shape, workspace.data, nullptr);
        status = status == cudaSuccess ? cudaDeviceSynchronize() : status;
        std::string const label = std::string("TokenPrune ") + typeName + " W=" + std::to_string(width);
        check(status == cudaSuccess, label + ": launch (" + cudaGetErrorString(status) + ")");
        check(dSource.toHost() == wantSource, label + ": source_index");
        check(dValid.toHost() == wantValid, label + ": pruned_valid");
        check(sameBits(dPruned.toHost(), wantPruned), label + ": pruned");
    }
}

// `deleted[b]` tokens of row b are deleted (keep_count = its valid count - deleted[b]; -1: all
// kept, whatever the count).
template <typename T>
void checkRecycle(char const* typeName, recycle::Shape const& s, std::vector<int64_t> const& deleted)
{
    std::vector<T> const visual = randomValues<T>(s.batch * s.numVisual * s.dim);
    std::vector<T> const scores = randomValues<T>(s.batch * s.numVisual);
    std::vector<int32_t> const valid = asBytes(randomMask(s.batch * s.numVisual, 0.95));
    std::vector<int64_t> keep(s.batch);
    for (int64_t b = 0; b < s.batch; ++b)
    {
        int64_t const validCount = countSetBefore(valid.data() + b * s.numVisual, s.numVisual);
        keep[b] = deleted[b] < 0 ? s.numVisual : std::max<int64_t>(validCount - deleted[b], 0);
    }
    int64_t const clusters = s.clusterBound();
    std::vector<T> wantMerged(s.batch * clusters * s.dim);
    std::vector<int32_t> wantValid(s.batch * clusters);
    std::vector<char> hostWorkspace(recycle::workspaceSize(s) + 256);
    recycle::runOnHost(visual.data(), scores.data(), valid.data(), keep.data(),
        wantMerged.data(), wantValid.data(), s, hostWorkspace.data());

    DeviceBuffer<T> dVisual(visual), dScores(scores), dMerged(wantMerged.size());
    DeviceBuffer<int32_t> dValid(valid), dMergedValid(wantValid.size());
    DeviceBuffer<int64_t> dKeep(keep);
    Workspace workspace(recycle::workspaceSize(s));
    cudaError_t status = launchTokenRecycle(typeOf<T>(), dVisual.data, dScores.data,
        dValid.data, dKeep.data, dMerged.data, dMergedValid.data,
        s, workspace.data, nullptr);
    status = status == cudaSuccess ? cudaDeviceSynchronize() : status;
    std::string const label = std::string("TokenRecycle ") + typeName + " V=" + std::to_string(s.numVisual)
        + " D=" + std::to_string(s.dim) + " candidates " + std::to_string(s.candidatePercent) + "%";
    check(status == cudaSuccess, label + ": launch (" + cudaGetErrorString(status) + ")");
    check(dMergedValid.toHost() == wantValid, label + ": merged_valid");
    // The device may contract a * b + c into one FMA where the host rounds twice: close, not
    // equal; in float16 that can move the stored value by one unit in the last place (~1e-3).
    float const tolerance = sizeof(T) == 2 ? 2e-3F : 1e-4F;
    check(sameValues(dMerged.toHost(), wantMerged, tolerance), label + ": merged");
}

template <typename T>
void checkRank(char const* typeName, rankkeep::Shape const& s)
{
    std::vector<T> attention = randomValues<T>(s.batch * s.numRaters * s.numVisual);
    // Row 1: rank 5 (rows repeat every 5); row 2: rank 1 (one row repeated).
    for (int64_t t = 5; t < s.numRaters; ++t)
    {
        for (int64_t v = 0; v < s.numVisual; ++v)
        {
            attention[(1 * s.numRaters + t) * s.numVisual + v] = attention[(1 * s.numRaters + t % 5) * s.numVisual + v];
            attention[(2 * s.numRaters + t) * s.numVisual + v] = attention[(2 * s.numRaters) * s.numVisual + v];
        }
    }
    std::vector<int32_t> const raters = asBytes(randomMask(s.batch * s.numRaters, 0.8));
    std::vector<int32_t> const visualValid = asBytes(randomMask(s.batch * s.numVisual, 0.9));
    rankkeep::RuleParams const params{rankkeep::Rule::kV10, 13.5F, 0.0F, 0.0F};
    std::vector<int64_t> wantRank(s.batch), wantKeep(s.batch);
    std::vector<char> hostWorkspace(rankkeep::workspaceSize(s) + 8);
    rankkeep::runOnHost(attention.data(), raters.data(),
        visualValid.data(), wantRank.data(), wantKeep.data(), s, params,
        hostWorkspace.data());

    DeviceBuffer<T> dAttention(attention);
    DeviceBuffer<int32_t> dRaters(raters), dVisualValid(visualValid);
    DeviceBuffer<int64_t> dRank(s.batch), dKeep(s.batch);
    Workspace workspace(rankkeep::workspaceSize(s));
    cudaError_t status = launchRankKeepCount(typeOf<T>(), dAttention.data, dRaters.data,
        dVisualValid.data, dRank.data, dKeep.data, s, params, workspace.data, nullptr);
    status = status == cudaSuccess ? cudaDeviceSynchronize() : status;
    std::string const label = std::string("RankKeepCount ") + typeName + " T=" + std::to_string(s.numRaters)
        + " V=" + std::to_string(s.numVisual);
    check(status == cudaSuccess, label + ": launch (" + cudaGetErrorString(status) + ")");
    check(dRank.toHost() == wantRank, label + ": rank");
    check(dKeep.toHost() == wantKeep, label + ": keep_count");
    check(wantRank[1] <= 5 && wantRank[2] <= 1, label + ": constructed ranks are deficient");
}

// The LLaVA-1.5-7B cases through the launchers (the table's "kernel" rows).
cudaError_t launchCase(sparsevlm_tests::Case const& c, sparsevlm_tests::DeviceTensors& d, cudaStream_t stream)
{
    using sparsevlm_tests::Op;
    std::vector<void*> const& in = d.inputs;
    std::vector<void*> const& out = d.outputs;
    switch (c.op)
    {
    case Op::kTopK:
        return launchTopKTokenSelect(c.type, in[0], in[1], out[0], static_cast<int64_t*>(out[1]), c.batch,
            c.inputs[0].shape[1], c.inputs[0].shape[2], c.k, d.workspace, stream);
    case Op::kPrune:
        return launchTokenPrune(c.type, in[0], in[1], static_cast<int32_t const*>(in[2]),
            static_cast<int64_t const*>(in[3]), in[4], static_cast<int32_t const*>(in[5]), out[0],
            static_cast<int32_t*>(out[1]), static_cast<int64_t*>(out[2]), c.pruneShape, d.workspace, stream);
    case Op::kRecycle:
        return launchTokenRecycle(c.type, in[0], in[1], static_cast<int32_t const*>(in[2]),
            static_cast<int64_t const*>(in[3]), out[0], static_cast<int32_t*>(out[1]), c.recycleShape, d.workspace,
            stream);
    case Op::kRank:
        return launchRankKeepCount(c.type, in[0], static_cast<int32_t const*>(in[1]),
            static_cast<int32_t const*>(in[2]), static_cast<int64_t*>(out[0]), static_cast<int64_t*>(out[1]),
            c.rankShape, c.rankParams, d.workspace, stream);
    }
    return cudaErrorInvalidValue;
}

void runLlavaCases(bool dryRun, int warmup, int runs)
{
    sparsevlm_tests::printTableHeader("gpu_check", "kernel launchers",
        dryRun ? " (dry run: the CPU path, checked by brute force; no device code)" : "", warmup, runs);
    sparsevlm_tests::forEachCase(true,
        [&](sparsevlm_tests::Case const& c)
        {
            sparsevlm_tests::Timing timing;
            if (!dryRun)
            {
                timing = sparsevlm_tests::runAndTime(c, "kernel " + sparsevlm_tests::rowLabel(c), warmup, runs,
                    [&](sparsevlm_tests::DeviceTensors& d, cudaStream_t stream) { return launchCase(c, d, stream); });
            }
            sparsevlm_tests::printRow("kernel", c, timing, dryRun);
        });
}

} // namespace

int main(int argc, char** argv)
{
    bool llava = false;
    bool dryRun = false;
    int warmup = 3;
    int runs = 20;
    for (int i = 1; i < argc; ++i)
    {
        std::string const arg = argv[i];
        if (arg == "--llava")
        {
            llava = true;
        }
        else if (arg == "--dry-run")
        {
            dryRun = true;
        }
        else if ((arg == "--warmup" || arg == "--runs") && i + 1 < argc && std::atoi(argv[i + 1]) > 0)
        {
            (arg == "--warmup" ? warmup : runs) = std::atoi(argv[++i]);
        }
        else
        {
            std::fprintf(stderr, "gpu_check: unknown argument %s; usage: gpu_check [--llava [--dry-run] "
                                 "[--warmup N] [--runs N]]\n", argv[i]);
            return 2;
        }
    }
    if (dryRun && !llava)
    {
        std::fprintf(stderr, "gpu_check: --dry-run needs --llava\n");
        return 2;
    }
    int devices = 0;
    if (!dryRun && (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0))
    {
        std::printf("gpu_check: no CUDA device\n");
        return 77;
    }
    if (llava)
    {
        runLlavaCases(dryRun, warmup, runs);
        return sparsevlm_tests::report("gpu_check");
    }
    checkTopK<float>("float32");
    checkTopK<__half>("float16");
    checkPrune<float>("float32");
    checkPrune<__half>("float16");
    // Pools of all the deleted tokens down to none, at the default candidate share; then (99 %:
    // pool = deleted) pools of 1, tile - 1, tile + 1 and 2 tiles + 1 candidates with a hidden
    // size off the slice: the edges of the Gram tiling.
    int64_t const tile = recycle::kGramTile;
    recycle::Shape const defaultPool{4, 576, 64, 30, 10};
    recycle::Shape const tileEdges{4, 2 * tile + 8, 2 * recycle::kGramSlice + 5, 99, 3};
    checkRecycle<float>("float32", defaultPool, {576, 370, 60, -1});
    checkRecycle<__half>("float16", defaultPool, {576, 370, 60, -1});
    checkRecycle<float>("float32", tileEdges, {1, tile - 1, tile + 1, 2 * tile + 1});
    checkRecycle<__half>("float16", tileEdges, {1, tile - 1, tile + 1, 2 * tile + 1});
    // Masks over several scan chunks: 576 visual tokens; then more raters than a chunk and
    // than valid tokens (the block is stored transposed).
    checkRank<float>("float32", rankkeep::Shape{4, 40, 576});
    checkRank<__half>("float16", rankkeep::Shape{4, 40, 576});
    checkRank<float>("float32", rankkeep::Shape{4, kThreads + 40, 24});
    checkRank<__half>("float16", rankkeep::Shape{4, kThreads + 40, 24});
    return sparsevlm_tests::report("gpu_check");
}
